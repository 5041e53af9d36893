"""`fedlm join` and `fedlm ledger` as real processes against a real coordinator on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import stat
import sys
from pathlib import Path

import pytest

from coordinator.server import Service
from coordinator.strategies import FedBuff
from tests.cli.helpers import REPO, cli_env, fedlm
from tests.client.helpers import CANARY, JOIN_TOKEN, coordinator_config, join_code, write_data
from tests.tiny_models import write_tiny_gguf

pytestmark = pytest.mark.timeout(300)


@pytest.mark.slow
def test_join_then_ledger(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = write_data(tmp_path / "data.jsonl")
    state = tmp_path / "state"

    async def scenario() -> tuple[int, str, str]:
        config = coordinator_config(tmp_path, model, strategy=FedBuff(buffer_size=1))
        async with Service(config) as service:
            env = cli_env() | {
                "FEDLM_JOIN_CODE": join_code(service)
            }  # the join code from the environment
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edge_sdk.cli", "join", str(model), "--data", str(data),
                "--coordinator", service.url, "--max-rounds", "1", "--state-dir", str(state),
                "--name", "cli-device", "--precision", "fp32", "--threads", "1",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=REPO,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), timeout=180)
            assert service.coordinator.version >= 1
            return proc.returncode or 0, out.decode(), err.decode()

    code, out, err = asyncio.run(scenario())
    assert code == 0, err[-2000:]
    assert "round 1: 3 steps from version 0" in out and "accepted" in out
    assert "finished (max_rounds); global version 1" in out
    assert stat.S_IMODE((state / "token.json").stat().st_mode) == 0o600

    listed = fedlm("ledger", "--state-dir", str(state), "--json")
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    kinds = [e["kind"] for e in doc["entries"]]
    assert kinds[:2] == ["join", "task"] and kinds.count("update") == 1
    assert doc["summary"]["requests"] == len(kinds) and doc["summary"]["distinct_updates"] == 1
    assert all(name.endswith(("lora_A", "lora_B")) for name in doc["summary"]["tensor_names"])
    assert CANARY not in listed.stdout and JOIN_TOKEN not in listed.stdout
    text = fedlm("ledger", "--state-dir", str(state))
    assert text.returncode == 0 and "update" in text.stdout and "requests" in text.stdout


def test_join_usage_errors_exit_2(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data.jsonl")
    bad_policy = fedlm("join", "x.gguf", "--data", str(data), "--refuse-licence", "bogus")
    assert bad_policy.returncode == 2 and "unknown licence class 'bogus'" in bad_policy.stderr
    missing = fedlm(
        "join",
        str(tmp_path / "missing.gguf"),
        "--data",
        str(data),
        "--coordinator",
        "http://127.0.0.1:9",
        "--insecure",
        "--state-dir",
        str(tmp_path / "s"),
    )
    assert missing.returncode == 2 and missing.stderr.startswith("fedlm: error:")
    no_state = fedlm("ledger", "--state-dir", str(tmp_path / "nothing"))
    assert no_state.returncode == 2 and "no client state directory" in no_state.stderr


def test_join_flags_reach_the_client_config(tmp_path: Path) -> None:
    from edge_sdk.cli import build_parser
    from edge_sdk.cli.join_cmd import _config

    data = write_data(tmp_path / "data.jsonl")
    args = build_parser().parse_args(
        [
            "join",
            "m.gguf",
            "--data",
            str(data),
            "--seed",
            "7",
            "--coordinator-name",
            "kitchen",
            "--discovery-timeout",
            "30",
            "--val-fraction",
            "0",
            "--poll-interval",
            "0.5",
        ]
    )
    config = _config(args)
    assert (config.seed, config.coordinator_name, config.discovery_timeout_s) == (
        7,
        "kitchen",
        30.0,
    )
    assert (config.val_fraction, config.poll_interval_s) == (0.0, 0.5)
    default = _config(build_parser().parse_args(["join", "m.gguf", "--data", str(data)]))
    assert (default.seed, default.val_fraction, default.poll_interval_s) == (0, 0.1, 2.0)
    with pytest.raises(ValueError, match="`val_fraction`"):
        _config(
            build_parser().parse_args(
                ["join", "m.gguf", "--data", str(data), "--val-fraction", "1"]
            )
        )
