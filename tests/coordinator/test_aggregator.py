"""One aggregation step on adapter dicts: each mode against the dense computation it promises."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregation import FedAdamConfig, frozen_a_matrix
from coordinator.aggregator import (
    AggregationConfig,
    Contribution,
    ServerState,
    a_key,
    aggregate,
    b_key,
    initial_adapter,
)
from coordinator.privacy import DpConfig

SHAPES = {
    "model.layers.0.self_attn.q_proj": (24, 16),
    "model.layers.0.mlp.down_proj": (16, 40),
}


def _random_adapter(
    rng: np.random.Generator, rank: int, scale: float = 0.1
) -> dict[str, np.ndarray]:
    out = {}
    for module, (o, i) in SHAPES.items():
        out[a_key(module)] = rng.normal(0, scale, size=(rank, i)).astype(np.float32)
        out[b_key(module)] = rng.normal(0, scale, size=(o, rank)).astype(np.float32)
    return out


def _product(adapter: dict[str, np.ndarray], module: str, scale: float) -> np.ndarray:
    return (
        scale
        * adapter[b_key(module)].astype(np.float64)
        @ adapter[a_key(module)].astype(np.float64)
    )


def _run(config, current, contributions, bases=None, state=None, rng=None):
    bases = bases or {0: current}
    return aggregate(
        config, SHAPES, current, iter(contributions), bases.__getitem__, state or ServerState(), rng
    )


def test_initial_adapter_is_peft_like_and_seeded() -> None:
    config = AggregationConfig(rank=4, a_seed=9)
    adapter = initial_adapter(config, SHAPES)
    for module, (o, i) in SHAPES.items():
        assert adapter[b_key(module)].shape == (o, 4) and not adapter[b_key(module)].any()
        np.testing.assert_array_equal(
            adapter[a_key(module)], frozen_a_matrix(9, (4, i), a_key(module))
        )


def test_exact_mode_equals_dense_weighted_average_with_mixed_ranks() -> None:
    rng = np.random.default_rng(0)
    config = AggregationConfig(mode="exact", rank=8, alpha=16.0, exact_max_rank=64)
    current = _random_adapter(rng, 8)
    clients = [(_random_adapter(rng, r), r, w) for r, w in ((2, 10.0), (4, 30.0), (8, 5.0))]
    contributions = [
        Contribution(f"u{k}", t, w, 0, 16.0 / r) for k, (t, r, w) in enumerate(clients)
    ]
    outcome = _run(config, current, contributions)
    total = sum(w for _, _, w in clients)
    for module in SHAPES:
        dense = sum(w * _product(t, module, 16.0 / r) for t, r, w in clients) / total  # rank <= 14
        u, s, vt = np.linalg.svd(dense)
        best = (u[:, :8] * s[:8]) @ vt[:8]  # what rank 8 can hold at best
        np.testing.assert_allclose(_product(outcome.tensors, module, config.scale), best, atol=1e-5)
    assert outcome.stats["updates"] == 3 and outcome.stats["truncation_rel_error"] == 0.0


def test_exact_mode_is_exact_when_the_average_fits_the_rank() -> None:
    rng = np.random.default_rng(1)
    config = AggregationConfig(mode="exact", rank=8, alpha=8.0)
    current = _random_adapter(rng, 8)
    clients = [_random_adapter(rng, 2) for _ in range(4)]  # Σ rank 8 <= r
    outcome = _run(
        config, current, [Contribution(f"u{k}", t, 1.0, 0, 8.0 / 2) for k, t in enumerate(clients)]
    )
    for module in SHAPES:
        dense = np.mean([_product(t, module, 4.0) for t in clients], axis=0)
        np.testing.assert_allclose(_product(outcome.tensors, module, 1.0), dense, atol=1e-6)


def test_frozen_a_mode_is_exact_and_keeps_a() -> None:
    rng = np.random.default_rng(2)
    config = AggregationConfig(mode="frozen-a", rank=4, alpha=8.0, a_seed=5)
    current = initial_adapter(config, SHAPES)
    clients = []
    for _ in range(3):
        clients.append(
            {b_key(m): rng.normal(size=(o, 4)).astype(np.float32) for m, (o, _) in SHAPES.items()}
        )
    weights = [1.0, 2.0, 5.0]
    outcome = _run(
        config,
        current,
        [Contribution(f"u{k}", t, w, 0, 2.0) for k, (t, w) in enumerate(zip(clients, weights))],
    )
    for module in SHAPES:
        a = current[a_key(module)].astype(np.float64)
        np.testing.assert_array_equal(outcome.tensors[a_key(module)], current[a_key(module)])
        dense = sum(
            w * t[b_key(module)].astype(np.float64) @ a for t, w in zip(clients, weights)
        ) / sum(weights)
        np.testing.assert_allclose(
            outcome.tensors[b_key(module)].astype(np.float64) @ a, dense, atol=1e-5
        )


def test_naive_mode_averages_factors_separately() -> None:
    rng = np.random.default_rng(3)
    config = AggregationConfig(mode="naive", rank=4)
    current = _random_adapter(rng, 4)
    clients = [_random_adapter(rng, 4) for _ in range(2)]
    outcome = _run(
        config, current, [Contribution(f"u{k}", t, 1.0, 0, 4.0) for k, t in enumerate(clients)]
    )
    for key in current:
        np.testing.assert_allclose(
            outcome.tensors[key], (clients[0][key] + clients[1][key]) / 2, atol=1e-6
        )


def test_stale_update_delta_is_applied_to_the_current_version() -> None:
    """FedBuff semantics: a client's change against its own base moves the newest model."""
    rng = np.random.default_rng(4)
    config = AggregationConfig(mode="naive", rank=4)
    v0, v1 = _random_adapter(rng, 4), _random_adapter(rng, 4)
    change = _random_adapter(rng, 4, scale=0.01)
    client = {k: v0[k] + change[k] for k in v0}  # trained from version 0
    outcome = _run(config, v1, [Contribution("u", client, 0.5, 0, 1.0)], bases={0: v0, 1: v1})
    for key in v1:
        np.testing.assert_allclose(outcome.tensors[key], v1[key] + change[key], atol=1e-6)


