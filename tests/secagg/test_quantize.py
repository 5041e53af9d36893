"""Grid quantisation (clip, weight, unbiased stochastic rounding) and bit packing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.secagg import SecAggParams, quantize


def _params(n: int = 8, length: int = 10, grid_bits: int = 4, **kw: object) -> SecAggParams:
    return SecAggParams(cohort_size=n, vector_len=length, grid_bits=grid_bits, **kw)


def test_stochastic_rounding_is_unbiased() -> None:
    rng = np.random.default_rng(0)
    z = rng.uniform(-5, 5, 200)
    draws = np.stack([quantize.stochastic_round(z, rng) for _ in range(4000)])  # (4000, 200)
    assert set(np.unique(draws - np.floor(z))) <= {0, 1}  # only the two neighbours
    # Mean of 4000 Bernoulli draws: std <= 0.5/sqrt(4000) ≈ 0.0079; allow 5 sigma.
    assert np.abs(draws.mean(axis=0) - z).max() < 0.04


def test_decoded_sum_is_unbiased_over_many_roundings() -> None:
    """The decoded grid sum of the clipped, weighted updates is unbiased (not just bounded)."""
    p = _params(n=4, length=50, grid_bits=2, clip=1.0, weight_cap=4)
    rng = np.random.default_rng(1)
    xs = rng.uniform(-1.5, 1.5, (3, 50))
    ws = [1, 3, 4]
    exact = sum(np.clip(x, -1, 1) * w / 4 for x, w in zip(xs, ws))
    est = np.zeros(50)
    trials = 3000
    for _ in range(trials):
        ring = sum(quantize.encode(x, w, p, rng).astype(np.uint64) for x, w in zip(xs, ws))
        est += quantize.decode_sum(ring.astype(np.uint32), 3, p)[0]
    step = quantize.grid_step(p)
    # Per-trial error std <= sqrt(3)·Δ/2; mean over trials: 5 sigma.
    assert np.abs(est / trials - exact).max() < 5 * np.sqrt(3) * step / 2 / np.sqrt(trials)


def test_encode_clips_and_carries_the_weight() -> None:
    p = _params(length=4, grid_bits=3, clip=2.0, weight_cap=10)
    ring = quantize.encode(np.array([-9.0, 9.0, 0.0, 2.0]), 10, p, np.random.default_rng(0))
    assert ring.dtype == np.uint32 and ring.shape == (5,)
    assert ring[0] == 0 and ring[1] == 7 and ring[3] == 7  # clipped to the ends of the grid
    assert ring[4] == 10
    zero_weight = quantize.encode(np.ones(4), 0, p, np.random.default_rng(0))
    assert zero_weight[-1] == 0
    sum_y, w = quantize.decode_sum(zero_weight, 1, p)
    assert w == 0 and np.abs(sum_y).max() <= quantize.grid_step(p)


@pytest.mark.parametrize(
    ("update", "weight", "error", "match"),
    [
        (np.ones(3), 1, ValueError, r"shape \(4,\)"),
        (np.array([1.0, np.nan, 0, 0]), 1, ValueError, "finite"),
        (np.array([1, 2, 3, 4]), 1, ValueError, "float"),
        (np.ones(4), 11, ValueError, r"\[0, 10\], got 11"),
        (np.ones(4), -1, ValueError, r"\[0, 10\], got -1"),
        (np.ones(4), 1.5, TypeError, "integer"),
    ],
)
def test_encode_rejects_bad_input(
    update: np.ndarray, weight: object, error: type, match: str
) -> None:
    p = _params(length=4, weight_cap=10)
    with pytest.raises(error, match=match):
        quantize.encode(update, weight, p, np.random.default_rng(0))  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(3, 4096),
    grid_bits=st.integers(1, 20),
    length=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_round_trips_at_every_width(n: int, grid_bits: int, length: int, seed: int) -> None:
    try:
        p = _params(n=n, length=length, grid_bits=grid_bits)
    except ValueError:
        return  # ring wider than 32 bits: refused by the params, nothing to pack
    rng = np.random.default_rng(seed)
    ring = rng.integers(0, 1 << p.ring_bits, length + 1, dtype=np.uint64).astype(np.uint32)
    ring[-1] = rng.integers(0, 2**32, dtype=np.uint64)
    data = quantize.pack(ring, p)
    assert len(data) == p.packed_len == (length * p.ring_bits + 7) // 8 + 4
    assert np.array_equal(quantize.unpack(data, p), ring)


@pytest.mark.parametrize("ring_bits_target", [3, 5, 7, 9, 11, 13, 17, 23, 31])
def test_pack_odd_widths_exactly(ring_bits_target: int) -> None:
    p = _params(n=4, length=1001, grid_bits=ring_bits_target - 2)
    assert p.ring_bits == ring_bits_target
    ring = np.arange(1002, dtype=np.uint32) * 2654435761 % (1 << ring_bits_target)
    ring = ring.astype(np.uint32)
    assert np.array_equal(quantize.unpack(quantize.pack(ring, p), p), ring)


def test_unpack_refuses_a_wrong_length() -> None:
    p = _params(length=9, grid_bits=3)
    with pytest.raises(ValueError, match=f"should be {p.packed_len} bytes, got {p.packed_len + 1}"):
        quantize.unpack(b"\x00" * (p.packed_len + 1), p)


def test_ring_width_is_grid_bits_plus_log2_cohort() -> None:
    assert _params(n=8, grid_bits=4).ring_bits == 7
    assert _params(n=9, grid_bits=4).ring_bits == 8
    assert _params(n=64, grid_bits=1).ring_bits == 7
    # The cohort's largest possible sum fits: n·(2^g - 1) < 2^b.
    for n in (3, 8, 9, 64, 1000):
        for g in (1, 4, 9):
            p = _params(n=n, grid_bits=g)
            assert n * ((1 << g) - 1) < (1 << p.ring_bits)


def test_capped_weight() -> None:
    p = _params(weight_cap=10)
    assert [quantize.capped_weight(k, p) for k in (0, 3, 10, 11, 10**9)] == [0, 3, 10, 10, 10]
    with pytest.raises(ValueError, match="non-negative, got -1"):
        quantize.capped_weight(-1, p)
    with pytest.raises(TypeError, match="integer"):
        quantize.capped_weight(2.5, p)  # type: ignore[arg-type]
