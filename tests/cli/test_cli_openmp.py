"""Each command's OpenMP wait policy: spin for a lone `fedlm train`, sleep beside other work."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from edge_sdk.cli import _openmp, build_parser
from edge_sdk.cli._openmp import FOREGROUND, PASSIVE, SHARED, apply_wait_policy, wait_policy


@pytest.mark.parametrize(
    ("kind", "busy", "expected"),
    [
        (FOREGROUND, 0.0, None),  # idle machine: libgomp's spin-then-sleep (1.6x faster)
        (FOREGROUND, 0.49, None),
        (FOREGROUND, 0.5, PASSIVE),  # other work on the cores: spinning costs 2-3x
        (FOREGROUND, 5.0, PASSIVE),
        (SHARED, 0.0, PASSIVE),  # demos, `fedlm join`: never spin beside other trainers/apps
        (SHARED, 5.0, PASSIVE),
    ],
)
def test_wait_policy(kind: str, busy: float, expected: str | None) -> None:
    assert wait_policy(kind, busy) == expected


@pytest.mark.parametrize(("busy", "expected"), [(0.2, None), (1.5, PASSIVE)])
def test_apply_follows_the_cores_use_at_start(
    monkeypatch: pytest.MonkeyPatch, busy: float, expected: str | None
) -> None:
    monkeypatch.setattr(_openmp, "_busy_cores", lambda: busy)
    env: dict[str, str] = {}
    assert apply_wait_policy(FOREGROUND, env) == expected
    assert env.get("OMP_WAIT_POLICY") == expected


def test_the_users_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_openmp, "_busy_cores", lambda: 0.0)
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert apply_wait_policy(FOREGROUND, env) == "ACTIVE"
    assert apply_wait_policy(SHARED, env) == "ACTIVE"
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_no_cpu_figures_count_as_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loadavg() -> tuple[float, float, float]:
        raise OSError("no /proc/loadavg")

    monkeypatch.setattr(_openmp, "_cpu_times", lambda: None)
    monkeypatch.setattr(_openmp.os, "getloadavg", no_loadavg)
    assert apply_wait_policy(FOREGROUND, {}) == PASSIVE


def test_busy_cores_sees_a_busy_process() -> None:
    """A real process spinning on one core reads as about one busy core (/proc/stat)."""
    if _openmp._cpu_times() is None:
        pytest.skip("no /proc/stat")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start
        busy = max(_openmp._busy_cores() for _ in range(3))
    finally:
        spinner.kill()
        spinner.wait()
    assert busy >= 0.7, busy
    assert wait_policy(FOREGROUND, busy) == PASSIVE


@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (["train", "smollm2-135m", "--data", "d.txt", "--out", "o"], FOREGROUND),
        (["join", "smollm2-135m", "--data", "d.txt"], SHARED),
        (["demo"], SHARED),
        (["coordinator"], SHARED),
        (["convert-adapter", "p", "--model", "m", "--out", "o.gguf"], SHARED),
    ],
)
def test_which_commands_spin(argv: list[str], kind: str) -> None:
    args = build_parser().parse_args(argv)
    assert getattr(args, "openmp", SHARED) == kind
