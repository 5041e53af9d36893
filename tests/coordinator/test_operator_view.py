"""examples/lan_coordinator/README.md's status command works as written (it answered 401).

The real CLI (`python -m coordinator`, what `fedlm coordinator` and run.sh start) runs on
127.0.0.1 with its default TLS; the README's curl line (pinned to the coordinator's own
certificate) is run with the operator token from the environment, and once more with the token
the coordinator generates and prints when none is given.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "examples" / "lan_coordinator" / "README.md"


class _Coordinator:
    def __init__(self, model: Path, db: Path, env: dict[str, str]) -> None:
        command = [
            sys.executable, "-m", "coordinator", "--model", str(model), "--host", "127.0.0.1",
            "--port", "0", "--db", str(db), "--no-mdns", "--targets", "q_proj,v_proj",
            "--log-level", "warning",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self.wait_for(r"^fedlm coordinator (https://\S+)")
        self.cafile = db.with_name(db.name + ".tls") / "cert.pem"

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, pattern: str) -> str:
        for line in self.seen:
            if m := re.search(pattern, line):
                return m.group(1)
        while True:
            try:
                line = self.lines.get(timeout=60)
            except queue.Empty:
                self.close()
                raise AssertionError(f"no line matching {pattern!r} in {self.seen}") from None
            self.seen.append(line)
            if m := re.search(pattern, line):
                return m.group(1)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _readme_status_command(url: str) -> list[str]:
    """The README's curl command, with the port and $FEDLM_OPERATOR_TOKEN filled in."""
    m = re.search(
        r"^\s*(curl --cacert \S+ -H \"Authorization: Bearer \$FEDLM_OPERATOR_TOKEN\" \\\n"
        r"\s*https://localhost:8750/v1/status)$",
        README.read_text(), re.MULTILINE,
    )  # fmt: skip
    assert m, "the README has no operator status command"
    port = url.rsplit(":", 1)[1]
    line = m.group(1).replace("localhost:8750", f"localhost:{port}")
    return ["bash", "-c", line + " --silent --show-error --fail-with-body"]


def _get_status(url: str, token: str | None, cafile: Path) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{url}/v1/status", headers=headers)
    context = ssl.create_default_context(cafile=str(cafile))
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's command uses curl")
def test_the_readme_status_command_works_with_the_operator_token(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    token = "operator-secret-from-the-environment"
    env = {"FEDLM_JOIN_TOKEN": "join-secret-for-the-example", "FEDLM_OPERATOR_TOKEN": token}
    coordinator = _Coordinator(tiny_gguf, tmp_path / "fed.sqlite", env)
    try:
        out = subprocess.run(
            _readme_status_command(coordinator.url), capture_output=True, text=True,
            timeout=30, env={**os.environ, "FEDLM_OPERATOR_TOKEN": token}, check=False,
            cwd=tmp_path,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        status = json.loads(out.stdout)
        assert status["view"] == "operator" and status["version"] == 0
        assert "client_list" in status
        assert _get_status(coordinator.url, None, coordinator.cafile)[0] == 401
        assert not any(token in line for line in coordinator.seen)  # given, so never printed
    finally:
        coordinator.close()


def test_a_generated_operator_token_is_printed_once_and_works(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    env = {"FEDLM_JOIN_TOKEN": "join-secret-for-the-example"}
    coordinator = _Coordinator(
        tiny_gguf, tmp_path / "fed.sqlite", {**env, "FEDLM_OPERATOR_TOKEN": ""}
    )
    try:
        token = coordinator.wait_for(r"^operator token \(shown once; for GET /v1/status\): (\S+)")
        status, body = _get_status(coordinator.url, token, coordinator.cafile)
        assert status == 200 and body["view"] == "operator"
        assert _get_status(coordinator.url, token + "x", coordinator.cafile)[0] == 401
    finally:
        coordinator.close()
    # The token lives in memory only: nothing of it is in the database.
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("fed.sqlite*") if p.is_file())
    assert token.encode() not in raw
