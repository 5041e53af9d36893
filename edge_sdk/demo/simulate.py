"""In-process training runs for the demo: local-only, centralized and a simulated federation.

The simulated federation is the coordinator's own math without the network: every round, each
client trains `local_steps` from the current global adapter on its partition, encodes the
result with the task's codec (so compression error is included), and the coordinator's
`aggregate` (FedBuff-style weighted mean of deltas, all updates fresh, `exact` LoRA mode by
default) produces the next global version. The demo uses it to choose its schedule and as
the reference for the real multi-process run.

    python -m edge_sdk.demo.simulate [--quick] [--set field=value ...]

prints one JSON line with the figures (used for BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_sdk.demo.config import DemoConfig
from edge_sdk.demo.evaluate import EvalScores, TeacherForcedEvaluator
from edge_sdk.demo.federation import FederationRecord, OnVersion, Tensors
from edge_sdk.demo.live import Progress

if TYPE_CHECKING:  # torch loads lazily
    import torch

    from coordinator.next_version import AggregationConfig
    from edge_sdk.training.data import Dataset
    from edge_sdk.training.preferences import PreferenceDataset
    from edge_sdk.training.tokenizer import Tokenizer
    from edge_sdk.training.trainer import TrainConfig

logger = logging.getLogger(__name__)


def train_config(
    config: DemoConfig, steps: int, *, batch_size: int | None = None, seed: int = 0
) -> TrainConfig:
    """The trainer's config for one run of the demo."""
    from edge_sdk.training.lora import LoraConfig
    from edge_sdk.training.trainer import TrainConfig

    return TrainConfig(
        steps=steps,
        lora=LoraConfig(rank=config.rank, alpha=config.alpha, freeze_a=config.mode == "frozen-a"),
        seq_len=config.seq_len,
        batch_size=batch_size or config.batch_size,
        lr=config.lr,
        warmup=min(config.warmup, steps),
        seed=seed,
        val_fraction=0.0,
        checkpoint_every=0,
        precision=config.precision,
        compute=config.compute,
        method=config.method,  # type: ignore[arg-type]
        beta=config.beta,
        dpo_loss=config.dpo_loss,  # type: ignore[arg-type]
        sft_weight=config.sft_weight,
    )


def load_dataset(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    tokenizer: Tokenizer,
    config: DemoConfig,
) -> Dataset:
    """Packed training sequences of `paths` (no validation split: the demo has its own eval set)."""
    from edge_sdk.training.data import DataConfig, build_dataset

    return build_dataset(
        paths, tokenizer, DataConfig(seq_len=config.seq_len, val_fraction=0.0, seed=config.seed)
    )


def reorder(dataset: Dataset | PreferenceDataset, seed: int) -> Dataset | PreferenceDataset:
    """The same sequences in another seeded order, so successive rounds see different batches."""
    return dataclasses.replace(dataset, seed=seed)


def aggregation_config(config: DemoConfig) -> AggregationConfig:
    from coordinator.next_version import AggregationConfig

    return AggregationConfig(
        mode=config.mode,
        rank=config.rank,
        alpha=config.alpha,
        a_seed=config.seed,
        server_lr=config.server_lr,
        robust=config.robust,
        trim_ratio=config.trim_ratio,
        clip_multiplier=config.clip_multiplier,
    )


def initial_global(model: torch.nn.Module, config: DemoConfig) -> Tensors:
    """Version 0 of the global adapter, as the coordinator creates it (B = 0)."""
    from coordinator.next_version import initial_adapter
    from edge_sdk.training.trainer import adapter_shapes

    return initial_adapter(aggregation_config(config), adapter_shapes(model))


def update_keys(config: DemoConfig, adapter: Mapping[str, np.ndarray]) -> list[str]:
    """The tensors a client sends: B only in frozen-a, else A and B."""
    return [k for k in adapter if config.mode != "frozen-a" or k.endswith(".lora_B")]


@dataclass
class RunRecord:
    """What one training run produced."""

    adapter: Tensors
    steps: int
    tokens: int
    seconds: float
    train_loss: float


def train_run(
    model: torch.nn.Module,
    dataset: Dataset | PreferenceDataset,
    config: DemoConfig,
    init: Mapping[str, np.ndarray],
    steps: int,
    *,
    seed: int,
    batch_size: int | None = None,
) -> RunRecord:
    """`steps` optimizer steps from `init` on `dataset` (seeded order)."""
    from edge_sdk.training.trainer import fit

    cfg = train_config(config, steps, batch_size=batch_size, seed=seed)
    result = fit(model, reorder(dataset, seed), cfg, init_adapter=init)
    m = result.metrics
    logger.info(
        "trained %d steps in %.1f s (%.0f tokens/s), loss %.3f",
        m.steps,
        m.seconds,
        m.tokens_per_s,
        m.train_loss,
    )
    return RunRecord(result.adapter, m.steps, m.num_tokens, m.seconds, m.train_loss)


