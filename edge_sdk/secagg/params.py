"""Parameters of one secure-aggregation round, shared by every device and the server.

The server fixes them for a round and sends them to the devices in `RoundSetup`; every
derived quantity (ring width, graph degree, threshold) is computed here, once, so that the
two sides cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from edge_sdk.validators import is_positive_finite, require_int_in

MIN_COHORT = 3
"""Smallest cohort the protocol accepts. With two devices each could subtract its own update
from the sum and learn the other's; the threshold must also exceed half the degree (see
`threshold`), which needs at least two neighbours per device."""

MAX_COHORT = 4096
"""Largest cohort (bounds every list a message may carry)."""

MAX_RING_BITS = 32
"""Masks are 32-bit words from the PRG, so the ring Z_{2^b} needs b <= 32."""

NOISE_TAIL_SIGMAS = 10.0
"""Distributed DP: the ring holds the summed noise out to this many standard deviations on
either side (a normal tail beyond 10σ is below 2e-23 per coordinate), so that a noisy sum
decodes without wrapping."""

WEIGHT_RING_BITS = 32
"""The weight coordinate (Σ wᵢ) is masked in its own ring Z_{2^32}: it is one value, and
giving it the full width lets the cap stay large while the update coordinates stay narrow."""


SIZE_TARGET_RING_BITS = 7
"""The widest ring that keeps a masked update >= 4x smaller than fp32: N values at b bits plus
the 4-byte weight word and the message's framing; at b = 8 it is 3.9998x."""


def grid_bits_for(cohort_size: int, ring_bits: int = SIZE_TARGET_RING_BITS) -> int:
    """The widest grid whose ring b = g + ceil(log2 n) stays within `ring_bits` (at least 1).

    With the default 7-bit budget: 5, 4, 3 and 1 grid bits at n = 3, 8, 16 and 64, a masked
    update 4.57x smaller than fp32. benchmarks/bench_secagg_grid.py measures what each grid
    costs in accuracy (BENCHMARKS.md); a cohort of 33-64 has one bit left, an unbiased
    stochastic sign, and a wider grid there costs the size target.
    """
    if isinstance(cohort_size, bool) or not isinstance(cohort_size, int) or cohort_size < 1:
        raise ValueError(f"`cohort_size` should be a positive integer, got {cohort_size!r}")
    return max(1, ring_bits - math.ceil(math.log2(cohort_size)))


def default_degree(cohort_size: int) -> int:
    """Degree k of the SecAgg+ graph (Bell et al. 2020): O(log n), complete for small cohorts.

    k = 4·ceil(log2 n) rounded up to even, or n - 1 when that is smaller (then the graph is
    complete and the protocol is the original one of Bonawitz et al. 2017).
    """
    k = 4 * math.ceil(math.log2(cohort_size))
    k += k % 2
    return min(cohort_size - 1, k)


