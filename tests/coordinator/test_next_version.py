"""One aggregation step on adapter dicts: each mode against the dense computation it promises."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.errors import AggregationError, ContributionError
from coordinator.lora_math import FedAdamConfig, frozen_a_matrix
from coordinator.next_version import (
    AggregationConfig,
    ClipBound,
    Contribution,
    ServerState,
    a_key,
    aggregate,
    b_key,
    clip_bound,
    effect_norm,
    initial_adapter,
    lower_median,
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
        ({"alpha": 1e300}, "alpha"),
        ({"rank": 1, "alpha": 2048.0}, "alpha"),
        ({"clip_multiplier": 0.5}, "clip_multiplier"),
        ({"clip_multiplier": float("nan")}, "clip_multiplier"),
        ({"clip_norm": float("inf")}, "clip_norm"),
        ({"clip_history": -1}, "clip_history"),
        ({"max_weight_examples": 0}, "max_weight_examples"),
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


# -- the default bound on every update's effect ------------------------------------------------


def _effect(config, before, after) -> float:
    """The global adapter's movement in the mode's parametrisation."""
    if config.mode == "exact":
        return float(
            np.sqrt(
                sum(
                    np.sum(
                        (_product(after, m, config.scale) - _product(before, m, config.scale)) ** 2
                    )
                    for m in SHAPES
                )
            )
        )
    keys = config.update_keys(SHAPES)
    return float(np.sqrt(sum(np.sum((after[k].astype(np.float64) - before[k]) ** 2) for k in keys)))


def test_lower_median_and_the_adaptive_bound() -> None:
    assert lower_median([3.0]) == 3.0
    assert lower_median([5.0, 1.0]) == 1.0  # one attacker of two cannot raise it
    assert lower_median([1.0, 9.0, 2.0, 1e9]) == 2.0
    config = AggregationConfig()  # the default: adaptive, c = 2, 16 earlier norms
    assert (config.clip_multiplier, config.clip_history, config.clip_norm) == (2.0, 16, None)
    assert clip_bound(config, [1.0, 1e12]) == ClipBound(2.0, "adaptive", 1.0)
    # A lone update is clipped against its predecessors: 1e12 cannot lift the median of 16.
    assert clip_bound(config, [1e12], [1.0] * 16).bound == 2.0
    assert clip_bound(config, [5.0], [1e12] * 15 + [1.0] * 16).bound == 2.0  # the last 16 only
    assert clip_bound(AggregationConfig(clip_norm=0.5), [1.0, 1.0]) == ClipBound(0.5, "fixed", 1.0)
    assert clip_bound(AggregationConfig(clip_multiplier=None), [1.0]) == ClipBound(None, "off")
    dp = AggregationConfig(mode="naive", dp=DpConfig(1.0, 0.3))
    assert clip_bound(dp, [1e12]) == ClipBound(0.3, "dp")  # DP never uses a data-dependent bound


@pytest.mark.parametrize("mode", ["naive", "frozen-a", "exact"])
def test_one_huge_update_moves_the_adapter_by_at_most_the_bound_in_every_mode(mode: str) -> None:
    """The take-over of issue 11 at the math level: B 5,000x larger and the largest weight."""
    rng = np.random.default_rng(11)
    config = AggregationConfig(mode=mode, rank=4, alpha=8.0, a_seed=2)
    current = initial_adapter(config, SHAPES)
    keys = config.update_keys(SHAPES)

    def trained(scale: float) -> dict[str, np.ndarray]:
        return {
            k: current[k] + rng.normal(0, 0.01, current[k].shape).astype(np.float32) * scale
            for k in keys
        }

    honest = [trained(1.0) for _ in range(3)]
    attacker = trained(1.0)
    for k in keys:
        if k.endswith("lora_B"):
            attacker[k] = attacker[k] * 5000.0
    contributions = [Contribution(f"h{i}", t, 10.0, 0, 2.0) for i, t in enumerate(honest)]
    contributions.append(Contribution("attacker", attacker, 1e6, 0, 2.0))
    outcome = _run(config, current, contributions)
    clip = outcome.stats["clip"]
    assert clip["source"] == "adaptive" and outcome.stats["clipped"] >= 1
    honest_norms = [effect_norm(config, SHAPES, c, current) for c in contributions[:3]]
    assert clip["bound"] <= 2.0 * max(honest_norms) + 1e-12  # the attacker did not lift it
    assert _effect(config, current, outcome.tensors) <= clip["bound"] * (1 + 1e-5)
    unclipped = _run(
        AggregationConfig(mode=mode, rank=4, alpha=8.0, a_seed=2, clip_multiplier=None),
        current,
        contributions,
    )
    assert _effect(config, current, unclipped.tensors) > 100 * clip["bound"]  # what it stopped


def test_a_non_finite_effect_names_the_update() -> None:
    rng = np.random.default_rng(12)
    config = AggregationConfig(mode="exact", rank=4, alpha=8.0)
    current = initial_adapter(config, SHAPES)
    poison = Contribution("poison", _random_adapter(rng, 4), 1.0, 0, 1e300 / 4)  # alpha 1e300
    with pytest.raises(ContributionError, match="poison") as info:
        effect_norm(config, SHAPES, poison, current)
    assert info.value.update_id == "poison"
    good = Contribution("good", _random_adapter(rng, 4), 1.0, 0, 2.0)
    with pytest.raises(ContributionError, match="poison"):
        _run(config, current, [good, poison])
    with pytest.raises(ContributionError, match="weight"):
        _run(config, current, [Contribution("w", good.tensors, float("inf"), 0, 2.0)])


def test_a_non_finite_result_is_an_aggregation_error() -> None:
    config = AggregationConfig(mode="naive", rank=2, clip_multiplier=None, server_lr=4.0)
    current = initial_adapter(config, SHAPES)
    big = {k: np.full_like(v, 3e38) for k, v in current.items()}  # finite; 4x is not float32
    contributions = [Contribution(f"u{i}", big, 1.0, 0, 1.0) for i in range(2)]
    with pytest.raises(AggregationError, match="not finite"):
        _run(config, current, contributions, state=ServerState())


def test_norm_history_is_kept_and_survives_the_state_blob() -> None:
    rng = np.random.default_rng(13)
    config = AggregationConfig(mode="naive", rank=2, clip_history=3)
    current = initial_adapter(config, SHAPES)
    state = ServerState()
    for version in range(3):
        contributions = [
            Contribution(f"u{version}{i}", _random_adapter(rng, 2), 1.0, 0, 1.0) for i in range(2)
        ]
        state = _run(config, current, contributions, state=state).state
    assert len(state.norm_history) == 3  # the last clip_history norms
    restored = ServerState.from_bytes(state.to_bytes())
    assert restored.norm_history == pytest.approx(state.norm_history)
    # A blob written before the history existed still loads.
    import io

    buffer = io.BytesIO()
    np.savez(buffer, dp_aggregations=np.array(2))
    old = ServerState.from_bytes(buffer.getvalue())
    assert old.norm_history == () and old.dp_aggregations == 2


def test_exact_mode_from_a_trained_version_moves_at_most_twice_the_bound() -> None:
    """From a version with B != 0 the rank-r re-projection may add at most the step's own
    size (Eckart-Young: the current s·B·A is a rank-r candidate), so a version moves s·B·A by
    at most 2·C; the pre-projection step itself is within C."""
    rng = np.random.default_rng(14)
    config = AggregationConfig(mode="exact", rank=4, alpha=8.0)
    current = _random_adapter(rng, 4)
    honest = [Contribution(f"h{i}", _random_adapter(rng, 4, 0.1), 10.0, 0, 2.0) for i in range(3)]
    attacker = _random_adapter(rng, 4, 0.1)
    attacker = {k: v * (5000.0 if k.endswith("lora_B") else 1.0) for k, v in attacker.items()}
    outcome = _run(config, current, [*honest, Contribution("a", attacker, 1e6, 0, 2.0)])
    bound = outcome.stats["clip"]["bound"]
    assert outcome.stats["clipped"] >= 1
    assert _effect(config, current, outcome.tensors) <= 2 * bound * (1 + 1e-6)


def test_blas_runs_one_thread_while_aggregating_and_its_count_is_restored() -> None:
    """The folds run on their own threads; BLAS threads on top of them spin-wait for a core
    (an exact aggregation of 4 SmolLM2 updates: 13 s instead of 0.8 s beside two busy
    processes, `benchmarks/bench_blas_threads.py`)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    rng = np.random.default_rng(3)
    current = _random_adapter(rng, 4)
    seen: list[list[int]] = []

    def base(version: int) -> dict[str, np.ndarray]:
        seen.append(blas_threads())  # called during the aggregation, once per update at least
        return current

    contributions = [Contribution(f"u{k}", _random_adapter(rng, 4), 1.0, 0, 2.0) for k in range(2)]
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        aggregate(AggregationConfig(mode="exact", rank=4), SHAPES, current, contributions, base,
                  ServerState())  # fmt: skip
        after = blas_threads()
    assert before and all(n == 2 for n in before)  # numpy's BLAS is there, at 2 threads
    assert seen and all(n == 1 for counts in seen for n in counts)
    assert after == before
