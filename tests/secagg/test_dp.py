"""Distributed DP under secure aggregation: each device's Skellam share sums to the
configured noise, through the real protocol (masks, shares, unmasking), and ε is accounted."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.privacy import epsilon_spent as gaussian_epsilon
from edge_sdk.secagg import SecAggParams, dp, quantize
from tests.secagg.helpers import make_round, run

N = 20_000


def dp_params(n: int, noise_multiplier: float, min_summed: int, **kw: float) -> SecAggParams:
    base = {"clip": 0.01, "grid_bits": 5, "weight_cap": 4, "l2_clip": 0.05}
    base.update(kw)
    probe = SecAggParams(n, N, noise_mu=1.0, **base)  # type: ignore[arg-type]
    mu = dp.noise_mu_for(noise_multiplier, probe, min_summed)
    return SecAggParams(n, N, noise_mu=mu, **base)  # type: ignore[arg-type]


def test_the_sums_noise_variance_is_the_configured_one() -> None:
    """Four devices with zero updates: the recovered sum is noise only; its variance (grid
    steps²) is 2·s·μ from the Skellam shares plus s/4 from rounding the grid's half-step
    centre, and 2·min_summed·μ = (z·Δ₂)² by calibration."""
    z, n = 0.5, 4
    p = dp_params(n, z, min_summed=3)
    assert p.ring_bits > SecAggParams(n, N, clip=0.01, grid_bits=5).ring_bits  # noise headroom
    r = make_round(p, n)
    r.updates = {i: np.zeros(N) for i in r.updates}
    result = run(r)
    step = quantize.grid_step(p)
    noise = result.sum_weighted / step  # the sum of zeros, in grid steps
    expected = 2 * n * p.noise_mu + n / 4
    assert noise.var() == pytest.approx(expected, rel=0.05)
    assert abs(noise.mean()) < 5 * math.sqrt(expected / N)
    assert 2 * 3 * p.noise_mu == pytest.approx((z * dp.l2_sensitivity(p)) ** 2)
    # Skellam tails: the sum is integer-valued with no wrap-around (it decodes both signs).
    assert noise.min() < 0 < noise.max()


def test_a_noisy_round_still_recovers_the_sum_and_clips_the_norm() -> None:
    """Real updates under DP: the mean is the L2-clipped plain mean plus noise of the stated
    variance; every device counts the same (weight = cap) whatever its example count."""
    n = 5
    p = dp_params(n, 0.3, min_summed=4)
    r = make_round(p, n, seed=3, scale=2e-3)  # weights drawn from 1..cap
    assert len(set(r.weights.values())) > 1
    result = run(r)
    assert result.total_weight == n * p.weight_cap
    clipped = [np.clip(dp.clip_l2(x, p.l2_clip), -p.clip, p.clip) for x in r.updates.values()]
    err = (result.sum_weighted - sum(clipped)) / quantize.grid_step(p)
    expected = 2 * n * p.noise_mu + n / 4  # at most: rounding variance p(1-p) <= 1/4
    assert err.var() < expected * 1.05
    assert err.var() > 2 * n * p.noise_mu * 0.95
    assert np.linalg.norm(r.updates[1]) > p.l2_clip  # the L2 clip was active
    assert np.linalg.norm(dp.clip_l2(r.updates[1], p.l2_clip)) == pytest.approx(p.l2_clip)


def test_conditional_rounding_keeps_the_sensitivity_bound() -> None:
    p = dp_params(4, 1.0, min_summed=3)
    rng = np.random.default_rng(0)
    levels = (1 << p.grid_bits) - 1
    bound = dp.l2_sensitivity(p)
    for _ in range(20):
        x = dp.clip_l2(rng.normal(0, 1.0, N), p.l2_clip)
        z = (np.clip(x, -p.clip, p.clip) + p.clip) / quantize.grid_step(p)
        q = dp.conditional_round(z, levels / 2, bound, rng)
        assert np.linalg.norm(q - levels / 2) <= bound
        assert np.all(np.abs(q - z) < 1)  # still a rounding: one of the two neighbours


def test_epsilon_is_the_gaussian_one_plus_a_vanishing_skellam_term() -> None:
    p = dp_params(4, 1.0, min_summed=3)
    eps = dp.epsilon_spent(p, 3, 8, 1e-5)
    gauss = gaussian_epsilon(1.0, 8, 1e-5)
    assert gauss <= eps < gauss * 1.01
    assert dp.epsilon_spent(p, 3, 0, 1e-5) == 0.0
    assert dp.epsilon_spent(p, 3, 16, 1e-5) > eps  # composition
    louder = dp_params(4, 2.0, min_summed=3)
    assert dp.epsilon_spent(louder, 3, 8, 1e-5) < eps


def test_noise_comes_from_the_os_not_from_the_round() -> None:
    a, b = dp.noise_rng(), dp.noise_rng()
    assert not np.array_equal(a.integers(0, 1 << 62, 8), b.integers(0, 1 << 62, 8))
    assert dp.skellam(50.0, 200_000, a).var() == pytest.approx(100.0, rel=0.03)


def test_dp_params_are_validated_and_travel_in_the_round_setup() -> None:
    with pytest.raises(ValueError, match="go together"):
        SecAggParams(4, N, l2_clip=0.05)
    with pytest.raises(ValueError, match="noise_mu"):
        SecAggParams(4, N, l2_clip=0.05, noise_mu=-1.0)
    with pytest.raises(ValueError, match="ring bits"):
        SecAggParams(64, N, grid_bits=8, l2_clip=1.0, noise_mu=1e16)
    p = dp_params(4, 1.0, min_summed=3)
    assert SecAggParams.from_list(p.to_list()) == p
    assert len(p.to_list()) == 9 and len(SecAggParams(4, N).to_list()) == 7
    with pytest.raises(ValueError, match="9 values"):
        SecAggParams.from_list([*SecAggParams(4, N).to_list(), 0.0, 0.0])
