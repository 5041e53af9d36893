"""Shared builders for the coordinator's service tests: configs, clients, wire updates."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np

from coordinator.config import CoordinatorConfig
from coordinator.next_version import AggregationConfig, a_key, b_key
from coordinator.strategies import FedBuff
from edge_sdk.wire import CONTENT_TYPE, AdapterUpdate, LoraSpec

SHA = "ab" * 32
JOIN_TOKEN = "join-secret-for-tests"
TARGETS = ("q_proj", "v_proj")
SHAPES = {
    "model.layers.0.self_attn.q_proj": (32, 32),
    "model.layers.0.self_attn.v_proj": (16, 32),
    "model.layers.1.self_attn.q_proj": (32, 32),
    "model.layers.1.self_attn.v_proj": (16, 32),
}


def make_config(tmp_path: Path, **overrides: Any) -> CoordinatorConfig:
    values: dict[str, Any] = {
        "model_sha256": SHA,
        "shapes": SHAPES,
        "db_path": tmp_path / "coordinator.sqlite",
        "targets": TARGETS,
        "aggregation": AggregationConfig(mode="exact", rank=8, alpha=16.0),
        "strategy": FedBuff(buffer_size=2, max_staleness=4),
        "codec": "fp32",
        "join_token": JOIN_TOKEN,
        "host": "127.0.0.1",
        "port": 0,
        "tls": False,  # these tests speak plain HTTP to the API; TLS has its own tests
        "mdns": False,
        "tick_s": 0.2,
        "max_body_bytes": 1 << 20,
    }
    values.update(overrides)
    return CoordinatorConfig(**values)


def client_tensors(
    rng: np.random.Generator, rank: int, mode: str = "exact", shapes=SHAPES
) -> dict[str, np.ndarray]:
    out = {}
    for module, (o, i) in shapes.items():
        if mode != "frozen-a":
            out[a_key(module)] = rng.normal(0, 0.1, size=(rank, i)).astype(np.float32)
        out[b_key(module)] = rng.normal(0, 0.1, size=(o, rank)).astype(np.float32)
    return out


def update_bytes(
    client_id: str,
    tensors: dict[str, np.ndarray],
    *,
    rank: int = 8,
    alpha: float = 16.0,
    mode: str = "exact",
    base_version: int = 0,
    num_examples: int = 10,
    sha: str = SHA,
    targets: tuple[str, ...] = TARGETS,
    update_id: str | None = None,
    codec: str = "fp32",
    a_seed: int | None = 0,
    reference: dict[str, np.ndarray] | None = None,
) -> bytes:
    update = AdapterUpdate.build(
        client_id=client_id,
        base_version=base_version,
        model_sha256=sha,
        lora=LoraSpec(rank, alpha, targets, mode, a_seed),
        tensors=tensors,
        num_examples=num_examples,
        metrics={"loss": 1.5},
        codec=codec,
        reference=reference,
        update_id=update_id or uuid.uuid4().hex,
    )
    return update.to_bytes()


def with_nan(body: bytes) -> bytes:
    """The same fp32 update with one value replaced by NaN (the encoder refuses to make one)."""
    header, payload = body[:8], msgpack.unpackb(body[8:], raw=False)
    key = next(iter(payload["tensors"]))
    data = bytearray(payload["tensors"][key]["data"])
    data[0:4] = np.array([np.nan], dtype="<f4").tobytes()
    payload["tensors"][key]["data"] = bytes(data)
    return header + msgpack.packb(payload, use_bin_type=True)


async def join(
    session: aiohttp.ClientSession, url: str, name: str = "device"
) -> tuple[str, dict[str, str]]:
    async with session.post(
        f"{url}/v1/join", json={"join_token": JOIN_TOKEN, "name": name}
    ) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    return body["client_id"], {"Authorization": f"Bearer {body['token']}"}


async def post_update(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes
) -> tuple[int, dict[str, Any]]:
    async with session.post(
        f"{url}/v1/updates", data=body, headers={**headers, "Content-Type": CONTENT_TYPE}
    ) as resp:
        text = await resp.text()
        return resp.status, json.loads(text)
