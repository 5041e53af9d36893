"""The protocol end to end: sums, drop-outs at every phase, late devices and phase guards."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from edge_sdk.secagg import (
    AdvertiseKeys,
    DeviceState,
    DropoutError,
    PhaseError,
    ProtocolViolationError,
    SecAggParams,
    ServerState,
    UnmaskRequest,
)
from tests.secagg.helpers import PHASES, assert_sum_within_grid, make_round, run, wire

# Complete graph (Bonawitz et al. 2017): n = 8, k = 7, t = 5, k - t = 2 drop-outs tolerated.
COMPLETE = SecAggParams(cohort_size=8, vector_len=257, clip=1.0, grid_bits=6, weight_cap=50)
# Sparse SecAgg+ graph: n = 12, k = 6, t = 4, k - t = 2 drop-outs per neighbourhood.
SPARSE = SecAggParams(
    cohort_size=12, vector_len=301, clip=0.5, grid_bits=5, weight_cap=20, degree=6
)


def test_params_of_the_two_graphs() -> None:
    assert (COMPLETE.degree, COMPLETE.threshold, COMPLETE.max_dropouts_per_neighbourhood) == (
        7,
        5,
        2,
    )
    assert (SPARSE.degree, SPARSE.threshold, SPARSE.max_dropouts_per_neighbourhood) == (6, 4, 2)
    assert COMPLETE.ring_bits == 6 + 3 and SPARSE.ring_bits == 5 + 4


@pytest.mark.parametrize("params", [COMPLETE, SPARSE], ids=["complete", "sparse"])
def test_sum_without_dropouts(params: SecAggParams) -> None:
    r = make_round(params, params.cohort_size, seed=1)
    result = run(r)
    assert result.survivors == tuple(range(1, params.cohort_size + 1))
    assert result.dropped == ()
    assert_sum_within_grid(r, result)
    assert r.server.state is ServerState.DONE
    assert all(d.state is DeviceState.DONE for d in r.devices.values())


@pytest.mark.parametrize("params", [COMPLETE, SPARSE], ids=["complete", "sparse"])
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("count", ["one", "max"])
def test_sum_with_dropouts_at_each_phase(params: SecAggParams, phase: str, count: str) -> None:
    n = params.cohort_size
    k = 1 if count == "one" else params.max_dropouts_per_neighbourhood
    rng = np.random.default_rng(hash((phase, count, n)) % 2**32)
    dropped = {int(i) for i in rng.choice(np.arange(1, n + 1), size=k, replace=False)}
    r = make_round(params, n, seed=2)
    result = run(r, {phase: dropped})
    if phase in ("after_masked", "during_unmask"):
        # Their masked inputs arrived: they are in the sum, unmasked with their neighbours' shares.
        assert set(result.survivors) == set(range(1, n + 1))
    else:
        assert set(result.survivors) == set(range(1, n + 1)) - dropped
        assert set(result.dropped) == dropped
    assert_sum_within_grid(r, result)


def test_dropouts_spread_over_every_phase() -> None:
    """Two drop-outs in different phases (k - t in all) still give the sum."""
    r = make_round(COMPLETE, 8, seed=3)
    result = run(r, {"after_advertise": {2}, "after_masked": {5}})
    assert set(result.survivors) == {1, 3, 4, 5, 6, 7, 8}
    assert_sum_within_grid(r, result)


def test_random_cohorts_with_random_dropouts() -> None:
    """Seeded random cohorts, graphs and drop-outs within the tolerance: the sum is right."""
    rng = np.random.default_rng(1234)
    for case in range(12):
        n = int(rng.integers(4, 21))
        degree = int(rng.integers(2, n))
        if degree < n - 1 and degree % 2:
            degree += 1
        params = SecAggParams(
            cohort_size=n,
            vector_len=int(rng.integers(1, 200)),
            clip=float(rng.uniform(0.1, 3)),
            grid_bits=int(rng.integers(1, 9)),
            weight_cap=int(rng.integers(1, 1000)),
            degree=min(degree, n - 1),
        )
        budget = params.max_dropouts_per_neighbourhood
        drops: dict[str, set[int]] = {p: set() for p in PHASES}
        for i in rng.choice(np.arange(1, n + 1), size=budget, replace=False):
            drops[PHASES[int(rng.integers(0, 4))]].add(int(i))
        r = make_round(params, n, seed=100 + case, scale=params.clip)
        result = run(r, drops)
        assert_sum_within_grid(r, result)


def test_one_dropout_too_many_fails_loudly_not_wrongly() -> None:
    """k - t + 1 drop-outs in one neighbourhood: a typed error, never a wrong sum."""
    r = make_round(COMPLETE, 8, seed=4)
    with pytest.raises(DropoutError, match="shares of device"):
        run(r, {"after_masked": {1, 2, 3}})
    assert r.server.state is ServerState.FAILED

    r = make_round(COMPLETE, 8, seed=5)
    with pytest.raises(DropoutError, match="shared keys"):
        run(r, {"after_advertise": {1, 2, 3}})


def test_too_few_devices_advertise() -> None:
    r = make_round(COMPLETE, 8, seed=6)
    for i in (1, 2, 3, 4, 5):  # 5 advertise, threshold 5 needs 6
        r.server.receive(wire(r.devices[i].advertise()))
    with pytest.raises(DropoutError, match="needs at least 6"):
        r.server.close_advertise()


def test_late_device_is_refused_and_counted_as_dropped() -> None:
    """A device that answers after its phase closed is refused; the round goes on without it."""
    r = make_round(SPARSE, 12, seed=7)
    s = r.server
    for d in r.devices.values():
        s.receive(wire(d.advertise()))
    reqs = s.close_advertise()
    for i, req in reqs.items():
        s.receive(wire(r.devices[i].share_keys(wire(req))))
    reqs = s.close_share_keys()
    late_input = None
    for i, req in reqs.items():
        msg = wire(r.devices[i].masked_input(wire(req), r.updates[i], r.weights[i]))
        if i == 4:
            late_input = msg
            continue
        s.receive(msg)
    reqs = s.close_masked_input()
    with pytest.raises(PhaseError, match="expected UNMASK, got MASKED_INPUT"):
        s.receive(late_input)
    for i, req in reqs.items():
        s.receive(wire(r.devices[i].unmask(wire(req))))
    result = s.close_unmask()
    assert 4 in result.dropped and 4 not in result.survivors
    assert_sum_within_grid(r, result)


def test_server_phase_guards_name_both_phases() -> None:
    r = make_round(COMPLETE, 8, seed=8)
    s = r.server
    for d in r.devices.values():
        s.receive(wire(d.advertise()))
    reqs = s.close_advertise()
    share = wire(r.devices[1].share_keys(wire(reqs[1])))
    with pytest.raises(PhaseError, match="expected SHARE_KEYS, got close of MASKED_INPUT"):
        s.close_masked_input()
    s.receive(share)
    with pytest.raises(ProtocolViolationError, match="may not send shares now"):
        s.receive(share)  # a duplicate
    with pytest.raises(PhaseError, match="expected SHARE_KEYS, got ADVERTISE"):
        s.receive(AdvertiseKeys(s.round_id, 2, b"\x01" * 32, b"\x02" * 32))


def test_device_phase_guards() -> None:
    r = make_round(COMPLETE, 8, seed=9)
    d = r.devices[1]
    d.advertise()
    with pytest.raises(PhaseError, match="expected SHARE_KEYS, got ADVERTISE"):
        d.advertise()
    with pytest.raises(PhaseError, match="expected SHARE_KEYS, got UNMASK"):
        d.unmask(UnmaskRequest(r.server.round_id, 1, (1, 2, 3, 4, 5), ()))
    assert d.state is DeviceState.ADVERTISED  # a phase error changes nothing


def test_logs_carry_no_vectors(caplog: pytest.LogCaptureFixture) -> None:
    """What the coordinator logs about a round is counts and ids, never vector contents."""
    caplog.set_level(logging.DEBUG)
    r = make_round(COMPLETE, 8, seed=10)
    run(r, {"after_share": {3}})
    assert caplog.records, "the round should log its outcome"
    assert all(len(rec.getMessage()) < 200 for rec in caplog.records)


def test_weights_are_capped_on_the_device() -> None:
    """A device claiming more examples than the cap counts as the cap, inside the masked sum."""
    r = make_round(COMPLETE, 8, seed=11)
    r.weights[1] = 10**9
    result = run(r)
    r.weights[1] = COMPLETE.weight_cap  # what the device must have used
    assert_sum_within_grid(r, result)


def test_any_dropout_pattern_gives_the_right_sum_or_a_typed_error() -> None:
    """Random drop-outs of any number, beyond the tolerance too: the round either returns the
    right sum or raises `DropoutError`; it never returns a wrong sum."""
    rng = np.random.default_rng(99)
    outcomes = {"sum": 0, "error": 0}
    for case in range(30):
        n = int(rng.integers(4, 14))
        degree = min(n - 1, 2 * int(rng.integers(1, n // 2 + 1)))
        params = SecAggParams(cohort_size=n, vector_len=17, grid_bits=3, degree=degree)
        drops: dict[str, set[int]] = {p: set() for p in PHASES}
        for i in rng.choice(np.arange(1, n + 1), size=int(rng.integers(0, n)), replace=False):
            drops[PHASES[int(rng.integers(0, 4))]].add(int(i))
        r = make_round(params, n, seed=200 + case)
        try:
            result = run(r, drops)
        except DropoutError:
            outcomes["error"] += 1
            assert r.server.state is ServerState.FAILED
            continue
        outcomes["sum"] += 1
        assert_sum_within_grid(r, result)
    assert outcomes["sum"] > 3 and outcomes["error"] > 3, outcomes
