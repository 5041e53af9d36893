"""ONNX Runtime backend vs llama.cpp on the same model, same thread count, same run.

    python benchmarks/bench_onnx.py --export DIR [--model smollm2-135m] [--threads 2] [--repeats 3]

DIR is a `fedlm export-onnx` folder of the same model (made first if missing; int4). Each
backend runs in its own child process (so peak RSS is its own), alternating, `--repeats` times;
the table reports medians. Measured per backend:

- prefill tok/s: one forward of a `--prompt-tokens` prompt from an empty cache;
- decode tok/s: `--decode-tokens` greedy steps after it (EOS ignored: fixed work);
- TTFT: public `generate(..., stream=True)` call to its first text piece;
- swap ms: `load_adapter` of a rank-8, 7-target GGUF LoRA (for ONNX this includes the
  on-device conversion to `.onnx_adapter`, reported apart): the first swap (ONNX also reads the
  graph's LoRA input shapes once), a swap to a second, new adapter (the steady state of a
  federation: every global version is new) and a swap back to the first (ONNX: converted
  before, so its content-hash cache skips the conversion);
- peak RSS of the child process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = (
    "The history of the city goes back many centuries. Merchants came from the coast, "
    "farmers from the hills, and scholars from distant universities. "
) * 12


def _adapter(model_path: Path, dest: Path, seed: int = 0) -> Path:
    from edge_sdk.adapters.gguf_lora import write_gguf_lora
    from edge_sdk.models.loader import read_config
    from edge_sdk.models.naming import LORA_TARGETS, hf_module

    cfg = read_config(model_path)
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(cfg.n_layer):
        for t, (o, n) in cfg.target_shapes().items():
            if t in LORA_TARGETS:
                tensors[f"{hf_module(i, t)}.lora_A"] = (rng.standard_normal((8, n)) * 0.01).astype(
                    np.float32
                )
                tensors[f"{hf_module(i, t)}.lora_B"] = (rng.standard_normal((o, 8)) * 0.01).astype(
                    np.float32
                )
    return write_gguf_lora(dest, tensors, alpha=16.0, base=model_path)


def _child(args: argparse.Namespace) -> dict:
    from edge_sdk.runtime import EdgeModel

    target = args.export if args.backend == "onnx" else args.model
    t0 = time.perf_counter()
    model = EdgeModel(target, backend=args.backend, n_threads=args.threads, n_ctx=1024)
    load_s = time.perf_counter() - t0
    tokens = model.tokenize(PROMPT)[: args.prompt_tokens]
    n_dec = args.decode_tokens
    if args.backend == "onnx":
        from dataclasses import replace

        from edge_sdk.runtime import GenerationConfig

        cfg = replace(GenerationConfig(), max_tokens=n_dec + 1)
        t = time.perf_counter()
        gen = model._generator(tokens, cfg)
        gen.generate_next_token()  # samples from the prefill's logits
        prefill_s = time.perf_counter() - t
        t, c = time.perf_counter(), time.process_time()
        done = 0
        while done < n_dec and not gen.is_done():
            gen.generate_next_token()
            done += 1
        decode_s = time.perf_counter() - t
        decode_cpu_s = time.process_time() - c
        del gen
    else:
        llm = model._llm
        llm.reset()
        t = time.perf_counter()
        llm.eval(tokens)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        prefill_s = time.perf_counter() - t
        t, c = time.perf_counter(), time.process_time()
        for done in range(1, n_dec + 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode_s = time.perf_counter() - t
        decode_cpu_s = time.process_time() - c
        llm.reset()
    prompt_text = model.detokenize(tokens)
    t = time.perf_counter()
    stream = model.generate(prompt_text, stream=True, max_tokens=4)
    next(stream, None)
    ttft_s = time.perf_counter() - t
    list(stream)
    first, second = args.adapter.split(",")
    t = time.perf_counter()
    model.load_adapter(first)
    swap_s = time.perf_counter() - t
    # A federation swaps version after version, each new: the steady state.
    t, c = time.perf_counter(), time.process_time()
    model.load_adapter(second)
    swap2_s = time.perf_counter() - t
    swap2_cpu_s = time.process_time() - c  # what carries over to an idle device
    convert_s = model.last_swap["convert_seconds"] if args.backend == "onnx" else 0.0
    t = time.perf_counter()
    model.load_adapter(first)  # back to an adapter seen before (ONNX: conversion cached)
    swap_back_s = time.perf_counter() - t
    t = time.perf_counter()
    model.remove_adapter()
    remove_s = time.perf_counter() - t
    out = {
        "backend": args.backend,
        "threads": args.threads,
        "prompt_tokens": len(tokens),
        "load_s": load_s,
        "prefill_tps": len(tokens) / prefill_s,
        "decode_tps": done / decode_s,
        "decode_tokens": done,
        # CPU per token: what the machine's load does not inflate (1 thread each)
        "decode_cpu_ms": decode_cpu_s / done * 1e3,
        "ttft_ms": ttft_s * 1e3,
        "swap_ms": swap_s * 1e3,
        "swap2_ms": swap2_s * 1e3,
        "swap2_cpu_ms": swap2_cpu_s * 1e3,
        "swap_back_ms": swap_back_s * 1e3,
        "convert_ms": convert_s * 1e3,
        "remove_ms": remove_s * 1e3,
    }
    model.close()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--export", required=True, help="fedlm export-onnx folder of --model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    p.add_argument("--json", help="write the raw runs here")
    args = p.parse_args()
    if args.backend:  # child
        print(json.dumps(_child(args)))
        return
    from edge_sdk.models.store import resolve

    model_path = resolve(args.model)
    if not (Path(args.export) / "genai_config.json").is_file():
        from edge_sdk.onnx.export import export_onnx

        export_onnx(model_path, args.export, precision="int4", progress=print)
    runs: dict[str, list[dict]] = {"llama.cpp": [], "onnx": []}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = ",".join(
            str(_adapter(model_path, Path(tmp) / f"bench-adapter-{i}.gguf", seed=i))
            for i in range(2)
        )
        for r in range(args.repeats):
            for backend in ("llama.cpp", "onnx") if r % 2 == 0 else ("onnx", "llama.cpp"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--backend",
                    backend,
                    "--adapter",
                    str(adapter),
                    "--model",
                    str(model_path),
                    "--export",
                    args.export,
                    "--threads",
                    str(args.threads),
                    "--prompt-tokens",
                    str(args.prompt_tokens),
                    "--decode-tokens",
                    str(args.decode_tokens),
                ]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[backend].append(json.loads(res.stdout.strip().splitlines()[-1]))
    keys = [
        "prefill_tps",
        "decode_tps",
        "decode_cpu_ms",
        "ttft_ms",
        "swap_ms",
        "swap2_ms",
        "swap2_cpu_ms",
        "swap_back_ms",
        "remove_ms",
        "peak_rss_mb",
        "load_s",
    ]
    med = {b: {k: statistics.median(x[k] for x in rs) for k in keys} for b, rs in runs.items()}
    med["onnx"]["convert_ms"] = statistics.median(x["convert_ms"] for x in runs["onnx"])
    # Paired ratios: each repeat ran both backends back to back, so their ratio cancels most of
    # the machine's drift; the median of the per-repeat ratios is the figure to quote.
    paired = {
        k: statistics.median(o[k] / a[k] for o, a in zip(runs["onnx"], runs["llama.cpp"]))
        for k in keys
    }
    print(
        f"model {args.model}, {args.threads} threads, "
        f"prompt {runs['onnx'][0]['prompt_tokens']} tokens, "
        f"{args.decode_tokens} decode steps, median of {args.repeats}"
    )
    print(f"{'':14}{'llama.cpp':>12}{'onnx':>12}{'paired onnx/llama.cpp':>24}")
    for k in keys:
        a, b = med["llama.cpp"][k], med["onnx"][k]
        print(f"{k:14}{a:12.2f}{b:12.2f}{paired[k]:24.2f}")
    print(f"onnx adapter conversion in the steady-state swap: {med['onnx']['convert_ms']:.1f} ms")
    load = {"before": load_before, "after": os.getloadavg()}
    print("load average (1, 5, 15 min) before: {before}, after: {after}".format(**load))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"runs": runs, "median": med, "paired": paired, "load_average": load}, indent=2
            )
        )


if __name__ == "__main__":
    main()
