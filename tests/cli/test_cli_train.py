"""`fedlm train` and `fedlm convert-adapter` from the command line (in-process)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edge_sdk.adapters.gguf_lora import check_adapter_compatible, read_gguf_lora
from edge_sdk.adapters.peft import load_peft
from edge_sdk.cli import main

ARGS = [
    "--steps",
    "4",
    "--seq-len",
    "64",
    "--batch-size",
    "2",
    "--precision",
    "fp32",
    "--rank",
    "2",
    "--lr",
    "1e-2",
    "--checkpoint-every",
    "2",
]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"prompt": f"hello {w}", "completion": f"{w} world"}) for w in "abcdefgh"]
    path.write_text("\n".join(lines[:4] + ["{broken"] + lines[4:]) + "\n")
    return path


def test_bad_line_fails_with_file_and_line(
    tmp_path: Path, tiny_gguf: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["train", str(tiny_gguf), "--data", str(data), "--out", str(tmp_path / "o"), *ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and f"{data}:5: invalid JSON" in err and "Traceback" not in err


def test_missing_file_and_bad_value_are_one_line_errors(
    tmp_path: Path, tiny_gguf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "train",
            str(tiny_gguf),
            "--data",
            str(tmp_path / "nope.jsonl"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "nope.jsonl: cannot read" in capsys.readouterr().err
    rc = main(
        [
            "train",
            str(tiny_gguf),
            "--data",
            str(tmp_path / "x"),
            "--out",
            str(tmp_path / "o"),
            "--rank",
            "0",
        ]
    )
    assert rc == 2 and "`rank` should be a positive integer, got 0" in capsys.readouterr().err


def test_train_skip_bad_then_convert(
    tmp_path: Path, tiny_gguf: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    rc = main(
        ["train", str(tiny_gguf), "--data", str(data), "--out", str(out), "--skip-bad", *ARGS]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "1 malformed lines skipped" in captured.out and "eval loss" in captured.out
    assert "step 4/4" in captured.err  # line progress when stderr is not a terminal
    check_adapter_compatible(out / "adapter.gguf", tiny_gguf)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["skipped_bad"] == 1 and metrics["metrics"]["steps"] == 4

    rc = main(
        ["convert-adapter", str(out), "--model", str(tiny_gguf), "--out", str(tmp_path / "c.gguf")]
    )
    assert rc == 0
    converted, peft = read_gguf_lora(tmp_path / "c.gguf"), load_peft(out)
    assert converted.tensors.keys() == peft.tensors.keys()
    trained = read_gguf_lora(out / "adapter.gguf")
    for k, v in trained.tensors.items():
        assert (converted.tensors[k] == v).all()


@pytest.mark.parametrize(
    "name,content,message",
    [
        (
            "d.csv",
            "question,answer\nwhat,this\n",
            (
                "d.csv: a .csv data file needs a header row "
                "with `prompt` and `completion` columns or "
                "a `text` column, got columns 'question', "
                "'answer'; or convert it to JSONL with one "
                "object per line"
            ),
        ),
        (
            "d.json",
            '{"rows": []}',
            (
                "d.json: a JSON object with keys rows is "
                "not a list of training records; pass a JSON "
                "array or a .jsonl file with one object per line"
            ),
        ),
        (
            "d.txt",
            '{"prompt": "a", "completion": "b"}\n',
            (
                "d.txt: holds JSON records but is not named "
                ".jsonl, so it would be trained on as plain "
                "text; rename it to d.jsonl"
            ),
        ),
    ],
)
def test_data_in_the_wrong_format_is_a_one_line_error(
    tmp_path: Path,
    tiny_gguf: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: str,
    message: str,
) -> None:
    path = tmp_path / name
    path.write_text(content)
    rc = main(["train", str(tiny_gguf), "--data", str(path), "--out", str(tmp_path / "o"), *ARGS])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"fedlm: error: {path}") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_json_array_trains_like_jsonl(
    tmp_path: Path, tiny_gguf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps([{"prompt": f"hello {w}", "completion": f"{w} world"} for w in "abcdefgh"])
    )
    rc = main(["train", str(tiny_gguf), "--data", str(path), "--out", str(tmp_path / "o"), *ARGS])
    out = capsys.readouterr().out
    assert rc == 0 and "data: 8 examples" in out and "(8 instruction)" in out


def test_output_is_flushed_line_by_line_into_a_pipe(
    tmp_path: Path, tiny_gguf: Path, data: Path
) -> None:
    """`fedlm train > log`: the data summary and the progress lines arrive while it runs.

    stdout and stderr are pipes here (not a terminal). The run is long enough that it is still
    training when the lines are read; Python would otherwise hold stdout in an 8 KiB buffer
    until the process exits.
    """
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("PYTHONUNBUFFERED", None)
    cmd = [
        sys.executable,
        "-m",
        "edge_sdk.cli",
        "train",
        str(tiny_gguf),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o"),
        "--skip-bad",
        "--steps",
        "3000",
        "--seq-len",
        "32",
        "--precision",
        "fp32",
        "--rank",
        "2",
        "--checkpoint-every",
        "0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        first = _read_line(proc.stdout, deadline=time.monotonic() + 240)
        assert first.startswith("data: 8 examples"), first
        # The summary comes before training starts, not with the results at the end.
        early = _available(proc.stderr)
        assert "step " not in early, early
        progress = early.splitlines()[-1] if early.endswith("\n") and early.strip() else ""
        while not progress.startswith("step "):  # skip warnings (e.g. the validation split)
            progress = _read_line(proc.stderr, deadline=time.monotonic() + 240)
        assert progress.startswith("step 300/3000: loss "), progress
        assert proc.poll() is None  # still training: the lines came while it ran
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def _available(stream: Any) -> str:
    """Whatever the pipe holds right now, without waiting for more."""
    buf = b""
    while select.select([stream], [], [], 0)[0]:
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
    return buf.decode()


def _read_line(stream: Any, deadline: float) -> str:
    """One line from a pipe, failing at `deadline` instead of blocking forever."""
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([stream], [], [], max(0.0, left))
        assert ready, f"no complete line before the deadline; got {buf!r}"
        chunk = os.read(stream.fileno(), 1)
        assert chunk, f"the process closed the pipe; got {buf!r}"
        buf += chunk
    return buf.decode()


def test_readme_training_example_runs(
    tmp_path: Path,
    tiny_gguf: Path,
    data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The README's Python training example, as written, on the tiny model (2 fp32 steps)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("<!-- example:training-api -->\n```python\n", 1)[1].split("```", 1)[0]
    assert "TrainConfig(steps=100," in block and '"smollm2-135m"' in block
    code = block.replace('"smollm2-135m"', repr(str(tiny_gguf))).replace(
        "TrainConfig(steps=100,", "TrainConfig(steps=2, precision='fp32', checkpoint_every=0,"
    )
    lines = [line for line in data.read_text().splitlines() if line != "{broken"]
    (tmp_path / "my.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md:training-api", "exec"), {})  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "8 examples" in out and "->" in out and "lora_A" in out
    assert (tmp_path / "out" / "adapter.gguf").is_file()
