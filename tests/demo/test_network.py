"""The multi-process federation: a real coordinator and `fedlm join` clients on 127.0.0.1 (mDNS)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.demo.config import DemoConfig
from edge_sdk.demo.errors import FederationError
from edge_sdk.demo.network import NetworkFederation, read_client_ledger
from edge_sdk.demo.tasks import generate, write_task_data

pytestmark = pytest.mark.timeout(600)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_two_clients_two_rounds_over_processes(tiny_gguf: Path, tmp_path: Path) -> None:
    config = DemoConfig(
        model=str(tiny_gguf),
        clients=2,
        rounds=2,
        local_steps=2,
        batch_size=2,
        seq_len=128,
        train_per_client=12,
        eval_per_family=1,
        precision="fp32",
        lr=1e-2,
        codec="delta+int8",
        greedy_eval=False,
    )
    paths, _ = write_task_data(generate(config.task_config()), tmp_path / "data")
    seen: list[tuple[int, dict[str, np.ndarray]]] = []
    events: list[dict[str, Any]] = []
    fed = NetworkFederation(
        work_dir=tmp_path / "fed",
        timeout_s=400.0,
        progress=lambda event, fields: events.append(fields),
    )
    record = fed.run(paths, config, lambda v, adapter: seen.append((v, adapter)))

    # Every version 1..rounds reached this process, and it moved the adapter away from version 0.
    assert [v for v, _ in seen] == [1, 2]
    assert len(record.versions) == 3
    final = record.versions[-1]
    assert set(final) == set(record.versions[0])
    b_keys = [k for k in final if k.endswith(".lora_B")]
    assert b_keys and not all(np.allclose(record.versions[0][k], final[k]) for k in b_keys)
    # The clients found the coordinator by mDNS (no URL was passed) and each sent one update per
    # round.
    for c in range(2):
        log = (tmp_path / "fed" / f"client-{c}.log").read_text()
        assert "on mDNS" in log and "finished" in log, log[-2000:]
        ledger = read_client_ledger(tmp_path / "fed" / f"client-{c}")
        assert ledger.updates == 2 and ledger.bytes_sent > 0
        assert sorted(ledger.loss) == [0, 1] and all(np.isfinite(list(ledger.loss.values())))
        # int8 codec: far fewer bytes than the same tensors in fp32.
        assert ledger.fp32_bytes > 2 * ledger.bytes_sent
    assert record.bytes_sent == [
        read_client_ledger(tmp_path / "fed" / f"client-{c}").bytes_sent for c in range(2)
    ]
    assert len(record.client_loss) == 2 and all(len(row) == 2 for row in record.client_loss)
    assert events and events[-1]["version"] == 2 and len(events[-1]["bytes_sent"]) == 2
    # Nothing is left running: the coordinator and both clients, and their process groups.
    assert len(fed.pids) == 3
    assert all(_gone(pid) and _group_gone(pid) for pid in fed.pids)


@pytest.mark.slow
def test_versions_queued_behind_a_slow_observer_are_all_delivered(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    """Clients can finish the task while `on_version` is still busy with an early version: the
    federation must then deliver the queued versions, not report the clients as stuck."""
    import time

    config = DemoConfig(
        model=str(tiny_gguf),
        clients=2,
        rounds=4,
        local_steps=1,
        batch_size=2,
        seq_len=128,
        train_per_client=8,
        eval_per_family=1,
        precision="fp32",
        codec="delta+int8",
        greedy_eval=False,
    )
    paths, _ = write_task_data(generate(config.task_config()), tmp_path / "data")
    seen: list[int] = []

    def slow_observer(version: int, adapter: dict[str, np.ndarray]) -> None:
        seen.append(version)
        # Each version takes longer than the grace after the last client exits (7 s), and the
        # tiny clients publish the next ones meanwhile: two or more versions queue up.
        time.sleep(8.0)

    fed = NetworkFederation(work_dir=tmp_path / "fed", timeout_s=400.0)
    fed.run(paths, config, slow_observer)
    assert seen[0] == 1 and seen[-1] == 4
    assert all(_gone(pid) for pid in fed.pids)


def test_a_coordinator_that_cannot_start_is_reported_and_nothing_is_left(tmp_path: Path) -> None:
    config = DemoConfig(
        model=str(tmp_path / "missing.gguf"), clients=2, rounds=1, greedy_eval=False
    )
    data = [tmp_path / "c0.jsonl", tmp_path / "c1.jsonl"]
    fed = NetworkFederation(work_dir=tmp_path / "fed", startup_timeout_s=60.0)
    with pytest.raises(FederationError, match="coordinator exited"):
        fed.run(data, config, lambda v, adapter: None)
    # The clients start alongside the coordinator; all three are stopped with their groups.
    assert len(fed.pids) == 3 and all(_gone(pid) and _group_gone(pid) for pid in fed.pids)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="`client_threads`"):
        NetworkFederation(client_threads=0)
    with pytest.raises(ValueError, match="`poll_s`"):
        NetworkFederation(poll_s=float("nan"))
