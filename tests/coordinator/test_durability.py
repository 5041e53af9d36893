"""kill -9 during ingest, then restart: no acknowledged update is lost and the round resumes.

The coordinator runs as a real subprocess (`python -m coordinator`) on 127.0.0.1 with an
SQLite file; a thread posts updates back to back while the test SIGKILLs the process.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from coordinator.shapes import shapes_from_gguf
from coordinator.storage import SQLiteStorage
from edge_sdk.models.identity import model_sha256
from edge_sdk.wire import CONTENT_TYPE
from tests.coordinator.helpers import client_tensors, update_bytes

JOIN_TOKEN = "durability-join-token"
TARGETS = ("q_proj", "v_proj")
BUFFER = 25


class CoordinatorProcess:
    def __init__(self, model: Path, db: Path) -> None:
        command = [
            sys.executable,
            "-m",
            "coordinator",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--db",
            str(db),
            "--no-mdns",
            "--insecure",
            "--join-token",
            JOIN_TOKEN,
            "--strategy",
            "fedbuff",
            "--buffer-size",
            str(BUFFER),
            "--targets",
            ",".join(TARGETS),
            "--rank",
            "4",
            "--alpha",
            "8",
            "--codec",
            "fp32",
            "--rate",
            "1000",
            "--log-level",
            "warning",
            "--max-wait",
            "3600",
        ]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=Path(__file__).parents[2],
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self._wait_for_url()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def _wait_for_url(self) -> str:
        seen = []
        while True:
            try:
                line = self.lines.get(timeout=60)
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"coordinator did not start: {seen}") from None
            seen.append(line)
            if line.startswith("fedlm coordinator http://"):
                return line.split()[2]


def _request(
    url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=data, headers=headers or {}, method="POST" if data is not None else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.timeout(300)
def test_kill_9_during_ingest_loses_no_acknowledged_update(tmp_path: Path, tiny_gguf: Path) -> None:
    db = tmp_path / "coordinator.sqlite"
    sha = model_sha256(tiny_gguf)
    shapes = shapes_from_gguf(tiny_gguf, TARGETS)
    rng = np.random.default_rng(0)
    first = CoordinatorProcess(tiny_gguf, db)

    def enroll(url: str) -> tuple[str, dict[str, str]]:
        for _ in range(100):  # /v1/join allows a burst of 10, then 1 per second per address
            status, joined = _request(
                f"{url}/v1/join",
                json.dumps({"join_token": JOIN_TOKEN}).encode(),
                {"Content-Type": "application/json"},
            )
            if status != 429:
                break
            threading.Event().wait(0.5)
        assert status == 200, joined
        return joined["client_id"], {"Authorization": f"Bearer {joined['token']}"}

    def body(client_id: str) -> bytes:
        return update_bytes(
            client_id,
            client_tensors(rng, 4, shapes=shapes),
            rank=4,
            alpha=8.0,
            sha=sha,
            update_id=uuid.uuid4().hex,
        )

    # One update per client per buffer: a client each, never enough to aggregate before the kill.
    clients = [enroll(first.url) for _ in range(BUFFER - 1)]
    auth = clients[0][1]
    bodies = [(body(cid), {**headers, "Content-Type": CONTENT_TYPE}) for cid, headers in clients]
    acked: list[str] = []
    enough = threading.Event()

    def post_all() -> None:
        for data, post_headers in bodies:
            try:
                status, ack = _request(f"{first.url}/v1/updates", data, post_headers)
            except (urllib.error.URLError, ConnectionError, OSError):
                return  # the server died mid-request: that update was never acknowledged
            assert status == 202, ack
            acked.append(ack["update_id"])
            if len(acked) >= 8:
                enough.set()
        enough.set()

    poster = threading.Thread(target=post_all)
    poster.start()
    assert enough.wait(timeout=120)
    os.kill(first.proc.pid, signal.SIGKILL)  # while the poster is still sending
    first.proc.wait(timeout=30)
    poster.join(timeout=60)
    assert 8 <= len(acked) < len(bodies), "the kill should land during ingest"

    with SQLiteStorage(db) as storage:
        stored = [r.update_id for r in storage.pending_updates()]
    assert set(acked) <= set(stored)  # every acknowledged update survived kill -9
    assert len(stored) - len(acked) <= 1  # at most the one in flight was stored but not acked

    second = CoordinatorProcess(tiny_gguf, db)
    try:
        status, state = _request(f"{second.url}/v1/status", headers=auth)  # the token survived too
        assert status == 200 and state["version"] == 0 and state["pending"] == len(stored)
        extra = 0
        while state["pending"] + extra < BUFFER:  # fill the round and let it aggregate
            client_id, headers = enroll(second.url)
            status, _ = _request(
                f"{second.url}/v1/updates",
                body(client_id),
                {**headers, "Content-Type": CONTENT_TYPE},
            )
            assert status == 202
            extra += 1
        for _ in range(400):
            status, state = _request(f"{second.url}/v1/status", headers=auth)
            if state["version"] == 1:
                break
            threading.Event().wait(0.05)
        assert state["version"] == 1 and state["last_aggregation"]["updates"] == BUFFER
        assert state["updates"] == {"pending": 0, "aggregated": BUFFER, "dropped": 0}
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(timeout=60) == 0  # graceful shutdown
    finally:
        if second.proc.poll() is None:
            second.proc.kill()


def test_join_token_from_env_or_generated_and_printed_once(tmp_path: Path, tiny_gguf: Path) -> None:
    import os as _os

    def run(env_token: str | None) -> tuple[list[str], int]:
        env = {k: v for k, v in _os.environ.items() if k != "FEDLM_JOIN_TOKEN"}
        if env_token:
            env["FEDLM_JOIN_TOKEN"] = env_token
        command = [
            sys.executable, "-m", "coordinator", "--model", str(tiny_gguf), "--host", "127.0.0.1",
            "--port", "0", "--db", str(tmp_path / f"{env_token}.sqlite"), "--no-mdns", "--insecure",
            "--targets", ",".join(TARGETS), "--log-level", "warning",
        ]  # fmt: skip
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        lines = [proc.stdout.readline()]
        url = lines[0].split()[2]
        if not env_token:
            lines.append(proc.stdout.readline())
        token = env_token or lines[-1].split()[-1]
        status, _ = _request(
            f"{url}/v1/join",
            json.dumps({"join_token": token}).encode(),
            {"Content-Type": "application/json"},
        )
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
        return lines + rest.splitlines(), status

    lines, status = run("token-from-the-environment")
    assert status == 200 and not any("join token" in line for line in lines)
    lines, status = run(None)
    assert status == 200 and sum("join token (shown once)" in line for line in lines) == 1
