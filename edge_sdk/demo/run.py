"""`run_demo(config, out_dir) -> report`: the whole federated demo, end to end.

Phases (each timed into `report["wall_time_s"]`):

1. data: the built-in generator (`edge_sdk.demo.tasks`) or the user's `--data DIR` (one JSONL
   per client, plus an optional `eval.jsonl`; without it each client's last examples are held out);
2. load: tokenizer and one QLoRA torch model shared by every in-process run;
3. baselines, in-process: base model, each client alone (local-only, the federation's total
   steps on its own partition), and centralized training on the pooled data (the same steps at
   clients x the batch: the federation's compute);
4. federated: a backend returns the global adapter of every version and the bytes each client
   sent (`edge_sdk.demo.federation`). A `Federation` works from the client files:
   `edge_sdk.demo.network.NetworkFederation` (what `fedlm demo` uses) runs a coordinator
   advertised by mDNS and `fedlm join` client processes that discover it. Without one,
   `edge_sdk.demo.simulate.InProcessFederation` runs the coordinator's aggregation on
   wire-encoded updates trained in this process on the model and datasets loaded in 2;
5. evaluation of every version (eval loss curve), export of the final adapter (PEFT + GGUF),
   greedy exact match through llama.cpp, one chat exchange, report.json + plot + table.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.demo.config import DemoConfig
from edge_sdk.demo.errors import DemoDataError, FederationError
from edge_sdk.demo.evaluate import EvalScores, GreedyEvaluator, TeacherForcedEvaluator
from edge_sdk.demo.federation import Federation
from edge_sdk.demo.live import Progress
from edge_sdk.demo.report import (
    BYTES_TARGET,
    PLOT_NAME,
    SECURE_BYTES_TARGET,
    build_report,
    chat_exchange,
    plot_curve,
    write_report,
)
from edge_sdk.demo.simulate import (
    InProcessFederation,
    initial_global,
    load_dataset,
    train_config,
    train_run,
)
from edge_sdk.demo.tasks import (
    Example,
    TaskData,
    generate,
    read_examples,
    write_jsonl,
    write_task_data,
)
from edge_sdk.models.config import model_config

logger = logging.getLogger(__name__)

FULL_BUDGET_S = 600.0
QUICK_BUDGET_S = 180.0


def _user_data(data_dir: Path, out: Path) -> tuple[list[Path], list[Example], list[list[str]]]:
    files = sorted(p for p in data_dir.glob("*.jsonl") if p.name != "eval.jsonl")
    if not files:
        raise DemoDataError(f"{data_dir}: no *.jsonl files (one per client) found")
    eval_file = data_dir / "eval.jsonl"
    if eval_file.exists():
        held_out = read_examples(eval_file)
    else:  # hold out the last 10% of each client's examples
        held_out = []
        for i, path in enumerate(files):
            examples = read_examples(path)
            n = max(1, len(examples) // 10)
            held_out += [dataclasses.replace(e, family=f"client{i}") for e in examples[-n:]]
    if not held_out:
        raise DemoDataError(f"{data_dir}: no held-out examples with an assistant answer to score")
    write_jsonl(out / "eval.jsonl", held_out)
    return files, held_out, [[p.stem] for p in files]


def run_demo(
    config: DemoConfig,
    out_dir: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    federation: Federation | None = None,
    budget_s: float = FULL_BUDGET_S,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run every phase and return the report (also written to `out_dir/report.json`).

    `federation`: the federated arm's backend; None runs it in this process
    (`InProcessFederation`, on the model and datasets loaded for the baselines).
    """
    from edge_sdk.adapters.export import export_adapter
    from edge_sdk.adapters.gguf_lora import BaseModelInfo, write_gguf_lora
    from edge_sdk.models import resolve
    from edge_sdk.training.tokenizer import load_tokenizer
    from edge_sdk.training.trainer import load_for_training

    def note(event: str, **fields: Any) -> None:
        if progress is not None:
            progress(event, fields)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = last = time.perf_counter()
    cpu_start = time.process_time()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        timings[name] = now - last
        last = now
        note("phase", name=name, seconds=timings[name])

    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    model_path = resolve(config.model)
    if data_dir is None:
        data: TaskData = generate(config.task_config())
        client_paths, _ = write_task_data(data, out / "data")
        held_out = data.eval
        families = [list(config.task_config().owned(c)) for c in range(config.clients)]
    else:
        client_paths, held_out, families = _user_data(Path(data_dir), out / "data")
        config = config.replace(clients=len(client_paths))
    tokenizer = load_tokenizer(model_path)
    datasets = [load_dataset(p, tokenizer, config) for p in client_paths]
    pooled = load_dataset(client_paths, tokenizer, config)
    lap("data")
    model = load_for_training(model_path, train_config(config, 1))
    evaluator = TeacherForcedEvaluator(model, tokenizer, held_out)
    init = initial_global(model, config)
    lap("load")

    base = evaluator.score(None)
    note("score", arm="base", eval_loss=base.eval_loss, exact_match=base.exact_match)
    steps = config.total_local_steps
    local: list[EvalScores] = []
    for c, ds in enumerate(datasets):
        run = train_run(model, ds, config, init, steps, seed=config.seed * 1000 + 7 + c)
        local.append(evaluator.score(run.adapter))
        note("local", client=c, exact_match=local[-1].exact_match)
    lap("local_only")
    central_run = train_run(
        model,
        pooled,
        config,
        init,
        steps,
        seed=config.seed * 1000 + 99,
        batch_size=config.batch_size * config.clients,
    )
    central = evaluator.score(central_run.adapter)
    note("score", arm="centralized", eval_loss=central.eval_loss, exact_match=central.exact_match)
    lap("centralized")

    curve: list[tuple[int, EvalScores]] = []

    def on_version(version: int, adapter: dict[str, np.ndarray]) -> None:
        curve.append((version, evaluator.score(adapter)))
        note(
            "version",
            version=version,
            eval_loss=curve[-1][1].eval_loss,
            exact_match=curve[-1][1].exact_match,
        )

    if federation is None:  # in this process, on the model and datasets loaded above
        federation_name = InProcessFederation.name
        fed = InProcessFederation(model, datasets, progress).run(config, on_version)
    else:
        federation_name = federation.name
        fed = federation.run(client_paths, config, on_version)
    if not curve:
        raise FederationError("the federation published no global version")
    final = fed.versions[-1]
    lap("federated")

    info = BaseModelInfo.from_gguf(model_path)
    adapter_dir = out / "adapter"
    paths = export_adapter(
        adapter_dir,
        final,
        rank=config.rank,
        alpha=config.alpha,
        base=info,
        base_model_name=config.model,
        n_layer=model_config(model).n_layer,
    )
    greedy: dict[str, EvalScores] = {}
    if config.greedy_eval:
        central_gguf = write_gguf_lora(
            out / "centralized.gguf", central_run.adapter, alpha=config.alpha, base=info
        )
        with GreedyEvaluator(model_path, held_out) as g:
            greedy["base"] = g.score(None)
            greedy["federated"] = g.score(paths.gguf_path)
            greedy["centralized"] = g.score(central_gguf)
        central_gguf.unlink(missing_ok=True)
    # One chat exchange: a held-out prompt of a family the first client never owned.
    probe = next((e for e in held_out if e.family not in families[0]), held_out[0])
    chat = chat_exchange(model_path, paths.gguf_path, probe.messages(with_answer=False))
    chat["expected"] = probe.answer
    lap("evaluate_export")
    timings["total"] = time.perf_counter() - t_start
    cpu_total = time.process_time() - cpu_start

    report = build_report(
        model=config.model,
        config=dataclasses.asdict(config) | {"federation": federation_name},
        base=base,
        local_only=local,
        client_families=families,
        federated=curve[-1][1],
        centralized=central,
        bytes_sent=fed.bytes_sent,
        fp32_bytes=fed.fp32_bytes,
        versions=curve,
        wall_time_s=timings,
        wall_budget_s=budget_s,
        greedy=greedy,
        bytes_target=SECURE_BYTES_TARGET if config.secure else BYTES_TARGET,
    )
    report["chat"] = chat
    # CPU seconds let a run on a busy machine be projected to an idle one (wall ~ cpu / threads).
    report["cpu_time_s"] = round(cpu_total, 1)
    plot = plot_curve(report, out / PLOT_NAME)
    report["artifacts"] = {
        "report": str(out / "report.json"),
        "plot": str(plot),
        "peft_dir": str(paths.peft_dir),
        "gguf": str(paths.gguf_path),
    }
    write_report(report, out)
    return report


__all__ = ["FULL_BUDGET_S", "QUICK_BUDGET_S", "Federation", "InProcessFederation", "run_demo"]