def simulate_federation(
    model: torch.nn.Module,
    datasets: Sequence[Dataset | PreferenceDataset],
    config: DemoConfig,
    *,
    on_version: Callable[[int, Tensors], None] | None = None,
    progress: Progress | None = None,
) -> FederationRecord:
    """Rounds of local training + the coordinator's aggregation, in this process.

    `progress` gets a "federation" event after each client's update, like the network
    federation's (see `edge_sdk.demo.live.Progress`)."""
    from coordinator.next_version import Contribution, ServerState, aggregate
    from edge_sdk.training.trainer import adapter_shapes
    from edge_sdk.wire import AdapterUpdate, LoraSpec, UpdateEncoder

    agg = aggregation_config(config)
    shapes = adapter_shapes(model)
    current = initial_global(model, config)
    versions = [current]
    encoders = [UpdateEncoder(config.codec) for _ in datasets]
    sent = [0] * len(datasets)
    fp32 = [0] * len(datasets)
    losses: list[list[float]] = []
    latest: list[float | None] = [None] * len(datasets)
    state = ServerState()
    tokens, t0 = 0, time.perf_counter()
    aggregation_s, clipped, norm_ratio_max = 0.0, 0, 0.0
    targets = tuple(sorted({k.split(".")[-2] for k in current}))
    for rnd in range(config.rounds):
        contributions = []
        round_loss = []
        for c, ds in enumerate(datasets):
            run = train_run(
                model,
                ds,
                config,
                current,
                config.local_steps,
                seed=config.seed * 1000 + rnd * 31 + c + 1,
            )
            tokens += run.tokens
            round_loss.append(run.train_loss)
            keys = update_keys(config, run.adapter)
            payload = {k: run.adapter[k] for k in keys}
            msg = AdapterUpdate.build(
                client_id=f"client-{c}",
                base_version=rnd,
                model_sha256="0" * 64,
                lora=LoraSpec(config.rank, config.alpha, targets),
                tensors=payload,
                num_examples=ds.stats.train_examples,
                encoder=encoders[c],
                reference={k: current[k] for k in keys},
            )
            body = msg.to_bytes()
            sent[c] += len(body)
            latest[c] = run.train_loss
            if progress is not None:
                progress(
                    "federation",
                    {
                        "version": rnd,
                        "rounds": config.rounds,
                        "updates": [rnd + (i <= c) for i in range(len(datasets))],
                        "latest_loss": list(latest),
                        "bytes_sent": list(sent),
                    },
                )
            # The reference is what plain federated LoRA sends: the whole adapter (A and B) in fp32.
            fp32[c] += sum(int(np.asarray(v).size) * 4 for v in run.adapter.values())
            decoded = AdapterUpdate.from_bytes(body).dense_tensors({k: current[k] for k in keys})
            full = dict(current)
            full.update(decoded)
            contributions.append(
                Contribution(
                    update_id=msg.update_id,
                    tensors=full,
                    weight=float(ds.stats.train_examples),
                    base_version=rnd,
                    scale=config.alpha / config.rank,
                )
            )
        t_agg = time.perf_counter()
        outcome = aggregate(agg, shapes, current, contributions, lambda v: versions[v], state)
        aggregation_s += time.perf_counter() - t_agg
        clipped += int(outcome.stats.get("clipped", 0))
        reference = outcome.stats["clip"]["reference"]
        if reference:
            norm_ratio_max = max(norm_ratio_max, outcome.stats["delta_norm_max"] / reference)
        state = outcome.state
        current = outcome.tensors
        versions.append(current)
        losses.append(round_loss)
        logger.info(
            "round %d: client losses %s", rnd + 1, ", ".join(f"{x:.3f}" for x in round_loss)
        )
        if on_version is not None:
            on_version(rnd + 1, current)
    return FederationRecord(
        versions,
        sent,
        fp32,
        losses,
        tokens,
        time.perf_counter() - t0,
        aggregation_s,
        clipped,
        norm_ratio_max,
    )


@dataclass
class InProcessFederation:
    """The coordinator's aggregation over wire-encoded client updates, without the network:
    trains the demo's loaded QLoRA model on each client's tokenized dataset in turn."""

    model: torch.nn.Module
    """The base model with LoRA layers, loaded once for every in-process run."""
    datasets: Sequence[Dataset]
    """One tokenized dataset per client."""
    progress: Progress | None = None
    """Receives a "federation" event after each client update."""
    name: str = "in-process"

    def run(self, config: DemoConfig, on_version: OnVersion) -> FederationRecord:
        """Federate `config.rounds` versions; call `on_version` for each one published."""
        return simulate_federation(
            self.model, self.datasets, config, on_version=on_version, progress=self.progress
        )


# --------------------------------------------------------------------------- the experiment


ARMS = ("base", "local", "federated", "centralized")


