"""Builders shared by the client tests: a tiny model, its coordinator, client configs, data."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.next_version import AggregationConfig
from coordinator.server import Service
from coordinator.shapes import shapes_from_gguf
from coordinator.strategies import FedBuff
from edge_sdk.client import ClientConfig, RetryConfig
from edge_sdk.client.joincode import make_join_code
from edge_sdk.models.identity import model_sha256

JOIN_TOKEN = "client-tests-join-secret"
TARGETS = ("q_proj", "v_proj")
CANARY = "zqxjcanaryvw"
"""A string that exists only in the local training data; no request body may contain it."""

FAST_RETRY = RetryConfig(
    attempts=40, initial_s=0.05, max_s=0.4, jitter_s=0.05, timeout_s=15.0, connect_timeout_s=2.0
)


def write_data(path: Path, n: int = 24, canary: str = CANARY) -> Path:
    """JSONL prompt/completion records in the tiny vocabulary, each with the canary in it."""
    words = ["hello", "world", "the", "a", "is", "of", "and", "to", "in"]
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            prompt = " ".join(words[(i + k) % len(words)] for k in range(4))
            completion = f"{canary} " + " ".join(words[(2 * i + k) % len(words)] for k in range(5))
            fh.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


def coordinator_config(tmp: Path, model: Path, **overrides: Any) -> CoordinatorConfig:
    values: dict[str, Any] = {
        "model_sha256": model_sha256(model),
        "shapes": shapes_from_gguf(model, TARGETS),
        "db_path": tmp / "coordinator.sqlite",
        "targets": TARGETS,
        "aggregation": AggregationConfig(mode="exact", rank=4, alpha=8.0),
        "strategy": FedBuff(buffer_size=1, max_staleness=4),
        "codec": "delta+fp16",
        "local_steps": 3,
        "batch_size": 2,
        "seq_len": 32,
        "lr": 1e-2,
        "max_rounds": None,
        "join_token": JOIN_TOKEN,
        "host": "127.0.0.1",
        "port": 0,
        "mdns": False,
        "tick_s": 0.1,
        "rate_per_s": 200.0,
        "rate_burst": 400,
    }
    values.update(overrides)
    return CoordinatorConfig(**values)


def join_code(service: Service, token: str = JOIN_TOKEN) -> str:
    """The join code a running (TLS) coordinator would print."""
    assert service.tls is not None, "the service runs without TLS"
    return make_join_code(service.tls.fingerprint, token)


def client_config(
    state_dir: Path, model: Path, data: Path, *, service: Service | None = None, **overrides: Any
) -> ClientConfig:
    """A fast client; `service=`: talk to that coordinator (its URL, and its join code or,
    for a plain-HTTP one, `insecure`)."""
    values: dict[str, Any] = {
        "model": str(model),
        "data": (str(data),),
        "state_dir": state_dir,
        "join_token": JOIN_TOKEN,
        "name": state_dir.name,
        "precision": "fp32",
        "checkpoint_every": 1,
        "poll_interval_s": 0.1,
        "final_wait_s": 10.0,
        "discovery_timeout_s": 2.0,
        "discovery_interfaces": ("127.0.0.1",),
        "retry": FAST_RETRY,
    }
    if service is not None:
        values["coordinator_url"] = service.url
        if service.tls is not None:
            values["join_code"] = join_code(service)
        else:
            values["insecure"] = True
    values.update(overrides)
    return ClientConfig(**values)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for restarting a server on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
