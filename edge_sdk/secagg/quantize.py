"""From a float update to ring elements and back, and bit packing at the ring's width.

A device holds an update x (shape (N,)) and a weight w (its number of examples, capped at W).
It sends the ring vector of

    y = (w / W) · clip(x, -C, C)        (N values in [-C, C])

stochastically rounded onto the grid of 2^g levels {-C, -C + Δ, …, C}, Δ = 2C / (2^g - 1),
as grid indices q ∈ [0, 2^g - 1], plus w itself as one extra coordinate. The sum of n such
indices is below n·2^g <= 2^b with b = g + ceil(log2 n), so the ring Z_{2^b} holds it without
wrapping, and the server decodes Σ y = Δ·Σ q - s·C (s = number of summed devices). The weighted
mean is then W·Σ y / Σ w: no device's weight is ever seen in the clear.

Stochastic rounding (q = floor(z + u), u ~ U[0, 1)) is unbiased: E[q] = z, so the decoded sum
is an unbiased estimate of Σ y, with an error below s·Δ per coordinate.
"""

from __future__ import annotations

import numpy as np

from edge_sdk.secagg.params import SecAggParams


def grid_step(params: SecAggParams) -> float:
    """Δ: the distance between two grid levels."""
    return 2.0 * params.clip / ((1 << params.grid_bits) - 1)


def stochastic_round(z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unbiased rounding of z to an integer neighbour: floor(z) + Bernoulli(frac(z)). int64."""
    floor = np.floor(z)
    return (floor + (rng.random(z.shape) < (z - floor))).astype(np.int64)


def capped_weight(num_examples: int, params: SecAggParams) -> int:
    """A device's weight: its number of examples, capped at `params.weight_cap`."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
        raise TypeError(f"num_examples should be an integer, got {num_examples!r}")
    if num_examples < 0:
        raise ValueError(f"num_examples should be non-negative, got {num_examples}")
    return min(int(num_examples), params.weight_cap)


def encode(
    update: np.ndarray,
    weight: int,
    params: SecAggParams,
    rng: np.random.Generator,
    noise: np.random.Generator | None = None,
) -> np.ndarray:
    """The device's plain ring vector: N grid indices then the weight, shape (N + 1,), uint32.

    `update` must be a finite float vector of length `params.vector_len`; `weight` an integer
    in [0, weight_cap] (callers cap the number of examples with `min(num_examples, cap)`).
    Under distributed DP (`params.dp`, see `edge_sdk.secagg.dp`) the update is clipped to
    `l2_clip` first, rounded conditionally, and Skellam(μ, μ) noise from `noise` (by default a
    Generator seeded from os.urandom) is added to every index, modulo 2^b.
    """
    x = np.asarray(update)
    if x.ndim != 1 or x.shape[0] != params.vector_len:
        raise ValueError(f"update should have shape ({params.vector_len},), got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating) or not np.all(np.isfinite(x)):
        raise ValueError("update should be a finite float vector (NaN/inf or non-float found)")
    if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)):
        raise TypeError(f"weight should be an integer, got {weight!r}")
    if not 0 <= int(weight) <= params.weight_cap:
        raise ValueError(f"weight should be in [0, {params.weight_cap}], got {weight}")
    c = params.clip
    levels = (1 << params.grid_bits) - 1
    out = np.empty(params.vector_len + 1, dtype=np.uint32)
    out[-1] = int(weight)
    if params.dp:
        from edge_sdk.secagg import dp

        # DP needs a bounded L2 effect: clip the norm, then each value (never longer), round
        # so that rounding keeps the norm bound (Kairouz et al. 2021), add this device's noise.
        y = np.clip(dp.clip_l2(x.astype(np.float64), params.l2_clip), -c, c)
        y *= int(weight) / params.weight_cap
        z = (y + c) / grid_step(params)  # in [0, levels]
        q = dp.conditional_round(z, levels / 2, dp.l2_sensitivity(params), rng)
        q += dp.skellam(params.noise_mu, params.vector_len, noise or dp.noise_rng())
        out[:-1] = (q & ((1 << params.ring_bits) - 1)).astype(np.uint32)  # two's complement mod 2^b
        return out
    y = np.clip(x.astype(np.float64), -c, c) * (int(weight) / params.weight_cap)  # (N,)
    z = (y + c) / grid_step(params)  # in [0, levels]
    q = np.clip(stochastic_round(z, rng), 0, levels)  # clip only guards float round-off
    out[:-1] = q.astype(np.uint32)
    return out


