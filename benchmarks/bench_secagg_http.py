"""Secure aggregation over the REST API: one `--secure` round of a real coordinator `Service`
(HTTPS on 127.0.0.1) at SmolLM2-135M's frozen-a size (N = 1,244,160 LoRA-B values), with n
hand-driven devices (`tests.secagg.test_http.Device`: a real `Transport` and `DeviceSession`)
in one process. Prints bytes per device against fp32, the round's wall time (all devices'
masking included, so it grows with n on one machine) and the recovered mean's error.

    PYTHONPATH=. python benchmarks/bench_secagg_http.py COHORT GRID_BITS
"""

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from coordinator.config import CoordinatorConfig
from coordinator.next_version import AggregationConfig
from coordinator.server import Service
from coordinator.shapes import shapes_from_gguf
from coordinator.strategies import FedAvg
from edge_sdk.models import resolve
from edge_sdk.models.identity import model_sha256
from edge_sdk.models.naming import LORA_TARGETS
from tests.client.helpers import JOIN_TOKEN
from tests.secagg.test_http import Device

tmp = Path(tempfile.mkdtemp())
path = resolve("smollm2-135m")
cfg = CoordinatorConfig(
    model_sha256=model_sha256(path),
    shapes=shapes_from_gguf(path, LORA_TARGETS),
    db_path=tmp / "c.sqlite",
    aggregation=AggregationConfig(mode="frozen-a", rank=8, alpha=16.0),
    strategy=FedAvg(clients_per_round=int(sys.argv[1]), min_clients=3),
    secure=True,
    secure_grid_bits=int(sys.argv[2]),
    secure_clip=3e-3,
    join_token=JOIN_TOKEN,
    host="127.0.0.1",
    port=0,
    mdns=False,
    tick_s=0.1,
    rate_per_s=1000.0,
    rate_burst=1000,
    max_connections_per_address=512,
    max_rounds=1,
)


async def main():
    async with Service(cfg) as s:
        sec = s.coordinator.secure
        n = cfg.strategy.clients_per_round
        devs = [Device(s, tmp, f"d{i}") for i in range(n)]
        for d in devs:
            await d.join()
        rng = np.random.default_rng(0)
        xs = [rng.normal(0, 1e-3, sec.vector_len) for _ in devs]
        t = time.perf_counter()
        await asyncio.gather(*(d.run(0, x, 50) for d, x in zip(devs, xs)))
        while s.coordinator.version < 1:
            await asyncio.sleep(0.05)
        wall = time.perf_counter() - t
        exact = np.mean([np.clip(x, -3e-3, 3e-3) for x in xs], axis=0)
        body, _, _ = s.coordinator.current_adapter()
        from edge_sdk.wire import GlobalAdapter

        g = GlobalAdapter.from_bytes(body).dense_tensors()
        got = np.concatenate([np.asarray(g[k], np.float64).ravel() for k in sec.keys])
        rel_rmse = np.sqrt(np.mean((got - exact) ** 2)) / np.sqrt(np.mean(exact**2))
        print(
            f"n={n} g={sec.params.grid_bits} b={sec.params.ring_bits} "
            f"N={sec.vector_len} masked={sec.params.packed_len} "
            f"fp32={4 * sec.vector_len} "
            f"x{4 * sec.vector_len / sec.params.packed_len:.2f} round_wall_s={wall:.2f} "
            f"stats={s.coordinator.last_aggregation['secure']} "
            f"rmse/rms={rel_rmse:.3f}"
        )
        for d in devs:
            await d.transport.close()


asyncio.run(main())
