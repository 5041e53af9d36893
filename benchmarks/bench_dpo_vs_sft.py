"""DPO step against SFT step: tokens/s and peak RSS on SmolLM2-135M (NF4), sequences of 256.

Each arm runs in its own subprocess (clean peak RSS) through the public trainer (`fit`):

- sft: packed plain-text sequences of 256 tokens, batch 2 (512 tokens per step);
- dpo: pairs whose chosen and rejected sequences are both cut to 256 tokens, batch 1 pair
  (the same 512 tokens per step, as one (2, 256) batch). The first `pairs` steps also compute
  each new pair's reference log-probs (adapter off, no grad); the later ones find them cached.
  Both halves are reported.

LoRA r=8 / alpha=16 on all projections, AdamW, no dropout, no gradient checkpointing.
"Training peak" is the process's VmHWM reset after the model is loaded (clear_refs), so it is
what training adds on top of the loaded model; "process peak" includes loading.

Run: `.venv/bin/python benchmarks/bench_dpo_vs_sft.py [--pairs 4] [--rounds 1] [--json out.json]`
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SEQ = 256


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _texts() -> list[str]:
    """Long paragraphs of real English (this repository's docs), each well over 256 tokens."""
    words = " ".join(
        (ROOT / name).read_text() for name in ("README.md", "docs/training-dpo.md")
    ).split()
    return [" ".join(words[i : i + 400]) for i in range(0, len(words) - 400, 400)]


def _child(arm: str, pairs: int, out: str) -> None:
    import torch

    from edge_sdk.models import resolve
    from edge_sdk.training.data import DataConfig, build_dataset
    from edge_sdk.training.lora import LoraConfig
    from edge_sdk.training.preferences import PreferencePair, build_preference_dataset
    from edge_sdk.training.tokenizer import load_tokenizer
    from edge_sdk.training.trainer import TrainConfig, fit, load_for_training

    path = resolve("smollm2-135m")
    tok = load_tokenizer(path)
    texts = _texts()
    steps = 2 * pairs
    data_cfg = DataConfig(seq_len=SEQ, val_fraction=0.0, seed=0)
    if arm == "dpo":
        items = [
            PreferencePair(f"Summarize part {i}.", texts[2 * i], texts[2 * i + 1])
            for i in range(pairs)
        ]
        dataset: Any = build_preference_dataset(items, tok, data_cfg)
        batch = 1
    else:
        tmp = Path(tempfile.mkdtemp()) / "t.txt"
        tmp.write_text("\n\n".join(texts))
        dataset = build_dataset(tmp, tok, data_cfg)
        batch = 2
    config = TrainConfig(
        steps=steps, method=arm, lora=LoraConfig(rank=8, alpha=16.0), seq_len=SEQ,
        batch_size=batch, lr=1e-4, warmup=0, val_fraction=0.0, checkpoint_every=0,
    )  # fmt: skip
    model = load_for_training(path, config)
    loaded_rss = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    records: list[dict[str, float]] = []
    result = fit(model, dataset, config, on_step=records.append)
    rates = [r["tokens_per_s"] for r in records]
    doc = {
        "arm": arm,
        "steps": steps,
        "tokens_per_step": result.metrics.num_tokens / steps,
        "tok_s_first_half": statistics.median(rates[:pairs]),
        "tok_s_second_half": statistics.median(rates[pairs:]),
        "tok_s_all": result.metrics.tokens_per_s,
        "loaded_rss_mb": loaded_rss / 1024,
        "training_peak_rss_mb": _status_kb("VmHWM") / 1024,
        "process_peak_rss_mb": __import__("resource").getrusage(0).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }
    Path(out).write_text(json.dumps(doc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=4, help="DPO pairs (steps = 2 x pairs)")
    ap.add_argument("--rounds", type=int, default=1, help="SFT/DPO alternations")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.pairs, args.out)
        return
    results: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        for arm in ("sft", "dpo"):
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                subprocess.run(
                    [sys.executable, __file__, "--child", arm, "--pairs", str(args.pairs),
                     "--out", f.name],
                    check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                )  # fmt: skip
                results.append(json.loads(Path(f.name).read_text()))
                print(json.dumps(results[-1]), flush=True)
    by = {arm: [r for r in results if r["arm"] == arm] for arm in ("sft", "dpo")}

    def med(arm: str, key: str) -> float:
        return statistics.median(r[key] for r in by[arm])

    sft_rate = med("sft", "tok_s_all")
    summary = {
        "dpo_first_steps_vs_sft_tok_s": med("dpo", "tok_s_first_half") / sft_rate,
        "dpo_cached_steps_vs_sft_tok_s": med("dpo", "tok_s_second_half") / sft_rate,
        "dpo_vs_sft_training_peak_rss": med("dpo", "training_peak_rss_mb")
        / med("sft", "training_peak_rss_mb"),
        "dpo_vs_sft_process_peak_rss": med("dpo", "process_peak_rss_mb")
        / med("sft", "process_peak_rss_mb"),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
