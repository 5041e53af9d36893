"""Exact aggregation of 4 SmolLM2-sized updates, with BLAS limited to one thread or not,
while `--busy` processes keep the cores busy (as the other arms of an in-process demo do).

`coordinator.next_version.aggregate` limits BLAS to one thread; `aggregate.__wrapped__` is
the same work with whatever BLAS threads the process has (OpenBLAS: one per core by default).
The two are timed alternately in this process; the table gives medians.

    python benchmarks/bench_blas_threads.py --busy 2 --repeats 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.next_version import (
    AggregationConfig,
    Contribution,
    ServerState,
    aggregate,
)
from coordinator.shapes import shapes_from_gguf
from edge_sdk.models import resolve
from edge_sdk.models.naming import LORA_TARGETS

RANK = 8


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1


def _adapter(rng: np.random.Generator, shapes: dict[str, tuple[int, int]]) -> dict:
    out = {}
    for module, (o, i) in shapes.items():
        out[f"{module}.lora_A"] = (rng.standard_normal((RANK, i)) * 0.01).astype(np.float32)
        out[f"{module}.lora_B"] = (rng.standard_normal((o, RANK)) * 0.01).astype(np.float32)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=2, help="busy processes beside it (2)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shapes = shapes_from_gguf(resolve("smollm2-135m"), LORA_TARGETS)
    rng = np.random.default_rng(0)
    current = _adapter(rng, shapes)
    contributions = [Contribution(f"u{i}", _adapter(rng, shapes), 48.0, 0, 2.0) for i in range(4)]
    config = AggregationConfig(mode="exact")
    busy = [mp.Process(target=_busy, args=(600.0,), daemon=True) for _ in range(args.busy)]
    for p in busy:
        p.start()
    times: dict[str, list[float]] = {"one BLAS thread (aggregate)": [], "default BLAS threads": []}
    try:
        for _ in range(args.repeats):
            for name, fn in (
                ("one BLAS thread (aggregate)", aggregate),
                ("default BLAS threads", aggregate.__wrapped__),
            ):
                t = time.perf_counter()
                fn(config, shapes, current, contributions, lambda v: current, ServerState())
                times[name].append(time.perf_counter() - t)
    finally:
        for p in busy:
            p.terminate()
    print(f"{os.cpu_count()} cores, {args.busy} busy processes, load {os.getloadavg()[0]:.1f}")
    for name, ts in times.items():
        med, lo, hi = statistics.median(ts), min(ts), max(ts)
        print(f"{name:30s} median {med:7.2f} s  (min {lo:.2f}, max {hi:.2f})")


if __name__ == "__main__":
    main()
