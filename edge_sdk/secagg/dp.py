"""Distributed differential privacy under secure aggregation: the Skellam mechanism.

The coordinator never sees a device's update, so it cannot add central DP noise to the sum
without trusting itself with the clear sum. Instead every device adds its share of integer
noise on the grid before masking (Agarwal, Kairouz, Liu 2021, "The Skellam Mechanism for
Differentially Private Federated Learning", NeurIPS; the rounding follows Kairouz, Liu,
Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
Aggregation", ICML):

1. clip the update's L2 norm to C₂ (`SecAggParams.l2_clip`), then each value to [-C, C];
2. scale to grid steps and round stochastically, *conditionally*: resample until the rounded
   vector's distance from the grid's centre is at most `l2_sensitivity(params)` (Δ₂), so that
   rounding cannot inflate one device's effect beyond a known bound;
3. add Skellam(μ, μ) = Poisson(μ) - Poisson(μ) to every coordinate (variance 2μ), drawn from a
   numpy Generator seeded from `os.urandom` (never from the round's seeds).

Skellam is closed under summation: s devices give Skellam(s·μ, s·μ) on the sum, variance
2·s·μ grid steps². The coordinator calibrates μ so that the *minimum* number of devices a
published sum may hold (the task's minimum cohort; a round with fewer summed inputs is not
published) gives noise of standard deviation z·Δ₂ grid steps, z the configured noise
multiplier: the same z·sensitivity as the central Gaussian mechanism of
`coordinator.privacy`. Drop-outs never lower the noise below that.

Accounting (`epsilon_spent`): one published sum is one Skellam mechanism with L2 sensitivity
Δ₂ and L1 sensitivity Δ₁ <= √N·Δ₂ (add/remove one device; the number of summed devices is
public, so the grid's offset is not part of the sensitivity). Its Rényi DP at order α is
(Agarwal et al. 2021, Theorem 3.5)

    ε(α) <= α·Δ₂² / (4μ_s) + min( ((2α - 1)·Δ₂² + 6·Δ₁) / (16·μ_s²),  3·Δ₁ / (4·μ_s) )

with μ_s = the summed μ. The first term is the Gaussian mechanism's RDP at variance 2μ_s; the
second vanishes as μ_s grows. Composition over T published sums multiplies ε(α) by T, and
(ε, δ) follows from the conversion of Canonne, Kamath, Steinke 2020 (also used by
dp-accounting): ε = min_α T·ε(α) + log(1 - 1/α) - (log δ + log α)/(α - 1). As in central
DP, clients are not sampled by the coordinator, so no subsampling amplification is claimed.
"""

from __future__ import annotations

import math
import os

import numpy as np

from edge_sdk.secagg.params import SecAggParams

ROUNDING_BETA = math.exp(-0.5)
"""β of the conditional rounding bound (Kairouz et al. 2021, Theorem 2's default): one
unconditional rounding meets the bound with probability at least 1 - β."""

MAX_ROUNDING_TRIES = 64
"""Resamples of the conditional rounding before giving up (each succeeds with p >= 1 - β)."""

RDP_ORDERS = tuple([1.0 + x / 10.0 for x in range(1, 100)] + list(range(11, 257)))
"""Rényi orders α over which ε is minimised (the range dp-accounting uses by default)."""


def noise_rng() -> np.random.Generator:
    """A fresh Generator seeded with 256 bits from the OS's CSPRNG (never from round data)."""
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(os.urandom(32), "little")))


def scaled_l2_clip(params: SecAggParams) -> float:
    """C₂ in grid steps: c = C₂ / Δ."""
    step = 2.0 * params.clip / ((1 << params.grid_bits) - 1)
    return params.l2_clip / step


