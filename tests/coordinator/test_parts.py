"""Small parts: token buckets, bearer parsing, layer shapes from GGUF, the CLI's error path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.auth import RateLimiter, TokenBucket, bearer_token, hash_token
from coordinator.shapes import adapter_parameters, shapes_from_gguf, shapes_from_tensor_directory
from edge_sdk.cli import main
from edge_sdk.models.naming import LORA_TARGETS


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=2, updated=0.0)
    assert bucket.take(0.0) == 0.0 and bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(0.5)  # one token takes 1/rate seconds
    assert bucket.take(0.5) == 0.0


def test_rate_limiter_forgets_least_recently_used_keys() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=2)
    assert limiter.check("a", 0.0) == 0.0
    assert limiter.check("a", 0.0) > 0
    limiter.check("b", 0.0)
    limiter.check("c", 0.0)  # evicts "a", so it starts afresh
    assert limiter.check("a", 0.0) == 0.0


def test_bearer_parsing_and_hashing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    for bad in (None, "", "Basic abc", "Bearer", "Bearer " + "x" * 600):
        assert bearer_token(bad) is None
    assert hash_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_shapes_from_tiny_gguf(tiny_gguf: Path) -> None:
    shapes = shapes_from_gguf(tiny_gguf, ("q_proj", "k_proj", "down_proj"))
    assert list(shapes)[:3] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.mlp.down_proj",
    ]
    assert shapes["model.layers.0.self_attn.k_proj"] == (32, 64)  # (out = kv dim, in = hidden)
    assert shapes["model.layers.1.mlp.down_proj"] == (64, 128)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        shapes_from_tensor_directory([], ("qkv",))


def test_smollm2_adapter_size(smollm2_path: Path) -> None:
    shapes = shapes_from_gguf(smollm2_path, LORA_TARGETS)
    assert len(shapes) == 30 * 7
    assert shapes["model.layers.29.mlp.down_proj"] == (576, 1536)
    assert adapter_parameters(shapes, 8) == 2_442_240


def test_cli_reports_bad_flags_in_one_line(
    tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        [
            "coordinator",
            "--model",
            str(tiny_gguf),
            "--db",
            str(tmp_path / "x.sqlite"),
            "--rank",
            "0",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "rank" in err and "\n" not in err
    assert main(["coordinator", "--model", str(tmp_path / "missing.gguf")]) == 2


def test_python_dash_m_coordinator_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "coordinator", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and "--strategy" in out.stdout and "--join-token" in out.stdout
