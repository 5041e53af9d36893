"""What the default clip and the robust statistics cost one coordinator aggregation.

SmolLM2-135M-sized updates (r=8 on all 7 projections of 30 layers, `delta+int8`), N of them
from N distinct clients, stored as pending in a fresh SQLite file; a fresh child process opens
the coordinator and runs `Coordinator.aggregate()` once (with the default adaptive clip, that
is two passes over the stored updates: effect norms, then the aggregation). Reported: wall
and CPU seconds of that call, and the child's peak RSS. The accuracy side is measured on the
demo task (BENCHMARKS.md, "Robust aggregation and clipping").

    python benchmarks/bench_robust.py [--sizes 4,16] [--repeat 3]
    python benchmarks/bench_robust.py --code ../main --configs "exact, no clip;naive, no clip"

`--code DIR` runs another checkout's coordinator (settings it does not know are left out), to
compare with the one-pass aggregation from before the default clip.
"""

from __future__ import annotations

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # as the CLI sets it, before numpy

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The code under test: this checkout, or `--code DIR` (its bench_coordinator puts DIR first on
# sys.path before it imports the coordinator).
CODE = Path(sys.argv[sys.argv.index("--code") + 1]).resolve() if "--code" in sys.argv else ROOT
sys.path.insert(0, str(CODE / "benchmarks"))

from bench_coordinator import ALPHA, RANK, make_updates, rss_mb, smollm2_shapes

from coordinator.config import CoordinatorConfig
from coordinator.next_version import AggregationConfig
from coordinator.state_machine import Coordinator
from coordinator.storage import SQLiteStorage, UpdateRecord
from coordinator.strategies import FedBuff

CONFIGS = {
    "exact, no clip": {"mode": "exact", "clip_multiplier": None},
    "exact, clip (default)": {"mode": "exact"},
    "naive, no clip": {"mode": "naive", "clip_multiplier": None},
    "naive, clip (default)": {"mode": "naive"},
    "naive, trimmed-mean 0.25 + clip": {
        "mode": "naive",
        "robust": "trimmed-mean",
        "trim_ratio": 0.25,
    },
    "naive, median + clip": {"mode": "naive", "robust": "median"},
}


def _config(shapes, sha: str, db: Path, name: str, n: int) -> CoordinatorConfig:
    known = set(AggregationConfig.__dataclass_fields__)
    settings = {k: v for k, v in CONFIGS[name].items() if k in known}
    aggregation = AggregationConfig(rank=RANK, alpha=ALPHA, **settings)
    return CoordinatorConfig(
        model_sha256=sha, shapes=shapes, db_path=db, aggregation=aggregation,
        strategy=FedBuff(buffer_size=n, max_staleness=8), codec="delta+int8",
        join_token="benchmark-join-token", mdns=False,
    )  # fmt: skip


def fill(db: Path, name: str, n: int) -> None:
    shapes, sha, _ = smollm2_shapes()
    mode = CONFIGS[name]["mode"]
    with SQLiteStorage(db) as storage:
        coordinator = Coordinator(_config(shapes, sha, db, name, n), storage)
        for i, body in enumerate(make_updates(coordinator.dense_version(0), mode, sha, n)):
            record = UpdateRecord(uuid.uuid4().hex, f"c{i}", 0, 80, 0, RANK, time.time(), len(body))
            storage.add_update(record, body)


def child(db: Path, name: str, n: int) -> dict:
    shapes, sha, _ = smollm2_shapes()
    with SQLiteStorage(db) as storage:
        coordinator = Coordinator(_config(shapes, sha, db, name, n), storage)
        before = rss_mb()
        wall, cpu = time.perf_counter(), time.process_time()
        assert coordinator.aggregate() == 1
        stats = coordinator.last_aggregation
        return {
            "code": str(Path(sys.modules["coordinator"].__file__).parents[1]),
            "seconds": round(time.perf_counter() - wall, 2),
            "cpu_s": round(time.process_time() - cpu, 2),
            "rss_peak_minus_before_mb": round(rss_mb("VmHWM") - before, 1),
            "clipped": stats.get("clipped"),
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="4,16")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--configs", default=";".join(CONFIGS), help="names, ';'-separated")
    parser.add_argument("--code", help="checkout whose coordinator to run (default: this one)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.name, args.n)))
        return
    for n in (int(s) for s in args.sizes.split(",")):
        for name in args.configs.split(";"):
            runs = []
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory(prefix="fedlm-robust-") as tmp:
                    db = Path(tmp) / "agg.sqlite"
                    fill(db, name, n)
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", str(db), "--name", name,
                         "--n", str(n), *(["--code", args.code] if args.code else [])],
                        capture_output=True, text=True, check=True, cwd=ROOT,
                    )  # fmt: skip
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            best = min(runs, key=lambda r: r["cpu_s"])
            print(
                json.dumps(
                    {
                        "config": name,
                        "code": args.code or "this",
                        "n": n,
                        "runs": len(runs),
                        **best,
                        "cpu_s_all": [r["cpu_s"] for r in runs],
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
