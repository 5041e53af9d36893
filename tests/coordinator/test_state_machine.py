"""The coordinator's state machine without HTTP: modes, codecs, staleness, rounds, DP status."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.errors import AuthError, ConflictError, StaleUpdateError, UpdateRejectedError
from coordinator.next_version import AggregationConfig, a_key, b_key
from coordinator.privacy import DpConfig
from coordinator.state_machine import Coordinator
from coordinator.storage import SQLiteStorage
from coordinator.strategies import FedBuff
from tests.coordinator.helpers import JOIN_TOKEN, SHAPES, client_tensors, make_config, update_bytes


def _open(tmp_path: Path, **overrides) -> tuple[Coordinator, SQLiteStorage]:
    storage = SQLiteStorage(tmp_path / "coordinator.sqlite")
    return Coordinator(
        make_config(tmp_path, **overrides), storage, rng=np.random.default_rng(0)
    ), storage


def test_join_and_authenticate(tmp_path: Path) -> None:
    coordinator, storage = _open(tmp_path)
    with storage:
        with pytest.raises(AuthError, match="invalid join token"):
            coordinator.join("not-the-token", "x")
        joined = coordinator.join(JOIN_TOKEN, "laptop")
        assert coordinator.authenticate(joined["token"]) == joined["client_id"]
        for bad in (None, "", "x" * 43):
            with pytest.raises(AuthError, match="bearer token"):
                coordinator.authenticate(bad)


def test_frozen_a_round_trip_with_delta_codec(tmp_path: Path) -> None:
    agg = AggregationConfig(mode="frozen-a", rank=4, alpha=8.0, a_seed=3)
    coordinator, storage = _open(tmp_path, aggregation=agg, strategy=FedBuff(buffer_size=2))
    rng = np.random.default_rng(1)
    with storage:
        cid = coordinator.join(JOIN_TOKEN, "a")["client_id"]
        v0 = coordinator.dense_version(0)
        with pytest.raises(UpdateRejectedError, match="unexpected") as info:  # A must not be sent
            coordinator.submit(
                cid,
                update_bytes(
                    cid, client_tensors(rng, 4), rank=4, alpha=8.0, mode="frozen-a", a_seed=3
                ),
            )
        assert info.value.code == "wrong_tensors"
        with pytest.raises(UpdateRejectedError, match="seed"):
            coordinator.submit(
                cid,
                update_bytes(
                    cid,
                    client_tensors(rng, 4, "frozen-a"),
                    rank=4,
                    alpha=8.0,
                    mode="frozen-a",
                    a_seed=4,
                ),
            )
        updates = []
        ids = [cid, coordinator.join(JOIN_TOKEN, "b")["client_id"]]  # one update per client
        for sender in ids:
            t = {
                k: v0[k] + rng.normal(0, 0.05, v0[k].shape).astype(np.float32)
                for k in v0
                if k.endswith("lora_B")
            }
            updates.append(t)
            body = update_bytes(
                sender,
                t,
                rank=4,
                alpha=8.0,
                mode="frozen-a",
                a_seed=3,
                codec="delta+fp16",
                reference=v0,
            )
            coordinator.submit(sender, body)
        assert coordinator.aggregate() == 1
        v1 = coordinator.dense_version(1)
        for module in SHAPES:
            np.testing.assert_array_equal(v1[a_key(module)], v0[a_key(module)])
            want = np.mean([u[b_key(module)] for u in updates], axis=0)  # both have weight 10
            np.testing.assert_allclose(v1[b_key(module)], want, atol=2e-3)  # fp16 deltas


def test_fedbuff_staleness_through_the_full_path(tmp_path: Path) -> None:
    coordinator, storage = _open(tmp_path, strategy=FedBuff(buffer_size=1, max_staleness=1))
    rng = np.random.default_rng(2)
    with storage:
        cid = coordinator.join(JOIN_TOKEN, "a")["client_id"]
        for expected in (1, 2):
            coordinator.submit(
                cid, update_bytes(cid, client_tensors(rng, 8), base_version=expected - 1)
            )
            assert coordinator.aggregate() == expected
        with pytest.raises(StaleUpdateError, match="2 versions old"):
            coordinator.submit(cid, update_bytes(cid, client_tensors(rng, 8), base_version=0))
        coordinator.submit(
            cid, update_bytes(cid, client_tensors(rng, 8), base_version=1)
        )  # staleness 1
        assert coordinator.aggregate() == 3
        assert coordinator.last_aggregation["staleness_max"] == 1
        assert (
            storage.global_body(1) is None and storage.global_body(2) is not None
        )  # only recent kept


def test_max_rounds_closes_the_task(tmp_path: Path) -> None:
    coordinator, storage = _open(tmp_path, strategy=FedBuff(buffer_size=1), max_rounds=1)
    rng = np.random.default_rng(3)
    with storage:
        cid = coordinator.join(JOIN_TOKEN, "a")["client_id"]
        coordinator.submit(cid, update_bytes(cid, client_tensors(rng, 8)))
        assert coordinator.aggregate() == 1
        with pytest.raises(ConflictError, match=r"the task finished after 1 rounds") as info:
            coordinator.submit(cid, update_bytes(cid, client_tensors(rng, 8), base_version=1))
        assert info.value.code == "task_complete"


def test_dp_status_reports_epsilon(tmp_path: Path) -> None:
    agg = AggregationConfig(mode="naive", rank=8, dp=DpConfig(noise_multiplier=1.2, clip_norm=0.5))
    coordinator, storage = _open(tmp_path, aggregation=agg, strategy=FedBuff(buffer_size=2))
    rng = np.random.default_rng(4)
    with storage:
        ids = [coordinator.join(JOIN_TOKEN, n)["client_id"] for n in ("a", "b")]
        assert coordinator.status()["privacy"]["epsilon"] == 0.0
        coordinator.submit(ids[0], update_bytes(ids[0], client_tensors(rng, 8), mode="naive"))
        with pytest.raises(ConflictError, match="already has an update"):  # one per client under DP
            coordinator.submit(ids[0], update_bytes(ids[0], client_tensors(rng, 8), mode="naive"))
        coordinator.submit(ids[1], update_bytes(ids[1], client_tensors(rng, 8), mode="naive"))
        assert coordinator.aggregate() == 1
        privacy = coordinator.status()["privacy"]
        assert privacy["aggregations"] == 1 and 0 < privacy["epsilon"] < float("inf")
    # The DP ledger survives a restart (it is part of the aggregation commit).
    coordinator, storage = _open(tmp_path, aggregation=agg, strategy=FedBuff(buffer_size=2))
    with storage:
        assert coordinator.status()["privacy"]["aggregations"] == 1


def test_a_corrupt_stored_update_is_dropped_not_fatal(tmp_path: Path) -> None:
    from coordinator.storage import UpdateRecord

    coordinator, storage = _open(tmp_path, strategy=FedBuff(buffer_size=2))
    rng = np.random.default_rng(5)
    with storage:
        cid = coordinator.join(JOIN_TOKEN, "a")["client_id"]
        other = coordinator.join(JOIN_TOKEN, "b")["client_id"]
        storage.add_update(UpdateRecord("tampered", other, 0, 5, 0, 8, 0.0, 4), b"FDLM-not-really")
    coordinator, storage = _open(tmp_path, strategy=FedBuff(buffer_size=2))  # resumes both
    with storage:
        coordinator.submit(cid, update_bytes(cid, client_tensors(rng, 8)))
        assert coordinator.aggregate() == 1
        assert (
            coordinator.last_aggregation["updates"] == 1
            and coordinator.last_aggregation["dropped"] == 1
        )
        assert storage.update_counts() == {"pending": 0, "aggregated": 1, "dropped": 1}
        assert coordinator.last_aggregation["dropped_reasons"] == {"undecodable": 1}
