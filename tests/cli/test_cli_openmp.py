"""Each command's OpenMP wait policy: spin for a lone `fedlm train`, sleep beside other work."""

from __future__ import annotations

import pytest

from edge_sdk.cli import _openmp, build_parser
from edge_sdk.cli._openmp import FOREGROUND, PASSIVE, SHARED, apply_wait_policy, wait_policy


@pytest.mark.parametrize(
    ("kind", "load", "expected"),
    [
        (FOREGROUND, 0.0, None),  # idle machine: libgomp's spin-then-sleep (1.6x faster)
        (FOREGROUND, 0.99, None),
        (FOREGROUND, 1.0, PASSIVE),  # a core's worth of other work: spinning costs 2-3x
        (FOREGROUND, 5.0, PASSIVE),
        (SHARED, 0.0, PASSIVE),  # demos, `fedlm join`: never spin beside other trainers/apps
        (SHARED, 5.0, PASSIVE),
    ],
)
def test_wait_policy(kind: str, load: float, expected: str | None) -> None:
    assert wait_policy(kind, load) == expected


@pytest.mark.parametrize(("load", "expected"), [(0.2, None), (1.5, PASSIVE)])
def test_apply_follows_the_load_at_start(
    monkeypatch: pytest.MonkeyPatch, load: float, expected: str | None
) -> None:
    monkeypatch.setattr(_openmp, "_load_1min", lambda: load)
    env: dict[str, str] = {}
    assert apply_wait_policy(FOREGROUND, env) == expected
    assert env.get("OMP_WAIT_POLICY") == expected


def test_the_users_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_openmp, "_load_1min", lambda: 9.0)
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert apply_wait_policy(FOREGROUND, env) == "ACTIVE"
    assert apply_wait_policy(SHARED, env) == "ACTIVE"
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_no_load_average_counts_as_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loadavg() -> tuple[float, float, float]:
        raise OSError("no /proc/loadavg")

    monkeypatch.setattr(_openmp.os, "getloadavg", no_loadavg)
    assert apply_wait_policy(FOREGROUND, {}) == PASSIVE


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
