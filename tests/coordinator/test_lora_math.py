"""The aggregation math alone: exactness against dense products, streaming, robust stats, DP."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.lora_math import (
    FedAdamConfig,
    LowRankSum,
    WeightedMean,
    clip_coefficient,
    coordinate_median,
    exact_average,
    fedadam_step,
    fill_dead_ranks,
    frozen_a_matrix,
    lowrank_norm,
    reproject,
    staleness_weight,
    tensors_norm,
    trimmed_mean,
)
from coordinator.privacy import DpConfig, epsilon_spent, privatize_sum


def _best_rank(dense: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(dense, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def test_frozen_a_is_deterministic_per_key_and_peft_bounded() -> None:
    a1 = frozen_a_matrix(7, (4, 64), "model.layers.0.self_attn.q_proj.lora_A")
    a2 = frozen_a_matrix(7, (4, 64), "model.layers.0.self_attn.q_proj.lora_A")
    other_key = frozen_a_matrix(7, (4, 64), "model.layers.1.self_attn.q_proj.lora_A")
    other_seed = frozen_a_matrix(8, (4, 64), "model.layers.0.self_attn.q_proj.lora_A")
    assert a1.dtype == np.float32 and a1.shape == (4, 64)
    np.testing.assert_array_equal(a1, a2)
    assert not np.allclose(a1, other_key) and not np.allclose(a1, other_seed)
    bound = 1 / math.sqrt(64)
    assert np.all(np.abs(a1) <= bound) and a1.std() > bound / 3  # U(-b, b) has std b/√3
    # Pin the stream: a change here breaks every frozen-a client in the field.
    np.testing.assert_allclose(
        frozen_a_matrix(0, (1, 4)),
        [[-0.0927505046, -0.4684050977, -0.1394553781, 0.0696822107]],
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="seed"):
        frozen_a_matrix(-1, (2, 2))


def test_reproject_matches_truncated_svd_of_dense_product() -> None:
    rng = np.random.default_rng(0)
    b = rng.normal(size=(40, 12))
    a = rng.normal(size=(12, 30))
    b_r, a_r, s = reproject(b, a, 5)
    assert b_r.shape == (40, 5) and a_r.shape == (5, 30)
    np.testing.assert_allclose(b_r @ a_r, _best_rank(b @ a, 5), atol=1e-9)
    np.testing.assert_allclose(s, np.linalg.svd(b @ a, compute_uv=False)[:12], rtol=1e-9)


def test_reproject_pads_low_rank_inputs_with_zeros() -> None:
    rng = np.random.default_rng(1)
    b_r, a_r, _ = reproject(rng.normal(size=(10, 2)), rng.normal(size=(2, 9)), 4)
    assert np.allclose(b_r[:, 2:], 0) and np.allclose(a_r[2:], 0)


def test_exact_average_equals_dense_weighted_mean_with_mixed_ranks() -> None:
    rng = np.random.default_rng(2)
    out_dim, in_dim = 48, 32
    ranks = [2, 4, 8]  # total 14 <= rank 16: the average is representable exactly
    terms = [
        (rng.normal(size=(out_dim, r)), rng.normal(size=(r, in_dim)), w)
        for r, w in zip(ranks, [1.0, 2.0, 3.5])
    ]
    dense = sum(w * b @ a for b, a, w in terms) / sum(w for _, _, w in terms)
    b_avg, a_avg = exact_average(terms, rank=16)
    np.testing.assert_allclose(b_avg @ a_avg, dense, atol=1e-9)
    # Re-projected to a smaller rank it is the Eckart-Young optimum.
    b4, a4 = exact_average(terms, rank=4, max_rank=16)
    np.testing.assert_allclose(b4 @ a4, _best_rank(dense, 4), atol=1e-8)


def test_low_rank_sum_streams_with_bounded_rank_and_reports_truncation() -> None:
    rng = np.random.default_rng(3)
    out_dim, in_dim, max_rank = 30, 20, 6
    # 25 rank-2 terms that all live in one rank-4 subspace: compression is lossless.
    basis_b, basis_a = rng.normal(size=(out_dim, 4)), rng.normal(size=(4, in_dim))
    summed = LowRankSum(out_dim, in_dim, max_rank)
    dense = np.zeros((out_dim, in_dim))
    for _ in range(25):
        b = basis_b @ rng.normal(size=(4, 2))
        a = rng.normal(size=(2, 4)) @ basis_a
        summed.add(b, a, 0.5)
        dense += 0.5 * b @ a
        assert summed.stacked()[0].shape[1] <= 2 * max_rank
    assert summed.compressions > 0
    assert summed.discarded < 1e-12 * np.sum(dense**2)
    b_r, a_r, _ = summed.factors(4)
    np.testing.assert_allclose(b_r @ a_r, dense, atol=1e-8)
    # Full-rank noise terms must be truncated, and the error is bounded by what was discarded.
    noisy = LowRankSum(out_dim, in_dim, 3)
    dense = np.zeros((out_dim, in_dim))
    for _ in range(10):
        b, a = rng.normal(size=(out_dim, 2)), rng.normal(size=(2, in_dim))
        noisy.add(b, a)
        dense += b @ a
    assert noisy.discarded > 0
    b_s, a_s = noisy.stacked()
    error = np.linalg.norm(b_s @ a_s - dense)
    assert error <= math.sqrt(noisy.discarded) * (1 + 1e-9) * math.sqrt(noisy.compressions)


def test_frozen_a_average_of_b_is_average_of_products() -> None:
    rng = np.random.default_rng(4)
    a = frozen_a_matrix(3, (4, 16), "k")
    bs = [rng.normal(size=(12, 4)) for _ in range(5)]
    weights = rng.uniform(1, 3, size=5)
    mean = WeightedMean()
    for b, w in zip(bs, weights):
        mean.add({"b": b}, float(w))
    dense = sum(w * b @ a for b, w in zip(bs, weights)) / weights.sum()
    np.testing.assert_allclose(mean.mean()["b"] @ a, dense, atol=1e-10)
    # ... which the naive mean of both factors is not, for independently trained A's.
    a_s = [rng.normal(size=(4, 16)) for _ in range(5)]
    naive = np.mean(bs, axis=0) @ np.mean(a_s, axis=0)
    true = np.mean([b @ ai for b, ai in zip(bs, a_s)], axis=0)
    assert np.linalg.norm(naive - true) > 0.1 * np.linalg.norm(true)


def test_staleness_weight_is_inverse_sqrt() -> None:
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)
    assert staleness_weight(8, exponent=1.0) == pytest.approx(1 / 9)
    with pytest.raises(ValueError, match="staleness"):
        staleness_weight(-1)


def test_clipping_and_norms() -> None:
    assert clip_coefficient(0.5, 1.0) == 1.0
    assert clip_coefficient(4.0, 1.0) == 0.25
    tensors = {"a": np.full((2, 2), 1.0), "b": np.array([2.0, 2.0, 2.0, 2.0])}
    assert tensors_norm(tensors) == pytest.approx(math.sqrt(4 + 16))
    rng = np.random.default_rng(5)
    b, a = rng.normal(size=(20, 3)), rng.normal(size=(3, 15))
    assert lowrank_norm(b, a) == pytest.approx(np.linalg.norm(b @ a))


def test_trimmed_mean_and_median_resist_outliers() -> None:
    values = np.array([[1.0, 2.0], [1.1, 2.1], [0.9, 1.9], [1000.0, -1000.0], [1.0, 2.0]])
    np.testing.assert_allclose(coordinate_median(values), [1.0, 2.0])
    np.testing.assert_allclose(trimmed_mean(values, 0.2), [1.0333333, 1.9666667], rtol=1e-6)
    assert abs(values.mean(axis=0)[0] - 1.0) > 100  # the plain mean is ruined
    with pytest.raises(ValueError, match="trim_ratio"):
        trimmed_mean(values, 0.5)


def test_fedadam_moves_along_the_sign_of_the_delta() -> None:
    config = FedAdamConfig(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    params = {"w": np.zeros(3)}
    delta = {"w": np.array([1.0, -2.0, 0.0])}
    new, m, v = fedadam_step(params, delta, None, None, config)
    np.testing.assert_allclose(m["w"], 0.1 * delta["w"])
    np.testing.assert_allclose(v["w"], 0.01 * delta["w"] ** 2)
    assert new["w"][0] > 0 and new["w"][1] < 0 and new["w"][2] == 0
    with pytest.raises(ValueError, match="beta1"):
        FedAdamConfig(beta1=1.0)


def test_fill_dead_ranks_keeps_product_and_revives_a_rows() -> None:
    b = np.zeros((6, 3))
    b[:, 0] = 1.0
    a = np.zeros((3, 5))
    a[0] = 2.0
    b2, a2 = fill_dead_ranks(b, a, seed=1, key="x")
    np.testing.assert_array_equal(b2 @ a2, b @ a)
    assert np.all(np.linalg.norm(a2[1:], axis=1) > 0)


def test_dp_epsilon_is_finite_and_grows_with_aggregations() -> None:
    eps = [epsilon_spent(1.1, n, 1e-5) for n in (0, 1, 10, 100)]
    assert eps[0] == 0.0
    assert all(math.isfinite(e) for e in eps)
    assert eps[1] < eps[2] < eps[3]
    assert epsilon_spent(4.0, 10, 1e-5) < eps[2]  # more noise, less privacy spent


def test_privatize_sum_adds_noise_of_the_configured_scale() -> None:
    config = DpConfig(noise_multiplier=2.0, clip_norm=0.5)
    rng = np.random.default_rng(6)
    out = privatize_sum({"x": np.zeros(200_000)}, 4, config, rng)["x"]
    assert out.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.02)
    with pytest.raises(ValueError, match="noise_multiplier"):
        DpConfig(noise_multiplier=0.0, clip_norm=1.0)
