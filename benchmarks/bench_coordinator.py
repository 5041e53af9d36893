"""Coordinator benchmark: ingest rate over loopback, aggregation time and peak memory.

SmolLM2-135M-sized updates: r=8 on all 7 projections of 30 layers (hidden 576, intermediate
1536, kv 192), 2,442,240 LoRA parameters, encoded `delta+int8` (about 2.6 MB each).

1. Ingest: `python -m coordinator` runs as a subprocess on 127.0.0.1; C simulated clients post
   pre-encoded updates concurrently; we count acknowledged (durably stored) updates per second
   and read the server's peak RSS (VmHWM).
2. Aggregation: for each LoRA mode and N in (10, 100, 1000), N updates are stored as pending
   in a fresh SQLite file, then a fresh child process opens the coordinator and aggregates them
   once. We report the aggregation wall time and the child's RSS before and at peak: the
   difference stays flat in N because aggregation streams (O(adapter), not O(N × adapter)).
   The N stored updates are 16 distinct client adapters repeated under distinct ids (generating
   1000 distinct 2.4M-parameter updates would dominate the run; the aggregation cost does not
   depend on the values).

    python benchmarks/bench_coordinator.py            # full run (~15 min on 2 busy cores)
    python benchmarks/bench_coordinator.py --quick    # N in (10, 100), fewer posts
"""

from __future__ import annotations

import os

# One BLAS thread, as the CLI sets it (see edge_sdk/cli/coordinator_cmd.py); before numpy.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# --code DIR: the aggregation child imports the coordinator from another checkout ("before").
CODE = Path(os.environ.get("FEDLM_BENCH_CODE") or ROOT)
sys.path.insert(0, str(CODE))

from coordinator.config import CoordinatorConfig
from coordinator.next_version import AggregationConfig
from coordinator.shapes import Shapes, adapter_parameters, shapes_from_gguf
from coordinator.state_machine import Coordinator
from coordinator.storage import SQLiteStorage, UpdateRecord
from coordinator.strategies import FedBuff
from edge_sdk.errors import FedlmError
from edge_sdk.models.naming import LORA_TARGETS, hf_module
from edge_sdk.wire import CONTENT_TYPE, AdapterUpdate, LoraSpec

RANK, ALPHA, CODEC = 8, 16.0, "delta+int8"
JOIN_TOKEN = "benchmark-join-token"
DISTINCT = 16


def smollm2_shapes() -> tuple[Shapes, str, Path | None]:
    """Shapes and sha256 of the real SmolLM2 GGUF when installed, else the same dims synthesised."""
    try:
        from edge_sdk.models import resolve
        from edge_sdk.models.identity import model_sha256

        path = resolve("smollm2-135m")
        return shapes_from_gguf(path, LORA_TARGETS), model_sha256(path), path
    except FedlmError:  # the benchmark also runs without the model package
        dims = {
            "q_proj": (576, 576),
            "k_proj": (192, 576),
            "v_proj": (192, 576),
            "o_proj": (576, 576),
            "gate_proj": (1536, 576),
            "up_proj": (1536, 576),
            "down_proj": (576, 1536),
        }
        shapes = {hf_module(i, t): dims[t] for i in range(30) for t in LORA_TARGETS}
        return shapes, "0" * 64, None


