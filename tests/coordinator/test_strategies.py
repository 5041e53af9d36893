"""Strategies alone: admission, when a round is due, and FedBuff's staleness weights."""

from __future__ import annotations

import pytest

from coordinator.errors import ConflictError, StaleUpdateError, UpdateRejectedError
from coordinator.storage import UpdateRecord
from coordinator.strategies import FedAvg, FedBuff


def _rec(
    uid: str, client: str = "c1", base: int = 0, examples: int = 10, at: float = 0.0
) -> UpdateRecord:
    return UpdateRecord(uid, client, base, examples, 0, 8, at, 100)


def test_fedbuff_weights_by_examples_and_inverse_sqrt_staleness() -> None:
    strategy = FedBuff(buffer_size=3, max_staleness=4)
    assert strategy.weight(_rec("a", base=5, examples=10), version=5) == pytest.approx(10.0)
    assert strategy.weight(_rec("b", base=2, examples=10), version=5) == pytest.approx(
        10.0 / 2.0
    )  # s=3
    assert strategy.weight(_rec("c", base=0, examples=40), version=3) == pytest.approx(40.0 / 2.0)
    assert strategy.weight(_rec("d", base=0, examples=10), version=5) == 0.0  # s=5 > max: dropped


def test_fedbuff_admission_and_due() -> None:
    strategy = FedBuff(buffer_size=2, max_staleness=2)
    strategy.admit(_rec("a", base=3), 5, [])
    with pytest.raises(StaleUpdateError, match="3 versions old"):
        strategy.admit(_rec("b", base=2), 5, [])
    with pytest.raises(UpdateRejectedError, match="base version 6"):
        strategy.admit(_rec("c", base=6), 5, [])
    pending = [_rec("a")]
    with pytest.raises(ConflictError, match="already has an update") as info:  # DP or not
        strategy.admit(_rec("b"), 0, pending)
    assert info.value.code == "already_submitted"
    strategy.admit(_rec("b", "c2"), 0, pending)
    assert not strategy.due(pending, 0, 0.0, 0.0)
    assert strategy.due([*pending, _rec("b", "c2")], 0, 0.0, 0.0)


def test_fedbuff_partial_buffer_publishes_after_max_wait_once_min_updates_are_in() -> None:
    strategy = FedBuff()  # the defaults: buffer 4, min 2, max wait 30 s
    assert (strategy.buffer_size, strategy.min_updates, strategy.max_wait_s) == (4, 2, 30.0)
    one = [_rec("a", "c1", at=100.0)]
    two = [*one, _rec("b", "c2", at=120.0)]
    assert not strategy.due(one, 0, 0.0, now=1000.0)  # 1 < min_updates: waits, however long
    assert not strategy.due(two, 0, 0.0, now=129.9)  # first arrived 29.9 s ago
    assert strategy.due(two, 0, 0.0, now=130.0)  # 30 s after the first
    full = [*two, _rec("c", "c3", at=125.0), _rec("d", "c4", at=126.0)]
    assert strategy.due(full, 0, 0.0, now=126.0)  # a full buffer does not wait
    waiting = strategy.waiting(one, 0, 0.0, 110.0, clients=2)
    assert {k: waiting[k] for k in ("pending", "more", "min_more", "deadline_in_s")} == {
        "pending": 1,
        "more": 3,
        "min_more": 1,
        "deadline_in_s": 20.0,
    }
    assert strategy.waiting([], 0, 0.0, 110.0, clients=2)["deadline_in_s"] is None
    assert strategy.describe()["min_updates"] == 2 and strategy.describe()["max_wait_s"] == 30.0
    assert FedBuff(buffer_size=1).min_updates == 1  # never more than the buffer holds


def test_weights_count_at_most_max_examples() -> None:
    huge = _rec("x", examples=2**63 - 1)
    assert FedBuff().weight(huge, 0, max_examples=80) == 80.0
    assert FedAvg().weight(huge, 0, max_examples=80) == 80.0
    assert FedBuff().weight(_rec("y", examples=30), 0, max_examples=80) == 30.0
    assert FedBuff().weight(_rec("z", base=0, examples=2**63 - 1), 3, max_examples=80) == (
        pytest.approx(80.0 / 2.0)
    )


def test_fedavg_rounds_min_clients_and_deadline() -> None:
    strategy = FedAvg(clients_per_round=3, min_clients=2, deadline_s=60.0)
    with pytest.raises(StaleUpdateError, match="round 4 is open"):
        strategy.admit(_rec("a", base=3), 4, [])
    pending = [_rec("a", "c1", 4)]
    with pytest.raises(ConflictError, match="already has an update in round 4"):
        strategy.admit(_rec("b", "c1", 4), 4, pending)
    strategy.admit(_rec("b", "c2", 4), 4, pending)
    assert not strategy.due(pending, 4, round_started_at=100.0, now=200.0)  # deadline, but 1 < min
    two = [*pending, _rec("b", "c2", 4)]
    assert not strategy.due(two, 4, round_started_at=100.0, now=150.0)  # 2 < 3 before the deadline
    assert strategy.due(two, 4, round_started_at=100.0, now=160.0)  # deadline with min_clients
    assert strategy.due([*two, _rec("c", "c3", 4)], 4, round_started_at=100.0, now=100.0)
    assert strategy.weight(_rec("x", base=4, examples=7), 4) == 7.0
    assert strategy.weight(_rec("x", base=3, examples=7), 4) == 0.0


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: FedAvg(clients_per_round=0), "clients_per_round"),
        (lambda: FedAvg(clients_per_round=2, min_clients=3), "min_clients"),
        (lambda: FedAvg(deadline_s=0), "deadline_s"),
        (lambda: FedBuff(buffer_size=0), "buffer_size"),
        (lambda: FedBuff(max_staleness=-1), "max_staleness"),
        (lambda: FedBuff(min_updates=0), "min_updates"),
        (lambda: FedBuff(max_wait_s=0), "max_wait_s"),
        (lambda: FedBuff(max_wait_s=float("inf")), "max_wait_s"),
    ],
)
def test_strategy_configs_validate(factory, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        factory()
