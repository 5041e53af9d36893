"""examples/embedded_app/app.py end to end: chat, feedback, federate, hot-swap, on 127.0.0.1.

The real app script in a subprocess, typed at through stdin; a real DPO coordinator in this
process; the tiny model.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from coordinator.server import Service
from coordinator.strategies import FedBuff
from edge_sdk.client import ClientState
from edge_sdk.method import MethodSpec
from tests.client.helpers import JOIN_TOKEN, coordinator_config

pytestmark = pytest.mark.timeout(300)

APP = Path(__file__).resolve().parents[2] / "examples" / "embedded_app" / "app.py"
SECRET = "zvqappeditsecret"


def test_the_embedded_app_learns_from_its_users_feedback(tmp_path: Path, model: Path) -> None:
    config = coordinator_config(
        tmp_path, model, strategy=FedBuff(buffer_size=1), max_rounds=1, seq_len=128, tls=False,
        method=MethodSpec("dpo", beta=0.5),
    )  # fmt: skip
    started = threading.Event()
    stop = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        async with Service(config) as service:
            box["url"] = service.url
            started.set()
            while not stop.is_set():
                await asyncio.sleep(0.1)
            box["status"] = service.coordinator.status()

    thread = threading.Thread(target=lambda: asyncio.run(serve()))
    thread.start()
    try:
        assert started.wait(60)
        typed = "\n".join([
            "/status",
            "hello world the",
            "/edit " + SECRET + " the a",
            "/regen",
            "/status",
            "/wait 200",
            "hello world the",
            "/status",
        ]) + "\n"  # fmt: skip
        env = {**os.environ, "FEDLM_JOIN_TOKEN": JOIN_TOKEN,
               "PYTHONPATH": str(APP.parents[2])}  # fmt: skip
        out = subprocess.run(
            [sys.executable, str(APP), "--model", str(model), "--state-dir", str(tmp_path / "app"),
             "--coordinator", box["url"], "--insecure", "--max-tokens", "4"],
            input=typed, capture_output=True, text=True, timeout=280, env=env, check=False,
        )  # fmt: skip
    finally:
        stop.set()
        thread.join(timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    statuses = [line for line in lines if "federation:" in line]
    # Before any feedback the DPO task has nothing to train on here: the device sits it out.
    assert "0 pairs" in statuses[0]
    assert "noted: your edit is preferred" in out.stdout
    assert "1 pairs" in statuses[1] or "2 pairs" in statuses[1]
    # The round trained on the feedback, and the new global adapter answers the next question.
    assert "serving global-v000001.gguf" in out.stdout, out.stdout
    assert any("model [global-v000001.gguf]>" in line for line in lines)
    assert box["status"]["version"] == 1 and box["status"]["method"]["name"] == "dpo"
    ledger = ClientState(tmp_path / "app").ledger.entries()
    assert [e.kind for e in ledger].count("update") == 1
    assert SECRET not in str([e.detail for e in ledger])
