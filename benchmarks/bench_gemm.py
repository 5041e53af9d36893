"""The training step's fp32 products alone: torch.mm (MKL) against oneDNN (`edge_sdk.models.gemm`).

SmolLM2-135M's shapes at seq 256, batch 1: each projection forward (x Wᵀ) and input gradient
(g W), and the tied output projection forward. Each product is timed alone, cache-warm, the
two libraries alternating per repetition (median of `--reps`), with the weight passed as the
step passes it. GFLOP/s = 2·M·K·N / time.

Run: `.venv/bin/python benchmarks/bench_gemm.py [--reps 30]` (leave OMP_WAIT_POLICY unset, as
`fedlm train` does on an idle machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_sdk.models import gemm

# (name, tokens M, in K, out N) of SmolLM2-135M at seq 256
SHAPES = [
    ("gate/up", 256, 576, 1536),
    ("down", 256, 1536, 576),
    ("q/o", 256, 576, 576),
    ("k/v", 256, 576, 192),
]
OUTPUT = ("output projection", 256, 576, 49152)


def _paired_ms(a: Callable[[], object], b: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median ms of a and b, alternating per repetition after a warm-up."""
    for _ in range(3):
        a(), b()
    ta: list[float] = []
    tb: list[float] = []
    for i in range(reps):
        for fn, out in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ta), 1e3 * statistics.median(tb)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args(argv)
    if not gemm.onednn_works():
        print("oneDNN linear is not available in this torch: nothing to compare")
        return 1
    torch.manual_seed(0)
    print("| product | torch.mm (MKL) | oneDNN | oneDNN / MKL |\n|---|---:|---:|---:|")
    rows = [(f"{n} forward", m, k, nn, False) for n, m, k, nn in SHAPES]
    rows += [(f"{n} input gradient", m, nn, k, True) for n, m, k, nn in SHAPES]
    rows.append((f"{OUTPUT[0]} forward", *OUTPUT[1:], False))
    for name, m, k, n, backward in rows:
        x = torch.randn(m, k)
        if backward:  # g (M, out=K) @ W (out, in=N): W is the layer's (out, in) weight
            w = torch.randn(k, n)
            mkl, dnn = partial(torch.matmul, x, w), partial(gemm.matmul, x, w)
        else:  # x (M, in=K) @ Wᵀ, W (out=N, in)
            w = torch.randn(n, k)
            mkl, dnn = partial(torch.mm, x, w.t()), partial(gemm.linear, x, w)
        reps = max(5, args.reps // 3) if n > 10_000 else args.reps
        t_mkl, t_dnn = _paired_ms(mkl, dnn, reps)
        gf = 2 * m * k * n / 1e6
        print(
            f"| {name}, ({m}x{k})·({k}x{n}) | {t_mkl:.2f} ms, {gf / t_mkl:.0f} GFLOP/s | "
            f"{t_dnn:.2f} ms, {gf / t_dnn:.0f} GFLOP/s | {t_dnn / t_mkl:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
