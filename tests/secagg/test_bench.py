"""The benchmark's round runner on a small vector, so that benchmarks/bench_secagg.py keeps
working."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_secagg", Path(__file__).resolve().parents[2] / "benchmarks" / "bench_secagg.py"
)
bench = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(bench)  # type: ignore[union-attr]


def test_bench_round_meets_the_size_targets_at_a_7_bit_ring() -> None:
    for n in (8, 16, 64):
        row = bench.run_round(
            n, bench.auto_grid_bits(n), 20_000, 1e-3, 3e-3, dropouts=(n == 8), seed=1
        )
        assert row["ring_bits"] == 7
        packed = (20_000 * 7 + 7) // 8 + 4  # values at 7 bits + the weight word
        # The whole MaskedInput message: packed vector, round id, device id, tag, framing.
        assert packed < row["masked_input_bytes"] < packed + 80
        assert row["x_smaller_than_fp32"] > 4
        assert 8 * 20_000 / row["masked_input_bytes"] > 8  # Flower's int64 masking
        assert row["total_weight_exact"]
    assert bench.auto_grid_bits(128) == 1


def test_flower_falls_back_to_its_documented_int64_size() -> None:
    if importlib.util.find_spec("flwr") is not None:
        pytest.skip("flwr is installed: the benchmark measures it instead")
    out = bench.flower_measure([(4, 8)], 2, None)
    assert out == {
        "measured": False,
        "bytes_per_param": 8.0,
        "note": "flwr not installed: int64 masking",
    }
