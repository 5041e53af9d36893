"""One aggregation step: the current global adapter + a stream of client adapters -> the next.

Clients train from a global version (their base) and send their whole adapter after local
training. The server works with deltas against that base, which is what makes asynchronous
(stale) updates meaningful (FedBuff applies each delta to the *current* model):

    naive / frozen-a:  Δᵢ = θᵢ - θ_base(i) on the factor tensors (A and B, or B only)
                       θ' = θ + η · Σ wᵢ·cᵢ·Δᵢ / Σ wᵢ      (or a FedAdam step on that mean)
    exact:             ΔWᵢ = sᵢ·Bᵢ·Aᵢ - s·B_b·A_b   (s = alpha/r, per layer, never dense)
                       W' = s·B·A + η · Σ wᵢ·cᵢ·ΔWᵢ / Σ wᵢ, re-projected to rank r

cᵢ ≤ 1 is the clipping coefficient: it scales the update's *effect* (Δᵢ over the factor tensors
in naive / frozen-a, the dense ΔWᵢ in exact, by Frobenius norm, never formed) to norm ≤ C. The
bound C is on by default (`clip_bound`): C = c · m with m the lower median of the effect norms
of this aggregation's updates and of the last `clip_history` aggregated ones, optionally capped
by a fixed `clip_norm`; under DP it is `dp.clip_norm`. The weights wᵢ / Σ wᵢ sum to 1, so the
averaged step has norm ≤ C: one version moves the global adapter by at most η·C in the factor
modes (plain server step), and s·B·A by at most η·C before the exact mode's rank-r
re-projection (from version 0, where B = 0, after it too; in general the re-projection at most
doubles it, Eckart-Young). With η = 1 and every client on the current version, the exact mode
gives exactly the best rank-r approximation of Σ wᵢ·cᵢ·sᵢ·Bᵢ·Aᵢ / Σ wᵢ.

Memory: the mean modes hold one float64 sum of the adapter; the exact mode holds, per layer,
a factored sum of rank ≤ 2·max_rank (`LowRankSum`). Both are O(adapter) for any number of
updates. The robust statistics (trimmed mean, median) keep every delta, O(clients × adapter),
and are offered for the factor modes only (a coordinate of the dense B·A is not available
without forming it).
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, ParamSpec

import numpy as np
from threadpoolctl import threadpool_limits

from coordinator.errors import AggregationError, ContributionError
from coordinator.lora_math import (
    ExactSum,
    FedAdamConfig,
    LowRankSum,
    Tensors,
    WeightedMean,
    coordinate_median,
    fedadam_step,
    fill_dead_ranks,
    frozen_a_matrix,
    lora_scale,
    lowrank_norm,
    reproject,
    tensors_norm,
    trimmed_mean,
)
from coordinator.privacy import DpConfig, epsilon_spent, privatize_sum
from edge_sdk.choices import LORA_MODES, ROBUST_AGGREGATORS, LoraMode, RobustAggregator

log = logging.getLogger(__name__)

MODES = LORA_MODES
ROBUST = ROBUST_AGGREGATORS

MAX_SCALE = 1024.0
"""Largest LoRA scale alpha / r a task may use (PEFT tasks use 0.1-16; rsLoRA up to ~64)."""

Shapes = dict[str, tuple[int, int]]
"""HF module path (`model.layers.0.self_attn.q_proj`) -> (out_features, in_features)."""


def a_key(module: str) -> str:
    return f"{module}.lora_A"


def b_key(module: str) -> str:
    return f"{module}.lora_B"


@dataclass(frozen=True)
class AggregationConfig:
    """How client adapters are combined."""

    mode: LoraMode = "exact"
    """`naive`, `frozen-a` or `exact` (see the module docstring of `coordinator.lora_math`)."""
    rank: int = 8
    """r of the global adapter."""
    alpha: float = 16.0
    """LoRA alpha of the global adapter; its scale is alpha / r."""
    a_seed: int = 0
    """Seed of the initial (and, in frozen-a, the fixed) A matrices: `frozen_a_matrix`."""
    server_lr: float = 1.0
    """η: how far the server moves along the averaged delta (1.0 = plain FedAvg)."""
    robust: RobustAggregator = "mean"
    """`mean` (weighted, streaming), `trimmed-mean` or `median` (coordinate-wise, unweighted)."""
    trim_ratio: float = 0.1
    """Fraction cut from each end per coordinate for `trimmed-mean`."""
    clip_norm: float | None = None
    """Fixed per-update bound on the norm of the update's effect (see `clip_bound`); None = no
    fixed bound. With `clip_multiplier` set too, the smaller of the two bounds applies."""
    clip_multiplier: float | None = 2.0
    """c of the adaptive bound c · m, m = lower median of the effect norms of the updates being
    aggregated and of the last `clip_history` aggregated updates. On by default; None = off.
    Ignored under `dp` (a data-dependent bound would break DP's sensitivity)."""
    clip_history: int = 16
    """How many effect norms of earlier aggregated updates join the adaptive reference (so a
    buffer of one update is still clipped against its predecessors); 0 = this buffer only."""
    max_weight_examples: int | None = None
    """Cap on `num_examples` used as an update's weight; None = the task's local_steps ×
    batch_size (the examples one local round trains on), resolved by the coordinator."""
    fedadam: FedAdamConfig | None = None
    """Server optimizer; None = plain server learning rate."""
    dp: DpConfig | None = None
    """Central DP (clip at dp.clip_norm, uniform weights, Gaussian noise); None = off."""
    max_client_rank: int = 64
    """Largest rank accepted from a client in exact mode (other modes need rank == r)."""
    exact_max_rank: int = 0
    """0 (default): the exact mode sums every update without truncation (`ExactSum`: factored
    while small, then a dense float32 (out, in) accumulator per layer, i.e. memory of the
    model's own size). > 0: the older streaming sum that keeps at most this rank between
    compressions (memory O(rank·(out + in)), truncated; `truncation_rel_error` bounds it)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"`mode` should be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.rank <= 0:
            raise ValueError(f"`rank` should be a positive integer, got {self.rank}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"`alpha` should be > 0, got {self.alpha}")
        if self.alpha / self.rank > MAX_SCALE:
            raise ValueError(
                f"`alpha` / `rank` should be at most {MAX_SCALE:g}, got {self.alpha}/{self.rank}"
            )
        if self.a_seed < 0:
            raise ValueError(f"`a_seed` should be >= 0, got {self.a_seed}")
        if not self.server_lr > 0:
            raise ValueError(f"`server_lr` should be > 0, got {self.server_lr}")
        if self.robust not in ROBUST:
            raise ValueError(f"`robust` should be one of {', '.join(ROBUST)}, got {self.robust!r}")
        if not 0.0 <= self.trim_ratio < 0.5:
            raise ValueError(f"`trim_ratio` should be in [0, 0.5), got {self.trim_ratio}")
        if self.clip_norm is not None and not (
            self.clip_norm > 0 and math.isfinite(self.clip_norm)
        ):
            raise ValueError(f"`clip_norm` should be > 0 or None, got {self.clip_norm}")
        if self.clip_multiplier is not None and not (
            self.clip_multiplier >= 1.0 and math.isfinite(self.clip_multiplier)
        ):
            raise ValueError(
                f"`clip_multiplier` should be >= 1 or None, got {self.clip_multiplier}"
            )
        if self.clip_history < 0:
            raise ValueError(f"`clip_history` should be >= 0, got {self.clip_history}")
        if self.max_weight_examples is not None and self.max_weight_examples < 1:
            raise ValueError(
                f"`max_weight_examples` should be >= 1 or None, got {self.max_weight_examples}"
            )
        if self.max_client_rank < self.rank:
            raise ValueError(
                f"`max_client_rank` should be >= rank={self.rank}, got {self.max_client_rank}"
            )
        if self.exact_max_rank < 0 or (0 < self.exact_max_rank < self.rank):
            raise ValueError(
                f"`exact_max_rank` should be 0 or >= rank={self.rank}, got {self.exact_max_rank}"
            )
        if self.mode == "exact":
            for name, value, off in (
                ("robust", self.robust, "mean"),
                ("fedadam", self.fedadam, None),
                ("dp", self.dp, None),
            ):
                if value != off:
                    raise ValueError(
                        f"`{name}`={value!r} needs per-coordinate factor tensors; "
                        "use mode 'naive' or 'frozen-a' with it"
                    )
        if self.dp is not None:
            if self.robust != "mean":
                raise ValueError(
                    f"`dp` needs robust='mean' (a bounded-sensitivity sum), got {self.robust!r}"
                )
            if self.clip_norm is not None:
                raise ValueError("`clip_norm` and `dp` are exclusive: DP clips at `dp.clip_norm`")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank)

    @property
    def sum_rank(self) -> int:
        """Rank kept by the truncating streaming sum (`exact_max_rank` > 0 only)."""
        return self.exact_max_rank or 4 * self.rank

    def update_keys(self, shapes: Shapes) -> list[str]:
        """The tensors a client update must carry: B only in frozen-a, else A and B."""
        keys: list[str] = []
        for module in shapes:
            if self.mode != "frozen-a":
                keys.append(a_key(module))
            keys.append(b_key(module))
        return keys

    def expected_shape(self, key: str, shapes: Shapes, rank: int) -> tuple[int, int]:
        module, _, kind = key.rpartition(".")
        out_dim, in_dim = shapes[module]
        return (rank, in_dim) if kind == "lora_A" else (out_dim, rank)


def initial_adapter(config: AggregationConfig, shapes: Shapes) -> Tensors:
    """Version 0, as PEFT initialises LoRA: A = `frozen_a_matrix(a_seed)`, B = 0 (so B·A = 0).

    Every mode starts from the same seeded A; in frozen-a it never changes.
    """
    tensors: Tensors = {}
    for module, (out_dim, in_dim) in shapes.items():
        tensors[a_key(module)] = frozen_a_matrix(
            config.a_seed, (config.rank, in_dim), a_key(module)
        )
        tensors[b_key(module)] = np.zeros((out_dim, config.rank), dtype=np.float32)
    return tensors


@dataclass
class Contribution:
    """One decoded client update, as the aggregator sees it."""

    update_id: str
    tensors: Mapping[str, np.ndarray]
    """The client's adapter after local training (A and B, or B only in frozen-a)."""
    weight: float
    """From the strategy (capped num_examples × staleness discount); uniform under DP."""
    base_version: int
    scale: float
    """The client's alpha / r (exact mode weighs Bᵢ·Aᵢ by it)."""


@dataclass
class ServerState:
    """What the aggregator carries across versions: FedAdam moments, the DP ledger, and the
    effect norms of the last aggregated updates (the adaptive clip's history)."""

    m: Tensors | None = None
    v: Tensors | None = None
    dp_aggregations: int = 0
    norm_history: tuple[float, ...] = ()

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "dp_aggregations": np.array(self.dp_aggregations),
            "norm_history": np.asarray(self.norm_history, dtype=np.float64),
        }
        for prefix, tensors in (("m/", self.m), ("v/", self.v)):
            for key, value in (tensors or {}).items():
                arrays[prefix + key] = value
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes | None) -> ServerState:
        if not data:
            return cls()
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            m = {k[2:]: npz[k] for k in npz.files if k.startswith("m/")}
            v = {k[2:]: npz[k] for k in npz.files if k.startswith("v/")}
            # Blobs written before the adaptive clip have no history: start it empty.
            history = npz["norm_history"] if "norm_history" in npz.files else np.zeros(0)
            finite = [float(x) for x in np.ravel(history) if math.isfinite(float(x)) and x >= 0]
            return cls(
                m=m or None,
                v=v or None,
                dp_aggregations=int(npz["dp_aggregations"]),
                norm_history=tuple(finite),
            )


