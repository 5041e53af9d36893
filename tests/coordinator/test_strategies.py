"""Strategies alone: admission, when a round is due, and FedBuff's staleness weights."""

from __future__ import annotations

import pytest

from coordinator.errors import ConflictError, StaleUpdateError, UpdateRejectedError
from coordinator.storage import UpdateRecord
from coordinator.strategies import FedAvg, FedBuff


def _rec(uid: str, client: str = "c1", base: int = 0, examples: int = 10) -> UpdateRecord:
    return UpdateRecord(uid, client, base, examples, 0, 8, 0.0, 100)


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
    strategy.admit(_rec("a", base=3), 5, [], one_per_client=False)
    with pytest.raises(StaleUpdateError, match="3 versions old"):
        strategy.admit(_rec("b", base=2), 5, [], one_per_client=False)
    with pytest.raises(UpdateRejectedError, match="base version 6"):
        strategy.admit(_rec("c", base=6), 5, [], one_per_client=False)
    pending = [_rec("a")]
    strategy.admit(_rec("b"), 0, pending, one_per_client=False)  # same client twice is fine ...
    with pytest.raises(ConflictError, match="already has an update"):
        strategy.admit(_rec("b"), 0, pending, one_per_client=True)  # ... but not under DP
    assert not strategy.due(pending, 0, 0.0, 0.0)
    assert strategy.due([*pending, _rec("b", "c2")], 0, 0.0, 0.0)


def test_fedavg_rounds_min_clients_and_deadline() -> None:
    strategy = FedAvg(clients_per_round=3, min_clients=2, deadline_s=60.0)
    with pytest.raises(StaleUpdateError, match="round 4 is open"):
        strategy.admit(_rec("a", base=3), 4, [], one_per_client=False)
    pending = [_rec("a", "c1", 4)]
    with pytest.raises(ConflictError, match="already has an update in round 4"):
        strategy.admit(_rec("b", "c1", 4), 4, pending, one_per_client=False)
    strategy.admit(_rec("b", "c2", 4), 4, pending, one_per_client=False)
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
    ],
)
def test_strategy_configs_validate(factory, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        factory()
