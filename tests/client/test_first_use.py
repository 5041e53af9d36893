"""First use of `fedlm coordinator` and `fedlm join`: one-line errors with the next step, exit
codes, the join code on the coordinator's output, `--insecure` on both sides, `--help` defaults.

Each test runs the real command line in a subprocess on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_sdk.client.joincode import JoinCode, make_join_code
from tests.cli.helpers import REPO, cli_env, fedlm
from tests.client.helpers import TARGETS, free_port, write_data

pytestmark = pytest.mark.timeout(180)


def _coordinator_args(model: Path, db: Path, port: int = 0) -> list[str]:
    return [
        "coordinator",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--db",
        str(db),
        "--no-mdns",
        "--targets",
        ",".join(TARGETS),
    ]


def _one_line_error(stderr: str) -> str:
    """The one error line (log lines of a client's progress may precede it)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("fedlm")]
    assert len(lines) == 1 and stderr.rstrip("\n").endswith(lines[0]), stderr
    return lines[0]


def test_port_in_use_is_one_line_naming_the_port(tmp_path: Path, model: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = fedlm(*_coordinator_args(model, tmp_path / "c.sqlite", port))
    assert done.returncode == 2 and done.stderr.count("\n") == 1  # nothing else either
    line = _one_line_error(done.stderr)
    assert f"port {port} on 127.0.0.1 is already in use" in line and "--port 0" in line
    assert list(tmp_path.iterdir()) == []  # no database, no certificate made


@pytest.mark.parametrize(
    ("how", "named"),
    [("flag", "--join-token"), ("env", "$FEDLM_JOIN_TOKEN")],
)
def test_a_short_join_token_names_the_flag_and_the_minimum(
    tmp_path: Path, model: Path, how: str, named: str
) -> None:
    args = _coordinator_args(model, tmp_path / "c.sqlite")
    if how == "flag":
        done = fedlm(*args, "--join-token", "secret")
    else:
        done = fedlm(*args, env=cli_env(FEDLM_JOIN_TOKEN="secret"))
    assert done.returncode == 2
    line = _one_line_error(done.stderr)
    assert named in line and "at least 8 characters, got 6" in line


def _start_coordinator(
    args: list[str], env: dict[str, str]
) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_sdk.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("  on each device"):
            return proc, lines
    proc.kill()
    raise AssertionError(
        "the coordinator printed no join instructions: "
        f"{lines} {proc.stderr.read() if proc.stderr else ''}"
    )


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return err


def test_the_coordinator_serves_tls_and_prints_a_join_code(tmp_path: Path, model: Path) -> None:
    db = tmp_path / "c.sqlite"
    env = cli_env(FEDLM_JOIN_TOKEN="a-token-from-the-env")
    proc, lines = _start_coordinator(_coordinator_args(model, db), env)
    err = _stop(proc)
    assert lines[0].startswith("fedlm coordinator https://127.0.0.1:")
    fingerprint = next(
        line.split()[-1] for line in lines if line.startswith("TLS certificate sha256")
    )
    code = next(line.split()[-1] for line in lines if line.startswith("join code: "))
    decoded = JoinCode.decode(code)
    assert (decoded.fingerprint, decoded.token) == (fingerprint, "a-token-from-the-env")
    assert (db.parent / "c.sqlite.tls" / "cert.pem").is_file()  # beside the database
    assert "TLS is off" not in err
    # A restart keeps the certificate, so the code stays valid.
    proc, lines = _start_coordinator(_coordinator_args(model, db), env)
    _stop(proc)
    assert f"join code: {code}" in lines


def test_plain_http_needs_insecure_on_both_sides(tmp_path: Path, model: Path) -> None:
    data = write_data(tmp_path / "d.jsonl")
    proc, lines = _start_coordinator(
        [*_coordinator_args(model, tmp_path / "c.sqlite"), "--insecure"], cli_env()
    )
    try:
        url = lines[0].split()[2]
        assert url.startswith("http://")
        token = next(
            line.split()[-1] for line in lines if line.startswith("join token (shown once)")
        )
        # A device without --insecure refuses the http:// URL (one line, exit 2)...
        refused = fedlm(
            "join",
            str(model),
            "--data",
            str(data),
            "--coordinator",
            url,
            "--join-token",
            token,
            "--state-dir",
            str(tmp_path / "s"),
        )
        assert refused.returncode == 2
        line = _one_line_error(refused.stderr)
        assert "plain http://" in line and "--insecure" in line
        assert not (tmp_path / "s" / "outbox.jsonl").exists()  # nothing was sent
    finally:
        err = _stop(proc)
    assert "TLS is off (--insecure)" in err  # the coordinator warns at every start


def test_an_unreachable_coordinator_fails_within_seconds(tmp_path: Path, model: Path) -> None:
    data = write_data(tmp_path / "d.jsonl")
    url = f"https://127.0.0.1:{free_port()}"  # nothing listens
    started = time.monotonic()
    done = fedlm(
        "join",
        str(model),
        "--data",
        str(data),
        "--coordinator",
        url,
        "--state-dir",
        str(tmp_path / "s"),
        "--join-code",
        make_join_code("ab" * 32, "a-join-token"),
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 2
    line = _one_line_error(done.stderr)
    assert line.startswith("fedlm: error: cannot reach") and line.endswith(
        f"is `fedlm coordinator` running at {url}?"
    )
    assert "aiohttp" not in line and "ssl:default" not in line and "Connector" not in line
    assert elapsed < 30  # interpreter and torch imports included; the network part is ~3 s


def test_a_mistyped_join_code_is_caught_before_anything_is_sent(tmp_path: Path) -> None:
    data = write_data(tmp_path / "d.jsonl")
    code = make_join_code("ab" * 32, "a-join-token")
    typo = code[:20] + ("a" if code[20] != "a" else "b") + code[21:]
    done = fedlm(
        "join",
        "m.gguf",
        "--data",
        str(data),
        "--join-code",
        typo,
        "--state-dir",
        str(tmp_path / "s"),
    )
    assert done.returncode == 2
    line = _one_line_error(done.stderr)
    assert "--join-code" in line and "checksum" in line and "copy it again" in line


def test_help_shows_every_default() -> None:
    from edge_sdk.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("coordinator", "join"):
        p = sub.choices[command]
        formatter = p._get_formatter()
        for action in p._actions:
            if (
                not action.option_strings
                or action.required
                or isinstance(action, argparse._HelpAction)
            ):
                continue
            if isinstance(action, argparse._StoreTrueAction):
                continue  # an off-by-default switch
            text = formatter._get_help_string(action) or ""
            assert "default" in text, f"fedlm {command} {action.option_strings[0]}: {text!r}"
        assert (
            "--final-wait" in p.format_help()
            if command == "join"
            else "--insecure" in p.format_help()
        )


def test_final_wait_reaches_the_client_config(tmp_path: Path) -> None:
    from edge_sdk.cli import build_parser
    from edge_sdk.cli.join_cmd import _config

    data = write_data(tmp_path / "d.jsonl")
    code = make_join_code("ab" * 32, "a-join-token")
    args = build_parser().parse_args(
        ["join", "m.gguf", "--data", str(data), "--final-wait", "0", "--join-code", code]
    )
    config = _config(args)
    assert config.final_wait_s == 0.0 and config.join_code == code and not config.insecure
