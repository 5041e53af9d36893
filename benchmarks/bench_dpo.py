"""DPO step speed and peak memory: fedlm-edge vs TRL's `DPOTrainer` + peft + bitsandbytes.

Same configuration on both sides, each stack in its own subprocess so that peak RSS is clean:
SmolLM2-135M-Instruct (the embedded GGUF), sequences of 256 tokens (prompt ~100 tokens, both
answers cut at 256), batch 1 pair (its chosen and rejected sequences in one forward), LoRA r=8 /
alpha=16 on all seven projections, frozen NF4 base (bitsandbytes, fp32 compute), AdamW on the
adapter, sigmoid loss, beta 0.1, the reference = the base model with the adapter disabled.

TRL's baseline model is built as `bench_train.py` builds the HF QLoRA baseline (transformers
refuses a BitsAndBytesConfig with a GGUF file): `from_pretrained(dir, gguf_file=...)` in fp32,
every decoder Linear replaced by an NF4 `Linear4bit`, `peft.get_peft_model`; then
`DPOTrainer(model, ref_model=None, ...)`, so TRL's reference is also the adapter disabled.

Reported per stack: median step time and tokens/s (chosen + rejected tokens, no padding, of the
steps after warmup), the run's wall time and tokens/s including the reference log-probs (ours
computes them once per pair before the first step; TRL by default once per step, or with
`precompute_ref_log_probs` (stack `trl-precompute`) once per pair before training), and peak
RSS. Stack `ours-ckpt`: gradient checkpointing and `FEDLM_LOW_MEMORY=1`.

Run: `.venv/bin/python benchmarks/bench_dpo.py --trl-python /tmp/trl-venv/bin/python`
where the second interpreter has the `bench` extra's `trl` (a separate venv that sees the main
one's packages works: `python -m venv /tmp/trl-venv; echo $PWD/.venv/lib/python3.11/site-packages
> /tmp/trl-venv/lib/python3.11/site-packages/main.pth; /tmp/trl-venv/bin/pip install trl==1.16.0`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_WORDS = [
    "river",
    "stone",
    "light",
    "paper",
    "garden",
    "window",
    "silver",
    "morning",
    "market",
    "engine",
    "orange",
    "music",
    "winter",
    "forest",
    "signal",
    "harbor",
    "letter",
    "planet",
    "copper",
    "meadow",
    "candle",
    "bridge",
    "valley",
    "thunder",
    "pocket",
    "library",
    "coffee",
    "mirror",
    "castle",
    "rocket",
    "lantern",
    "island",
]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def pairs_text(n: int, seed: int) -> list[dict[str, str]]:
    """`n` pairs whose prompt is ~100 tokens and whose answers run past 256 tokens in all."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(k))

    return [
        {"prompt": "Continue the list: " + words(90), "chosen": words(220), "rejected": words(220)}
        for _ in range(n)
    ]


def worker_ours(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from edge_sdk.models import resolve
    from edge_sdk.training.data import DataConfig
    from edge_sdk.training.lora import LoraConfig
    from edge_sdk.training.preferences import PreferencePair, build_preference_dataset
    from edge_sdk.training.tokenizer import load_tokenizer
    from edge_sdk.training.trainer import TrainConfig, fit, load_for_training

    torch.manual_seed(args.seed)
    path = resolve(args.model)
    n_steps = args.warmup + args.steps
    cfg = TrainConfig(
        steps=n_steps, lora=LoraConfig(rank=args.rank, alpha=2.0 * args.rank),
        seq_len=args.seq_len, batch_size=args.batch_size, lr=1e-4, warmup=0, val_fraction=0.0,
        checkpoint_every=0, precision="nf4", method="dpo", beta=0.1, dpo_loss="sigmoid",
        gradient_checkpointing=args.worker == "ours-ckpt",
    )  # fmt: skip
    text = pairs_text(n_steps * args.batch_size, args.seed)
    pairs = [PreferencePair(prompt=p["prompt"], chosen=p["chosen"], rejected=p["rejected"])
             for p in text]  # fmt: skip
    dataset = build_preference_dataset(
        pairs, load_tokenizer(path), DataConfig(seq_len=args.seq_len, val_fraction=0.0)
    )
    t0 = time.perf_counter()
    model = load_for_training(path, cfg)
    load_s = time.perf_counter() - t0
    stamps: list[float] = []
    tokens: list[float] = []

    def on_step(record: dict[str, float]) -> None:
        stamps.append(time.perf_counter())
        tokens.append(float(record.get("tokens", 0.0)))

    t0 = time.perf_counter()
    result = fit(model, dataset, cfg, on_step=on_step)
    run_s = time.perf_counter() - t0
    step_s = (
        [b - a for a, b in itertools.pairwise(stamps)][args.warmup - 1 :] if args.warmup else []
    )
    per_step_tokens = 2 * sum(
        min(len(p.chosen.input_ids), args.seq_len) for p in dataset.train[: args.batch_size]
    )
    seq_tokens = [len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in dataset.train]
    return {
        "load_s": load_s,
        "step_s": step_s,
        "run_s": run_s,
        "run_tokens": sum(seq_tokens),
        "tokens_per_step": per_step_tokens,
        "seq_lens": sorted({len(p.chosen.input_ids) for p in dataset.train}),
        "final_loss": float(result.metrics.train_loss),
    }


def worker_trl(args: argparse.Namespace) -> dict[str, Any]:
    import bitsandbytes as bnb
    import peft
    import torch
    from datasets import Dataset
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from edge_sdk.models import resolve

    torch.manual_seed(args.seed)
    path = resolve(args.model)
    n_steps = args.warmup + args.steps
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    )
    # transformers marks a model read from GGUF as quantized ("gguf"), and Trainer refuses to
    # train such a model; the weights were dequantized to fp32 on load, and the NF4 below is
    # bitsandbytes' own, so the stale marker goes.
    for attr in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        model.__dict__.pop(attr, None)
    model.config.__dict__.pop("quantization_config", None)
    model.is_quantized = False
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for name, module in list(model.named_modules()):  # BitsAndBytesConfig(nf4, fp32 compute)
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and not (name == "" and child_name == "lm_head"):
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4",
                )  # fmt: skip
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type="nf4",
                    compress_statistics=False, module=q,
                )  # fmt: skip
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, q.to("cpu"))  # quantizes
    lora = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
        ],
    )  # fmt: skip
    model = peft.get_peft_model(model, lora)
    load_s = time.perf_counter() - t0
    train = Dataset.from_list(pairs_text(n_steps * args.batch_size, args.seed))
    config = DPOConfig(
        output_dir=str(Path(args.out_dir) / "trl"), per_device_train_batch_size=args.batch_size,
        max_steps=n_steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
        beta=0.1, loss_type=["sigmoid"], max_length=args.seq_len, truncation_mode="keep_start",
        precompute_ref_log_probs=args.trl_precompute, use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=args.seed,
        gradient_checkpointing=False, disable_tqdm=True, bf16=False, fp16=False,
    )  # fmt: skip
    stamps: list[float] = []
    seen_tokens: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            stamps.append(time.perf_counter())

    trainer = DPOTrainer(
        model=model, ref_model=None, args=config, train_dataset=train,
        processing_class=tokenizer, callbacks=[Clock()],
    )  # fmt: skip
    collate = trainer.data_collator

    def counting(features: Any) -> Any:
        batch = collate(features)
        mask_keys = [k for k in batch if k.endswith("attention_mask")]
        seen_tokens.append(int(sum(int(batch[k].sum()) for k in mask_keys)))
        return batch

    trainer.data_collator = counting
    t0 = time.perf_counter()
    trainer.train()
    run_s = time.perf_counter() - t0
    step_s = (
        [b - a for a, b in itertools.pairwise(stamps)][args.warmup - 1 :] if args.warmup else []
    )
    return {
        "load_s": load_s,
        "step_s": step_s,
        "run_s": run_s,
        "run_tokens": sum(seen_tokens[:n_steps]),
        "tokens_per_step": statistics.median(seen_tokens) if seen_tokens else 0,
        "batch_keys_tokens": seen_tokens[:3],
        "final_loss": float(trainer.state.log_history[-1].get("train_loss", float("nan"))),
    }


