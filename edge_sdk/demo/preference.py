"""`fedlm demo --method dpo`: federated DPO on seeded, checkable, non-IID preferences.

The task: the rule prompts of `edge_sdk.demo.tasks` (`date: 2023-04-17`), each with two answers
that carry the same content in two formats. Each client's users prefer one format per family
(`17.04.2023` over `04/17/2023`, `(555) 123-4567` over `555-123-4567`, ...): the chosen answer
is the rule's, the rejected one a near miss. As in the SFT demo, client c draws 90% of its
prompts from its own family, so every client's users mostly teach one preference (non-IID).

The judge is programmatic: a greedy answer wins when it is exactly the preferred format
(teacher-forced argmax over the answer tokens = what greedy decoding produces; `--greedy`
confirms base and federated in llama.cpp). Reported for base, each client alone (local-only:
the federation's steps on its own pairs), the federation (the coordinator's aggregation of
wire-encoded updates, in-process) and centralized DPO on the pooled pairs (the same steps at
clients x the batch): the judged win rate, and the held-out reward accuracy (the share of
held-out pairs whose implicit reward β·(log π − log π_ref) ranks chosen above rejected; the
reference is the base model, so the base scores 0 by definition: no pair is ranked).

    python -m edge_sdk.demo.preference [--quick] [--set field=value ...]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk.demo.config import DemoConfig
from edge_sdk.demo.tasks import Example, generate

if TYPE_CHECKING:
    import torch

    from edge_sdk.training.preferences import PreferenceDataset, PreferencePair
    from edge_sdk.training.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ARMS = ("base", "local", "federated", "centralized")


def _rejected(family: str, x: str) -> str:
    """The near-miss format of `family` for input `x` (what these users reject)."""
    if family == "date":
        y, m, d = x.split("-")
        return f"{m}/{d}/{y}"
    if family == "phone":
        return f"{x[:3]}-{x[3:6]}-{x[6:]}"
    if family == "cite":
        first, last = x.split(" ", 1)
        return f"{first[0]}. {last}"
    if family == "list":
        return ", ".join(x.split())
    if family == "rev":
        return x
    if family == "abbr":
        return "".join(n[0] for n in x.split())
    if family == "snake":
        return "-".join(w.lower() for w in x.split())
    if family == "tag":
        tag, word = x.split(" ", 1)
        return f"[{tag}]{word}[/{tag}]"
    raise ValueError(f"no rejected format for family {family!r}")


def preference_pair(example: Example) -> PreferencePair:
    """The pair of one rule example: its answer chosen, the family's near miss rejected."""
    from edge_sdk.training.preferences import PreferencePair

    x = example.prompt.split(": ", 1)[1]
    return PreferencePair(
        prompt=tuple(example.messages(with_answer=False)),
        chosen=example.answer,
        rejected=_rejected(example.family, x),
        source=f"{example.family}:{x}",
    )


def pair_dataset(
    examples: Sequence[Example], tokenizer: Tokenizer, config: DemoConfig
) -> PreferenceDataset:
    from edge_sdk.training.data import DataConfig
    from edge_sdk.training.preferences import build_preference_dataset

    pairs = [preference_pair(e) for e in examples]
    return build_preference_dataset(
        pairs, tokenizer, DataConfig(seq_len=config.seq_len, val_fraction=0.0, seed=config.seed)
    )


def reward_accuracy(
    model: torch.nn.Module,
    eval_pairs: PreferenceDataset,
    reference: torch.Tensor,
    adapter: Mapping[str, np.ndarray] | None,
) -> float:
    """Share of held-out pairs whose implicit reward ranks chosen above rejected (strictly)."""
    from edge_sdk.training.dpo import reference_logps
    from edge_sdk.training.lora import load_lora_state_dict

    if adapter is None:
        return 0.0  # the policy is the reference: every implicit reward is 0, no pair ranked
    load_lora_state_dict(model, adapter, strict=True)
    policy = reference_logps(model, eval_pairs, "train", reference="start", batch_size=16)
    margin = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    return float((margin > 0).float().mean())


