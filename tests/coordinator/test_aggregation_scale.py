"""The exact mode at scale (`ExactSum`): many updates whose summed rank exceeds the layer's
dimensions, against the dense SVD of the dense weighted sum, computed independently here."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.lora_math import ExactSum, top_r_dense
from coordinator.next_version import (
    AggregationConfig,
    Contribution,
    ServerState,
    a_key,
    aggregate,
    b_key,
    effect_norm,
)

# Several layers of each of two shapes (the per-shape batching), one wide, one tall.
SHAPES = {
    **{f"model.layers.{i}.self_attn.q_proj": (24, 16) for i in range(3)},
    **{f"model.layers.{i}.mlp.down_proj": (16, 40) for i in range(3)},
}


def _adapter(rng: np.random.Generator, rank: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    out = {}
    for module, (o, i) in SHAPES.items():
        out[a_key(module)] = rng.normal(0, scale, size=(rank, i)).astype(np.float32)
        out[b_key(module)] = rng.normal(0, scale, size=(o, rank)).astype(np.float32)
    return out


def _product(adapter: dict[str, np.ndarray], module: str, scale: float) -> np.ndarray:
    b = adapter[b_key(module)].astype(np.float64)
    return scale * b @ adapter[a_key(module)].astype(np.float64)


def _best(dense: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(dense)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


@pytest.mark.parametrize("clip", [None, 1.0])
def test_exact_mode_with_many_updates_equals_the_dense_svd(clip: float | None) -> None:
    rng = np.random.default_rng(0)
    config = AggregationConfig(
        mode="exact", rank=4, alpha=8.0, clip_norm=clip, clip_multiplier=None, server_lr=0.7
    )
    s = config.scale
    versions = {0: _adapter(rng, 4), 1: _adapter(rng, 4)}
    current = versions[1]
    # 60 clients (Σ rank 240 >> 16..40: every layer becomes dense), mixed ranks and bases, and
    # a common direction so the top singular values are separated from the rest.
    shared = _adapter(rng, 4, scale=0.3)
    items, expected = [], {m: np.zeros(shape) for m, shape in SHAPES.items()}
    for k in range(60):
        rank = 4 if k % 3 else 2
        mine = _adapter(rng, rank)
        if rank == 4:
            mine = {key: mine[key] + shared[key] for key in mine}
        base = k % 2
        weight = float(rng.uniform(1, 10))
        item = Contribution(f"u{k}", mine, weight, base, 8.0 / rank)
        items.append(item)
        norm = effect_norm(config, SHAPES, item, versions[base])
        coef = 1.0 if clip is None else min(1.0, clip / norm)
        for m in SHAPES:
            delta = _product(mine, m, 8.0 / rank) - _product(versions[base], m, s)
            expected[m] += weight * coef * delta
    outcome = aggregate(
        config, SHAPES, current, iter(items), versions.__getitem__, ServerState(), None
    )
    total = sum(i.weight for i in items)
    assert outcome.stats["dense_layers"] == len(SHAPES)
    assert outcome.stats["truncation_rel_error"] == 0.0
    if clip is not None:
        assert outcome.stats["clipped"] > 0
    for m in SHAPES:
        target = _best(_product(current, m, s) + 0.7 * expected[m] / total, 4)
        got = _product(outcome.tensors, m, s)
        # float32 factors and float32 sums: agreement to ~1e-6 of the matrix's scale
        assert np.linalg.norm(got - target) <= 1e-5 * np.linalg.norm(target)


def test_exact_sum_factored_and_dense_paths_agree_with_numpy() -> None:
    rng = np.random.default_rng(1)
    for out_dim, in_dim, terms in ((30, 50, 1), (30, 50, 40), (50, 30, 40)):
        acc = ExactSum(out_dim, in_dim, flush_rank=16)
        dense = np.zeros((out_dim, in_dim))
        for _ in range(terms):
            b, a, c = rng.normal(size=(out_dim, 8)), rng.normal(size=(8, in_dim)), rng.random()
            acc.add(b, a, c)
            dense += c * b @ a
            if acc.due:
                acc.absorb(acc.take_pending())
        b0, a0 = rng.normal(size=(out_dim, 3)), rng.normal(size=(3, in_dim))
        b_new, a_new, energy = acc.factors_with(b0, a0, 0.5, 3)
        w = b0 @ a0 + 0.5 * dense
        assert acc.is_dense == (terms > 1)  # 8 ranks <= 15 stay factored
        assert np.linalg.norm(b_new @ a_new - _best(w, 3)) <= 1e-5 * np.linalg.norm(w)
        assert energy == pytest.approx(float(np.sum(w**2)), rel=1e-5)


def test_top_r_dense_zeroes_missing_ranks_and_matches_svd() -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(size=(40, 2)) @ rng.normal(size=(2, 25))  # rank 2 < requested 4
    b, a, _ = top_r_dense(w, 4)
    np.testing.assert_allclose(b @ a, w, atol=1e-9)
    assert not b[:, 2:].any() and not a[2:].any()
    full = rng.normal(size=(25, 40))
    b, a, _ = top_r_dense(full, 5)
    np.testing.assert_allclose(b @ a, _best(full, 5), atol=1e-8)


def test_an_update_that_overflows_float32_is_measured_in_float64() -> None:
    # Its effect norm overflows float32 (1e25² ~ 1e50) but not float64: it is clipped, not
    # dropped as "not finite".
    rng = np.random.default_rng(3)
    config = AggregationConfig(mode="exact", rank=4, alpha=8.0)
    base = _adapter(rng, 4)
    huge = {k: v * np.float32(1e25) for k, v in _adapter(rng, 4).items()}
    norm = effect_norm(config, SHAPES, Contribution("h", huge, 1.0, 0, 2.0), base)
    assert np.isfinite(norm) and norm > 1e45


def test_the_truncating_sum_is_an_approximation_within_its_reported_bound() -> None:
    """`--exact-max-rank N` (the bounded-memory option) against the same dense SVD reference,
    on updates with no common direction (a flat spectrum, where truncating hurts most): its
    error is real, and within the `truncation_rel_error` it reports; the default exact sum
    agrees to float32 rounding on the same updates."""
    errors = {}
    for max_rank in (0, 8):
        rng = np.random.default_rng(0)
        config = AggregationConfig(
            mode="exact", rank=4, alpha=8.0, clip_norm=None, clip_multiplier=None,
            server_lr=0.7, exact_max_rank=max_rank,
        )  # fmt: skip
        s = config.scale
        current = _adapter(rng, 4)
        items, expected = [], {m: np.zeros(shape) for m, shape in SHAPES.items()}
        for k in range(60):
            mine = _adapter(rng, 4)
            weight = float(rng.uniform(1, 10))
            items.append(Contribution(f"u{k}", mine, weight, 0, s))
            for m in SHAPES:
                expected[m] += weight * (_product(mine, m, s) - _product(current, m, s))
        outcome = aggregate(
            config, SHAPES, current, iter(items), {0: current}.__getitem__, ServerState(), None
        )
        total = sum(i.weight for i in items)
        num = den = 0.0
        for m in SHAPES:
            target = _best(_product(current, m, s) + 0.7 * expected[m] / total, 4)
            num += np.linalg.norm(_product(outcome.tensors, m, s) - target) ** 2
            den += np.linalg.norm(target) ** 2
        errors[max_rank] = (float(np.sqrt(num / den)), outcome.stats["truncation_rel_error"])
    exact, (truncated, bound) = errors[0][0], errors[8]
    assert exact <= 1e-5 and errors[0][1] == 0.0
    assert 1e-3 < truncated <= bound, errors
