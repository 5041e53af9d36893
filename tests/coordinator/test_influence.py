"""Issue 11, "one enrolled device can freeze or take over the shared model", against a real
coordinator (the aiohttp service on 127.0.0.1, or `Coordinator` over a real SQLite file)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import numpy as np
import pytest

import coordinator.state_machine as core_module
from coordinator.errors import UpdateRejectedError
from coordinator.next_version import AggregationConfig, a_key, b_key
from coordinator.server import Service
from coordinator.state_machine import Coordinator
from coordinator.storage import SQLiteStorage
from coordinator.strategies import FedBuff
from edge_sdk.wire import AdapterUpdate, GlobalAdapter, LoraSpec
from tests.coordinator.helpers import (
    JOIN_TOKEN,
    SHA,
    SHAPES,
    TARGETS,
    client_tensors,
    join,
    make_config,
    post_update,
    update_bytes,
)

pytestmark = pytest.mark.timeout(120)

HUGE = 2**63 - 1


async def _wait_for_version(
    session: aiohttp.ClientSession, url: str, headers: dict, version: int
) -> dict:
    for _ in range(300):
        async with session.get(f"{url}/v1/status", headers=headers) as resp:
            status = await resp.json()
        if status["version"] >= version:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"version {version} never appeared: {status}")


def _trained(rng: np.random.Generator, base: dict[str, np.ndarray], mode: str) -> dict:
    """A plausible local round: a small change of every factor the mode trains."""
    keys = [k for k in base if mode != "frozen-a" or k.endswith("lora_B")]
    return {k: base[k] + rng.normal(0, 0.01, base[k].shape).astype(np.float32) for k in keys}


def _movement(config: AggregationConfig, before: dict, after: dict) -> float:
    """How far a version moved the global adapter, in the mode's parametrisation."""
    if config.mode == "exact":
        s = config.scale
        return float(
            np.sqrt(
                sum(
                    np.sum(
                        (
                            s * after[b_key(m)].astype(np.float64) @ after[a_key(m)]
                            - s * before[b_key(m)].astype(np.float64) @ before[a_key(m)]
                        )
                        ** 2
                    )
                    for m in SHAPES
                )
            )
        )
    keys = config.update_keys(SHAPES)
    return float(np.sqrt(sum(np.sum((after[k].astype(np.float64) - before[k]) ** 2) for k in keys)))


@pytest.mark.parametrize("mode", ["exact", "naive", "frozen-a"])
def test_take_over_is_bounded_by_the_clip_and_cannot_fill_the_buffer(
    tmp_path: Path, mode: str
) -> None:
    """One client tries to send the whole buffer, with num_examples 2^63-1 and B 5,000x larger.

    Default strategy (FedBuff, buffer 4) and default clip: the attacker gets one slot, its
    weight counts local_steps x batch_size examples, and the version moves the global adapter
    by at most the stated bound (2 x the lower median of the effect norms)."""
    rng = np.random.default_rng(0)
    agg = AggregationConfig(mode=mode, rank=8, alpha=16.0, a_seed=0)
    config = make_config(tmp_path, aggregation=agg, strategy=FedBuff())
    kw = {"mode": mode, "alpha": 16.0, "a_seed": 0}

    async def scenario() -> None:
        async with Service(config) as service, aiohttp.ClientSession() as session:
            url = service.url
            honest = [await join(session, url, f"honest-{i}") for i in range(3)]
            attacker_id, attacker = await join(session, url, "attacker")
            async with session.get(f"{url}/v1/task", headers=attacker) as resp:
                task = await resp.json()
            assert task["extra"]["clip"]["multiplier"] == 2.0  # the device sees the bound
            assert task["extra"]["max_weight_examples"] == 20 * 4
            async with session.get(f"{url}/v1/adapter", headers=attacker) as resp:
                v0 = GlobalAdapter.from_bytes(await resp.read()).dense_tensors()

            codes = []
            for _ in range(4):  # all four buffer slots
                poison = _trained(rng, v0, mode)
                for key in poison:
                    if key.endswith("lora_B"):
                        poison[key] = poison[key] * 5000.0
                body = update_bytes(attacker_id, poison, num_examples=HUGE, **kw)
                status, ack = await post_update(session, url, attacker, body)
                codes.append(status if status == 202 else ack["error"]["code"])
            assert codes == [202, "already_submitted", "already_submitted", "already_submitted"]
            assert service.coordinator.version == 0  # it could not fill the buffer alone

            for client_id, headers in honest:
                body = update_bytes(client_id, _trained(rng, v0, mode), num_examples=500, **kw)
                assert (await post_update(session, url, headers, body))[0] == 202
            status = await _wait_for_version(session, url, attacker, 1)
            stats = status["last_aggregation"]
            assert stats["updates"] == 4 and stats["clipped"] >= 1
            assert stats["total_weight"] == pytest.approx(4 * 80)  # 2^63-1 counted as 80
            bound = stats["clip"]["bound"]
            assert stats["clip"]["source"] == "adaptive"
            assert bound == pytest.approx(2.0 * stats["clip"]["reference"])
            async with session.get(f"{url}/v1/adapter", headers=attacker) as resp:
                v1 = GlobalAdapter.from_bytes(await resp.read()).dense_tensors()
            moved = _movement(agg, v0, v1)
            assert moved <= bound * (1 + 1e-5)  # server_lr 1: a version moves <= the bound
            assert bound < 0.1 * stats["delta_norm_max"]  # the attack was 10x+ beyond it

    asyncio.run(scenario())