def decode_sum(ring_sum: np.ndarray, n_summed: int, params: SecAggParams) -> tuple[np.ndarray, int]:
    """(Σ y as float64 (N,), Σ w) from the unmasked ring sum of `n_summed` devices."""
    if ring_sum.shape != (params.vector_len + 1,):
        raise ValueError(
            f"ring sum should have shape ({params.vector_len + 1},), got {ring_sum.shape}"
        )
    if not 1 <= n_summed <= params.cohort_size:
        raise ValueError(f"n_summed should be in [1, {params.cohort_size}], got {n_summed}")
    q = (ring_sum[:-1].astype(np.uint64) & np.uint64((1 << params.ring_bits) - 1)).astype(np.int64)
    if params.noise_headroom:
        # A noisy sum lies in [-h, n·(2^g - 1) + h] and the ring has room for all of it: the
        # top h residues are the negative sums.
        q[q >= (1 << params.ring_bits) - params.noise_headroom] -= 1 << params.ring_bits
    return q.astype(np.float64) * grid_step(params) - n_summed * params.clip, int(ring_sum[-1])


def weighted_mean(sum_y: np.ndarray, total_weight: int, params: SecAggParams) -> np.ndarray:
    """Σ wᵢ·xᵢ / Σ wᵢ from the decoded sums (y = (w/W)·x, so Σ wᵢ·xᵢ = W·Σ y)."""
    if total_weight <= 0:
        raise ValueError(f"total_weight should be positive, got {total_weight}")
    return sum_y * (params.weight_cap / total_weight)


def pack(ring: np.ndarray, params: SecAggParams) -> bytes:
    """N values at exactly `ring_bits` bits (little-endian bit order), then the 32-bit weight
    word."""
    if ring.shape != (params.vector_len + 1,) or ring.dtype != np.uint32:
        raise ValueError(f"ring vector should be uint32 of shape ({params.vector_len + 1},)")
    b = params.ring_bits
    values = ring[:-1]
    # Bit j of every value, one column per pass: (N, b), least significant bit first. b
    # passes over N values beat one unpack of all 32 bits when b is small.
    bits = np.empty((params.vector_len, b), dtype=np.uint8)
    for j in range(b):
        bits[:, j] = (values >> np.uint32(j)) & np.uint32(1)
    packed = np.packbits(bits.reshape(-1), bitorder="little")
    return packed.tobytes() + ring[-1:].astype("<u4").tobytes()


def unpack(data: bytes, params: SecAggParams) -> np.ndarray:
    """Inverse of `pack`; `ValueError` if the length is not exactly `params.packed_len`."""
    if len(data) != params.packed_len:
        raise ValueError(f"packed update should be {params.packed_len} bytes, got {len(data)}")
    b, n = params.ring_bits, params.vector_len
    body = np.frombuffer(data, dtype=np.uint8, count=len(data) - 4)
    bits = np.unpackbits(body, bitorder="little")[: n * b].reshape(n, b)  # (N, b)
    out = np.zeros(n + 1, dtype=np.uint32)
    values = out[:-1]
    for j in range(b):
        values |= bits[:, j].astype(np.uint32) << np.uint32(j)
    out[-1] = np.frombuffer(data, dtype="<u4", offset=len(data) - 4, count=1)[0]
    return out
