"""Parameter validation: every bad field is named with its value."""

from __future__ import annotations

import pytest

from edge_sdk.secagg import MIN_COHORT, SecAggParams
from edge_sdk.secagg.params import default_degree, default_threshold


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cohort_size": 2}, r"`cohort_size` should be an integer in \[3, 4096\], got 2"),
        ({"cohort_size": True}, "`cohort_size`"),
        ({"vector_len": 0}, "`vector_len`"),
        ({"clip": 0.0}, "`clip` should be a positive finite number, got 0.0"),
        ({"clip": float("inf")}, "`clip`"),
        ({"clip": "1"}, "`clip`"),
        ({"grid_bits": 0}, "`grid_bits`"),
        ({"grid_bits": 30}, "exceeds 32 ring bits"),
        ({"weight_cap": 0}, "`weight_cap`"),
        ({"weight_cap": 2**31}, "`weight_cap`"),
        ({"degree": 1}, "`degree`"),
        ({"degree": 5}, "`degree` should be even"),
        ({"degree": 4, "threshold": 2}, r"`threshold` should be an integer in \[3, 4\], got 2"),
        ({"degree": 4, "threshold": 5}, "`threshold`"),
    ],
)
def test_bad_fields_are_named(kwargs: dict, match: str) -> None:
    base = {"cohort_size": 16, "vector_len": 10}
    with pytest.raises(ValueError, match=match):
        SecAggParams(**{**base, **kwargs})


def test_defaults_and_round_trip() -> None:
    assert MIN_COHORT == 3
    for n in (3, 4, 8, 16, 64, 1000, 4096):
        p = SecAggParams(cohort_size=n, vector_len=5)
        assert p.degree == default_degree(n) <= n - 1
        assert p.degree // 2 < p.threshold == default_threshold(p.degree) <= p.degree
        assert SecAggParams.from_list(p.to_list()) == p
    assert SecAggParams(cohort_size=64, vector_len=5).degree == 24
    assert SecAggParams(cohort_size=8, vector_len=5).degree == 7  # complete
    with pytest.raises(ValueError, match="list of 7"):
        SecAggParams.from_list([1, 2])


def test_for_ring_bits_picks_the_widest_grid() -> None:
    for n, g in ((8, 4), (16, 3), (64, 1), (9, 3)):
        p = SecAggParams.for_ring_bits(n, 10, 7, clip=0.5)
        assert (p.grid_bits, p.ring_bits, p.clip) == (g, 7, 0.5)
    with pytest.raises(ValueError, match="leaves no grid bit for a cohort of 128"):
        SecAggParams.for_ring_bits(128, 10, 7)


def test_grid_bits_for_keeps_the_ring_within_the_size_budget() -> None:
    from edge_sdk.secagg.params import SIZE_TARGET_RING_BITS, grid_bits_for

    assert [grid_bits_for(n) for n in (3, 4, 8, 16, 64)] == [5, 5, 4, 3, 1]
    for n in (3, 5, 8, 9, 16, 17, 33, 64):
        p = SecAggParams(n, 1000, grid_bits=grid_bits_for(n))
        assert p.ring_bits <= SIZE_TARGET_RING_BITS
        assert 4 * 1000 / p.packed_len > 4 or n < 3
    assert grid_bits_for(1000) == 1  # never below one bit (the ring then exceeds the budget)
    with pytest.raises(ValueError, match="cohort_size"):
        grid_bits_for(0)