def test_alpha_1e300_is_refused_at_ingest_and_dropped_from_an_old_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The freeze of issue 11: lora.alpha = 1e300 with finite tensors (exact mode).

    At ingest it is a 422. Stored by an older coordinator, it is dropped at aggregation (log
    line naming it and its client, metric) and the version advances."""
    rng = np.random.default_rng(1)
    config = make_config(tmp_path)  # exact mode, FedBuff buffer 2

    async def ingest() -> str:
        async with Service(config) as service, aiohttp.ClientSession() as session:
            attacker_id, attacker = await join(session, service.url, "attacker")
            body = update_bytes(attacker_id, client_tensors(rng, 8), alpha=1e300)
            status, error = await post_update(session, service.url, attacker, body)
            assert (status, error["error"]["code"]) == (422, "lora_mismatch")
            assert "alpha 1e+300" in error["error"]["message"]
            return attacker_id

    attacker_id = asyncio.run(ingest())
    # What an older coordinator (no alpha check in exact mode) had accepted and stored:
    poison = AdapterUpdate.from_bytes(
        update_bytes(attacker_id, client_tensors(rng, 8), alpha=1e300, update_id="poison-1e300")
    )
    with SQLiteStorage(config.db_path) as storage:
        record = Coordinator(config, storage)._record(attacker_id, poison, 1)
        storage.add_update(record, poison.to_bytes())

    async def restart() -> None:
        async with Service(config) as service, aiohttp.ClientSession() as session:
            assert service.coordinator.pending_count == 1
            honest_id, honest = await join(session, service.url, "honest")
            body = update_bytes(honest_id, client_tensors(rng, 8))
            assert (await post_update(session, service.url, honest, body))[0] == 202
            status = await _wait_for_version(session, service.url, honest, 1)
            assert status["last_aggregation"]["updates"] == 1
            assert status["last_aggregation"]["dropped_reasons"] == {"lora_mismatch": 1}
            assert status["updates"] == {"pending": 0, "aggregated": 1, "dropped": 1}
            async with session.get(f"{service.url}/metrics") as resp:
                text = await resp.text()
            assert 'fedlm_updates_dropped_total{reason="lora_mismatch"} 1.0' in text

    with caplog.at_level(logging.WARNING, logger="coordinator.state_machine"):
        asyncio.run(restart())
    assert any(
        "poison-1e300" in r.getMessage() and attacker_id in r.getMessage() for r in caplog.records
    )


def _open(tmp_path: Path, clock=None, **overrides) -> tuple[Coordinator, SQLiteStorage]:
    storage = SQLiteStorage(tmp_path / "coordinator.sqlite")
    kwargs = {"rng": np.random.default_rng(0)}
    if clock is not None:
        kwargs["clock"] = clock
    return Coordinator(make_config(tmp_path, **overrides), storage, **kwargs), storage


def _submit_from_new_clients(coordinator: Coordinator, rng: np.random.Generator, n: int) -> list:
    ids = []
    for i in range(n):
        cid = coordinator.join(JOIN_TOKEN, f"d{i}")["client_id"]
        ack = coordinator.submit(cid, update_bytes(cid, client_tensors(rng, 8)))
        ids.append((cid, ack["update_id"]))
    return ids


@pytest.mark.parametrize("together", [False, True])
def test_a_failing_aggregation_drops_exactly_the_culprit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    together: bool,
) -> None:
    """The math fails whenever one update takes part (alone, or only with others): that update,
    and only it, is dropped and named; the other three make the version."""
    real = core_module.aggregate
    rng = np.random.default_rng(2)
    coordinator, storage = _open(tmp_path, strategy=FedBuff(buffer_size=4))
    with storage:
        sent = _submit_from_new_clients(coordinator, rng, 4)
        culprit_client, culprit = sent[2]

        def failing(config, shapes, current, contributions, *args, **kwargs):
            items = list(contributions)
            ids = {c.update_id for c in items}
            if culprit in ids and (len(ids) > 1 or not together):
                raise np.linalg.LinAlgError("SVD did not converge")  # what numpy raises
            return real(config, shapes, current, items, *args, **kwargs)

        monkeypatch.setattr(core_module, "aggregate", failing)
        drops: list[str] = []
        coordinator.on_drop = drops.append
        with caplog.at_level(logging.WARNING, logger="coordinator.state_machine"):
            assert coordinator.aggregate() == 1
        stats = coordinator.last_aggregation
        assert stats["updates"] == 3 and stats["dropped_reasons"] == {"aggregation_failed": 1}
        assert drops == ["aggregation_failed"]
        assert storage.update_counts() == {"pending": 0, "aggregated": 3, "dropped": 1}
        named = [r.getMessage() for r in caplog.records if culprit in r.getMessage()]
        assert named and culprit_client in named[0]


def test_an_aggregation_that_always_fails_is_dropped_not_retried_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    coordinator, storage = _open(tmp_path, strategy=FedBuff(buffer_size=2))
    with storage:
        _submit_from_new_clients(coordinator, rng, 2)
        calls = []

        def broken(*args, **kwargs):
            calls.append(1)
            raise FloatingPointError("overflow")

        monkeypatch.setattr(core_module, "aggregate", broken)
        assert coordinator.aggregate() is None
        assert storage.update_counts() == {"pending": 0, "aggregated": 0, "dropped": 2}
        assert coordinator.pending_count == 0 and not coordinator.due()
        assert len(calls) <= 1 + 2 + 2 + 1  # the batch, each alone, each left out, once more
        assert coordinator.aggregate() is None and len(calls) <= 6  # nothing left to retry


def test_fedbuff_defaults_publish_with_two_devices_and_say_what_they_wait_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 18: two devices, the default strategy (buffer 4, min 2, max wait 30 s)."""
    now = [1000.0]
    rng = np.random.default_rng(4)
    coordinator, storage = _open(tmp_path, clock=lambda: now[0], strategy=FedBuff())
    with storage, caplog.at_level(logging.INFO, logger="coordinator.state_machine"):
        a = coordinator.join(JOIN_TOKEN, "a")["client_id"]
        b = coordinator.join(JOIN_TOKEN, "b")["client_id"]
        waiting = coordinator.waiting()
        assert waiting["message"].startswith(
            "version 1 waits for 4 more updates (buffer-size 4, 2 clients enrolled)"
        )
        coordinator.submit(a, update_bytes(a, client_tensors(rng, 8)))
        now[0] += 100.0  # one device alone never publishes, however long it waits
        assert not coordinator.due()
        assert "waits for 3 more updates" in coordinator.status()["waiting"]["message"]
        coordinator.submit(b, update_bytes(b, client_tensors(rng, 8)))
        assert coordinator.due()  # two are in and the first has waited 100 s >= 30 s
        assert coordinator.aggregate() == 1 and coordinator.last_aggregation["updates"] == 2
        # Version 2: the second device arrives 10 s after the first; 30 s after the first it goes.
        coordinator.submit(a, update_bytes(a, client_tensors(rng, 8), base_version=1))
        now[0] += 10.0
        coordinator.submit(b, update_bytes(b, client_tensors(rng, 8), base_version=1))
        now[0] += 19.0
        assert not coordinator.due()
        message = coordinator.waiting()["message"]
        assert message == (
            "version 2 waits for 2 more updates (buffer-size 4, 2 clients enrolled), "
            "or publishes the 2 it has in 1 s"
        )
        assert any(message in r.getMessage() for r in caplog.records)  # logged by due()
        now[0] += 1.0
        assert coordinator.due() and coordinator.aggregate() == 2


