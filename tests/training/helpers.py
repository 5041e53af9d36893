"""Shared by the SFT and DPO `fedlm train` process tests: run it, SIGKILL it mid-run, and
compare two runs' outputs bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file

from edge_sdk.training.checkpoint import CHECKPOINT_NAME

REPO = Path(__file__).resolve().parents[2]


def train_env() -> dict[str, str]:
    """This environment with the repository importable and one OpenMP thread."""
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def run_train(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`argv` to completion from the repository root, output captured as text."""
    return subprocess.run(
        argv, check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )


def kill_at_checkpoint(argv: list[str], out: Path, env: dict[str, str], *, step: int = 6) -> int:
    """Start `argv` and SIGKILL it once the checkpoint in `out` is at `step` or later.

    Returns the checkpoint's step when the kill was sent (0 if none appeared in 240 s).
    """
    proc = subprocess.Popen(
        argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = out / CHECKPOINT_NAME
    seen = 0
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.exists():
                seen = int(torch.load(ckpt, weights_only=True)["step"])
                if seen >= step:
                    break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return seen


def assert_same_adapters(a: Path, b: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The runs in `a` and `b` exported bit-identical adapters (PEFT and GGUF); returns their
    `metrics.json` metrics."""
    ta = load_file(str(a / "adapter_model.safetensors"))
    tb = load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k])
    assert (a / "adapter.gguf").read_bytes() == (b / "adapter.gguf").read_bytes()
    return (
        json.loads((a / "metrics.json").read_text())["metrics"],
        json.loads((b / "metrics.json").read_text())["metrics"],
    )
