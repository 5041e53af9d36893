"""The README's "Federating on a LAN" commands, run as written on 127.0.0.1.

The commands are read from README.md itself. Only what a test must change is changed: the
tiny model for `smollm2-135m`, files in a temporary directory, the printed join code for
`fedlm1-…`, and flags that keep the run on loopback and small (appended, never removed).
Discovery is real mDNS: the devices are not told the coordinator's address.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_sdk.client.joincode import JoinCode
from tests.client.helpers import TARGETS, write_data
from tests.tiny_models import write_tiny_gguf

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Federating on a LAN", 1)[1]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("fedlm "):
            commands.append(shlex.split(line))
    return commands


def test_the_readme_lan_example_works_as_written(tmp_path: Path) -> None:
    commands = _readme_commands()
    assert [c[:2] for c in commands] == [
        ["fedlm", "coordinator"],
        ["fedlm", "join"],
        ["fedlm", "ledger"],
    ]
    coordinator_cmd, join_cmd, ledger_cmd = commands
    assert "--join-code" in join_cmd and "--insecure" not in coordinator_cmd + join_cmd

    model = write_tiny_gguf(tmp_path / "tiny.gguf", seed=2000 + os.getpid() % 50_000)
    data = write_data(tmp_path / "my.jsonl")
    env = {k: v for k, v in os.environ.items() if k not in ("FEDLM_JOIN_TOKEN", "FEDLM_JOIN_CODE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")

    def swap(args: list[str], code: str = "") -> list[str]:
        out = []
        for a in args[1:]:  # `fedlm` -> this interpreter's `python -m edge_sdk.cli`
            a = {"smollm2-135m": str(model), "fed.sqlite": str(tmp_path / "fed.sqlite"),
                 "my.jsonl": str(data)}.get(a, a)  # fmt: skip
            out.append(code if a.startswith("fedlm1-") else a)
        return [sys.executable, "-m", "edge_sdk.cli", *out]

    coordinator = subprocess.Popen(
        swap(coordinator_cmd)
        + [
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--targets",
            ",".join(TARGETS),
            "--local-steps",
            "2",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert coordinator.stdout is not None
        code = ""
        deadline = time.monotonic() + 120
        while not code and time.monotonic() < deadline:
            line = coordinator.stdout.readline()
            assert line, "the coordinator exited"
            if m := re.match(r"join code: (\S+)", line):
                code = m.group(1)
        JoinCode.decode(code)
        devices = []
        for n in range(2):
            state = tmp_path / f"device-{n}"
            devices.append(
                subprocess.Popen(
                    swap(join_cmd, code)
                    + [
                        "--state-dir",
                        str(state),
                        "--name",
                        f"device-{n}",
                        "--interface",
                        "127.0.0.1",
                        "--precision",
                        "fp32",
                        "--threads",
                        "1",
                        "--final-wait",
                        "60",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                    cwd=tmp_path,
                )
            )
        results = [d.communicate(timeout=480) for d in devices]
        for device, (out, err) in zip(devices, results, strict=True):
            assert device.returncode == 0, err[-3000:]
            assert (
                "finished (max_rounds)" in out
                and out.count(" accepted") + out.count(" duplicate") == 5
            )
            assert "TLS, certificate pinned" in err  # it talked TLS to the pinned coordinator
        ledger = subprocess.run(
            swap(ledger_cmd) + ["--state-dir", str(tmp_path / "device-0")],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert ledger.returncode == 0 and "update" in ledger.stdout
    finally:
        coordinator.send_signal(signal.SIGINT)
        try:
            coordinator.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            coordinator.kill()