def test_one_device_alone_is_told_why_nothing_publishes(tmp_path: Path) -> None:
    coordinator, storage = _open(tmp_path, strategy=FedBuff())
    with storage:
        cid = coordinator.join(JOIN_TOKEN, "only")["client_id"]
        coordinator.submit(cid, update_bytes(cid, client_tensors(np.random.default_rng(5), 8)))
        message = coordinator.waiting()["message"]
        assert "only 1 enrolled: enroll another device or lower --min-updates" in message


@pytest.mark.parametrize("mode", ["exact", "naive", "frozen-a"])
def test_every_lora_field_is_checked_in_every_mode(tmp_path: Path, mode: str) -> None:
    agg = AggregationConfig(mode=mode, rank=8, alpha=16.0, a_seed=3)
    coordinator, storage = _open(tmp_path, aggregation=agg, strategy=FedBuff(buffer_size=8))
    rng = np.random.default_rng(6)
    good = {"rank": 8, "alpha": 16.0, "mode": mode, "a_seed": 3}
    bad = [
        {"alpha": 1e300},
        {"alpha": 16.5},
        {"a_seed": 4},
        {"mode": next(m for m in ("exact", "naive") if m != mode)},
        {"rank": 4, "alpha": 9.0},  # exact: another rank needs the task's alpha or scale
        {"rank": 80},
    ]
    with storage:
        cid = coordinator.join(JOIN_TOKEN, "a")["client_id"]
        for change in bad:
            spec = {**good, **change}
            tensors = client_tensors(rng, spec["rank"], mode)
            with pytest.raises(UpdateRejectedError) as info:
                coordinator.submit(cid, update_bytes(cid, tensors, **spec))
            assert info.value.code in ("lora_mismatch", "wrong_tensors"), (change, info.value)
            if "alpha" in change or "a_seed" in change:
                assert info.value.code == "lora_mismatch"
        with pytest.raises(UpdateRejectedError, match="targets"):
            coordinator.submit(
                cid, update_bytes(cid, client_tensors(rng, 8, mode), targets=("q_proj",), **good)
            )
        if mode == "exact":  # other ranks: the task's alpha, or the task's scale alpha / r
            for alpha in (16.0, 8.0):
                other = coordinator.join(JOIN_TOKEN, f"r4-{alpha}")["client_id"]
                body = update_bytes(other, client_tensors(rng, 4), rank=4, alpha=alpha, a_seed=3)
                assert coordinator.submit(other, body)["accepted"]
        body = update_bytes(cid, client_tensors(rng, 8, mode), **good)
        assert coordinator.submit(cid, body)["accepted"]
        none_seed = coordinator.join(JOIN_TOKEN, "no-seed")["client_id"]
        if mode != "frozen-a":  # a_seed is optional outside frozen-a
            body = update_bytes(none_seed, client_tensors(rng, 8, mode), **{**good, "a_seed": None})
            assert coordinator.submit(none_seed, body)["accepted"]