def test_clipping_bounds_each_delta_in_exact_mode() -> None:
    rng = np.random.default_rng(5)
    config = AggregationConfig(mode="exact", rank=4, alpha=4.0, clip_norm=0.01, exact_max_rank=32)
    current = initial_adapter(config, SHAPES)
    client = _random_adapter(rng, 4, scale=1.0)  # a huge change
    outcome = _run(config, current, [Contribution("u", client, 1.0, 0, 1.0)])
    moved = np.sqrt(
        sum(
            np.sum((_product(outcome.tensors, m, 1.0) - _product(current, m, 1.0)) ** 2)
            for m in SHAPES
        )
    )
    assert moved == pytest.approx(0.01, rel=1e-3)
    assert outcome.stats["clipped"] == 1 and outcome.stats["delta_norm_max"] > 1.0


def test_median_ignores_a_poisoned_update() -> None:
    rng = np.random.default_rng(6)
    config = AggregationConfig(mode="naive", rank=2, robust="median")
    current = _random_adapter(rng, 2)
    honest = [{k: v + 0.01 for k, v in current.items()} for _ in range(4)]
    poisoned = {k: v + 1e4 for k, v in current.items()}
    contributions = [
        Contribution(f"u{k}", t, 1.0, 0, 1.0) for k, t in enumerate([*honest, poisoned])
    ]
    outcome = _run(config, current, contributions)
    for key in current:
        np.testing.assert_allclose(outcome.tensors[key], current[key] + 0.01, atol=1e-5)


def test_fedadam_state_persists_across_versions() -> None:
    config = AggregationConfig(mode="frozen-a", rank=2, a_seed=1, fedadam=FedAdamConfig(lr=0.05))
    current = initial_adapter(config, SHAPES)
    client = {b_key(m): np.full((o, 2), 0.2, np.float32) for m, (o, _) in SHAPES.items()}
    first = _run(config, current, [Contribution("u", client, 1.0, 0, 1.0)])
    restored = ServerState.from_bytes(first.state.to_bytes())
    assert restored.m is not None and set(restored.m) == {b_key(m) for m in SHAPES}
    key = b_key("model.layers.0.self_attn.q_proj")
    np.testing.assert_allclose(restored.v[key], first.state.v[key])
    # First step, Δ = 0.2: m = 0.1·Δ = 0.02, √v = √(0.01·Δ²) = 0.02, x = η·m/(√v + τ).
    np.testing.assert_allclose(first.tensors[key], 0.05 * 0.02 / (0.02 + 1e-3), rtol=1e-5)
    second = _run(
        config,
        first.tensors,
        [Contribution("u2", client, 1.0, 1, 1.0)],
        bases={1: first.tensors},
        state=restored,
    )
    assert np.all(second.tensors[key] > first.tensors[key])


def test_dp_adds_calibrated_noise_and_counts_epsilon() -> None:
    config = AggregationConfig(
        mode="frozen-a", rank=2, a_seed=1, dp=DpConfig(noise_multiplier=1.0, clip_norm=0.1)
    )
    current = initial_adapter(config, SHAPES)
    client = {b_key(m): np.zeros((o, 2), np.float32) for m, (o, _) in SHAPES.items()}
    contributions = [Contribution(f"u{k}", client, 7.0 * (k + 1), 0, 1.0) for k in range(4)]
    outcome = _run(config, current, contributions, rng=np.random.default_rng(0))
    noise = np.concatenate([outcome.tensors[b_key(m)].ravel() for m in SHAPES])
    assert noise.std() == pytest.approx(1.0 * 0.1 / 4, rel=0.15)  # (z·C)/n on the mean
    assert outcome.state.dp_aggregations == 1 and 0 < outcome.stats["dp_epsilon"] < float("inf")
    again = _run(
        config,
        outcome.tensors,
        contributions,
        bases={0: current},
        state=outcome.state,
        rng=np.random.default_rng(1),
    )
    assert again.stats["dp_epsilon"] > outcome.stats["dp_epsilon"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "exact", "robust": "median"}, "robust"),
        ({"mode": "exact", "fedadam": FedAdamConfig()}, "fedadam"),
        ({"mode": "naive", "dp": DpConfig(1.0, 1.0), "clip_norm": 1.0}, "clip_norm"),
        ({"mode": "sideways"}, "mode"),
        ({"rank": 0}, "rank"),
        ({"trim_ratio": 0.5}, "trim_ratio"),
    ],
)
def test_config_refuses_incompatible_options(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AggregationConfig(**kwargs)


def test_no_positive_weight_is_an_error() -> None:
    config = AggregationConfig(mode="naive", rank=2)
    current = initial_adapter(config, SHAPES)
    with pytest.raises(ValueError, match="no contribution"):
        _run(config, current, [Contribution("u", current, 0.0, 0, 1.0)])
