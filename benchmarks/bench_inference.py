"""Inference benchmark: model load time, generation tokens/s, adapter hot-swap vs reload.

The baseline for the swap is llama-cpp-python's own way of changing an adapter, a new
`Llama(model_path, lora_path=...)`, timed in the same run. Medians over --repeats runs.

    .venv/bin/python benchmarks/bench_inference.py [--model smollm2-135m] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()

    import llama_cpp

    from edge_sdk.adapters.gguf_lora import BaseModelInfo, write_gguf_lora
    from edge_sdk.models import naming, resolve
    from edge_sdk.runtime import EdgeModel

    path = resolve(args.model)
    info = BaseModelInfo.from_gguf(path)
    rng = np.random.default_rng(0)
    n_layer = 1 + max(int(n.split(".")[1]) for n in info.tensor_shapes if n.startswith("blk."))
    tensors = {}
    for layer in range(n_layer):
        for target in naming.LORA_TARGETS:
            out_f, in_f = info.tensor_shapes[naming.gguf_stem(layer, target) + ".weight"]
            key = naming.hf_module(layer, target)
            tensors[key + ".lora_A"] = (rng.standard_normal((8, in_f)) * 0.02).astype(np.float32)
            tensors[key + ".lora_B"] = (rng.standard_normal((out_f, 8)) * 0.02).astype(np.float32)
    tmp = Path(tempfile.mkdtemp())
    adapters = [
        write_gguf_lora(tmp / f"a{i}.gguf", tensors, alpha=16.0, base=info) for i in range(2)
    ]

    loads, swaps, reloads, rates = [], [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model = EdgeModel(path, n_ctx=1024)
        loads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        text = model.generate(
            "Once upon a time, in a small village by the sea,", max_tokens=args.tokens
        )
        dt = time.perf_counter() - t0
        rates.append(len(model.tokenize(text, add_bos=False)) / dt)
        for adapter in adapters:
            t0 = time.perf_counter()
            model.load_adapter(adapter)
            swaps.append(time.perf_counter() - t0)
        model.close()
        t0 = time.perf_counter()
        llm = llama_cpp.Llama(str(path), n_ctx=1024, lora_path=str(adapters[0]), verbose=False)
        reloads.append(time.perf_counter() - t0)
        llm.close()

    med = statistics.median
    print(f"model: {path.name}")
    print(
        f"load (EdgeModel)                 median {med(loads):.3f} "
        f"s   min {min(loads):.3f}  max {max(loads):.3f}"
    )
    print(
        f"generation, greedy, {args.tokens} tokens    median "
        f"{med(rates):.1f} tok/s  min {min(rates):.1f}  max {max(rates):.1f}"
    )
    print(f"adapter hot-swap (r=8, all linear) median {med(swaps) * 1e3:.1f} ms")
    print(f"reload with lora_path (baseline)   median {med(reloads) * 1e3:.1f} ms")
    print(f"swap / reload ratio                {med(swaps) / med(reloads):.3f}")


if __name__ == "__main__":
    main()
