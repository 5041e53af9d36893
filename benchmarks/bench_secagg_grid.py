"""Grid width against cohort size: the rounding error of a secure sum and the bytes it costs.

The ring of a round is b = g + ceil(log2 n) bits (n devices, g grid bits): it must hold the sum
of n grid indices without wrapping. This sweeps g for each cohort n and reports, per row, the
error of the recovered weighted mean (RMSE over its RMS, median over `--trials` rounds) and the
bytes of one masked update at SmolLM2-135M's LoRA-B size (N = 1,244,160 values, frozen-a, r=8)
against fp32 (4·N) and Flower's SecAgg+ (8 B/param, measured in BENCHMARKS.md).

The error comes from `edge_sdk.secagg.quantize` only (encode on every device, the plain sum of
the ring vectors, `decode_sum`, `weighted_mean`): the masks cancel exactly modulo 2^b
(tests/secagg/test_protocol.py checks the masked sum against this plain one bit for bit), so
running the key agreement here would cost minutes and change no digit.

Update model: `common`·s + `own`·eᵢ with s, eᵢ ~ N(0, σ²) (devices of one task agree in part;
with i.i.d. updates the mean shrinks as 1/√n and every grid looks worse at large n), clip
C = `--clip-sigmas`·σ, every device at the weight cap (the demo's case: weight = local steps ×
batch = the cap) or, with `--spread-weights`, example counts from [W/20, W].

    .venv/bin/python benchmarks/bench_secagg_grid.py \
        [--cohorts 3 8 16 64] [--grid-bits 1 2 3 4 5 6 8]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from edge_sdk.secagg import SecAggParams
from edge_sdk.secagg.quantize import decode_sum, encode, weighted_mean

LORA_B_VALUES = 1_244_160
"""N of SmolLM2-135M at r = 8 on the 7 projections of its 30 layers (bench_secagg.py reads it
from the GGUF)."""
FRAMING_BYTES = 65
"""What a MaskedInput message adds to the packed vector (measured: BENCHMARKS.md)."""
FLOWER_BYTES_PER_PARAM = 8.02
"""Flower 1.42.0's SecAgg+ masked int64 vector, measured by bench_secagg.py."""


def rounding_error(
    n: int,
    grid_bits: int,
    *,
    length: int,
    clip_sigmas: float,
    common: float,
    trials: int,
    spread_weights: bool,
    weight_cap: int,
    seed: int,
) -> float:
    """Median over `trials` of RMSE / RMS of the recovered weighted mean against the plain,
    unclipped weighted mean."""
    sigma = 1e-3
    params = SecAggParams(
        n, length, clip=clip_sigmas * sigma, grid_bits=grid_bits, weight_cap=weight_cap
    )
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(trials):
        s = rng.normal(0, sigma, length)
        own = math.sqrt(1 - common**2)
        xs = [common * s + own * rng.normal(0, sigma, length) for _ in range(n)]
        ws = (
            [int(rng.integers(max(1, weight_cap // 20), weight_cap + 1)) for _ in range(n)]
            if spread_weights
            else [weight_cap] * n
        )
        ring = np.zeros(length + 1, dtype=np.uint64)
        for x, w in zip(xs, ws, strict=True):
            ring += encode(x, w, params, rng)
        ring &= np.uint64((1 << params.ring_bits) - 1)  # what unmasking leaves: the sum mod 2^b
        ring[-1] = sum(ws)
        sum_y, total = decode_sum(ring.astype(np.uint32), n, params)
        mean = weighted_mean(sum_y, total, params)
        # Against the unclipped mean: the clip's bias counts as error too (a tighter clip
        # trades rounding noise for it).
        exact = sum(x * w for x, w in zip(xs, ws, strict=True)) / sum(ws)
        out.append(np.sqrt(np.mean((mean - exact) ** 2)) / np.sqrt(np.mean(exact**2)))
    return float(np.median(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cohorts", type=int, nargs="+", default=[3, 8, 16, 64])
    ap.add_argument("--grid-bits", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8])
    ap.add_argument("--length", type=int, default=50_000, help="values per trial vector")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--clip-sigmas", type=float, default=3.0)
    ap.add_argument("--common", type=float, default=0.5, help="weight of the shared direction")
    ap.add_argument("--spread-weights", action="store_true")
    ap.add_argument("--weight-cap", type=int, default=100)
    args = ap.parse_args()
    print(
        "| n | g | b | masked B/device | × fp32 | × Flower | mean RMSE / RMS |\n"
        "|---|---|---|---|---|---|---|"
    )
    for n in args.cohorts:
        for g in args.grid_bits:
            params = SecAggParams(n, LORA_B_VALUES, grid_bits=g)
            size = params.packed_len + FRAMING_BYTES
            err = rounding_error(
                n,
                g,
                length=args.length,
                clip_sigmas=args.clip_sigmas,
                common=args.common,
                trials=args.trials,
                spread_weights=args.spread_weights,
                weight_cap=args.weight_cap,
                seed=n * 100 + g,
            )
            row = {
                "n": n,
                "g": g,
                "b": params.ring_bits,
                "bytes": size,
                "x_fp32": 4 * LORA_B_VALUES / size,
                "x_flower": FLOWER_BYTES_PER_PARAM * LORA_B_VALUES / size,
                "rmse_over_rms": err,
            }
            print(
                f"| {n} | {g} | {row['b']} | {size:,} | {row['x_fp32']:.2f} | "
                f"{row['x_flower']:.2f} | {err:.3f} |",
                flush=True,
            )
            print(json.dumps(row), flush=True, file=__import__("sys").stderr)


if __name__ == "__main__":
    main()
