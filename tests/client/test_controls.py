"""Local controls: DP clip + noise, config validation, and the schedule hook in a real run."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from coordinator.server import Service
from coordinator.strategies import FedBuff
from edge_sdk.client import ClientConfig, FederatedClient, LocalDpConfig, privatize
from edge_sdk.wire import AdapterUpdate, GlobalAdapter
from tests.client.helpers import client_config, coordinator_config, write_data
from tests.tiny_models import write_tiny_gguf

pytestmark = pytest.mark.timeout(120)


def test_privatize_clips_the_change_and_adds_calibrated_noise() -> None:
    base = {"b": np.ones((200, 50), np.float32)}
    trained = {"b": base["b"] + 0.5}  # ‖Δ‖ = 0.5 * 100 = 50
    clipped, norm = privatize(
        trained, base, LocalDpConfig(clip_norm=2.0, noise_multiplier=0.0), np.random.default_rng(0)
    )
    assert math.isclose(norm, 50.0, rel_tol=1e-6)
    assert math.isclose(float(np.linalg.norm(clipped["b"] - base["b"])), 2.0, rel_tol=1e-5)
    small = {"b": base["b"] + 1e-3}  # already inside the ball: unchanged
    same, _ = privatize(
        small, base, LocalDpConfig(clip_norm=2.0, noise_multiplier=0.0), np.random.default_rng(0)
    )
    np.testing.assert_allclose(same["b"], small["b"], rtol=0, atol=1e-7)
    noisy, _ = privatize(
        trained, base, LocalDpConfig(clip_norm=2.0, noise_multiplier=0.5), np.random.default_rng(1)
    )
    noise = noisy["b"] - clipped["b"]
    assert abs(float(noise.std()) - 1.0) < 0.05  # σ·C = 0.5 * 2
    with pytest.raises(ValueError, match="clip_norm"):
        LocalDpConfig(clip_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        LocalDpConfig(clip_norm=1.0, noise_multiplier=-1.0)


def test_client_config_validates_fields(tmp_path: Path) -> None:
    ok = ClientConfig(model="m.gguf", data="d.jsonl", state_dir=tmp_path)  # type: ignore[arg-type]
    assert ok.data == ("d.jsonl",) and ok.refuse_licences and ok.name
    # No data files is allowed: a device may learn only from its app's feedback (issue 14).
    assert ClientConfig(model="m.gguf", data=(), state_dir=tmp_path).data == ()
    for field, value in (
        ("coordinator_url", "ftp://x"),
        ("max_rounds", 0),
        ("threads", 0),
        ("precision", "int3"),
        ("poll_interval_s", 0.0),
    ):
        with pytest.raises(ValueError, match=field):
            ClientConfig(**{"model": "m.gguf", "data": ("d",), "state_dir": tmp_path, field: value})
    with pytest.raises(ValueError, match="'nope' is not a valid LicenceClass"):
        ClientConfig(
            model="m.gguf", data=("d",), state_dir=tmp_path, refuse_licences=frozenset({"nope"})
        )


def test_schedule_hook_defers_training_and_local_dp_bounds_the_update(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = write_data(tmp_path / "data.jsonl")
    answers = iter([False, False])
    asked: list[bool] = []

    def schedule() -> bool:
        allowed = next(answers, True)
        asked.append(allowed)
        return allowed

    async def scenario() -> None:
        config = coordinator_config(tmp_path, model, strategy=FedBuff(buffer_size=1), codec="fp32")
        async with Service(config) as service:
            cfg = client_config(
                tmp_path / "state", model, data, service=service, max_rounds=1,
                schedule_poll_s=0.05, local_dp=LocalDpConfig(clip_norm=0.05, noise_multiplier=0.0),
            )  # fmt: skip
            v0 = GlobalAdapter.from_bytes(service.coordinator.current_adapter()[0]).dense_tensors()
            bodies: list[bytes] = []

            async def on_chunk(
                session: object, ctx: object, params: aiohttp.TraceRequestChunkSentParams
            ) -> None:
                if params.url.path == "/v1/updates":
                    bodies.append(params.chunk)

            trace = aiohttp.TraceConfig()
            trace.on_request_chunk_sent.append(on_chunk)
            client = FederatedClient(cfg, schedule=schedule, trace_configs=[trace])
            summary = await asyncio.wait_for(client.run_async(), timeout=90)
            assert summary.rounds[0].outcome == "accepted"
            sent = AdapterUpdate.from_bytes(b"".join(bodies)).dense_tensors()
            change = math.sqrt(sum(float(np.square(sent[k] - v0[k]).sum()) for k in sent))
            assert 0 < change <= 0.05 * (1 + 1e-5)  # clipped on the device, fp32 on the wire

    asyncio.run(scenario())
    assert asked[:3] == [False, False, True]
