"""Where one QLoRA training step spends its time: torch.profiler's table for fedlm-edge's step.

Same configuration as `bench_train.py` (SmolLM2-135M, NF4 base, seq 256, batch 1, LoRA r=8 on
all projections, `--compute` as `fedlm train` picks it unless given). Two warm-up steps, three
timed steps, then one profiled step.

Run: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/profile_train_step.py [--rows 25]`

torch.profiler inflates small ops (an RMSNorm forward: 194 us under it, 57 us timed alone).
`--timers` instead times a few unprofiled steps with wall-clock timers around the step's
parts (the products, the NF4 dequantization with and without the adapter merges, the rank-8
LoRA gradients, the attention forward, the fused loss), median per step.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from edge_sdk.compute import resolve_compute
from edge_sdk.models import resolve
from edge_sdk.models.loader import load_model
from edge_sdk.training.adamw import AdapterAdamW
from edge_sdk.training.lora import LoraConfig, lora_parameters, set_base_compute


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--timers", action="store_true", help="time the step's parts instead")
    ap.add_argument("--compute", choices=("auto", "fp32", "bf16"), default="auto")
    args = ap.parse_args()
    compute = resolve_compute(args.compute, "nf4")
    print("compute:", compute)
    parts: dict[str, float] = defaultdict(float)
    if args.timers:
        _time_parts(parts)

    model = load_model(resolve(args.model), precision="nf4", lora=LoraConfig(rank=8, alpha=16.0))
    set_base_compute(model, compute)
    model.train()
    opt = AdapterAdamW(lora_parameters(model), lr=1e-4)  # what `fedlm train` uses
    ids = torch.randint(
        0, model.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0)
    )

    def step() -> None:
        model(ids, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print("step seconds:", ", ".join(f"{t:.3f}" for t in times))
    if args.timers:
        per_step: dict[str, list[float]] = defaultdict(list)
        for _ in range(5):
            parts.clear()
            t0 = time.perf_counter()
            step()
            per_step["step"].append(time.perf_counter() - t0)
            for name, s in parts.items():
                per_step[name].append(s)
        for name, values in per_step.items():
            print(f"{name:<52} {1e3 * statistics.median(values):8.1f} ms per step (median of 5)")
        return
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def _time_parts(parts: dict[str, float]) -> None:
    """Wrap the step's parts in timers that add into `parts` (seconds, by name)."""
    import torch.nn.functional as F

    from edge_sdk.models import gemm, nf4, transformer
    from edge_sdk.training import lora, lora_bf16

    def timed(owner: Any, name: str, label: str) -> None:
        fn: Callable[..., Any] = getattr(owner, name)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[label] += time.perf_counter() - t0

        setattr(owner, name, wrapper)

    timed(gemm, "linear", "products (oneDNN / torch.mm, loss included)")
    timed(gemm, "matmul", "products (oneDNN / torch.mm, loss included)")
    timed(nf4.NF4Linear, "dequantize_into", "NF4 dequantization")
    timed(lora, "_stacked_weight", "NF4 dequantization + s·B·A merges (fused functions)")
    timed(lora, "_stacked_lora_grads", "rank-8 LoRA gradients (fused functions)")
    timed(lora_bf16, "_product", "bf16 products (widening included)")
    timed(lora_bf16, "_rounded", "rounding inputs and gradients to bf16")
    timed(lora_bf16, "_add_adapters_forward", "bf16: adapters beside, forward")
    timed(lora_bf16, "_add_adapters_backward", "bf16: adapters beside, input gradient")
    timed(F, "scaled_dot_product_attention", "attention forward")
    timed(transformer, "fused_linear_cross_entropy", "fused loss (its products included)")


if __name__ == "__main__":
    main()
