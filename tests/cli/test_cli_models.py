from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edge_sdk.runtime import EdgeModel
from tests.cli.helpers import fedlm
from tests.helpers import SMOLLM2_SHA256, random_adapter
from tests.tiny_models import TinySpec, write_tiny_gguf


def test_inspect_json_real_model(smollm2_path: Path) -> None:
    out = fedlm("inspect", "smollm2-135m", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["sha256"] == SMOLLM2_SHA256
    assert report["licence"] == "apache-2.0" and report["licence_class"] == "permissive"


def test_models_lists_default() -> None:
    out = fedlm("models", "--json")
    assert out.returncode == 0
    names = {row["name"] for row in json.loads(out.stdout)}
    assert {"smollm2-135m", "gemma3-270m"} <= names


def test_bad_inputs_exit_2_with_one_line(tmp_path: Path, tiny_gguf: Path) -> None:
    notgguf = tmp_path / "notgguf.gguf"
    notgguf.write_text("hello")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(tiny_gguf.read_bytes()[:30_000])
    weird = write_tiny_gguf(tmp_path / "weird.gguf", arch="notanarch")
    other = write_tiny_gguf(
        tmp_path / "other.gguf", spec=TinySpec(d_model=32, n_head=2, n_kv_head=1, d_ff=64)
    )
    wrong_adapter = random_adapter(tmp_path / "wrong-adapter.gguf", other)
    cases = [
        (("inspect", str(tmp_path / "missing.gguf")), "missing.gguf: no such file"),
        (("inspect", str(notgguf)), "notgguf.gguf: not a GGUF file"),
        (("inspect", str(trunc)), "trunc.gguf: "),
        (("generate", str(notgguf), "hi"), "notgguf.gguf: not a GGUF file"),
        (("generate", str(trunc), "hi"), "trunc.gguf: "),
        (("generate", str(weird), "hi"), "weird.gguf: llama.cpp refused the model: "),
        (
            ("generate", str(tiny_gguf), "hi", "--adapter", str(wrong_adapter)),
            "wrong-adapter.gguf: tensor 'blk.0.",
        ),
        (("generate", str(tiny_gguf), "hi", "--adapter", str(notgguf)), "notgguf.gguf: "),
    ]
    for args, needle in cases:
        out = fedlm(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr
        lines = [line for line in out.stderr.splitlines() if line.startswith("fedlm: error:")]
        assert len(lines) == 1 and needle in lines[0], out.stderr


def test_chat_reads_turns_from_stdin_and_keeps_history(tiny_gguf: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_sdk.cli",
            "chat",
            str(tiny_gguf),
            "--max-tokens",
            "4",
            "--n-ctx",
            "256",
        ],
        input="hello\nthe world\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()  # one answer line per user turn
    # The second answer is the one the model gives with the first exchange in its context
    # (greedy, so reproducible here), not the one it gives to the second turn alone.
    with EdgeModel(tiny_gguf, n_ctx=256) as model:
        opts = {"max_tokens": 4, "temperature": 0.0, "seed": 0}
        turn1 = {"role": "user", "content": "hello"}
        turn2 = {"role": "user", "content": "the world"}
        assert model.chat([turn1], **opts) == first
        with_history = model.chat([turn1, {"role": "assistant", "content": first}, turn2], **opts)
        alone = model.chat([turn2], **opts)
    assert with_history != alone, "the tiny model answers alike with or without history"
    assert second == with_history


def test_generate_prints_prompt_and_greedy_continuation(tiny_gguf: Path) -> None:
    first = fedlm("generate", str(tiny_gguf), "hello world", "--max-tokens", "6", "--n-ctx", "256")
    second = fedlm("generate", str(tiny_gguf), "hello world", "--max-tokens", "6", "--n-ctx", "256")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("hello world") and first.stdout == second.stdout
