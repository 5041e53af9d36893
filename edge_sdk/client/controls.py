"""Local controls of a device: thread and memory caps, and local differential privacy.

Local DP (the device protects its own update, trusting nobody): the update's change from its
base adapter, Δ = θ - θ_base over the tensors that are sent, is clipped to L2 norm C and
Gaussian noise N(0, (σ·C)²) is added to every coordinate before encoding (the Gaussian
mechanism on one round's contribution; Abadi et al. 2016, with the whole update as the unit).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_sdk.validators import is_finite, is_positive_finite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalDpConfig:
    """Clip-and-noise on the device, per round."""

    clip_norm: float
    """C: the update's change from its base is scaled down to at most this global L2 norm."""
    noise_multiplier: float = 1.0
    """σ: the noise standard deviation is σ·C per coordinate (0 clips without noise)."""

    def __post_init__(self) -> None:
        if not is_positive_finite(self.clip_norm):
            raise ValueError(f"`clip_norm` should be a positive number, got {self.clip_norm!r}")
        if not (is_finite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"`noise_multiplier` should be >= 0, got {self.noise_multiplier!r}")


def privatize(
    tensors: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray],
    dp: LocalDpConfig,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], float]:
    """base + clip(Δ) + noise for every tensor; also returns ‖Δ‖ before clipping."""
    deltas = {
        k: np.asarray(v, np.float64) - np.asarray(base[k], np.float64) for k, v in tensors.items()
    }
    norm = math.sqrt(sum(float(np.square(d).sum()) for d in deltas.values()))
    scale = min(1.0, dp.clip_norm / norm) if norm > 0 else 1.0
    sigma = dp.noise_multiplier * dp.clip_norm
    out: dict[str, np.ndarray] = {}
    for key, delta in deltas.items():
        noisy = delta * scale
        if sigma > 0:
            noisy = noisy + rng.normal(0.0, sigma, size=delta.shape)
        out[key] = (np.asarray(base[key], np.float64) + noisy).astype(np.float32)
    log.info(
        "local DP: update norm %.4g clipped to %.4g, noise std %.3g", norm, norm * scale, sigma
    )
    return out, norm


def apply_thread_cap(threads: int | None) -> None:
    """Limit torch's intra-op threads (training) to `threads`; None leaves the default."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"`threads` should be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # for libraries started later
    log.info("training threads capped at %d", threads)


def apply_memory_cap(limit_mb: int | None) -> None:
    """Cap this process's address space (RLIMIT_AS, soft limit) at `limit_mb` MiB.

    Process-wide and one-way for an unprivileged process (the soft limit can be lowered again,
    never raised past the hard limit), so an embedding app should leave it off and the CLI
    sets it. Allocation beyond it fails with MemoryError instead of swapping the device.
    """
    if limit_mb is None:
        return
    if limit_mb < 64:
        raise ValueError(f"`memory_limit_mb` should be at least 64, got {limit_mb}")
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = limit_mb << 20
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    log.info("address space capped at %d MiB", limit >> 20)
