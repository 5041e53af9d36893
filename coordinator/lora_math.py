"""Aggregation math for federated LoRA, as pure numpy functions and small accumulators.

Shapes follow PEFT: for a target linear layer W (out, in), a rank-r adapter holds
`lora_A` (r, in) and `lora_B` (out, r), and the layer computes W·x + (alpha/r)·B·A·x.

Three ways to combine client adapters:

- naive:    average A and B separately. Cheap, but mean(B)·mean(A) != mean(B·A).
- frozen-a: A is fixed from a shared seed (`frozen_a_matrix`) and only B is trained, so
            mean(B)·A == mean(B·A) exactly, and updates carry half the bytes.
- exact:    average the products Σ wᵢ·sᵢ·Bᵢ·Aᵢ and re-project to rank r by a thin SVD computed
            from the stacked factors (`reproject`); the dense (out, in) matrix is never formed,
            and clients may use different ranks.

Everything streams: `WeightedMean` and `LowRankSum` fold one update at a time, so memory is
O(adapter), not O(clients × adapter). The coordinate-wise robust statistics (`trimmed_mean`,
`coordinate_median`) need every value of a coordinate at once and are O(clients × adapter) by
nature; the strategy says so where they are chosen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from edge_sdk.adapters.seeded import frozen_a_matrix

__all__ = ["frozen_a_matrix"]  # re-exported: the coordinator's version 0 and frozen-a A

Tensors = dict[str, np.ndarray]


def lora_scale(alpha: float, rank: int) -> float:
    """PEFT's scaling of B·A: alpha / r."""
    if rank <= 0:
        raise ValueError(f"`rank` should be a positive integer, got {rank}")
    return float(alpha) / float(rank)


# -------------------------------------------------------------------------------------------
# Weights, norms, clipping
# -------------------------------------------------------------------------------------------


def staleness_weight(staleness: int, exponent: float = 0.5) -> float:
    """FedBuff's polynomial staleness discount (1 + s)^-exponent; 1/√(1+s) by default.

    Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022.
    """
    if staleness < 0:
        raise ValueError(f"`staleness` should be >= 0, got {staleness}")
    if exponent < 0:
        raise ValueError(f"`exponent` should be >= 0, got {exponent}")
    return float((1.0 + staleness) ** -exponent)


