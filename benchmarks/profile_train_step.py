"""Where one QLoRA training step spends its time: torch.profiler's table for fedlm-edge's step.

Same configuration as `bench_train.py` (SmolLM2-135M, NF4 base, seq 256, batch 1, LoRA r=8 on
all projections). Two warm-up steps, three timed steps, then one profiled step.

Run: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/profile_train_step.py [--rows 25]`
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from edge_sdk.models import resolve
from edge_sdk.models.loader import load_model
from edge_sdk.training.adamw import AdapterAdamW
from edge_sdk.training.lora import LoraConfig, lora_parameters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()

    model = load_model(resolve(args.model), precision="nf4", lora=LoraConfig(rank=8, alpha=16.0))
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
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