def rss_mb(field: str = "VmRSS", pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_updates(
    reference: dict[str, np.ndarray], mode: str, sha: str, count: int, client_id: str = "bench"
) -> list[bytes]:
    rng = np.random.default_rng(0)
    keys = [k for k in reference if mode != "frozen-a" or k.endswith("lora_B")]
    bodies = []
    for _ in range(count):
        tensors = {
            k: reference[k] + rng.normal(0, 0.01, reference[k].shape).astype(np.float32)
            for k in keys
        }
        update = AdapterUpdate.build(
            client_id=client_id, base_version=0, model_sha256=sha,
            lora=LoraSpec(RANK, ALPHA, LORA_TARGETS, mode, 0), tensors=tensors,
            num_examples=int(rng.integers(10, 100)), codec=CODEC, reference=reference,
        )  # fmt: skip
        bodies.append(update.to_bytes())
    return bodies


def config_for(
    shapes: Shapes, sha: str, db: Path, mode: str, buffer: int, exact_max_rank: int = 0
) -> CoordinatorConfig:
    aggregation = AggregationConfig(
        mode=mode, rank=RANK, alpha=ALPHA, exact_max_rank=exact_max_rank
    )
    return CoordinatorConfig(
        model_sha256=sha,
        shapes=shapes,
        db_path=db,
        aggregation=aggregation,
        strategy=FedBuff(buffer_size=buffer, max_staleness=8),
        codec=CODEC,
        join_token=JOIN_TOKEN,
        mdns=False,
    )


# -- aggregation ------------------------------------------------------------------------------


def fill(shapes: Shapes, sha: str, db: Path, mode: str, n: int) -> int:
    with SQLiteStorage(db) as storage:
        coordinator = Coordinator(config_for(shapes, sha, db, mode, n), storage)
        bodies = make_updates(coordinator.dense_version(0), mode, sha, min(DISTINCT, n))
        items = []
        for i in range(n):
            body = bodies[i % len(bodies)]
            record = UpdateRecord(
                uuid.uuid4().hex, "bench", 0, 10 + i % 50, 0, RANK, time.time(), len(body)
            )
            items.append((record, body))
        add_updates = getattr(storage, "add_updates", None)  # one fsync per 50 where it exists
        for start in range(0, n, 50):
            if add_updates is not None:
                assert not any(add_updates(items[start : start + 50]))
            else:
                for record, body in items[start : start + 50]:
                    storage.add_update(record, body)
        return len(bodies[0])


def fill_via_ingest(coordinator: Coordinator, mode: str, sha: str, n: int) -> int:
    """N updates from N enrolled devices through `Coordinator.submit`, the path a running
    coordinator takes (decode, validate, effect norm, durable insert)."""
    distinct = [
        AdapterUpdate.from_bytes(body)
        for body in make_updates(coordinator.dense_version(0), mode, sha, min(DISTINCT, n))
    ]
    size = 0
    for i in range(n):
        client = coordinator.join(JOIN_TOKEN, f"device-{i}")
        template = distinct[i % len(distinct)]
        body = AdapterUpdate(
            **{**template.__dict__, "client_id": client["client_id"], "update_id": uuid.uuid4().hex}
        ).to_bytes()
        coordinator.submit(client["client_id"], body)
        size = len(body)
    return size


def child_aggregate(
    db: Path, mode: str, n: int, exact_max_rank: int, fill_mode: str = "storage"
) -> dict[str, float]:
    shapes, sha, _ = smollm2_shapes()
    with SQLiteStorage(db) as storage:
        coordinator = Coordinator(config_for(shapes, sha, db, mode, n, exact_max_rank), storage)
        fill_seconds = 0.0
        if fill_mode == "ingest":
            started = time.perf_counter()
            fill_via_ingest(coordinator, mode, sha, n)
            fill_seconds = time.perf_counter() - started
        before = rss_mb()
        started, cpu_started = time.perf_counter(), time.process_time()
        version = coordinator.aggregate()
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started  # every thread of this process
        assert version == 1, "the buffer was due"
        return {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "fill": fill_mode,
            "fill_seconds": fill_seconds,
            "rss_before_mb": before,
            "rss_peak_mb": rss_mb("VmHWM"),
            "truncation_rel_error": float(
                coordinator.last_aggregation.get("truncation_rel_error", 0.0)
            ),
            **{
                k: v
                for k, v in coordinator.last_aggregation.items()
                if k.startswith("seconds_") or k == "dense_layers"
            },
        }


def bench_aggregation(
    shapes: Shapes,
    sha: str,
    sizes: list[int],
    modes: list[str],
    exact_max_rank: int = 0,
    fill_mode: str = "ingest",
    code: Path | None = None,
) -> list[dict]:
    rows = []
    for mode in modes:
        for n in sizes:
            with tempfile.TemporaryDirectory(prefix="fedlm-bench-") as tmp:
                db = Path(tmp) / "agg.sqlite"
                # "storage": rows written directly, as a coordinator finds them after a restart
                # (the clip's first pass decodes them); "ingest": through `submit` in the child.
                size = fill(shapes, sha, db, mode, n) if fill_mode == "storage" else 0
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child-aggregate",
                        str(db),
                        "--mode",
                        mode,
                        "--n",
                        str(n),
                        "--exact-max-rank",
                        str(exact_max_rank),
                        "--fill",
                        fill_mode,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=CODE,
                    env={**os.environ, "FEDLM_BENCH_CODE": str(code or ROOT)},
                )
                result = json.loads(out.stdout.strip().splitlines()[-1])
            row = {
                "code": str(code or ROOT),
                "mode": mode,
                "n": n,
                "exact_max_rank": exact_max_rank,
                "update_bytes": size,
            }
            row.update(result)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# -- ingest -----------------------------------------------------------------------------------


