"""Experiment (issue 16, part 4): the frozen base's GEMMs below fp32, in int8 or in bf16.

- int8: the NF4 base is dequantized as usual, then re-quantized per call to int8 (per output
  row for the forward, per input column for the input-gradient GEMM), the activations / output
  gradients per token, and the products run through `torch._int_mm` (VNNI on AVX512 CPUs).
- bf16: `fedlm train --compute bf16` (`edge_sdk/training/lora_bf16.py`): the dequantized NF4
  weight and the activations / output gradients rounded to bf16, torch's bf16 GEMM (AVX512-BF16
  where the CPU has it), the products widened back to fp32, the adapter beside it in fp32.

In both, the LoRA path, its gradients and the optimizer stay fp32. Not wired into `fedlm
train` for int8: this script patches `edge_sdk.training.lora`'s autograd function in its own
process.

Two measurements, one process each arm, same seed and data:
- speed: paired steps, alternating fp32 / the mode on one model (SmolLM2, seq 256, batch 1);
- quality: `fedlm train` on JSON-record data (what the hidden task looks like), or on a text
  file (`--data`), eval loss after N steps, fp32 against the mode.

Run: `.venv/bin/python benchmarks/exp_compute.py --mode speed --compute bf16 [--speed-pairs 8]`,
then `--mode quality --compute fp32|bf16|int8 [--steps 12] [--data FILE.txt]`
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from edge_sdk.training import lora


def _q_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (rows, cols) -> int8 (rows, cols), scale (rows, 1)."""
    s = t.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12) / 127.0
    return (t / s).round_().clamp_(-127, 127).to(torch.int8), s


class _Int8NF4LoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, scale, base):  # type: ignore[no-untyped-def,override]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        wq, sw = _q_rows(base.dequantize_scratch())  # (out, in), (out, 1)
        xq, sx = _q_rows(x2)  # (N, in), (N, 1)
        y = torch._int_mm(xq, wq.T.contiguous()).float().mul_(sx).mul_(sw.T)  # (N, out)
        y.add_((x2 @ lora_A.T) @ lora_B.T, alpha=scale)
        if base.bias is not None:
            y.add_(base.bias)
        ctx.save_for_backward(x, lora_A, lora_B)
        ctx.scale, ctx.base = scale, base
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def,override]
        x, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scale
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            wq, sw = _q_rows(
                ctx.base.dequantize_scratch().T
            )  # per input column: (in, out), (in, 1)
            gq, sg = _q_rows(g2)
            grad_x = torch._int_mm(gq, wq.T.contiguous()).float().mul_(sg).mul_(sw.T)  # (N, in)
            grad_x.add_((g2 @ lora_B) @ lora_A, alpha=s)
            grad_x = grad_x.view(*g.shape[:-1], -1)
        xa = x2 @ lora_A.T
        grad_b = (xa.T @ g2).T.mul_(s)
        gb = (lora_B.T @ g2.T).T
        grad_a = (gb.T @ x2).mul_(s)
        return grad_x, grad_a, grad_b, None, None


FP32 = lora._MergedNF4LoRA
MODES = ("fp32", "int8", "bf16")


def use(mode: str, model: Any = None) -> None:
    """int8: patch the non-gated projections' function (what the int8 arm measured); bf16:
    `fedlm train --compute bf16`'s own path (`edge_sdk.training.lora_bf16`), set on `model`."""
    lora._MergedNF4LoRA = _Int8NF4LoRA if mode == "int8" else FP32  # type: ignore[misc]
    # int8 replaces the per-projection function: the fused q/k/v and MLP functions step aside
    lora.FUSED_PROJECTIONS = mode != "int8"
    if model is not None:
        lora.set_base_compute(model, "bf16" if mode == "bf16" else "fp32")


def speed(steps: int, mode: str) -> dict[str, Any]:
    from edge_sdk.models import resolve
    from edge_sdk.models.loader import load_model
    from edge_sdk.training.adamw import AdapterAdamW

    model = load_model(resolve("smollm2-135m"), lora=lora.LoraConfig(rank=8, alpha=16.0))
    model.train()
    opt = AdapterAdamW(lora.lora_parameters(model), lr=1e-4)
    ids = torch.randint(
        0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0)
    )

    def step(mode: str) -> float:
        use(mode, model)
        t0 = time.perf_counter()
        model(ids, ids).backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t0

    step("fp32"), step(mode)
    pairs, fp32_s = [], []
    for i in range(steps):
        order = ("fp32", mode) if i % 2 == 0 else (mode, "fp32")
        t = {m: step(m) for m in order}
        pairs.append(t[mode] / t["fp32"])
        fp32_s.append(t["fp32"])
    use("fp32", model)
    return {
        f"{mode}_over_fp32_step": statistics.median(pairs),
        "quartiles": statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs,
        "fp32_step_s": statistics.median(fp32_s),
        "pairs": pairs,
    }


def json_data(path: Path, n: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    names = ["Ada", "Bo", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
    cities = ["Oslo", "Lima", "Pune", "Kyiv", "Lyon", "Cork", "Nara", "Baku"]
    lines = []
    for _ in range(n):
        rec = {
            "name": rng.choice(names),
            "age": rng.randint(18, 90),
            "city": rng.choice(cities),
            "tags": sorted(rng.sample(["a", "b", "c", "d", "e"], 2)),
        }
        lines.append(
            f"Record: {rec['name']} from {rec['city']}, {rec['age']}.\nJSON: {json.dumps(rec)}"
        )
    path.write_text("\n\n".join(lines))
    return path


def quality(mode: str, steps: int, data: Path) -> float:
    from edge_sdk.cli import main as cli_main

    use("int8" if mode == "int8" else "fp32")
    with tempfile.TemporaryDirectory() as out:
        rc = cli_main(
            [
                "train",
                "smollm2-135m",
                "--data",
                str(data),
                "--out",
                out,
                "--seq-len",
                "128",
                "--batch-size",
                "2",
                "--rank",
                "8",
                "--steps",
                str(steps),
                "--seed",
                "0",
                "--compute",
                "bf16" if mode == "bf16" else "fp32",
            ]
        )
        assert rc == 0
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    use("fp32")
    return metrics


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--speed-pairs", type=int, default=4)
    ap.add_argument("--mode", choices=["speed", "quality"], default="speed")
    ap.add_argument("--compute", choices=MODES, default="bf16")
    ap.add_argument("--data", type=Path, help="quality: a text file (default: JSON records)")
    args = ap.parse_args()
    if args.mode == "speed":
        print(json.dumps(speed(args.speed_pairs, args.compute)))
    else:
        data = args.data or json_data(Path(tempfile.gettempdir()) / "fedlm-compute-json.txt")
        metrics = quality(args.compute, args.steps, data)
        print(json.dumps({"compute": args.compute, "data": str(data), "metrics": metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