def l2_sensitivity(params: SecAggParams) -> float:
    """Δ₂: the bound the conditional rounding enforces on ‖q - centre‖₂, in grid steps.

    Kairouz et al. 2021 (Theorem 2 / Eq. 4): √(c² + N/4 + √(2·log(1/β))·(c + √N/2)), capped at
    c + √N (which any rounding meets).
    """
    c, n = scaled_l2_clip(params), params.vector_len
    bound = c * c + n / 4 + math.sqrt(2 * math.log(1 / ROUNDING_BETA)) * (c + math.sqrt(n) / 2)
    return min(math.sqrt(bound), c + math.sqrt(n))


def l1_sensitivity(params: SecAggParams) -> float:
    """Δ₁ <= √N·Δ₂ (Cauchy-Schwarz)."""
    return math.sqrt(params.vector_len) * l2_sensitivity(params)


def noise_mu_for(noise_multiplier: float, params: SecAggParams, min_summed: int) -> float:
    """Per-device μ such that `min_summed` devices sum to noise of std z·Δ₂ grid steps:
    2·min_summed·μ = (z·Δ₂)²."""
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"`noise_multiplier` should be > 0, got {noise_multiplier!r}")
    if min_summed < 1:
        raise ValueError(f"`min_summed` should be >= 1, got {min_summed!r}")
    sigma = noise_multiplier * l2_sensitivity(params)
    return sigma * sigma / (2 * min_summed)


def clip_l2(x: np.ndarray, bound: float) -> np.ndarray:
    """x scaled down to L2 norm `bound` if it is longer."""
    norm = float(np.linalg.norm(x))
    return x * (bound / norm) if norm > bound else x


def conditional_round(
    z: np.ndarray, centre: float, bound: float, rng: np.random.Generator
) -> np.ndarray:
    """Stochastic rounding of z (grid steps), resampled until ‖q - centre‖₂ <= bound. int64."""
    floor = np.floor(z)
    frac = z - floor
    for _ in range(MAX_ROUNDING_TRIES):
        q = floor + (rng.random(z.shape) < frac)
        if float(np.linalg.norm(q - centre)) <= bound:
            return q.astype(np.int64)
    raise ValueError(
        f"conditional rounding did not meet the bound {bound:.1f} in {MAX_ROUNDING_TRIES} tries "
        "(the update is not clipped to l2_clip?)"
    )


def skellam(mu: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Skellam(μ, μ) samples: Poisson(μ) - Poisson(μ), int64, variance 2μ."""
    return rng.poisson(mu, size).astype(np.int64) - rng.poisson(mu, size).astype(np.int64)


def rdp(alpha: float, mu_sum: float, l2: float, l1: float) -> float:
    """Rényi DP of one Skellam mechanism at order α (Agarwal et al. 2021, Theorem 3.5)."""
    gaussian = alpha * l2 * l2 / (4 * mu_sum)
    extra = min(
        ((2 * alpha - 1) * l2 * l2 + 6 * l1) / (16 * mu_sum * mu_sum), 3 * l1 / (4 * mu_sum)
    )
    return gaussian + extra


def epsilon_spent(params: SecAggParams, min_summed: int, aggregations: int, delta: float) -> float:
    """ε after `aggregations` published sums of at least `min_summed` devices, at δ."""
    if aggregations < 0:
        raise ValueError(f"`aggregations` should be >= 0, got {aggregations}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"`delta` should be in (0, 1), got {delta}")
    if aggregations == 0:
        return 0.0
    if not params.dp:
        return float("inf")
    mu_sum = min_summed * params.noise_mu
    l2, l1 = l2_sensitivity(params), l1_sensitivity(params)
    best = float("inf")
    for alpha in RDP_ORDERS:
        eps = (
            aggregations * rdp(alpha, mu_sum, l2, l1)
            + math.log1p(-1 / alpha)
            - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        )
        best = min(best, eps)
    return max(0.0, best)


__all__ = [
    "MAX_ROUNDING_TRIES",
    "ROUNDING_BETA",
    "clip_l2",
    "conditional_round",
    "epsilon_spent",
    "l1_sensitivity",
    "l2_sensitivity",
    "noise_mu_for",
    "noise_rng",
    "rdp",
    "skellam",
]
