"""First-use errors from the command line: one line on stderr that says what to do, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.cli import main
from tests.cli.helpers import fedlm
from tests.helpers import random_adapter


@pytest.mark.parametrize(
    "name,meant",
    [
        ("SmolLM2-135M", "smollm2-135m"),
        ("SmolLM2-135M-Instruct", "smollm2-135m"),
        ("smollm2_135m", "smollm2-135m"),
        ("gemma-3-270m", "gemma3-270m"),
        ("Gemma3-270M", "gemma3-270m"),
    ],
)
def test_unknown_model_name_suggests_the_known_one(
    name: str, meant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["inspect", name])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == (
        f"fedlm: error: {name}: unknown model name and no such file (did you mean {meant}? "
        "known names: gemma3-270m, smollm2-135m)\n"
    )


def test_unrelated_model_name_gets_no_guess(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["inspect", "llama-3-8b"])
    err = capsys.readouterr().err
    assert rc == 2 and "did you mean" not in err
    assert err == (
        "fedlm: error: llama-3-8b: unknown model name and no such file "
        "(known names: gemma3-270m, smollm2-135m)\n"
    )


def test_adapter_directory_is_a_one_line_hint(tmp_path: Path, tiny_gguf: Path) -> None:
    run_dir = tmp_path / "out"
    run_dir.mkdir()
    random_adapter(run_dir / "adapter.gguf", tiny_gguf)
    out = fedlm("generate", str(tiny_gguf), "hello", "--adapter", str(run_dir), "--max-tokens", "2")
    assert out.returncode == 2
    assert out.stderr == (
        f"fedlm: error: {run_dir}: is a directory; pass the GGUF adapter inside it: "
        f"{run_dir / 'adapter.gguf'}\n"
    )
