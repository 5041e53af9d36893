"""Where the coordinator's CPU goes for one accepted update, without HTTP: a steadier figure
than end-to-end rates on a shared machine (CPU time, not wall time, is measured).

N SmolLM2-135M-shaped `delta+int4+zlib` updates (r=8, 7 projections x 30 layers, as
`bench_load.py` frames them) from N enrolled devices go through `Coordinator.submit` from T
threads at once, in-process, into a fresh SQLite file (exact mode, FedBuff with a buffer larger
than N: no aggregation runs). Reported: CPU ms per update of the whole process (all threads:
decode, checks, effect norm, storage), the wall time and fsync-bound rate on this disk, and the
median thread CPU of each phase of one update measured one at a time.

    python benchmarks/bench_ingest.py                          # this checkout
    python benchmarks/bench_ingest.py --code /tmp/before       # another checkout ("before")
"""

from __future__ import annotations

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=120)
    parser.add_argument("--threads", type=int, default=8, help="concurrent submitters")
    parser.add_argument("--code", type=Path, help="the coordinator of this checkout")
    args = parser.parse_args()
    code = (args.code or ROOT).resolve()
    sys.path[:0] = [str(code), str(ROOT / "benchmarks")]
    os.environ["FEDLM_BENCH_CODE"] = str(code)  # bench_coordinator imports the coordinator
    import bench_coordinator as bc
    import bench_load as bl

    from coordinator.state_machine import Coordinator
    from coordinator.storage import SQLiteStorage

    assert Path(sys.modules["coordinator"].__file__ or "").is_relative_to(code)
    from edge_sdk.wire import AdapterUpdate

    shapes, sha, _ = bc.smollm2_shapes()
    with tempfile.TemporaryDirectory(prefix="fedlm-ingest-") as tmp:
        db = Path(tmp) / "ingest.sqlite"
        storage = SQLiteStorage(db)
        coordinator = Coordinator(bc.config_for(shapes, sha, db, "exact", 10**6), storage)
        reference = coordinator.dense_version(0)
        templates = bl.make_templates(reference, sha, 4)
        n = args.updates
        clients = [coordinator.join(bc.JOIN_TOKEN, f"d{i}")["client_id"] for i in range(n)]
        bodies = [templates[i % 4].body(c, uuid.uuid4().hex, 0) for i, c in enumerate(clients)]

        phases: dict[str, list[float]] = {"decode": [], "dense": [], "effect_norm": []}
        for body in bodies[:20]:  # one at a time, thread CPU of each phase
            t = time.thread_time()
            update = AdapterUpdate.from_bytes(body, coordinator._limits)
            phases["decode"].append(time.thread_time() - t)
            t = time.thread_time()
            dense = update.dense_tensors(reference)
            phases["dense"].append(time.thread_time() - t)
            t = time.thread_time()
            coordinator._effect_norm(update, dense)
            phases["effect_norm"].append(time.thread_time() - t)

        cpu, wall = time.process_time(), time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            acks = list(pool.map(coordinator.submit, clients, bodies))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        assert all(a["accepted"] for a in acks)
        close = getattr(coordinator, "close", None)
        if close is not None:
            close()
        storage.close()
    result = {
        "code": str(code),
        "updates": n,
        "threads": args.threads,
        "update_bytes": len(bodies[0]),
        "cpu_ms_per_update": round(1000 * cpu / n, 1),
        "wall_s": round(wall, 2),
        "updates_per_s_wall": round(n / wall, 1),
        "cpu_bound_updates_per_s_on_2_cores": round(2 * n / cpu, 1),
        **{f"{k}_ms_median": round(1000 * statistics.median(v), 2) for k, v in phases.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
