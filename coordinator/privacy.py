"""Central differential privacy: clip each client's delta, add Gaussian noise to the sum.

Each aggregation is one Gaussian mechanism on the sum of the clipped client deltas: one client
changes that sum by at most `clip_norm` in L2 (the strategy admits at most one update per
client per aggregation when DP is on), and the noise is N(0, (z·clip_norm)²) per coordinate.
The noisy sum is divided by the number of contributions, which is post-processing.

The spent (ε, δ) is computed by `dp-accounting`'s RDP accountant over the composition of
every aggregation so far. Clients are not sampled by the coordinator (they arrive on their
own schedule), so no subsampling amplification is claimed: the bound is conservative.
This is client-level DP for updates that go through the aggregation; it does not cover what
the clients choose to send elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from coordinator.lora_math import Tensors, add_gaussian_noise


@dataclass(frozen=True)
class DpConfig:
    """Central DP parameters."""

    noise_multiplier: float
    """z: noise std divided by the clip norm."""
    clip_norm: float = 1.0
    """L2 bound C on one client's delta (over all its tensors together)."""
    delta: float = 1e-5
    """δ at which ε is reported."""

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"`noise_multiplier` should be > 0, got {self.noise_multiplier}")
        if not self.clip_norm > 0:
            raise ValueError(f"`clip_norm` should be > 0, got {self.clip_norm}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"`delta` should be in (0, 1), got {self.delta}")


@lru_cache(maxsize=256)
def epsilon_spent(noise_multiplier: float, aggregations: int, delta: float) -> float:
    """ε after `aggregations` Gaussian mechanisms with multiplier z, at δ (0.0 for none)."""
    if aggregations < 0:
        raise ValueError(f"`aggregations` should be >= 0, got {aggregations}")
    if aggregations == 0:
        return 0.0
    # Imported here: dp_accounting pulls in scipy and absl, which the server needs only with DP.
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(noise_multiplier), aggregations
    )
    accountant.compose(event)
    epsilon = float(accountant.get_epsilon(delta))
    return epsilon if math.isfinite(epsilon) else float("inf")


def privatize_sum(
    clipped_sum: Tensors, count: int, config: DpConfig, rng: np.random.Generator
) -> Tensors:
    """(Σ clipped deltas + N(0, (z·C)²)) / count: the DP average of `count` contributions."""
    if count <= 0:
        raise ValueError(f"`count` should be positive, got {count}")
    noisy = add_gaussian_noise(clipped_sum, config.noise_multiplier * config.clip_norm, rng)
    return {k: v / count for k, v in noisy.items()}
