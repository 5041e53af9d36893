"""ServerApp: FedAvg over every node, synchronous rounds, from fedlm's own version-0 adapter.

The initial arrays are the fedlm coordinator's version 0 (A seeded, B = 0) under PEFT's
names, so both stacks start from the same adapter. After each round the global arrays are
saved with the wall-clock time they were published (`evaluate_fn` runs right after the
aggregation), and the benchmark scores them afterwards with the same evaluator as fedlm's
versions: no evaluation runs inside either federation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["out-dir"]))
    try:
        _main(grid, context)
    except BaseException as exc:  # the benchmark polls for versions: tell it why none come
        (out / "error.txt").write_text(f"{type(exc).__name__}: {exc}")
        raise


def _main(grid: Grid, context: Context) -> None:
    run = context.run_config
    out = Path(str(run["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    clients = int(run["num-clients"])
    with np.load(str(run["initial-arrays"])) as z:
        initial = ArrayRecord({k: Array(z[k].astype(np.float32)) for k in z.files})
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=clients,
        min_evaluate_nodes=0,
        min_available_nodes=clients,
    )

    def save(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        published = time.time()
        if server_round > 0:
            tensors = {k: v.numpy() for k, v in arrays.items()}
            np.savez(out / f"version-{server_round}.npz", **tensors)
            with (out / "versions.jsonl").open("a") as f:
                f.write(json.dumps({"version": server_round, "published": published}) + "\n")
        return None

    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(run["num-server-rounds"]),
        train_config=ConfigRecord({"lr": float(run["lr"])}),
        evaluate_fn=save,
    )
