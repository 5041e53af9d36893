"""`fedlm train` and `fedlm convert-adapter` from the command line (in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_sdk.adapters.gguf_lora import check_adapter_compatible, read_gguf_lora
from edge_sdk.adapters.peft import load_peft
from edge_sdk.cli import main

ARGS = ["--steps", "4", "--seq-len", "64", "--batch-size", "2", "--precision", "fp32", "--rank", "2",
        "--lr", "1e-2", "--checkpoint-every", "2"]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"prompt": f"hello {w}", "completion": f"{w} world"}) for w in "abcdefgh"]
    path.write_text("\n".join(lines[:4] + ["{broken"] + lines[4:]) + "\n")
    return path


def test_bad_line_fails_with_file_and_line(tmp_path: Path, tiny_gguf: Path, data: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", str(tiny_gguf), "--data", str(data), "--out", str(tmp_path / "o"), *ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and f"{data}:5: invalid JSON" in err and "Traceback" not in err


def test_missing_file_and_bad_value_are_one_line_errors(tmp_path: Path, tiny_gguf: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", str(tiny_gguf), "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "nope.jsonl: cannot read" in capsys.readouterr().err
    rc = main(["train", str(tiny_gguf), "--data", str(tmp_path / "x"), "--out", str(tmp_path / "o"), "--rank", "0"])
    assert rc == 2 and "`rank` should be a positive integer, got 0" in capsys.readouterr().err


def test_train_skip_bad_then_convert(tmp_path: Path, tiny_gguf: Path, data: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["train", str(tiny_gguf), "--data", str(data), "--out", str(out), "--skip-bad", *ARGS])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "1 malformed lines skipped" in captured.out and "eval loss" in captured.out
    assert "step 4/4" in captured.err  # line progress when stderr is not a terminal
    check_adapter_compatible(out / "adapter.gguf", tiny_gguf)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["skipped_bad"] == 1 and metrics["metrics"]["steps"] == 4

    rc = main(["convert-adapter", str(out), "--model", str(tiny_gguf), "--out", str(tmp_path / "c.gguf")])
    assert rc == 0
    converted, peft = read_gguf_lora(tmp_path / "c.gguf"), load_peft(out)
    assert converted.tensors.keys() == peft.tensors.keys()
    trained = read_gguf_lora(out / "adapter.gguf")
    for k, v in trained.tensors.items():
        assert (converted.tensors[k] == v).all()
