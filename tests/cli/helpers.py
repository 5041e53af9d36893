"""Running `fedlm` as a real process, for the command-line tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from edge_sdk.env import JOIN_CODE_ENV, JOIN_TOKEN_ENV

REPO = Path(__file__).resolve().parents[2]


def cli_env(**extra: str) -> dict[str, str]:
    """This environment with the repository importable and no join secret inherited."""
    env = {k: v for k, v in os.environ.items() if k not in (JOIN_TOKEN_ENV, JOIN_CODE_ENV)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def fedlm(
    *args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m edge_sdk.cli ARGS` from the repository root; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "edge_sdk.cli", *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
        env=env or cli_env(),
        cwd=REPO,
        check=False,
    )
