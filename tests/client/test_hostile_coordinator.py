"""The real client against a hostile coordinator (a real aiohttp server on 127.0.0.1).

Oversized answers are aborted with bounded memory, hostile tasks are refused before anything
is allocated, bad global adapters are refused while the previous one stays in service, and
a bad data file fails before any request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from coordinator.server import Service
from edge_sdk.client import ClientState, FederatedClient, Ledger, Transport
from edge_sdk.client.errors import (
    AdapterRefusedError,
    ProtocolError,
    ResponseTooLargeError,
    TaskRefusedError,
    TransportError,
)
from edge_sdk.client.task_policy import (
    SMALL_RESPONSE_BYTES,
    TaskPolicy,
    adapter_bytes_cap,
    target_shapes,
)
from edge_sdk.training.errors import DataFormatError
from edge_sdk.wire import GlobalAdapter, LoraSpec, WireError
from tests.client.helpers import (
    FAST_RETRY,
    TARGETS,
    client_config,
    coordinator_config,
    free_port,
    write_data,
)
from tests.client.hostile import (
    MIB,
    HostileCoordinator,
    global_body,
    good_tensors,
    rss_bytes,
    streaming,
    tiny_task,
)

pytestmark = pytest.mark.timeout(180)

HOSTILE_SIZE = 400 * MIB


def _shapes(model: Path) -> dict[str, tuple[int, int]]:
    from edge_sdk.adapters.gguf_lora import BaseModelInfo

    return target_shapes(BaseModelInfo.from_gguf(model).tensor_shapes, TARGETS)


# -- response caps --------------------------------------------------------------------------


def test_a_400_mib_adapter_is_aborted_and_memory_stays_bounded(tmp_path: Path, model: Path) -> None:
    data = write_data(tmp_path / "data.jsonl")
    task = tiny_task(model)

    async def scenario() -> tuple[int, int, list[int], HostileCoordinator, BaseException]:
        async with HostileCoordinator(task) as server:
            handler, sent = streaming(HOSTILE_SIZE)
            server.handlers["/v1/adapter"] = handler
            client = FederatedClient(
                client_config(
                    tmp_path / "state", model, data, coordinator_url=server.url, insecure=True
                )
            )
            baseline = rss_bytes()
            peak = [baseline]

            async def sample() -> None:
                while True:
                    peak[0] = max(peak[0], rss_bytes())
                    await asyncio.sleep(0.005)

            sampler = asyncio.create_task(sample())
            try:
                with pytest.raises(ResponseTooLargeError) as caught:
                    await asyncio.wait_for(client.run_async(), timeout=120)
            finally:
                sampler.cancel()
            await asyncio.sleep(0.2)  # let the server notice the hang-up
            return baseline, peak[0], sent, server, caught.value

    baseline, peak, sent, server, error = asyncio.run(scenario())
    cap = adapter_bytes_cap(_shapes(model), 4)
    logging.getLogger(__name__).info(
        "400 MiB adapter: cap %d B, server sent %d B before the hang-up, RSS +%.1f MiB",
        cap,
        sent[0],
        (peak - baseline) / MIB,
    )
    message = str(error)
    assert "GET /v1/adapter" in message and "read aborted" in message
    assert f"{cap / MIB:.1f} MiB" in message  # the cap the task implies, named
    assert cap < 2 * MIB  # r=4 on q/v of a 2-layer model: a few hundred KiB + slack
    # The client read at most the cap (plus what sat in socket buffers), never 400 MiB.
    assert sent[0] < 32 * MIB, sent[0]
    assert peak - baseline < 48 * MIB, (peak - baseline) / MIB
    assert server.requests["/v1/adapter"] == 1  # refused once, not retried
    kinds = [e.kind for e in ClientState(tmp_path / "state").ledger.entries()]
    assert kinds == ["join", "task", "adapter"]


@pytest.mark.parametrize("path", ["/v1/join", "/v1/task"])
@pytest.mark.parametrize("declared", [False, True], ids=["streamed", "content-length"])
def test_oversized_json_answers_are_refused(tmp_path: Path, path: str, declared: bool) -> None:
    async def scenario() -> tuple[BaseException, list[int], int]:
        async with HostileCoordinator(tiny_task_stub()) as server:
            handler, sent = streaming(HOSTILE_SIZE, content_length=declared)
            server.handlers[path] = handler
            async with Transport(
                server.url, Ledger(tmp_path / "outbox.jsonl"), retry=FAST_RETRY
            ) as t:
                with pytest.raises(ResponseTooLargeError) as caught:
                    if path == "/v1/join":
                        await t.join("a-join-token", "dev")
                    else:
                        await t.task()
            await asyncio.sleep(0.1)
            return caught.value, sent, server.requests[path]

    error, sent, requests = asyncio.run(scenario())
    assert path in str(error) and "read aborted" in str(error)
    assert ("Content-Length" in str(error)) == declared
    assert requests == 1 and sent[0] < 32 * MIB


def test_a_huge_error_body_is_truncated_not_buffered(tmp_path: Path) -> None:
    """A 500 with a 400 MiB body: each try reads at most the small cap, then retries end."""

    async def scenario() -> tuple[BaseException, list[int], int, int]:
        async with HostileCoordinator(tiny_task_stub()) as server:
            handler, sent = streaming(HOSTILE_SIZE, status=500)
            server.handlers["/v1/task"] = handler
            retry = FAST_RETRY.__class__(attempts=3, initial_s=0.01, max_s=0.02, jitter_s=0.0)
            before = rss_bytes()
            async with Transport(server.url, Ledger(tmp_path / "outbox.jsonl"), retry=retry) as t:
                with pytest.raises(TransportError) as caught:
                    await t.task()
            grown = rss_bytes() - before
            await asyncio.sleep(0.1)
            return caught.value, sent, server.requests["/v1/task"], grown

    error, sent, requests, grown = asyncio.run(scenario())
    assert "HTTP 500" in str(error) and requests == 3
    assert sent[0] < 3 * 32 * MIB and grown < 48 * MIB
    assert SMALL_RESPONSE_BYTES <= 1 * MIB


def tiny_task_stub() -> Any:
    """A task object for the transport-only tests (never sent to a client loop)."""
    from edge_sdk.wire import TaskConfig

    return TaskConfig(
        task_id="t", model_sha256="0" * 64, lora=LoraSpec(4, 8.0, TARGETS), codec="fp32",
        local_steps=1, batch_size=1, seq_len=8, lr=1e-3,
    )  # fmt: skip


# -- hostile tasks --------------------------------------------------------------------------

HOSTILE_TASKS: dict[str, tuple[dict[str, Any], str]] = {
    "seq_len": ({"seq_len": 2**40}, "`seq_len` = 1099511627776 exceeds"),
    "local_steps": ({"local_steps": 2**63 - 1}, "`local_steps` = 9223372036854775807 exceeds"),
    "rank": ({"lora": {"rank": 65536}}, "`lora.rank` = 65536 exceeds"),
    "lr": ({"lr": 1e300}, "`lr` = 1e+300 exceeds this client's bound (at most 1)"),
    "batch_size": ({"batch_size": 10**9}, "`batch_size` = 1000000000 exceeds"),
    "tokens_per_step": ({"batch_size": 256, "seq_len": 8192}, "`batch_size * seq_len` = 2097152"),
    "alpha": ({"lora": {"alpha": 1e30}}, "`lora.alpha / lora.rank`"),
    "target": ({"lora": {"targets": ["q_proj", "evil_proj"]}}, "`lora.targets` = ['evil_proj']"),
    "staleness": ({"extra": {"strategy": {"name": "fedbuff", "max_staleness": "soon"}}},
                  "`extra.strategy.max_staleness` = 'soon'"),
    "max_rounds": ({"max_rounds": 2**62}, "`max_rounds` = 4611686018427387904 exceeds"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE_TASKS))
def test_a_hostile_task_is_refused_before_anything_is_allocated(
    tmp_path: Path, model: Path, case: str
) -> None:
    override, expected = HOSTILE_TASKS[case]
    obj = tiny_task(model).to_json_dict()
    for key, value in override.items():
        if isinstance(value, dict) and key == "lora":
            obj["lora"].update(value)
        else:
            obj[key] = value
    data = write_data(tmp_path / "data.jsonl")

    async def scenario() -> tuple[BaseException, HostileCoordinator]:
        async with HostileCoordinator(tiny_task(model)) as server:

            async def hostile_task(request: web.Request) -> web.StreamResponse:
                return web.json_response(obj)

            server.handlers["/v1/task"] = hostile_task
            client = FederatedClient(
                client_config(
                    tmp_path / "state", model, data, coordinator_url=server.url, insecure=True
                )
            )
            with pytest.raises(TaskRefusedError) as caught:
                await asyncio.wait_for(client.run_async(), timeout=60)
            return caught.value, server

    error, server = asyncio.run(scenario())
    assert expected in str(error), str(error)
    assert "\n" not in str(error)
    # Nothing was sized by the task: no adapter download, no round, no update.
    assert [e.kind for e in ClientState(tmp_path / "state").ledger.entries()] == ["join", "task"]
    assert not (tmp_path / "state" / "train").exists()
    assert server.requests["/v1/adapter"] == 0


def test_an_unknown_codec_in_the_task_is_a_clear_protocol_error(
    tmp_path: Path, model: Path
) -> None:
    obj = tiny_task(model).to_json_dict()
    obj["codec"] = "evil+fp32"
    data = write_data(tmp_path / "data.jsonl")

    async def scenario() -> BaseException:
        async with HostileCoordinator(tiny_task(model)) as server:

            async def hostile_task(request: web.Request) -> web.StreamResponse:
                return web.json_response(obj)

            server.handlers["/v1/task"] = hostile_task
            client = FederatedClient(
                client_config(
                    tmp_path / "state", model, data, coordinator_url=server.url, insecure=True
                )
            )
            with pytest.raises(ProtocolError) as caught:
                await asyncio.wait_for(client.run_async(), timeout=60)
            return caught.value

    error = asyncio.run(scenario())
    assert "GET /v1/task" in str(error) and "unknown codec stage 'evil'" in str(error)


def test_task_policy_validates_its_own_bounds() -> None:
    with pytest.raises(ValueError, match="`max_seq_len` should be a positive integer, got 0"):
        TaskPolicy(max_seq_len=0)
    with pytest.raises(ValueError, match="`max_delta_rms` should be a finite positive number"):
        TaskPolicy(max_delta_rms=float("inf"))


# -- bad global adapters --------------------------------------------------------------------


def _bad_adapters(model: Path) -> dict[str, tuple[bytes, str]]:
    task = tiny_task(model)
    good = good_tensors(model, task)
    q_a = "model.layers.0.self_attn.q_proj.lora_A"
    q_b = "model.layers.0.self_attn.q_proj.lora_B"

    def with_(key: str, value: np.ndarray) -> dict[str, np.ndarray]:
        return {**good, key: value}

    wrong_shape = with_(q_b, np.zeros((48, 4), np.float32))  # out is 64
    huge = with_(q_b, np.full((64, 4), 3e38, np.float32))
    # The encoder refuses NaN; a hostile coordinator patches the bytes of a distinctive value.
    marker = np.float32(1.2345678)
    nan_body = global_body(2, task.lora, with_(q_b, np.full((64, 4), marker, np.float32)))
    nan_body = nan_body.replace(marker.tobytes(), np.float32(np.nan).tobytes())
    # Every entry bounded (|x| = 100 <= 1e3) but together a take-over: ||s·B·A||_F >> 64.
    takeover = with_(q_b, np.full((64, 4), 100.0, np.float32))
    takeover[q_a] = np.full((4, 64), 1.0, np.float32)
    missing = {k: v for k, v in good.items() if k != q_b}
    extra = {**good, "model.layers.9.self_attn.q_proj.lora_A": good[q_a]}
    other_lora = LoraSpec(rank=4, alpha=16.0, targets=TARGETS, mode="exact", a_seed=0)
    return {
        "wrong_shape": (
            global_body(2, task.lora, wrong_shape),
            "has shape (48, 4), the base model implies (64, 4)",
        ),
        "huge_values": (global_body(2, task.lora, huge), "has an entry of magnitude 3e+38"),
        "nan": (nan_body, "expected finite fp32 values"),
        "takeover": (global_body(2, task.lora, takeover), "changes its weight by ||s·B·A||_F"),
        "missing_key": (global_body(2, task.lora, missing), "tensor keys differ"),
        "extra_key": (global_body(2, task.lora, extra), "unexpected ['model.layers.9"),
        "other_spec": (global_body(2, other_lora, good), "differs from the task's"),
    }


@pytest.mark.parametrize(
    "case",
    ["wrong_shape", "huge_values", "nan", "takeover", "missing_key", "extra_key", "other_spec"],
)
def test_check_global_refuses_each_bad_adapter(model: Path, case: str) -> None:
    body, expected = _bad_adapters(model)[case]
    task = tiny_task(model)
    # What `GlobalAdapterFollower.load` does: decode (the wire refuses NaN/inf), then the
    # client's checks.
    with pytest.raises((AdapterRefusedError, WireError)) as caught:
        TaskPolicy().check_global(GlobalAdapter.from_bytes(body), task, _shapes(model))
    assert expected in str(caught.value), str(caught.value)
    # The good one passes the same checks.
    good = GlobalAdapter.from_bytes(global_body(1, task.lora, good_tensors(model, task)))
    TaskPolicy().check_global(good, task, _shapes(model))


def test_a_bad_global_is_refused_and_the_previous_one_keeps_serving(
    tmp_path: Path, model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """v1 is good; after our update the coordinator serves a v2 with wrong shapes (what made
    the old client raise AdapterMismatchError). The runtime keeps serving v1, the client
    downloads v2 once, and a restart neither crashes nor serves v2."""
    from edge_sdk.runtime import EdgeModel

    data = write_data(tmp_path / "data.jsonl")
    task = tiny_task(model)
    good = global_body(1, task.lora, good_tensors(model, task))
    bad, _ = _bad_adapters(model)["wrong_shape"]
    state_dir = tmp_path / "state"

    async def scenario(runtime: EdgeModel) -> tuple[Any, Any, HostileCoordinator]:
        async with HostileCoordinator(task, [good, bad]) as server:
            cfg = client_config(
                state_dir,
                model,
                data,
                coordinator_url=server.url,
                insecure=True,
                max_rounds=1,
                final_wait_s=1.5,
            )
            first = await asyncio.wait_for(
                FederatedClient(cfg, runtime=runtime).run_async(), timeout=120
            )
            # Restart (same state): the saved global is v1; v2 is refused again, no crash.
            second = await asyncio.wait_for(
                FederatedClient(cfg, runtime=runtime).run_async(), timeout=120
            )
            return first, second, server

    runtime = EdgeModel(model, n_ctx=64, n_threads=1)
    try:
        with caplog.at_level(logging.WARNING, logger="edge_sdk.client"):
            first, second, server = asyncio.run(scenario(runtime))
        served = runtime.adapter_path
    finally:
        runtime.close()
    assert first.reason == "max_rounds" and [r.outcome for r in first.rounds] == ["accepted"]
    assert first.global_version == 1 and second.global_version == 1
    assert first.adapter_path is not None and first.adapter_path.name == "global-v000001.gguf"
    assert served == first.adapter_path
    assert not (state_dir / "adapters" / "global-v000002.gguf").exists()
    # Downloaded once per run (then If-None-Match: 304), refused with a clear line each time.
    assert server.adapter_downloads[1] == 2
    refusals = [
        r.getMessage() for r in caplog.records if "refused a global adapter" in r.getMessage()
    ]
    assert len(refusals) == 2 and all("keeping version 1" in m for m in refusals)
    assert "has shape (48, 4), the base model implies (64, 4)" in refusals[0]
    saved = json.loads((state_dir / "global.json").read_text())
    assert saved["version"] == 1


def test_a_saved_global_that_fails_the_checks_is_set_aside_not_swapped_at_every_start(
    tmp_path: Path, model: Path
) -> None:
    data = write_data(tmp_path / "data.jsonl")
    task = tiny_task(model)
    good = global_body(1, task.lora, good_tensors(model, task))
    bad, _ = _bad_adapters(model)["huge_values"]
    state_dir = tmp_path / "state"
    state = ClientState(state_dir).open()
    state.save_global(bad, 2, '"old"', task.task_id)  # what an older client saved unchecked
    state.close()

    async def scenario() -> Any:
        async with HostileCoordinator(task, [good]) as server:
            cfg = client_config(
                state_dir,
                model,
                data,
                coordinator_url=server.url,
                insecure=True,
                max_rounds=1,
                final_wait_s=0.2,
            )
            return await asyncio.wait_for(FederatedClient(cfg).run_async(), timeout=120)

    summary = asyncio.run(scenario())
    assert summary.reason == "max_rounds" and summary.global_version == 1
    assert len(list(state_dir.glob("global.bin.corrupt-*"))) == 1
    assert not (state_dir / "adapters" / "global-v000002.gguf").exists()


# -- data is checked before enrolling -------------------------------------------------------


def test_a_bad_data_file_fails_before_any_request(tmp_path: Path, model: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hello", "completion": "world"}\n{"prompt": oops}\n')

    async def scenario() -> tuple[BaseException, int]:
        async with Service(coordinator_config(tmp_path, model)) as service:
            client = FederatedClient(client_config(tmp_path / "state", model, bad, service=service))
            with pytest.raises(DataFormatError) as caught:
                await client.run_async()
            return caught.value, service.coordinator.storage.count_clients()

    error, enrolled = asyncio.run(scenario())
    assert f"{bad}:2" in str(error) and "invalid JSON" in str(error)
    assert enrolled == 0
    assert ClientState(tmp_path / "state").ledger.entries() == []


def test_fedlm_join_with_bad_data_exits_2_with_one_line_and_sends_nothing(
    tmp_path: Path, model: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json at all\n")
    state = tmp_path / "state"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_sdk.cli",
            "join",
            str(model),
            "--data",
            str(bad),
            "--coordinator",
            f"http://127.0.0.1:{free_port()}",
            "--state-dir",
            str(state),
            "--join-token",
            "a-long-enough-token",
            "--insecure",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and f"{bad}:1" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert Ledger(state / "outbox.jsonl").entries() == []


def test_no_validation_warning_when_val_fraction_is_zero(
    tmp_path: Path, model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edge_sdk.training.data import DataConfig, build_dataset
    from edge_sdk.training.tokenizer import load_tokenizer

    data = write_data(tmp_path / "one.jsonl", n=1)
    tokenizer = load_tokenizer(model)
    with caplog.at_level(logging.WARNING, logger="edge_sdk.training.data"):
        build_dataset([data], tokenizer, DataConfig(seq_len=256, val_fraction=0.0))
    assert not [r for r in caplog.records if "no validation split" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="edge_sdk.training.data"):
        build_dataset([data], tokenizer, DataConfig(seq_len=256, val_fraction=0.1))
    assert [r for r in caplog.records if "no validation split" in r.getMessage()]


def test_a_client_with_no_good_adapter_yet_keeps_running_and_polls_cheaply(
    tmp_path: Path, model: Path
) -> None:
    """The very first global is bad: nothing to keep, so the client waits (304s) until stopped."""
    data = write_data(tmp_path / "data.jsonl")
    task = tiny_task(model)
    bad, _ = _bad_adapters(model)["takeover"]

    async def scenario() -> tuple[Any, HostileCoordinator]:
        async with HostileCoordinator(task, [bad]) as server:
            client = FederatedClient(
                client_config(
                    tmp_path / "state", model, data, coordinator_url=server.url, insecure=True
                )
            )
            run = asyncio.create_task(client.run_async())
            await asyncio.sleep(2.0)  # about 20 polls at poll_interval_s = 0.1
            assert not run.done()
            client.stop()
            return await asyncio.wait_for(run, timeout=30), server

    summary, server = asyncio.run(scenario())
    assert summary.reason == "stopped" and summary.global_version == -1 and summary.rounds == []
    assert server.adapter_downloads[0] == 1  # then only 304s
    assert server.requests["/v1/adapter"] > 5
    assert server.updates == [] and not (tmp_path / "state" / "global.bin").exists()