def tensors_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm over every tensor (as one flattened vector), accumulated in float64."""
    total = 0.0
    for value in tensors.values():
        flat = np.asarray(value, dtype=np.float64).ravel()
        # einsum, not `flat @ flat`: a BLAS dot per tensor pays a thread fork/join each time.
        total += float(np.einsum("i,i->", flat, flat))
    return math.sqrt(total)


def lowrank_norm(b: np.ndarray, a: np.ndarray) -> float:
    """Frobenius norm of B·A (B (out, k), A (k, in)) without forming it.

    ||B·A||²_F = trace(BᵀB · A·Aᵀ): two (k, k) Gram matrices.
    """
    b64 = np.asarray(b, dtype=np.float64)
    a64 = np.asarray(a, dtype=np.float64)
    if b64.ndim != 2 or a64.ndim != 2 or b64.shape[1] != a64.shape[0]:
        raise ValueError(f"B {b64.shape} and A {a64.shape} are not (out, k) and (k, in)")
    value = float(np.sum((b64.T @ b64) * (a64 @ a64.T)))
    return math.sqrt(max(value, 0.0))


def clip_coefficient(norm: float, max_norm: float) -> float:
    """min(1, max_norm / norm): the factor that brings a vector of `norm` inside the L2 ball."""
    if max_norm <= 0:
        raise ValueError(f"`max_norm` should be > 0, got {max_norm}")
    if not math.isfinite(norm):
        raise ValueError(f"`norm` should be finite, got {norm}")
    return 1.0 if norm <= max_norm else max_norm / norm


def subtract(left: Mapping[str, np.ndarray], right: Mapping[str, np.ndarray]) -> Tensors:
    """left - right per key (float64); both must hold the same keys and shapes."""
    if left.keys() != right.keys():
        raise ValueError(f"key sets differ: {sorted(set(left) ^ set(right))[:4]}")
    return {k: np.asarray(left[k], np.float64) - np.asarray(right[k], np.float64) for k in left}


# -------------------------------------------------------------------------------------------
# Streaming weighted mean (naive and frozen-a)
# -------------------------------------------------------------------------------------------


class WeightedMean:
    """Streaming Σ wᵢ·xᵢ / Σ wᵢ over dicts of tensors; holds one float64 copy of the adapter."""

    def __init__(self) -> None:
        self._sums: Tensors = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"`weight` should be a positive finite number, got {weight}")
        if self._sums and tensors.keys() != self._sums.keys():
            raise ValueError("every update must hold the same tensor keys")
        for key, value in tensors.items():
            scaled = np.asarray(value, dtype=np.float64) * weight
            if key in self._sums:
                if self._sums[key].shape != scaled.shape:
                    raise ValueError(f"{key}: shape {scaled.shape} != {self._sums[key].shape}")
                self._sums[key] += scaled
            else:
                self._sums[key] = scaled
        self.total_weight += weight
        self.count += 1

    def mean(self) -> Tensors:
        if self.count == 0:
            raise ValueError("no values were added")
        return {k: v / self.total_weight for k, v in self._sums.items()}


# -------------------------------------------------------------------------------------------
# Exact (factored) aggregation
# -------------------------------------------------------------------------------------------


def reproject(
    b_stack: np.ndarray, a_stack: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best rank-`rank` factors of B·A from stacked factors, never forming (out, in).

    B·A = (Qb·Rb)·(Qa·Ra)ᵀ = Qb·(Rb·Raᵀ)·Qaᵀ with thin QRs of B (out, k) and Aᵀ (in, k); the
    small core (k, k) = U·S·Vᵀ gives the SVD of B·A as (Qb·U)·S·(Qa·V)ᵀ (Eckart-Young).
    Returns B' (out, rank) = Qb·U·√S, A' (rank, in) = √S·Vᵀ·Qaᵀ and every singular value. When
    B·A has fewer than `rank` singular values, the missing columns/rows are zero.
    """
    b64 = np.asarray(b_stack, dtype=np.float64)
    a64 = np.asarray(a_stack, dtype=np.float64)
    if b64.ndim != 2 or a64.ndim != 2 or b64.shape[1] != a64.shape[0]:
        raise ValueError(f"B {b64.shape} and A {a64.shape} are not (out, k) and (k, in)")
    if rank <= 0:
        raise ValueError(f"`rank` should be a positive integer, got {rank}")
    out_dim, in_dim = b64.shape[0], a64.shape[1]
    b_new = np.zeros((out_dim, rank))
    a_new = np.zeros((rank, in_dim))
    if b64.shape[1] == 0:
        return b_new, a_new, np.zeros(0)
    qb, rb = np.linalg.qr(b64)  # (out, kb), (kb, k)
    qa, ra = np.linalg.qr(a64.T)  # (in, ka), (ka, k)
    u, s, vt = np.linalg.svd(rb @ ra.T, full_matrices=False)  # core (kb, ka)
    keep = min(rank, s.shape[0])
    root = np.sqrt(s[:keep])
    b_new[:, :keep] = (qb @ u[:, :keep]) * root  # (out, keep)
    a_new[:keep] = (root[:, None] * vt[:keep]) @ qa.T  # (keep, in)
    return b_new, a_new, s


