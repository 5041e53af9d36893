"""Issue 18, item 1, end to end: two real `fedlm join` processes and a real `fedlm coordinator`
process with the default strategy and aggregation settings (FedBuff buffer 4, min-updates 2,
max-wait 30 s; adaptive clip) finish two rounds on 127.0.0.1, and both sides say what they
wait for. Over the coordinator's default TLS: the devices enroll with the join code it prints."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.client.helpers import write_data

REPO = Path(__file__).resolve().parents[2]
JOIN_TOKEN = "two-devices-join-token"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FEDLM_JOIN_TOKEN", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _pump(stream, lines: queue.Queue[str], sink: list[str]) -> None:
    for line in stream:
        sink.append(line)
        lines.put(line)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_devices_with_the_default_strategy_finish_two_rounds(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    coordinator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_sdk.cli",
            "coordinator",
            "--model",
            str(tiny_gguf),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-mdns",
            "--db",
            str(tmp_path / "c.sqlite"),
            "--join-token",
            JOIN_TOKEN,
            "--targets",
            "q_proj,v_proj",
            "--local-steps",
            "3",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--lr",
            "0.01",
            "--max-rounds",
            "2",
        ],  # strategy and aggregation: the defaults
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=REPO,
    )
    coordinator_out: list[str] = []
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=_pump, args=(coordinator.stdout, lines, coordinator_out), daemon=True
    ).start()
    devices: list[subprocess.Popen[str]] = []
    try:
        deadline = time.monotonic() + 60
        url = join_code = None
        while (url is None or join_code is None) and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line.startswith("fedlm coordinator https://"):
                url = line.split()[2]
            elif line.startswith("join code: "):
                join_code = line.split()[2]
        assert url and join_code, "".join(coordinator_out)
        for name in ("kitchen", "garage"):
            data = write_data(tmp_path / f"{name}.jsonl")
            devices.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "edge_sdk.cli",
                        "join",
                        str(tiny_gguf),
                        "--data",
                        str(data),
                        "--coordinator",
                        url,
                        "--join-code",
                        join_code,
                        "--state-dir",
                        str(tmp_path / name),
                        "--name",
                        name,
                        "--precision",
                        "fp32",
                        "--threads",
                        "1",
                        "--poll-interval",
                        "0.5",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=_env(),
                    cwd=REPO,
                )
            )
        outputs = [device.communicate(timeout=330)[0] for device in devices]
    finally:
        for proc in (*devices, coordinator):
            if proc.poll() is None:
                proc.terminate()
        for proc in (*devices, coordinator):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    served = "".join(coordinator_out)
    for device, out in zip(devices, outputs, strict=True):
        assert device.returncode == 0, out[-3000:]
        assert "round 1: 3 steps from version 0" in out and "round 2: 3 steps from version 1" in out
        assert "finished (task_complete); global version 2" in out, out[-3000:]
        assert "waiting for global version 1: the coordinator publishes when 4 updates" in out
    assert "version 1 waits for 3 more updates (buffer-size 4, 2 clients enrolled)" in served
    assert "or publishes the 2 it has in" in served
    assert "version 1 from 2 updates" in served and "version 2 from 2 updates" in served