def run_worker(stack: str, args: argparse.Namespace) -> dict[str, Any]:
    python = args.trl_python if stack.startswith("trl") else sys.executable
    cmd = [python, __file__, "--worker", stack, "--model", args.model, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seq-len", str(args.seq_len), "--rank", str(args.rank),
           "--seed", str(args.seed), "--batch-size", str(args.batch_size),
           "--out-dir", args.out_dir]  # fmt: skip
    if stack == "trl-precompute":
        cmd.append("--trl-precompute")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_train.py: same for both stacks
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if stack == "ours-ckpt":  # gradient checkpointing + the pinned mmap threshold (BENCHMARKS.md)
        env["FEDLM_LOW_MEMORY"] = "1"
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{stack} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(name: str, r: dict[str, Any]) -> dict[str, Any]:
    med = statistics.median(r["step_s"]) if r["step_s"] else float("nan")
    return {
        "stack": name,
        "step_s_median": round(med, 3),
        "tokens_per_step": r["tokens_per_step"],
        "tokens_per_s": round(r["tokens_per_step"] / med, 1),
        "run_s": round(r["run_s"], 2),
        "run_tokens_per_s": round(r["run_tokens"] / r["run_s"], 1),
        "peak_rss_mb": round(r["peak_rss_mb"], 1),
        "load_s": round(r["load_s"], 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", default=None)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of each stack")
    ap.add_argument("--trl-python", default=os.environ.get("FEDLM_TRL_PYTHON", sys.executable))
    ap.add_argument("--trl-precompute", action="store_true")
    ap.add_argument("--stacks", default="ours,trl,trl-precompute")
    ap.add_argument("--out-dir", default="/tmp/fedlm-bench-dpo")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.worker is not None:
        out = worker_ours(args) if args.worker.startswith("ours") else worker_trl(args)
        out["peak_rss_mb"] = _peak_rss_mb()
        print(json.dumps(out))
        return 0
    stacks = args.stacks.split(",")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in stacks}
    for rep in range(args.repeats):
        for stack in stacks if rep % 2 == 0 else reversed(stacks):  # alternate: drift cancels
            runs[stack].append(summarize(stack, run_worker(stack, args)))
            print(json.dumps(runs[stack][-1]), file=sys.stderr)
    rows = []
    for stack, results in runs.items():
        row = dict(results[0])
        for key in ("step_s_median", "tokens_per_s", "run_s", "run_tokens_per_s", "peak_rss_mb"):
            row[key] = round(statistics.median(r[key] for r in results), 2)
        rows.append(row)
    report: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "worker"},
                              "rows": rows}  # fmt: skip
    if "ours" in runs:
        ours = next(r for r in rows if r["stack"] == "ours")
        for r in rows:
            if r["stack"] != "ours":
                report[f"vs_{r['stack']}"] = {
                    "tokens_per_s_ratio": round(ours["tokens_per_s"] / r["tokens_per_s"], 2),
                    "run_tokens_per_s_ratio": round(
                        ours["run_tokens_per_s"] / r["run_tokens_per_s"], 2
                    ),
                    "peak_rss_ratio": round(ours["peak_rss_mb"] / r["peak_rss_mb"], 2),
                }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
