"""`fedlm train --method dpo` from the command line: errors, --skip-bad, outputs, progress lines,
SFT -> DPO with --init-adapter, and a SIGKILLed run resumed bit for bit (tiny model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.adapters.gguf_lora import check_adapter_compatible
from edge_sdk.adapters.peft import load_peft
from edge_sdk.cli import main
from tests.training.helpers import assert_same_adapters, kill_at_checkpoint, run_train, train_env

WORDS = ["hello", "world", "the", "a", "is", "of", "and", "to"]
ARGS = ["--method", "dpo", "--seq-len", "64", "--batch-size", "2", "--precision", "fp32",
        "--rank", "2", "--lr", "1e-2", "--warmup", "2", "--no-progress"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pairs(path: Path, bad: list[str] | None = None) -> Path:
    lines = [
        json.dumps({"prompt": f"{w} {v}", "chosen": f"{v} {w}", "rejected": f"{w} {v} {w}"})
        for w in WORDS
        for v in WORDS[:4]
    ]
    path.write_text("\n".join(lines[:3] + (bad or []) + lines[3:]) + "\n")
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "chosen": "", "rejected": "b"}', "`chosen` is empty"),
        ('{"prompt": "a", "chosen": "b", "rejected": "b"}', "`chosen` and `rejected` are the same"),
        ('{"prompt": "a", "chosen": "b"}', "missing field `rejected`"),
    ],
)
def test_bad_pair_is_a_one_line_error_with_file_and_line(
    tmp_path: Path, tiny_gguf: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    data = _pairs(tmp_path / "p.jsonl", [line])
    rc = main(["train", str(tiny_gguf), "--data", str(data), "--out", str(tmp_path / "o"), *ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and f"{data}:4: {message}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_dpo_run_skips_bad_lines_logs_and_exports(
    tmp_path: Path, tiny_gguf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = ['{"prompt": "a", "chosen": "", "rejected": "b"}', "{broken"]
    data = _pairs(tmp_path / "p.jsonl", bad)
    out = tmp_path / "o"
    args = [a for a in ARGS if a != "--no-progress"]  # not a terminal: progress lines
    rc = main(["train", str(tiny_gguf), "--data", str(data), "--out", str(out), *args,
               "--steps", "6", "--skip-bad", "--checkpoint-every", "0", "--beta", "0.2",
               "--loss", "ipo"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert (
        "data: 32 preference pairs" in captured.out and "2 malformed lines skipped" in captured.out
    )
    assert "eval reward accuracy" in captured.out
    # Without a terminal, progress is a line per step here (6 steps: every step).
    progress = [ln for ln in captured.err.splitlines() if ln.startswith("step ")]
    assert len(progress) == 6
    assert all("reward acc" in ln and "margin" in ln and "logps chosen" in ln for ln in progress)
    check_adapter_compatible(out / "adapter.gguf", tiny_gguf)
    peft = load_peft(out)
    assert peft.rank == 2 and any(
        np.abs(v).max() > 0 for k, v in peft.tensors.items() if "lora_B" in k
    )
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["config"]["method"] == "dpo" and doc["config"]["dpo_loss"] == "ipo"
    assert doc["config"]["beta"] == 0.2 and doc["config"]["lora"]["rank"] == 2
    m = doc["metrics"]
    assert m["steps"] == 6 and "reward_accuracy" in m["eval_metrics"]
    assert {"reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps"} <= set(
        m["history"][0]
    )


def test_sft_then_dpo_from_the_sft_adapter(
    tmp_path: Path, tiny_gguf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text(
        "".join(json.dumps({"prompt": f"{w} a", "completion": f"a {w}"}) + "\n" for w in WORDS)
    )
    sft_out, dpo_out = tmp_path / "sft", tmp_path / "dpo"
    common = ["--seq-len", "64", "--precision", "fp32", "--rank", "2", "--lr", "1e-2",
              "--no-progress", "--checkpoint-every", "0", "--steps", "3"]  # fmt: skip
    assert (
        main(["train", str(tiny_gguf), "--data", str(sft_data), "--out", str(sft_out), *common])
        == 0
    )
    data = _pairs(tmp_path / "p.jsonl")
    rc = main(["train", str(tiny_gguf), "--data", str(data), "--out", str(dpo_out), *common,
               "--method", "dpo", "--init-adapter", str(sft_out),
               "--reference", "start"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    m = json.loads((dpo_out / "metrics.json").read_text())["metrics"]
    # The reference is the SFT adapter the run starts from: before any step, policy == reference.
    assert m["eval_loss_before"] == pytest.approx(np.log(2.0), abs=1e-6)
    assert m["eval_metrics_before"]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    start = load_peft(sft_out).tensors
    end = load_peft(dpo_out).tensors
    assert start.keys() == end.keys() and any(not np.array_equal(start[k], end[k]) for k in start)


def _cli(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edge_sdk.cli", "train", str(model), "--data", str(data),
            "--out", str(out), *ARGS, "--steps", "30", "--dropout", "0.1",
            "--checkpoint-every", "2", *extra]  # fmt: skip


@pytest.mark.slow
def test_dpo_sigkill_then_resume_is_bitwise_equal(tmp_path: Path, tiny_gguf: Path) -> None:
    data = _pairs(tmp_path / "p.jsonl")
    env = train_env()
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    done = run_train(_cli(tiny_gguf, data, ref), env)
    assert done.returncode == 0, done.stderr

    step = kill_at_checkpoint(_cli(tiny_gguf, data, killed), killed, env)
    assert 6 <= step < 30 and not (killed / "adapter.gguf").exists()

    resumed = run_train(_cli(tiny_gguf, data, killed, "--resume"), env)
    assert resumed.returncode == 0, resumed.stderr
    ma, mb = assert_same_adapters(ref, killed)
    assert ma["eval_metrics"] == mb["eval_metrics"] and ma["num_tokens"] == mb["num_tokens"]
