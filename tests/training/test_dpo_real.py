"""DPO on the real SmolLM2 (NF4): pairs that prefer a terse answer raise the held-out reward
accuracy, and `fedlm generate` with the exported adapter answers tersely where the base model
writes a sentence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _generate(model: Path, prompt: str, adapter: Path | None) -> str:
    cmd = [sys.executable, "-m", "edge_sdk.cli", "generate", str(model), prompt, "--chat",
           "--max-tokens", "30"]  # fmt: skip
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, timeout=300)
    return done.stdout.strip()


@pytest.mark.slow
def test_dpo_on_real_pairs_learns_the_terse_format(tmp_path: Path, smollm2_path: Path) -> None:
    rows = [json.loads(line) for line in (REPO / "tests/data/capitals_json.jsonl").open()]
    pairs = []
    for row in rows:
        question = row["messages"][0]["content"]
        answer = json.loads(row["messages"][1]["content"])
        # Users preferred the bare answer to the sentence the base model tends to write.
        pairs.append(
            {
                "prompt": question,
                "chosen": f"{answer['capital']}.",
                "rejected": f"The capital of {answer['country']} is {answer['capital']}.",
            }
        )
    held_out = [p["prompt"] for p in pairs[-3:]]  # never trained on, nor in the val split
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs[:-3]))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "edge_sdk.cli", "train", str(smollm2_path), "--method", "dpo",
           "--data", str(data), "--out", str(out), "--steps", "8", "--seq-len", "64",
           "--batch-size", "2", "--lr", "1e-3", "--warmup", "2", "--beta", "0.1",
           "--checkpoint-every", "0", "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    # Before training the policy is the reference: no pair is ranked right (ties).
    assert m["eval_metrics_before"]["reward_accuracy"] == 0.0
    assert m["eval_metrics"]["reward_accuracy"] >= 0.9
    assert m["eval_metrics"]["reward_margin"] > 1.0
    assert m["eval_metrics"]["chosen_logps"] > m["eval_metrics_before"]["chosen_logps"]

    base = [_generate(smollm2_path, q, None) for q in held_out]
    tuned = [_generate(smollm2_path, q, out / "adapter.gguf") for q in held_out]
    words = [len(a.split()) for a in tuned]
    print("base:", base, "\ntuned:", tuned)
    assert sum(len(a.split()) for a in base) / 3 >= 5  # the base writes sentences
    assert sum(n <= 3 for n in words) >= 2  # the tuned model answers tersely
    assert sum(words) < 0.5 * sum(len(a.split()) for a in base)