def experiment(
    config: DemoConfig,
    work_dir: Path,
    *,
    arms: Sequence[str] = ARMS,
    clients: Sequence[int] | None = None,
    greedy: bool = False,
) -> dict[str, Any]:
    """The arms in this process; returns the figures (also what `fedlm demo --method dpo`
    writes to report.json). Arms (and local-only `clients`) can run in separate processes
    and be merged: they share every seed."""
    import torch

    from edge_sdk.demo.evaluate import TeacherForcedEvaluator
    from edge_sdk.demo.simulate import initial_global, simulate_federation, train_config, train_run
    from edge_sdk.models import resolve
    from edge_sdk.training.dpo import reference_logps
    from edge_sdk.training.tokenizer import load_tokenizer
    from edge_sdk.training.trainer import load_for_training

    if config.method != "dpo":
        raise ValueError(f"`method` should be 'dpo' for the preference demo, got {config.method!r}")
    t_all, cpu_all = time.perf_counter(), time.process_time()
    model_path = resolve(config.model)
    data = generate(config.task_config())
    tokenizer = load_tokenizer(model_path)
    datasets = [pair_dataset(ex, tokenizer, config) for ex in data.clients]
    eval_pairs = pair_dataset(data.eval, tokenizer, config)
    model = load_for_training(model_path, train_config(config, 1))
    judge = TeacherForcedEvaluator(model, tokenizer, data.eval)
    reference = reference_logps(model, eval_pairs, "train", reference="base", batch_size=16)
    init = initial_global(model, config)
    out: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "threads": torch.get_num_threads(),
        "pairs_per_client": [len(d.train) for d in datasets],
        "eval_pairs": len(eval_pairs.train),
        "example_pair": dataclasses.asdict(preference_pair(data.eval[0])),
    }
    adapters: dict[str, dict[str, np.ndarray]] = {}

    def rec(adapter: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
        s = judge.score(adapter)
        return {
            "win_rate": round(s.exact_match, 4),
            "wins": round(s.exact_match * len(data.eval)),
            "reward_accuracy": round(reward_accuracy(model, eval_pairs, reference, adapter), 4),
            "per_family": {k: round(v, 2) for k, v in s.per_family.items()},
        }

    steps = config.total_local_steps
    if "base" in arms:
        out["base"] = rec(None)
    if "local" in arms:
        local = {}
        for c, ds in enumerate(datasets):
            if clients is not None and c not in clients:
                continue
            run = train_run(model, ds, config, init, steps, seed=config.seed * 1000 + 7 + c)
            local[str(c)] = rec(run.adapter) | {"train_s": round(run.seconds, 1)}
            logger.info("local-only client %d: %s", c, local[str(c)])
        out["local_only"] = local
    if "federated" in arms:
        curve: list[dict[str, Any]] = []

        def on_version(v: int, tensors: dict[str, np.ndarray]) -> None:
            if v == config.rounds or v % 2 == 0:
                curve.append({"version": v} | rec(tensors))
                logger.info("global version %d: %s", v, curve[-1])

        fed = simulate_federation(model, datasets, config, on_version=on_version)
        adapters["federated"] = fed.versions[-1]
        out["federated"] = curve[-1] | {"train_s": round(fed.seconds, 1)}
        out["curve"] = [
            {k: c[k] for k in ("version", "win_rate", "reward_accuracy")} for c in curve
        ]
        out["bytes_sent"] = fed.bytes_sent
    if "centralized" in arms:
        from edge_sdk.training.preferences import PreferenceDataset

        pooled = PreferenceDataset(
            train=[p for d in datasets for p in d.train], val=[], seed=config.seed,
            pad_id=datasets[0].pad_id, stats=datasets[0].stats,
        )  # fmt: skip
        cen = train_run(model, pooled, config, init, steps, seed=config.seed * 1000 + 99,
                        batch_size=config.batch_size * config.clients)  # fmt: skip
        out["centralized"] = rec(cen.adapter) | {"train_s": round(cen.seconds, 1)}
    if {"base", "federated", "centralized"} <= set(arms):
        # From the win counts, not the rounded rates (9 of 32 against 10 of 32 is 90%, and
        # 0.2812 / 0.3125 would say 89.98%).
        base, fed_w, cen_w = (out[a]["wins"] for a in ("base", "federated", "centralized"))
        out["gap_closed"] = round((fed_w - base) / (cen_w - base), 4) if cen_w > base else None
    if "local" in arms and "federated" in arms:
        best_local = max(v["win_rate"] for v in out["local_only"].values())
        out["beats_every_local"] = out["federated"]["win_rate"] > best_local
    if greedy and "federated" in adapters:
        out["greedy_llama_cpp"] = _greedy(model, model_path, adapters["federated"], data.eval,
                                          config, work_dir)  # fmt: skip
    out["total_s"] = round(time.perf_counter() - t_all, 1)
    out["cpu_s"] = round(time.process_time() - cpu_all, 1)  # wall time on a shared machine lies
    return out


def _greedy(
    model: torch.nn.Module,
    model_path: Path,
    adapter: Mapping[str, np.ndarray],
    examples: Sequence[Example],
    config: DemoConfig,
    work_dir: Path,
) -> dict[str, float]:
    """The judge on real greedy answers of llama.cpp: base, and the federated adapter as GGUF."""
    from edge_sdk.adapters.gguf_lora import BaseModelInfo, write_gguf_lora
    from edge_sdk.demo.evaluate import GreedyEvaluator

    path = work_dir / "federated-dpo.gguf"
    work_dir.mkdir(parents=True, exist_ok=True)
    write_gguf_lora(
        path, dict(adapter), alpha=config.alpha, base=BaseModelInfo.from_gguf(model_path)
    )
    with GreedyEvaluator(model_path, examples, n_threads=config.threads) as greedy:
        return {
            "base": round(greedy.score(None).exact_match, 4),
            "federated": round(greedy.score(path).exact_match, 4),
        }


def quick(config: DemoConfig) -> DemoConfig:
    """The preference demo's quick preset: fewer rounds and pairs."""
    return config.replace(rounds=4, train_per_client=48, eval_per_family=8)


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - an experiment driver
    import argparse
    import tempfile

    from edge_sdk.demo.simulate import _parse_value

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--greedy", action="store_true", help="also judge llama.cpp greedy answers")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--clients", default="", help="local-only clients to run (default: all)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = DemoConfig.preference()
    if args.quick:
        config = quick(config)
    changes = dict(item.split("=", 1) for item in args.set)
    config = config.replace(**{k: _parse_value(v) for k, v in changes.items()})
    with tempfile.TemporaryDirectory(prefix="fedlm-dpo-") as tmp:
        result = experiment(
            config, Path(tmp), arms=args.arms.split(","), greedy=args.greedy,
            clients=[int(c) for c in args.clients.split(",")] if args.clients else None,
        )  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