def default_threshold(degree: int) -> int:
    """Shamir threshold t = ceil(2k/3): above k/2 (needed for privacy against a server that
    sends different drop-out lists to different neighbours), leaving k - t drop-outs per
    neighbourhood."""
    return max(degree // 2 + 1, math.ceil(2 * degree / 3))


@dataclass(frozen=True)
class SecAggParams:
    """What every party of a round agrees on. Validated on construction."""

    cohort_size: int
    """Most devices in the round (n). The ring is wide enough for the sum of n inputs."""
    vector_len: int
    """Length N of each device's plain update vector (the weight coordinate is extra)."""
    clip: float = 1.0
    """Per-coordinate bound C: devices clip their update to [-C, C] before rounding."""
    grid_bits: int = 4
    """Bits g of the integer grid: 2^g levels spanning [-C, C] (g = 1 is a stochastic sign)."""
    weight_cap: int = 1000
    """Largest weight (number of examples) one device may claim."""
    degree: int = 0
    """Neighbours k of each device in the SecAgg+ graph; 0 picks `default_degree(n)`."""
    threshold: int = 0
    """Shamir threshold t (shares needed to reconstruct); 0 picks `default_threshold(k)`."""
    l2_clip: float = 0.0
    """Distributed DP (with `noise_mu`): devices first clip the L2 norm of their update to this
    bound, the sensitivity of the sum (`edge_sdk.secagg.dp`); 0 = no DP."""
    noise_mu: float = 0.0
    """Distributed DP: each device adds Skellam(μ, μ) noise (variance 2μ, in grid steps) to
    every coordinate, so that a sum of s devices carries Skellam(s·μ, s·μ); 0 = no noise."""
    ring_bits: int = field(init=False)
    """Derived: b = g + ceil(log2 n) (with noise: enough for n·(2^g - 1) plus twice
    `noise_headroom`), the width of the ring Z_{2^b} and of each packed value."""
    noise_headroom: int = field(init=False)
    """Derived: 0 without noise; else ceil(NOISE_TAIL_SIGMAS · √(2·n·μ)), how far below 0 (and
    above n·(2^g - 1)) a noisy sum may land and still decode (`quantize.decode_sum`)."""

    def __post_init__(self) -> None:
        def _int(name: str, lo: int, hi: int) -> int:
            return require_int_in(name, getattr(self, name), lo, hi)

        n = _int("cohort_size", MIN_COHORT, MAX_COHORT)
        _int("vector_len", 1, 1 << 30)
        g = _int("grid_bits", 1, MAX_RING_BITS - 1)
        _int("weight_cap", 1, ((1 << WEIGHT_RING_BITS) - 1) // n)
        if not is_positive_finite(self.clip):
            raise ValueError(f"`clip` should be a positive finite number, got {self.clip!r}")
        for name in ("l2_clip", "noise_mu"):
            value = getattr(self, name)
            ok = not isinstance(value, bool) and isinstance(value, (int, float))
            if not (ok and math.isfinite(value) and value >= 0):
                raise ValueError(f"`{name}` should be a finite number >= 0, got {value!r}")
        if (self.l2_clip > 0) != (self.noise_mu > 0):
            raise ValueError(
                f"`l2_clip` and `noise_mu` go together (distributed DP), got l2_clip="
                f"{self.l2_clip!r}, noise_mu={self.noise_mu!r}"
            )
        ring_bits = g + math.ceil(math.log2(n))
        headroom = 0
        if self.noise_mu > 0:
            headroom = math.ceil(NOISE_TAIL_SIGMAS * math.sqrt(2 * n * self.noise_mu))
            ring_bits = math.ceil(math.log2(n * ((1 << g) - 1) + 2 * headroom + 1))
        object.__setattr__(self, "noise_headroom", headroom)
        if ring_bits > MAX_RING_BITS:
            raise ValueError(
                f"`grid_bits` {g} + ceil(log2 cohort_size {n}) (+ noise headroom {headroom}) "
                f"= {ring_bits} exceeds {MAX_RING_BITS} ring bits; use fewer grid bits"
            )
        object.__setattr__(self, "ring_bits", ring_bits)
        if self.degree:
            k = _int("degree", 2, n - 1)
            if k < n - 1 and k % 2:
                raise ValueError(
                    f"`degree` should be even below cohort_size - 1 = {n - 1} (a Harary graph "
                    f"has k/2 neighbours on each side), got {k}"
                )
        else:
            k = default_degree(n)
        object.__setattr__(self, "degree", k)
        if self.threshold:
            _int("threshold", k // 2 + 1, k)
        else:
            object.__setattr__(self, "threshold", default_threshold(k))

    @classmethod
    def for_ring_bits(
        cls, cohort_size: int, vector_len: int, ring_bits: int, **kwargs: float
    ) -> SecAggParams:
        """Parameters whose ring is `ring_bits` wide: the widest grid that fits the cohort.

        E.g. `ring_bits=7` keeps a masked update >= 4x smaller than fp32 (4, 3 and 1 grid bits
        for cohorts of 8, 16 and 64).
        """
        if cohort_size < 1:
            raise ValueError(f"`cohort_size` should be positive, got {cohort_size}")
        grid_bits = ring_bits - math.ceil(math.log2(cohort_size))
        if grid_bits < 1:
            raise ValueError(
                f"`ring_bits` {ring_bits} leaves no grid bit for a cohort of {cohort_size} "
                f"(needs at least {1 + math.ceil(math.log2(cohort_size))})"
            )
        return cls(cohort_size, vector_len, grid_bits=grid_bits, **kwargs)  # type: ignore[arg-type]

    @property
    def max_dropouts_per_neighbourhood(self) -> int:
        """Drop-outs each device's neighbourhood tolerates: k - t."""
        return self.degree - self.threshold

    @property
    def packed_len(self) -> int:
        """Bytes of a packed masked update: N values at b bits, then the 4-byte weight word."""
        return (self.vector_len * self.ring_bits + 7) // 8 + WEIGHT_RING_BITS // 8

    @property
    def dp(self) -> bool:
        """Whether devices add distributed-DP noise."""
        return self.noise_mu > 0

    def to_list(self) -> list[int | float]:
        """Canonical form, for messages and for the round binding (order is part of the format):
        7 values, then l2_clip and noise_mu only under distributed DP."""
        out: list[int | float] = [
            self.cohort_size,
            self.vector_len,
            float(self.clip),
            self.grid_bits,
            self.weight_cap,
            self.degree,
            self.threshold,
        ]
        if self.dp:
            out += [float(self.l2_clip), float(self.noise_mu)]
        return out

    @classmethod
    def from_list(cls, values: list[Any]) -> SecAggParams:
        """Inverse of `to_list`; raises `ValueError` on any bad field."""
        if not isinstance(values, list) or len(values) not in (7, 9):
            raise ValueError(f"params should be a list of 7 or 9 values, got {values!r:.80}")
        if len(values) == 9:
            n, length, clip, g, cap, k, t, l2, mu = values
            if not (l2 and mu):  # the no-DP form is the 7-value one: one form per meaning
                raise ValueError(f"params: 9 values need l2_clip and noise_mu > 0, got {l2}, {mu}")
            return cls(n, length, clip, g, cap, k, t, l2, mu)
        n, length, clip, g, cap, k, t = values
        return cls(n, length, clip, g, cap, k, t)
