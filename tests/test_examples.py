"""The examples stay runnable: each script parses its arguments and imports the real APIs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script", ["laptop_client/join.py", "embedded_app/app.py"])
def test_example_help(script: str) -> None:
    out = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"], capture_output=True, text=True, check=False,
                         timeout=120, cwd=EXAMPLES.parent)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and "--state-dir" in out.stdout


def test_coordinator_script_refuses_without_token() -> None:
    out = subprocess.run(["bash", str(EXAMPLES / "lan_coordinator/run.sh")], capture_output=True, text=True, check=False,
                         timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode != 0
    assert "FEDLM_JOIN_TOKEN" in out.stderr