@dataclass
class Outcome:
    tensors: Tensors
    """The new global adapter, float32, the same keys and shapes as the current one."""
    state: ServerState
    stats: dict[str, Any] = field(default_factory=dict)


# -------------------------------------------------------------------------------------------
# Clipping: the bound, and each update's effect norm
# -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipBound:
    """The per-update bound one aggregation applies, and where it came from."""

    bound: float | None
    """Largest norm of one update's effect after clipping; None = not clipped."""
    source: str
    """`off`, `fixed` (clip_norm), `adaptive` (c · lower median), or `dp` (dp.clip_norm)."""
    reference: float | None = None
    """m, the lower median the adaptive bound was computed from (None when not adaptive)."""

    def to_obj(self) -> dict[str, Any]:
        return {"bound": self.bound, "source": self.source, "reference": self.reference}


def lower_median(values: Sequence[float]) -> float:
    """The ⌈n/2⌉-th smallest value: with fewer than half of the values hostile, it lies between
    two honest values; with exactly half (one attacker of two), it is at most an honest one."""
    if not values:
        raise ValueError("no values to take the median of")
    return float(sorted(values)[(len(values) - 1) // 2])


def clip_bound(
    config: AggregationConfig, norms: Sequence[float], history: Sequence[float] = ()
) -> ClipBound:
    """The bound for an aggregation of updates with effect `norms` (see the module docstring).

    `history` holds the effect norms of earlier aggregated updates (`ServerState.norm_history`);
    only its last `config.clip_history` values count.
    """
    if config.dp is not None:
        return ClipBound(config.dp.clip_norm, "dp")
    fixed = config.clip_norm
    if config.clip_multiplier is None:
        return ClipBound(fixed, "fixed") if fixed is not None else ClipBound(None, "off")
    recent = list(history)[-config.clip_history :] if config.clip_history else []
    reference = lower_median([*norms, *recent])
    adaptive = config.clip_multiplier * reference
    if fixed is not None and fixed < adaptive:
        return ClipBound(fixed, "fixed", reference)
    return ClipBound(adaptive, "adaptive", reference)


def _clip_coef(norm: float, bound: float | None) -> float:
    if bound is None or norm <= bound:
        return 1.0
    # bound 0 (at least half of the reference norms were 0): the update moves nothing.
    return bound / norm if bound > 0 else 0.0


def _check_contribution(item: Contribution) -> None:
    if not (item.weight >= 0 and math.isfinite(item.weight)):
        raise ContributionError(item.update_id, f"weight {item.weight} is not finite")
    if not (item.scale > 0 and math.isfinite(item.scale) and item.scale <= MAX_SCALE):
        raise ContributionError(item.update_id, f"LoRA scale {item.scale} is not usable")


def _usable(contributions: Iterable[Contribution]) -> Iterator[Contribution]:
    """The contributions of positive weight, each checked, consumed lazily (one at a time)."""
    for item in contributions:
        if item.weight <= 0:
            continue
        _check_contribution(item)
        yield item


def _finite_norm(item: Contribution, norm: float) -> float:
    if not math.isfinite(norm):
        raise ContributionError(item.update_id, "the norm of its effect is not finite")
    return norm


@dataclass
class _NormTally:
    """The effect norms of one aggregation's updates, and how many of them were clipped."""

    bound: float | None
    """`ClipBound.bound` of this aggregation."""
    norms: list[float] = field(default_factory=list)
    clipped: int = 0

    def coefficient(self, item: Contribution, norm: float) -> float:
        """Records `item`'s effect norm (refused when not finite); its clipping coefficient cᵢ."""
        self.norms.append(_finite_norm(item, norm))
        coef = _clip_coef(norm, self.bound)
        self.clipped += coef < 1.0
        return coef

    def require_some(self) -> None:
        if not self.norms:
            raise ValueError("no contribution with positive weight")

    def stats(self, avg_norm: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "delta_norm_mean": float(np.mean(self.norms)),
            "delta_norm_max": float(np.max(self.norms)),
            "clipped": int(self.clipped),
        }
        if avg_norm is not None:
            out["avg_delta_norm"] = avg_norm
        return out

    def history(self, config: AggregationConfig, state: ServerState) -> tuple[float, ...]:
        """The adaptive clip's history after this aggregation: the last `clip_history` norms."""
        if config.clip_history == 0:
            return ()
        return tuple([*state.norm_history, *self.norms][-config.clip_history :])


def effect_norm(
    config: AggregationConfig,
    shapes: Shapes,
    item: Contribution,
    reference: Mapping[str, np.ndarray],
    *,
    cache: dict[tuple[Any, ...], tuple[np.ndarray, ...]] | None = None,
) -> float:
    """Norm of what `item` would change in the global adapter, in the mode's parametrisation.

    naive / frozen-a: ‖θᵢ - θ_base‖ over the factor tensors the mode averages; exact:
    ‖sᵢ·Bᵢ·Aᵢ - s·B_b·A_b‖_F over every layer, from the factors (never dense). Raises
    `ContributionError` when it is not finite (e.g. an alpha of 1e300 on finite tensors).
    """
    _check_contribution(item)
    with np.errstate(over="ignore", invalid="ignore"):
        if config.mode == "exact":
            norm = _exact_terms(item, reference, shapes, config.scale, config.rank, cache).norm
        else:
            norm = tensors_norm(_factor_delta(config, shapes, item, reference))
    return _finite_norm(item, norm)


def _factor_delta(
    config: AggregationConfig,
    shapes: Shapes,
    item: Contribution,
    reference: Mapping[str, np.ndarray],
) -> Tensors:
    return {
        k: np.asarray(item.tensors[k], np.float64) - np.asarray(reference[k], np.float64)
        for k in config.update_keys(shapes)
    }


# -------------------------------------------------------------------------------------------
# One aggregation
# -------------------------------------------------------------------------------------------


_P = ParamSpec("_P")


def _one_blas_thread(fn: Callable[_P, Outcome]) -> Callable[_P, Outcome]:
    """Run `fn` with BLAS limited to one thread, restored after.

    The folds already run in parallel on `_WORKERS` threads, and OpenBLAS's own threads under
    them spin-wait for a core. With two busy processes beside it, an exact aggregation of 4
    SmolLM2 updates took 7.7-33 s instead of 0.5-1.6 s (`benchmarks/bench_blas_threads.py`).
    `fedlm coordinator` sets the BLAS thread count before numpy loads; this covers every other
    caller (the in-process demos, an app that embeds the coordinator).
    """

    @functools.wraps(fn)
    def limited(*args: _P.args, **kwargs: _P.kwargs) -> Outcome:
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return limited


@_one_blas_thread
def aggregate(
    config: AggregationConfig,
    shapes: Shapes,
    current: Mapping[str, np.ndarray],
    contributions: Iterable[Contribution],
    base: Callable[[int], Mapping[str, np.ndarray]],
    state: ServerState,
    rng: np.random.Generator | None = None,
    *,
    clip: ClipBound | None = None,
) -> Outcome:
    """Fold `contributions` into the next global adapter.

    `base(v)` returns the global adapter of version v (the service caches decoded versions).
    `clip` is the bound to apply; a streaming caller (the coordinator) measures every update's
    `effect_norm` first and passes `clip_bound(...)`, so the contributions are consumed once,
    lazily. Without it the bound is computed here, which holds the contributions in memory.

    Raises `ContributionError` naming an update whose effect or weight is not finite,
    `AggregationError` when the result is not finite, and `ValueError` when no contribution
    has positive weight.
    """
    if clip is None:
        items = [c for c in contributions if c.weight > 0]
        norms = [effect_norm(config, shapes, c, base(c.base_version)) for c in items]
        clip = clip_bound(config, norms, state.norm_history) if items else ClipBound(None, "off")
        contributions = items
    given = _Inputs(config, shapes, current, base, state, clip)
    if config.mode == "exact":
        outcome = _aggregate_exact(given, contributions)
    else:
        outcome = _aggregate_factors(given, contributions, rng)
    for key, value in outcome.tensors.items():
        if not np.isfinite(value).all():
            raise AggregationError(f"the aggregated {key} is not finite")
    outcome.stats["clip"] = clip.to_obj()
    return outcome


class _Inputs(NamedTuple):
    """What one aggregation works from besides the contributions (see `aggregate`)."""

    config: AggregationConfig
    shapes: Shapes
    current: Mapping[str, np.ndarray]
    base: Callable[[int], Mapping[str, np.ndarray]]
    state: ServerState
    clip: ClipBound


def _aggregate_factors(
    given: _Inputs, contributions: Iterable[Contribution], rng: np.random.Generator | None
) -> Outcome:
    config, shapes, current, base, state, clip = given
    keys = config.update_keys(shapes)
    mean = WeightedMean()
    kept: list[Tensors] = []  # robust statistics only: O(clients × adapter)
    tally = _NormTally(clip.bound)
    for item in _usable(contributions):
        delta = _factor_delta(config, shapes, item, base(item.base_version))
        coef = tally.coefficient(item, tensors_norm(delta))
        if coef < 1.0:
            delta = {k: v * coef for k, v in delta.items()}
        if config.robust == "mean":
            mean.add(delta, 1.0 if config.dp is not None else item.weight)
        else:
            kept.append(delta)
    tally.require_some()
    updates = len(tally.norms)

    stats: dict[str, Any] = {"mode": config.mode, "robust": config.robust, "updates": updates}
    if config.robust == "mean":
        avg = mean.mean()
        stats["total_weight"] = mean.total_weight
    else:
        avg = {}
        for key in keys:
            stacked = np.stack([d[key] for d in kept])  # (n, *shape)
            avg[key] = (
                coordinate_median(stacked)
                if config.robust == "median"
                else trimmed_mean(stacked, config.trim_ratio)
            )
    new_state = ServerState(
        m=state.m,
        v=state.v,
        dp_aggregations=state.dp_aggregations,
        norm_history=tally.history(config, state),
    )
    if config.dp is not None:
        generator = rng if rng is not None else np.random.default_rng()
        summed = {k: v * updates for k, v in avg.items()}
        avg = privatize_sum(summed, updates, config.dp, generator)
        new_state.dp_aggregations += 1
        stats["dp_epsilon"] = epsilon_spent(
            config.dp.noise_multiplier, new_state.dp_aggregations, config.dp.delta
        )
        stats["dp_delta"] = config.dp.delta

    params = {k: current[k] for k in keys}
    if config.fedadam is not None:
        stepped, new_state.m, new_state.v = fedadam_step(
            params, avg, state.m, state.v, config.fedadam
        )
    else:
        stepped = {k: np.asarray(params[k], np.float64) + config.server_lr * avg[k] for k in keys}
    new = {k: np.asarray(v, dtype=np.float32) for k, v in current.items()}
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf: `aggregate` refuses it
        for key in keys:
            new[key] = stepped[key].astype(np.float32)
    stats.update(tally.stats(tensors_norm(avg)))
    return Outcome(tensors=new, state=new_state, stats=stats)


_WORKERS = max(1, min(4, os.cpu_count() or 1))
"""Threads that fold the exact mode's layers (BLAS releases the GIL; the CLI runs BLAS on one
thread, so these are the coordinator's parallelism)."""

_FLUSH_RANK = 64
"""Ranks buffered per layer before one GEMM folds them into the dense sum (8 updates at r=8):
enough for BLAS to run near its peak, little enough to keep the buffer small."""


@dataclass
class _ExactTerms:
    """One update's ΔWᵢ for every layer (see `_client_factors`), from a few batched numpy calls
    per layer shape instead of several per layer."""

    norm: float
    """‖ΔWᵢ‖ over every layer (inf when not finite)."""
    own: dict[str, tuple[np.ndarray, np.ndarray]]
    """module -> (B (out, k), A (k, in)): the client's own term (rank rᵢ, or 2rᵢ when split is
    not possible because rᵢ ≠ r)."""
    a_delta: dict[str, np.ndarray] | None
    """module -> Aᵢ - A_b (r, in), the part shared with B_b; None for another rank."""


def _shape_groups(shapes: Shapes) -> dict[tuple[int, int], list[str]]:
    groups: dict[tuple[int, int], list[str]] = {}
    for module, shape in shapes.items():
        groups.setdefault(tuple(shape), []).append(module)  # type: ignore[arg-type]
    return groups


def _base_stacks(
    reference: Mapping[str, np.ndarray], modules: list[str], s: float, dtype: type
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """s·B_b (L, out, r), A_b (L, r, in) and (s·B_b)ᵀ(s·B_b) (L, r, r) of one layer shape."""
    b_b: np.ndarray = np.stack([reference[b_key(m)] for m in modules], dtype=dtype)
    b_b *= dtype(s)
    a_b: np.ndarray = np.stack([reference[a_key(m)] for m in modules], dtype=dtype)
    return b_b, a_b, np.matmul(b_b.transpose(0, 2, 1), b_b)


def _exact_terms(
    item: Contribution,
    reference: Mapping[str, np.ndarray],
    shapes: Shapes,
    s: float,
    rank: int,
    cache: dict[tuple[Any, ...], tuple[np.ndarray, ...]] | None = None,
) -> _ExactTerms:
    """ΔWᵢ's factors and norm, in float32 (half the memory traffic of float64, and the sums
    keep float32 factors anyway); in float64 when float32 overflows, so only an effect that is
    not finite in float64 either counts as not finite.

    `cache` keeps the base version's stacked factors across the updates of one aggregation
    (they are the same for every client on that base)."""
    terms = _exact_terms_as(item, reference, shapes, s, rank, cache, np.float32)
    if math.isfinite(terms.norm):
        return terms
    return _exact_terms_as(item, reference, shapes, s, rank, cache, np.float64)


def _exact_terms_as(
    item: Contribution,
    reference: Mapping[str, np.ndarray],
    shapes: Shapes,
    s: float,
    rank: int,
    cache: dict[tuple[Any, ...], tuple[np.ndarray, ...]] | None,
    dtype: type,
) -> _ExactTerms:
    own: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    shared: dict[str, np.ndarray] | None = {}
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for shape, modules in _shape_groups(shapes).items():
            key = (item.base_version, shape, dtype)
            cached = cache.get(key) if cache is not None else None
            if cached is None:
                cached = _base_stacks(reference, modules, s, dtype)
                if cache is not None:
                    cache[key] = cached
            b_b, a_b, gram_bb = cached
            b_i: np.ndarray = np.stack([item.tensors[b_key(m)] for m in modules], dtype=dtype)
            b_i *= dtype(item.scale)  # (L, out, rᵢ)
            a_i: np.ndarray = np.stack([item.tensors[a_key(m)] for m in modules], dtype=dtype)
            if a_i.shape[1] == rank:
                b_i -= b_b  # now b_own = sᵢ·Bᵢ - s·B_b
                a_delta = a_i - a_b
                for j, m in enumerate(modules):
                    own[m] = (b_i[j], a_i[j])
                    shared[m] = a_delta[j]  # type: ignore[index]
                # ‖b_own·Aᵢ + B_b·ΔA‖²_F from (k, k) Grams, batched over the layers of a shape:
                # Σ (b_ownᵀb_own)∘(AᵢAᵢᵀ) + 2·Σ (b_ownᵀB_b)∘(Aᵢ·ΔAᵀ) + Σ (B_bᵀB_b)∘(ΔA·ΔAᵀ).
                bt = b_i.transpose(0, 2, 1)
                at_i, at_d = a_i.transpose(0, 2, 1), a_delta.transpose(0, 2, 1)
                total += float(np.sum(np.matmul(bt, b_i) * np.matmul(a_i, at_i)))
                total += 2.0 * float(np.sum(np.matmul(bt, b_b) * np.matmul(a_i, at_d)))
                total += float(np.sum(gram_bb * np.matmul(a_delta, at_d)))
            else:
                x = np.concatenate([b_i, -b_b], axis=2)
                y = np.concatenate([a_i, a_b], axis=1)
                for j, m in enumerate(modules):
                    own[m] = (x[j], y[j])
                shared = None
                gram_x = np.matmul(x.transpose(0, 2, 1), x)
                total += float(np.sum(gram_x * np.matmul(y, y.transpose(0, 2, 1))))
    norm = math.sqrt(max(total, 0.0)) if math.isfinite(total) else math.inf
    return _ExactTerms(norm, own, shared)


def _aggregate_exact(given: _Inputs, contributions: Iterable[Contribution]) -> Outcome:
    """W' = s·B·A + step·Σ cᵢ·wᵢ·ΔWᵢ exactly (no truncation), then the best rank-r factors.

    One decoded update at a time feeds every layer's `ExactSum`; every `_FLUSH_RANK` ranks the
    layers fold their buffers into the dense sums in a thread pool while the next updates
    decode; the final re-projection runs per layer in the same pool.
    """
    config, shapes, current, base, state, clip = given
    if config.exact_max_rank:
        return _aggregate_exact_truncated(given, contributions)
    started = time.perf_counter()
    s = config.scale
    sums = {
        m: ExactSum(out_dim, in_dim, flush_rank=_FLUSH_RANK)
        for m, (out_dim, in_dim) in shapes.items()
    }
    total_weight = 0.0
    tally = _NormTally(clip.bound)
    shared: dict[int, dict[str, np.ndarray]] = {}  # base version -> Σ cᵢ·(Aᵢ - A_b) per layer
    base_cache: dict[tuple[Any, ...], tuple[np.ndarray, ...]] = {}
    with ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="fedlm-exact") as pool:
        folding: list[Future[None]] = []

        def fold() -> None:
            for future in folding:
                future.result()  # the previous fold of a layer ends before its next begins
            folding[:] = [pool.submit(acc.absorb, acc.take_pending()) for acc in sums.values()]

        for item in _usable(contributions):
            reference = base(item.base_version)
            terms = _exact_terms(item, reference, shapes, s, config.rank, base_cache)
            c = item.weight * tally.coefficient(item, terms.norm)
            for module, (b_own, a_own) in terms.own.items():
                sums[module].add(b_own, a_own, c)
            if terms.a_delta is not None:
                acc = shared.setdefault(item.base_version, {})
                for module, a_delta in terms.a_delta.items():
                    if module in acc:
                        acc[module] += c * a_delta
                    else:
                        acc[module] = c * a_delta
            total_weight += item.weight
            if next(iter(sums.values())).due:
                fold()
        streamed = time.perf_counter()
        for future in folding:
            future.result()
        tally.require_some()
        _add_shared_terms(sums, shared, base, s)
        step = config.server_lr / total_weight

        def finish(module: str) -> tuple[np.ndarray, np.ndarray, float]:
            b_cur = s * np.asarray(current[b_key(module)], np.float64)
            a_cur = np.asarray(current[a_key(module)], np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                return sums[module].factors_with(b_cur, a_cur, step, config.rank)

        folded = time.perf_counter()
        results = dict(zip(shapes, pool.map(finish, shapes)))
        finished = time.perf_counter()
    stats = {
        "truncation_rel_error": 0.0,  # nothing is truncated before the final rank-r step
        "dense_layers": sum(acc.is_dense for acc in sums.values()),
        "seconds_stream": round(streamed - started, 3),
        "seconds_fold_wait": round(folded - streamed, 3),
        "seconds_reproject": round(finished - folded, 3),
    }
    reprojected = {module: (b_new, a_new) for module, (b_new, a_new, _) in results.items()}
    return _exact_outcome(config, state, tally, total_weight, reprojected, stats)


def _aggregate_exact_truncated(given: _Inputs, contributions: Iterable[Contribution]) -> Outcome:
    config, shapes, current, base, state, clip = given
    s = config.scale
    sums = {
        m: LowRankSum(out_dim, in_dim, config.sum_rank) for m, (out_dim, in_dim) in shapes.items()
    }
    total_weight = 0.0
    tally = _NormTally(clip.bound)
    # Σ over clients on base b of cᵢ·(Aᵢ - A_b), per layer (r, in): see `_client_factors`.
    shared: dict[int, dict[str, np.ndarray]] = {}
    for item in _usable(contributions):
        reference = base(item.base_version)
        with np.errstate(over="ignore", invalid="ignore"):
            factors = {m: _client_factors(item, reference, m, s, config.rank) for m in shapes}
            norm = math.sqrt(sum(lowrank_norm(bm, am) ** 2 for bm, am, _ in factors.values()))
        c = item.weight * tally.coefficient(item, norm)
        for module, (bm, am, split) in factors.items():
            if split is None:
                sums[module].add(bm, am, c)
            else:
                b_own, a_own, a_delta = split
                sums[module].add(b_own, a_own, c)
                acc = shared.setdefault(item.base_version, {})
                acc[module] = acc.get(module, 0.0) + c * a_delta
        total_weight += item.weight
    _add_shared_terms(sums, shared, base, s)
    tally.require_some()

    reprojected: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    discarded = 0.0
    kept_energy = 0.0
    step = config.server_lr / total_weight
    for module in shapes:
        d_b, d_a = sums[module].stacked()  # the delta sum, (out, k), (k, in)
        discarded += sums[module].discarded
        b_cur = np.asarray(current[b_key(module)], np.float64)
        a_cur = np.asarray(current[a_key(module)], np.float64)
        # W' = s·B·A + step·ΔB·ΔA, then back to PEFT factors with B·A = W'/s.
        b_new, a_new, spectrum = reproject(
            np.hstack([s * b_cur, step * d_b]), np.vstack([a_cur, d_a]), config.rank
        )
        kept_energy += float(np.sum(spectrum**2))
        reprojected[module] = (b_new, a_new)
    stats = {
        # Upper bound on ||error||_F / ||W'||_F from compressing the streaming sum.
        "truncation_rel_error": math.sqrt(discarded) * step / math.sqrt(kept_energy)
        if kept_energy > 0
        else 0.0,
    }
    return _exact_outcome(config, state, tally, total_weight, reprojected, stats)


def _add_shared_terms(
    sums: Mapping[str, ExactSum] | Mapping[str, LowRankSum],
    shared: Mapping[int, Mapping[str, np.ndarray]],
    base: Callable[[int], Mapping[str, np.ndarray]],
    s: float,
) -> None:
    """Adds s·B_b·Σ cᵢ·(Aᵢ - A_b) to each layer's sum, once per base version b (the part of
    ΔWᵢ that every client on b shares: see `_client_factors`)."""
    for version, per_module in shared.items():
        reference = base(version)
        for module, a_sum in per_module.items():
            sums[module].add(s * np.asarray(reference[b_key(module)], np.float64), a_sum)


def _exact_outcome(
    config: AggregationConfig,
    state: ServerState,
    tally: _NormTally,
    total_weight: float,
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    mode_stats: Mapping[str, Any],
) -> Outcome:
    """The exact modes' result from each layer's rank-r factors of W' (module -> (s·B, A)):
    back to PEFT factors (B·A = W'/s, dead ranks refilled from the seed), in float32."""
    s = config.scale
    new: Tensors = {}
    for module, (b_new, a_new) in factors.items():
        b_new, a_new = fill_dead_ranks(b_new / s, a_new, config.a_seed, a_key(module), atol=1e-12)
        new[b_key(module)] = b_new.astype(np.float32)
        new[a_key(module)] = a_new.astype(np.float32)
    stats: dict[str, Any] = {
        "mode": "exact",
        "robust": "mean",
        "updates": len(tally.norms),
        "total_weight": total_weight,
        **mode_stats,
        **tally.stats(None),
    }
    return Outcome(
        tensors=new,
        state=ServerState(
            dp_aggregations=state.dp_aggregations,
            norm_history=tally.history(config, state),
        ),
        stats=stats,
    )


def _client_factors(
    item: Contribution, reference: Mapping[str, np.ndarray], module: str, s: float, rank: int
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """ΔWᵢ = sᵢ·Bᵢ·Aᵢ - s·B_b·A_b for one layer as factors (B (out, k), A (k, in)), never dense.

    For a client of the global rank it is split as (sᵢ·Bᵢ - s·B_b)·Aᵢ + s·B_b·(Aᵢ - A_b): the
    first term is the client's own rank-r part; the second shares B_b with every client on the
    same base, so its A-parts are summed densely and enter the factored sum once per base
    version. That halves the rank streamed per client (r instead of 2r). Returns the stacked
    rank-2r factors (for the norm) and the split, or None for another rank.
    """
    b_i = item.scale * np.asarray(item.tensors[b_key(module)], np.float64)  # (out, rᵢ)
    a_i = np.asarray(item.tensors[a_key(module)], np.float64)  # (rᵢ, in)
    b_b = s * np.asarray(reference[b_key(module)], np.float64)  # (out, r)
    a_b = np.asarray(reference[a_key(module)], np.float64)  # (r, in)
    if a_i.shape[0] != rank:
        return np.hstack([b_i, -b_b]), np.vstack([a_i, a_b]), None
    b_own, a_delta = b_i - b_b, a_i - a_b
    return np.hstack([b_own, b_b]), np.vstack([a_i, a_delta]), (b_own, a_i, a_delta)