class LowRankSum:
    """Streaming Σ cⱼ·Bⱼ·Aⱼ for one target layer, kept as a truncated SVD U·diag(s)·Vᵀ.

    New terms are buffered; once the buffer holds more than `max_rank` ranks it is folded into
    the SVD by an incremental update (Brand, "Fast low-rank modifications of the thin SVD",
    2006): project the new factors X (out, b), Yᵀ (in, b) on U and V, QR only the residuals,
    take the SVD of the small (m+b, m+b) core, rotate. That costs O((out + in)·(m + b)·m)
    per fold instead of re-factoring the whole stack, and memory stays O(max_rank·(out + in))
    however many clients contribute.

    While the total rank of all terms stays ≤ `max_rank` nothing is truncated and the sum is
    exact; otherwise `discarded` accumulates the squared singular values dropped at each fold
    (an upper bound on the squared Frobenius error of the result).
    """

    def __init__(self, out_dim: int, in_dim: int, max_rank: int) -> None:
        if out_dim <= 0 or in_dim <= 0:
            raise ValueError(f"dims should be positive, got out={out_dim} in={in_dim}")
        if max_rank <= 0:
            raise ValueError(f"`max_rank` should be a positive integer, got {max_rank}")
        self.out_dim, self.in_dim, self.max_rank = out_dim, in_dim, max_rank
        self._u = np.zeros((out_dim, 0))  # orthonormal columns (out, m)
        self._s = np.zeros(0)  # (m,)
        self._v = np.zeros((in_dim, 0))  # orthonormal columns (in, m)
        self._b_blocks: list[np.ndarray] = []  # pending, each (out, kᵢ) with its coefficient
        self._a_blocks: list[np.ndarray] = []  # pending, each (kᵢ, in)
        self._pending_rank = 0
        self.discarded = 0.0
        self.compressions = 0

    def add(self, b: np.ndarray, a: np.ndarray, coef: float = 1.0) -> None:
        b64 = np.asarray(b, dtype=np.float64)
        a64 = np.asarray(a, dtype=np.float64)
        if (
            b64.shape[0] != self.out_dim
            or a64.shape[1] != self.in_dim
            or b64.shape[1] != a64.shape[0]
        ):
            raise ValueError(
                f"B {b64.shape} / A {a64.shape} do not fit (out={self.out_dim}, in={self.in_dim})"
            )
        self._b_blocks.append(b64 * coef)
        self._a_blocks.append(a64)
        self._pending_rank += b64.shape[1]
        if self._pending_rank > self.max_rank:
            self._fold()

    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """Factors (B (out, k), A (k, in)) whose product is the sum, k ≤ 2·max_rank + one term."""
        b_parts = [self._u * self._s, *self._b_blocks]
        a_parts = [self._v.T, *self._a_blocks]
        return np.hstack(b_parts), np.vstack(a_parts)

    @staticmethod
    def _extend(basis: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """basisᵀ·new (m, b), and Q (d, b'), R (b', b) of the part of `new` outside the basis."""
        proj = basis.T @ new
        residual = new - basis @ proj
        again = basis.T @ residual  # classical Gram-Schmidt, twice: keeps Q orthogonal to U
        residual -= basis @ again
        q, r = np.linalg.qr(residual)
        return proj + again, q, r

    def _fold(self) -> None:
        x = np.hstack(self._b_blocks)  # (out, b)
        y = np.vstack(self._a_blocks)  # (b, in)
        m = self._s.shape[0]
        px, qx, rx = self._extend(self._u, x)  # (m, b), (out, bx), (bx, b)
        py, qy, ry = self._extend(self._v, y.T)  # (m, b), (in, by), (by, b)
        # U·S·Vᵀ + X·Y = [U, Qx]·core·[V, Qy]ᵀ with core = diag(S, 0) + [Px; Rx]·[Py; Ry]ᵀ.
        left = np.vstack([px, rx])  # (m + bx, b)
        right = np.vstack([py, ry])  # (m + by, b)
        core = left @ right.T
        core[:m, :m] += np.diag(self._s)
        uc, sc, vct = np.linalg.svd(core, full_matrices=False)
        keep = min(self.max_rank, sc.shape[0])
        self.discarded += float(np.sum(sc[keep:] ** 2))
        self._u = np.hstack([self._u, qx]) @ uc[:, :keep]
        self._v = np.hstack([self._v, qy]) @ vct[:keep].T
        self._s = sc[:keep]
        self._b_blocks, self._a_blocks, self._pending_rank = [], [], 0
        self.compressions += 1

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Best rank-`rank` factors (B (out, rank), A (rank, in)) of the sum, and its spectrum."""
        b_stack, a_stack = self.stacked()
        return reproject(b_stack, a_stack, rank)


try:  # scipy is optional: it saves a temporary per flush and most of the final eigensolve
    from scipy.linalg import eigh as _scipy_eigh
    from scipy.linalg.blas import sgemm as _SGEMM
except ImportError:  # pragma: no cover - depends on the environment
    _SGEMM = None
    _scipy_eigh = None


def _gemm_into(acc: np.ndarray, b: np.ndarray, a: np.ndarray) -> None:
    """acc += b @ a, in place (float32; acc Fortran-ordered)."""
    if _SGEMM is not None:
        # BLAS's C = alpha·A·B + beta·C writes straight into the accumulator: no (out, in)
        # temporary and no second pass over it.
        _SGEMM(1.0, b, a, beta=1.0, c=acc, overwrite_c=True)
    else:  # numpy only: one product, then one add
        acc += b @ a


def top_r_dense(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Best rank-`rank` factors (B (out, rank), A (rank, in)) of a dense float64 `w`, and ‖w‖²_F.

    Through the Gram matrix of the smaller side: an eigendecomposition of a (k, k) matrix,
    k = min(out, in), costs about a fifth of a thin SVD of (out, in) here, and the top
    singular vectors come out to float64 accuracy (relative error ~ eps·σ₁²/(σ_r² − σ_{r+1}²)).
    Components with a singular value below ~√eps·σ₁ are returned as zeros (they are noise of
    the Gram product, and `fill_dead_ranks` revives them).
    """
    out_dim, in_dim = w.shape
    tall = out_dim >= in_dim
    gram = w.T @ w if tall else w @ w.T
    energy = float(np.trace(gram))
    keep = min(rank, gram.shape[0])
    if _scipy_eigh is not None and keep < gram.shape[0]:
        # Only the top `keep` eigenpairs (LAPACK syevr): ~3x faster than all of them.
        n = gram.shape[0]
        values, vectors = _scipy_eigh(gram, subset_by_index=[n - keep, n - 1], driver="evr")
    else:
        values, vectors = np.linalg.eigh(gram)  # ascending
    lam = values[::-1][:keep]
    vec = vectors[:, ::-1][:, :keep]
    top = float(lam[0]) if keep else 0.0
    alive = lam > max(top, 0.0) * 1e-13
    sigma = np.sqrt(np.where(alive, lam, 1.0))
    b_new = np.zeros((out_dim, rank))
    a_new = np.zeros((rank, in_dim))
    if tall:  # vec = V (in, keep): W·V = U·S, so B = U·√S = W·V/√S, A = √S·Vᵀ
        b_new[:, :keep] = (w @ vec) / np.sqrt(sigma)
        a_new[:keep] = np.sqrt(sigma)[:, None] * vec.T
    else:  # vec = U (out, keep): Uᵀ·W = S·Vᵀ, so A = √S·Vᵀ = Uᵀ·W/√S, B = U·√S
        a_new[:keep] = (vec.T @ w) / np.sqrt(sigma)[:, None]
        b_new[:, :keep] = vec * np.sqrt(sigma)
    b_new[:, :keep][:, ~alive] = 0.0
    a_new[:keep][~alive] = 0.0
    return b_new, a_new, energy


class ExactSum:
    """Exact Σ cⱼ·Bⱼ·Aⱼ for one target layer, for any number of terms.

    Terms are kept as factors while their total rank is small (≤ `dense_rank`, default half
    of min(out, in)); past that the factored form would be larger than the matrix, so the sum
    becomes a dense float32 (out, in) accumulator, and pending factors enter it `flush_rank`
    ranks at a time through one BLAS GEMM each (a rank-8 product alone would be bound by
    writing the whole accumulator). Nothing is ever truncated: the only error is float32
    rounding of the factors and of the running sum (relative ~1e-7 per flush).

    Memory: O(out·in) per layer once dense, however many terms: the model's own size, not
    O(terms). `add` and `take_pending` run in one thread; `absorb` of one layer may run in a
    worker thread while the caller adds the next terms (numpy's BLAS releases the GIL).
    """

    def __init__(
        self, out_dim: int, in_dim: int, flush_rank: int = 128, dense_rank: int | None = None
    ) -> None:
        if out_dim <= 0 or in_dim <= 0:
            raise ValueError(f"dims should be positive, got out={out_dim} in={in_dim}")
        if flush_rank <= 0:
            raise ValueError(f"`flush_rank` should be a positive integer, got {flush_rank}")
        self.out_dim, self.in_dim, self.flush_rank = out_dim, in_dim, flush_rank
        self.dense_rank = min(out_dim, in_dim) // 2 if dense_rank is None else dense_rank
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_rank = 0
        self._kept: list[tuple[np.ndarray, np.ndarray]] = []  # factored terms (float32)
        self._kept_rank = 0
        self._dense: np.ndarray | None = None  # (out, in) float32, Fortran order

    def add(self, b: np.ndarray, a: np.ndarray, coef: float = 1.0) -> None:
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"B {b.shape} and A {a.shape} are not (out, k) and (k, in)")
        if b.shape[0] != self.out_dim or a.shape[1] != self.in_dim:
            raise ValueError(
                f"B {b.shape} / A {a.shape} do not fit (out={self.out_dim}, in={self.in_dim})"
            )
        self._pending.append((np.asarray(b * coef, np.float32), np.asarray(a, np.float32)))
        self.pending_rank += b.shape[1]

    @property
    def due(self) -> bool:
        return self.pending_rank >= self.flush_rank

    def take_pending(self) -> list[tuple[np.ndarray, np.ndarray]]:
        taken, self._pending, self.pending_rank = self._pending, [], 0
        return taken

    def absorb(self, terms: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Fold `terms` (from `take_pending`) into the sum."""
        if not terms:
            return
        if self._dense is None:
            self._kept.extend(terms)
            self._kept_rank += sum(b.shape[1] for b, _ in terms)
            if self._kept_rank <= self.dense_rank:
                return
            terms, self._kept, self._kept_rank = self._kept, [], 0
            self._dense = np.zeros((self.out_dim, self.in_dim), np.float32, order="F")
        b = np.hstack([t[0] for t in terms])
        a = np.vstack([t[1] for t in terms])
        _gemm_into(self._dense, b, a)

    @property
    def is_dense(self) -> bool:
        return self._dense is not None

    def factors_with(
        self, b_base: np.ndarray, a_base: np.ndarray, step: float, rank: int
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Best rank-`rank` factors of b_base·a_base + step·(the sum), and that matrix's ‖·‖²_F."""
        self.absorb(self.take_pending())
        b_base = np.asarray(b_base, np.float64)
        a_base = np.asarray(a_base, np.float64)
        if self._dense is None:
            b_parts = [b_base, *(step * np.asarray(b, np.float64) for b, _ in self._kept)]
            a_parts = [a_base, *(np.asarray(a, np.float64) for _, a in self._kept)]
            b_new, a_new, spectrum = reproject(np.hstack(b_parts), np.vstack(a_parts), rank)
            return b_new, a_new, float(np.sum(spectrum**2))
        w = self._dense.astype(np.float64)
        w *= step
        w += b_base @ a_base
        return top_r_dense(w, rank)


def exact_average(
    terms: Iterable[tuple[np.ndarray, np.ndarray, float]], rank: int, max_rank: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Σ wⱼ·Bⱼ·Aⱼ / Σ wⱼ re-projected to `rank`, for (B, A, w) terms of any ranks."""
    summed: LowRankSum | None = None
    total = 0.0
    for b, a, weight in terms:
        if summed is None:
            summed = LowRankSum(b.shape[0], a.shape[1], max_rank or 4 * rank)
        summed.add(b, a, weight)
        total += weight
    if summed is None or total <= 0:
        raise ValueError("no terms with positive total weight")
    b_new, a_new, _ = summed.factors(rank)
    return b_new / total, a_new


def fill_dead_ranks(
    b: np.ndarray, a: np.ndarray, seed: int, key: str, atol: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Give zero rank-components (B column and A row both ~0) a fresh seeded A row.

    A component with B[:, j] = 0 and A[j] = 0 gets no gradient in either factor and would stay
    dead forever. Setting A[j] to the PEFT init keeps B·A unchanged (B[:, j] is zero) and keeps
    that rank trainable for the next local round.
    """
    a = a.copy()
    col_norms = np.linalg.norm(b, axis=0)
    row_norms = np.linalg.norm(a, axis=1)
    dead = (col_norms <= atol) & (row_norms <= atol)
    if np.any(dead):
        init = frozen_a_matrix(seed, a.shape, key)
        a[dead] = init[dead]
    return b, a


# -------------------------------------------------------------------------------------------
# Robust coordinate-wise statistics (O(clients × adapter) by nature)
# -------------------------------------------------------------------------------------------


def trimmed_mean(stacked: np.ndarray, trim_ratio: float) -> np.ndarray:
    """Coordinate-wise mean after dropping the ⌊trim_ratio·n⌋ smallest and largest values.

    `stacked` is (n, ...); Yin et al., "Byzantine-Robust Distributed Learning", ICML 2018.
    """
    if not 0.0 <= trim_ratio < 0.5:
        raise ValueError(f"`trim_ratio` should be in [0, 0.5), got {trim_ratio}")
    n = stacked.shape[0]
    if n == 0:
        raise ValueError("no values to average")
    cut = math.floor(trim_ratio * n)
    if n - 2 * cut <= 0:
        raise ValueError(f"trim_ratio {trim_ratio} leaves nothing of {n} values")
    ordered = np.sort(np.asarray(stacked, dtype=np.float64), axis=0)
    return ordered[cut : n - cut].mean(axis=0)


def coordinate_median(stacked: np.ndarray) -> np.ndarray:
    """Coordinate-wise median over the first axis of `stacked` (n, ...)."""
    if stacked.shape[0] == 0:
        raise ValueError("no values to take the median of")
    return np.median(np.asarray(stacked, dtype=np.float64), axis=0)


# -------------------------------------------------------------------------------------------
# Server optimizer
# -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FedAdamConfig:
    """FedAdam server optimizer (Reddi et al., "Adaptive Federated Optimization", ICLR 2021)."""

    lr: float = 1e-2
    """Server learning rate η."""
    beta1: float = 0.9
    """First-moment decay."""
    beta2: float = 0.99
    """Second-moment decay."""
    tau: float = 1e-3
    """Adaptivity floor added to √v; larger is closer to FedAvg-with-momentum."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"`lr` should be > 0, got {self.lr}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` should be in [0, 1), got {value}")
        if not self.tau > 0:
            raise ValueError(f"`tau` should be > 0, got {self.tau}")


def fedadam_step(
    params: Mapping[str, np.ndarray],
    pseudo_grad: Mapping[str, np.ndarray],
    m: Mapping[str, np.ndarray] | None,
    v: Mapping[str, np.ndarray] | None,
    config: FedAdamConfig,
) -> tuple[Tensors, Tensors, Tensors]:
    """One FedAdam step; returns (new params, m, v).

    `pseudo_grad` is the averaged client delta Δ (the direction of improvement), so
    m ← β1·m + (1-β1)·Δ, v ← β2·v + (1-β2)·Δ², x ← x + η·m / (√v + τ).
    """
    new_params: Tensors = {}
    new_m: Tensors = {}
    new_v: Tensors = {}
    for key, x in params.items():
        delta = np.asarray(pseudo_grad[key], dtype=np.float64)
        m_prev = np.zeros_like(delta) if m is None else np.asarray(m[key], np.float64)
        v_prev = np.zeros_like(delta) if v is None else np.asarray(v[key], np.float64)
        m_k = config.beta1 * m_prev + (1.0 - config.beta1) * delta
        v_k = config.beta2 * v_prev + (1.0 - config.beta2) * delta * delta
        new_params[key] = np.asarray(x, np.float64) + config.lr * m_k / (np.sqrt(v_k) + config.tau)
        new_m[key], new_v[key] = m_k, v_k
    return new_params, new_m, new_v


def add_gaussian_noise(
    tensors: Mapping[str, np.ndarray], std: float, rng: np.random.Generator
) -> Tensors:
    """tensors + N(0, std²) on every coordinate (the Gaussian mechanism's noise)."""
    if std < 0:
        raise ValueError(f"`std` should be >= 0, got {std}")
    return {
        k: np.asarray(v, np.float64) + rng.normal(0.0, std, size=np.shape(v))
        for k, v in tensors.items()
    }
