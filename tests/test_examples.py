"""The examples stay runnable: each script parses its arguments and imports the real APIs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script", ["laptop_client/join.py", "embedded_app/app.py"])
def test_example_help(script: str) -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=EXAMPLES.parent,
    )
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and "--state-dir" in out.stdout


def test_coordinator_script_runs_the_coordinator_with_tls(tmp_path: Path) -> None:
    # `fedlm` on PATH as this interpreter's module, so the script runs as a user would run it.
    shim = tmp_path / "fedlm"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m edge_sdk.cli "$@"\n')
    shim.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "PYTHONPATH": str(EXAMPLES.parent)}
    out = subprocess.run(
        ["bash", str(EXAMPLES / "lan_coordinator/run.sh"), "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "--insecure" in out.stdout and "join code" in out.stdout