def experiment(
    config: DemoConfig,
    work_dir: Path,
    *,
    arms: Sequence[str] = ARMS,
    clients: Sequence[int] | None = None,
    curve_every: int = 1,
) -> dict[str, object]:
    """Selected arms in-process (base, local-only per client, federated, centralized), scored
    teacher-forced; arms can run in separate processes and be merged (they share seeds)."""
    import torch

    from edge_sdk.demo.tasks import generate, write_task_data
    from edge_sdk.models import resolve
    from edge_sdk.training.tokenizer import load_tokenizer
    from edge_sdk.training.trainer import load_for_training

    t_all, cpu_all = time.perf_counter(), time.process_time()
    model_path = resolve(config.model)
    data = generate(config.task_config())
    client_paths, _ = write_task_data(data, work_dir)
    tokenizer = load_tokenizer(model_path)
    datasets = [load_dataset(p, tokenizer, config) for p in client_paths]
    t0 = time.perf_counter()
    model = load_for_training(model_path, train_config(config, 1))
    out: dict[str, object] = {
        "config": dataclasses.asdict(config),
        "load_s": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
    }
    evaluator = TeacherForcedEvaluator(model, tokenizer, data.eval)
    init = initial_global(model, config)
    train_s, train_cpu, train_tokens = 0.0, 0.0, 0

    def rec(s: EvalScores) -> dict[str, object]:
        return {
            "loss": round(s.eval_loss or float("nan"), 4),
            "em": round(s.exact_match, 4),
            "fam": {k: round(v, 2) for k, v in s.per_family.items()},
            "eval_s": round(s.seconds, 1),
        }

    if "base" in arms:
        out["base"] = rec(evaluator.score(None))
    steps = config.total_local_steps
    if "local" in arms:
        local = {}
        for c in clients if clients is not None else range(config.clients):
            cpu0 = time.process_time()
            run = train_run(
                model, datasets[c], config, init, steps, seed=config.seed * 1000 + 7 + c
            )
            train_cpu += time.process_time() - cpu0
            train_s += run.seconds
            train_tokens += run.tokens
            local[str(c)] = rec(evaluator.score(run.adapter)) | {"train_s": round(run.seconds, 1)}
        out["local_only"] = local
    if "federated" in arms:
        curve: list[dict[str, object]] = []
        cpu0 = time.process_time()

        def on_version(v: int, tensors: Tensors) -> None:
            if curve_every and (v % curve_every == 0 or v == config.rounds) or v == config.rounds:
                curve.append({"version": v} | rec(evaluator.score(tensors)))

        fed = simulate_federation(model, datasets, config, on_version=on_version)
        train_cpu += time.process_time() - cpu0
        train_s += fed.seconds
        train_tokens += fed.tokens
        out["federated"] = curve[-1] | {
            "train_s": round(fed.seconds, 1),
            "aggregation_s": round(fed.aggregation_s, 2),
            "clipped": fed.clipped,
            "norm_ratio_max": round(fed.norm_ratio_max, 3),
        }
        out["curve"] = [{k: c[k] for k in ("version", "loss", "em")} for c in curve]
        out["bytes_ratio"] = round(sum(fed.fp32_bytes) / max(1, sum(fed.bytes_sent)), 2)
        out["bytes_sent"] = fed.bytes_sent
    if "centralized" in arms:
        # The federation's total compute on pooled data (same steps, clients x batch).
        pooled = load_dataset(client_paths, tokenizer, config)
        cpu0 = time.process_time()
        cen = train_run(
            model,
            pooled,
            config,
            init,
            steps,
            seed=config.seed * 1000 + 99,
            batch_size=config.batch_size * config.clients,
        )
        train_cpu += time.process_time() - cpu0
        train_s += cen.seconds
        train_tokens += cen.tokens
        out["centralized"] = rec(evaluator.score(cen.adapter)) | {"train_s": round(cen.seconds, 1)}
    if train_tokens:
        out["train_tokens"] = train_tokens
        out["train_tokens_per_s"] = round(train_tokens / train_s, 1)
        out["train_tokens_per_cpu_s"] = round(train_tokens / max(train_cpu, 1e-9), 1)
    out["total_s"] = round(time.perf_counter() - t_all, 1)
    out["cpu_s"] = round(time.process_time() - cpu_all, 1)
    return out


def _parse_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - an experiment driver
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS)
    )
    parser.add_argument("--clients", default="", help="local-only clients to run (default: all)")
    parser.add_argument(
        "--curve-every", type=int, default=1, help="score every Nth version (0: the last)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = DemoConfig.quick() if args.quick else DemoConfig.full()
    changes = dict(item.split("=", 1) for item in args.set)
    config = config.replace(**{k: _parse_value(v) for k, v in changes.items()})
    with tempfile.TemporaryDirectory(prefix="fedlm-sim-") as tmp:
        print(
            json.dumps(
                experiment(
                    config,
                    Path(tmp),
                    arms=args.arms.split(","),
                    clients=[int(c) for c in args.clients.split(",")] if args.clients else None,
                    curve_every=args.curve_every,
                )
            )
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