def start_server(model: Path, db: Path, posts: int) -> tuple[subprocess.Popen[str], str]:
    """`python -m coordinator` on 127.0.0.1:0; returns the process and its URL."""
    proc = subprocess.Popen(
        [
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
            "--join-token",
            JOIN_TOKEN,
            "--buffer-size",
            str(10 * posts),
            "--codec",
            CODEC,
            "--rate",
            "10000",
            "--max-body-mb",
            "16",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("fedlm coordinator http://"):
            return proc, line.split()[2]
    raise SystemExit("coordinator exited before listening")


async def bench_ingest(
    model: Path | None, shapes: Shapes, sha: str, clients: int, posts: int
) -> dict:
    import aiohttp

    if model is None:
        raise SystemExit(
            "the ingest benchmark needs the smollm2-135m package (the server resolves it)"
        )
    with tempfile.TemporaryDirectory(prefix="fedlm-bench-") as tmp:
        db = Path(tmp) / "ingest.sqlite"
        proc, url = start_server(model, db, posts)
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{url}/v1/adapter", headers={}) as resp:
                    assert resp.status == 401
                tokens = []
                for i in range(clients):
                    async with session.post(
                        f"{url}/v1/join", json={"join_token": JOIN_TOKEN, "name": f"sim{i}"}
                    ) as resp:
                        tokens.append(await resp.json())
                from edge_sdk.wire import GlobalAdapter

                async with session.get(
                    f"{url}/v1/adapter", headers={"Authorization": f"Bearer {tokens[0]['token']}"}
                ) as resp:
                    reference = GlobalAdapter.from_bytes(await resp.read()).dense_tensors()
                per_client = posts // clients
                templates = {
                    t["client_id"]: make_updates(reference, "exact", sha, 2, t["client_id"])
                    for t in tokens
                }
                size = len(templates[tokens[0]["client_id"]][0])
                # Every post needs its own update id; re-encode before the clock starts.
                bodies = {
                    cid: [_with_new_id(bs[j % 2]) for j in range(per_client)]
                    for cid, bs in templates.items()
                }
                latencies: list[float] = []

                async def client(token: dict) -> None:
                    headers = {
                        "Authorization": f"Bearer {token['token']}",
                        "Content-Type": CONTENT_TYPE,
                    }
                    for body in bodies[token["client_id"]]:
                        t0 = time.perf_counter()
                        async with session.post(
                            f"{url}/v1/updates", data=body, headers=headers
                        ) as resp:
                            assert resp.status == 202, await resp.text()
                        latencies.append(time.perf_counter() - t0)

                started = time.perf_counter()
                await asyncio.gather(*(client(t) for t in tokens))
                elapsed = time.perf_counter() - started
            peak = rss_mb("VmHWM", proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    accepted = per_client * clients
    return {
        "clients": clients,
        "accepted": accepted,
        "seconds": elapsed,
        "updates_per_s": accepted / elapsed,
        "update_bytes": size,
        "mb_per_s": accepted * size / elapsed / 1e6,
        "latency_p50_ms": 1000 * float(np.median(latencies)),
        "latency_p95_ms": 1000 * float(np.percentile(latencies, 95)),
        "server_peak_rss_mb": peak,
    }


def _with_new_id(body: bytes) -> bytes:
    update = AdapterUpdate.from_bytes(body)
    return AdapterUpdate(**{**update.__dict__, "update_id": uuid.uuid4().hex}).to_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--posts", type=int, default=200)
    parser.add_argument("--modes", default="exact,frozen-a,naive")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--sizes", default="", help="comma-separated N (default 10,100,1000)")
    parser.add_argument(
        "--exact-max-rank", type=int, default=0, help="0 = exact, untruncated sum; > 0 = truncating"
    )
    parser.add_argument(
        "--fill",
        choices=("ingest", "storage"),
        default="ingest",
        help="store the N updates through Coordinator.submit (norms measured at ingest, as in a "
        "running coordinator) or as raw rows (as after a restart)",
    )
    parser.add_argument(
        "--code",
        type=Path,
        help="run the aggregation child against the coordinator of this checkout (e.g. the "
        "code before a change; use --fill storage with code that has no ingest-time norms)",
    )
    parser.add_argument("--child-aggregate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_aggregate:
        print(
            json.dumps(
                child_aggregate(
                    args.child_aggregate, args.mode, args.n, args.exact_max_rank, args.fill
                )
            )
        )
        return
    shapes, sha, model = smollm2_shapes()
    print(
        f"adapter: {len(shapes)} layers, "
        f"{adapter_parameters(shapes, RANK):,} parameters at r={RANK}",
        flush=True,
    )
    results: dict = {"parameters": adapter_parameters(shapes, RANK)}
    if not args.skip_ingest:
        posts = 48 if args.quick else args.posts
        results["ingest"] = asyncio.run(bench_ingest(model, shapes, sha, args.clients, posts))
        print(json.dumps(results["ingest"]), flush=True)
    sizes = [10, 100] if args.quick else [10, 100, 1000]
    if args.sizes:
        sizes = [int(n) for n in args.sizes.split(",")]
    modes = args.modes.split(",")
    results["aggregation"] = bench_aggregation(
        shapes, sha, sizes, modes, args.exact_max_rank, args.fill, args.code
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