def test_status_and_task_state_the_clip_and_the_weight_cap(tmp_path: Path) -> None:
    coordinator, storage = _open(tmp_path)
    with storage:
        task = coordinator.task_config()
        clip = task.extra["clip"]
        assert clip["source"] == "adaptive" and clip["multiplier"] == 2.0
        assert clip["last_bound"] is None and task.extra["max_weight_examples"] == 80
        status = coordinator.status()
        assert status["aggregation"]["clip"] == clip
        assert status["aggregation"]["max_weight_examples"] == 80
        spec = LoraSpec(8, 16.0, TARGETS, "exact", 0)
        assert task.lora == spec and task.model_sha256 == SHA


def test_fedavg_says_what_its_round_waits_for(tmp_path: Path) -> None:
    from coordinator.strategies import FedAvg

    now = [500.0]
    strategy = FedAvg(clients_per_round=3, min_clients=2, deadline_s=60.0)
    coordinator, storage = _open(tmp_path, clock=lambda: now[0], strategy=strategy)
    with storage:
        _submit_from_new_clients(coordinator, np.random.default_rng(7), 1)
        now[0] += 20.0
        assert coordinator.waiting()["message"] == (
            "round 1 waits for 2 more updates (clients-per-round 3, 1 clients enrolled); "
            "at the deadline (in 40 s) it closes once 2 are in"
        )
        assert coordinator.waiting()["deadline_in_s"] == 40.0
