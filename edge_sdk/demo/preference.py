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

Cost: one model load and one tokenization per process; both figures of an adapter come from
one forward pass over the held-out pairs (`PreferenceEvaluator`); only reported versions are
scored (the last; `--curve`: every even one); and the arms run in 2 worker processes on 2
cores (`experiment(workers=...)`; the figures do not depend on the split).

    python -m edge_sdk.demo.preference [--quick] [--curve] [--workers N] [--set field=value ...]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from edge_sdk.demo.config import DemoConfig
from edge_sdk.demo.tasks import Example, generate

if TYPE_CHECKING:
    import torch

    from edge_sdk.models.transformer import Transformer
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


@dataclass
class PairScores:
    """One adapter's held-out figures from one pass over the held-out pairs."""

    wins: np.ndarray
    """(N,) bool: the judge: every answer token of the chosen (preferred) answer, up to its
    end-of-turn, is the argmax of the teacher-forced logits (= greedy decoding's answer)."""
    logps: torch.Tensor
    """(N, 2) summed answer log-probs (chosen, rejected)."""


class PreferenceEvaluator:
    """The judge and the reward accuracy of adapters in one forward pass over the held-out pairs.

    The chosen row of a held-out pair is exactly the judge's teacher-forced sequence (the same
    chat template, tokens and answer mask: checked at construction), so one (2B, T) forward of
    the chosen and rejected rows gives both the greedy-answer check of
    `edge_sdk.demo.evaluate.TeacherForcedEvaluator` (the same arithmetic: argmax of the
    soft-capped `h @ W.T` over the answer tokens up to the first end-of-turn) and the summed
    answer log-probs of both rows. The reference log-probs come from the same code with the
    adapter bypassed, so the implicit rewards of the base are exactly 0.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        examples: Sequence[Example],
        eval_pairs: PreferenceDataset,
        *,
        batch_size: int = 16,
    ) -> None:
        from edge_sdk.demo.evaluate import END_OF_TURN
        from edge_sdk.training.data import tokenize_record

        if len(examples) != len(eval_pairs.train) or not examples:
            raise ValueError(
                f"`eval_pairs` should hold one pair per held-out example ({len(examples)}), "
                f"got {len(eval_pairs.train)}"
            )
        for i, (ex, pair) in enumerate(zip(examples, eval_pairs.train)):
            (tok,) = tokenize_record(tokenizer, "chat", ex.messages(), f"eval:{i}")
            if not (
                np.array_equal(tok.input_ids, pair.chosen.input_ids)
                and np.array_equal(np.asarray(tok.loss_mask, bool), pair.chosen.loss_mask)
            ):
                raise ValueError(
                    f"held-out pair {i} ({pair.source}): its chosen row is not the judge's "
                    "sequence (tokenization differs); use TeacherForcedEvaluator"
                )
        eot = tokenizer.encode(END_OF_TURN, add_bos=False)
        self.eot_id = eot[0] if len(eot) == 1 else tokenizer.eos_id
        self.model = model
        self.examples = list(examples)
        self.pairs = eval_pairs
        self.batch_size = batch_size
        self._base = self._pass(None)
        self.reference = self._base.logps
        """(N, 2) log-probs of the base model (the DPO reference of every arm)."""

    def _pass(self, adapter: Mapping[str, np.ndarray] | None) -> PairScores:
        import torch

        from edge_sdk.training.data import IGNORE_INDEX
        from edge_sdk.training.dpo import adapter_disabled
        from edge_sdk.training.lora import load_lora_state_dict
        from edge_sdk.training.preferences import _collate

        tf = cast("Transformer", self.model)
        items = self.pairs.train
        n = len(items)
        wins = np.zeros(n, bool)
        logps = torch.zeros((n, 2), dtype=torch.float32)
        if adapter is not None:
            load_lora_state_dict(self.model, adapter, strict=True)
        order = sorted(range(n), key=lambda i: len(items[i].chosen.input_ids))
        was_training = self.model.training
        self.model.eval()
        ctx = adapter_disabled(self.model) if adapter is None else contextlib.nullcontext()
        cap = tf.config.final_logit_softcap
        try:
            with torch.no_grad(), ctx:
                for s in range(0, n, self.batch_size):
                    rows = np.asarray(order[s : s + self.batch_size], dtype=np.int64)
                    b = _collate([items[i] for i in rows], rows, self.pairs.pad_id)
                    h = tf.hidden_states(torch.from_numpy(b.ids))[:, :-1]  # (2B, T-1, d)
                    targets = torch.from_numpy(b.labels[:, 1:])  # (2B, T-1)
                    w = tf.output_weight.to(h.dtype)
                    for r in range(2 * b.pairs):
                        idx = (targets[r] != IGNORE_INDEX).nonzero().squeeze(1)
                        logits = (h[r].index_select(0, idx) @ w.T).float()  # (n, V)
                        if cap:
                            logits = cap * torch.tanh(logits / cap)
                        tgt = targets[r].index_select(0, idx)
                        lp = -torch.nn.functional.cross_entropy(logits, tgt, reduction="sum")
                        pair, col = r % b.pairs, r // b.pairs
                        logps[rows[pair], col] = float(lp)
                        if col == 0:  # the judge: answer tokens up to the first end-of-turn
                            ends = (tgt == self.eot_id).nonzero()
                            last = int(ends[0, 0]) if len(ends) else len(tgt) - 1
                            hit = logits[: last + 1].argmax(-1) == tgt[: last + 1]
                            wins[rows[pair]] = bool(hit.all())
        finally:
            self.model.train(was_training)
        return PairScores(wins, logps)

    def score(self, adapter: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
        """Win rate, wins, per-family win rate and held-out reward accuracy of `adapter`
        (None: the base model, whose implicit rewards are all 0: reward accuracy 0)."""
        from edge_sdk.demo.evaluate import _tally

        scores = self._base if adapter is None else self._pass(adapter)
        margin = (scores.logps[:, 0] - self.reference[:, 0]) - (
            scores.logps[:, 1] - self.reference[:, 1]
        )
        rate, per_family = _tally(scores.wins, self.examples)
        return {
            "win_rate": round(rate, 4),
            "wins": int(scores.wins.sum()),
            "reward_accuracy": round(float((margin > 0).float().mean()), 4),
            "per_family": {k: round(v, 2) for k, v in per_family.items()},
        }


def experiment(
    config: DemoConfig,
    work_dir: Path,
    *,
    arms: Sequence[str] = ARMS,
    clients: Sequence[int] | None = None,
    greedy: bool = False,
    curve: bool = False,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run the arms; returns the figures (also what `fedlm demo --method dpo` writes to
    report.json), with the run's wall time and CPU time (`wall_s`, `cpu_s`: this process and
    its workers) and the load average around it.

    `workers` > 1 runs the arms in that many processes (spawned, one model each: a load takes
    ~2 s), which is what makes the default preset fit 10 minutes on 2 cores: the arms are
    independent and share every seed, so the figures do not depend on how they are split
    (`tests/demo/test_preference.py::test_workers_give_the_same_figures`). None: one worker per
    thread of `config.threads` (default: every core), at most 2. `curve` also scores the
    federation's even versions (4 evaluations instead of 1)."""
    import resource

    t_all, cpu_all = time.perf_counter(), time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_start = os.getloadavg()
    budget = config.threads or os.cpu_count() or 1
    n_workers = min(2, budget) if workers is None else workers
    if n_workers < 1:
        raise ValueError(f"`workers` should be a positive integer, got {workers!r}")
    if n_workers == 1:
        out = _arms(config, work_dir, arms=arms, clients=clients, greedy=greedy, curve=curve)
        out["workers"] = 1
    else:
        out = _parallel(config, work_dir, arms, clients, greedy, curve, n_workers, budget)
    _summarize(out, arms)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    out["wall_s"] = round(time.perf_counter() - t_all, 1)
    out["total_s"] = out["wall_s"]  # the name the first reports used
    out["cpu_s"] = round(time.process_time() - cpu_all + child_cpu, 1)
    out["load_avg"] = {"start": [round(x, 2) for x in load_start],
                       "end": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
    return out


def _summarize(out: dict[str, Any], arms: Sequence[str]) -> None:
    """The targets' figures, from the arms' win counts."""
    if {"base", "federated", "centralized"} <= set(arms):
        # From the win counts, not the rounded rates (9 of 32 against 10 of 32 is 90%, and
        # 0.2812 / 0.3125 would say 89.98%).
        base, fed_w, cen_w = (out[a]["wins"] for a in ("base", "federated", "centralized"))
        out["gap_closed"] = round((fed_w - base) / (cen_w - base), 4) if cen_w > base else None
    if "local" in arms and "federated" in arms and out.get("local_only"):
        best_local = max(v["win_rate"] for v in out["local_only"].values())
        out["beats_every_local"] = out["federated"]["win_rate"] > best_local


def _worker(
    config: DemoConfig,
    work_dir: Path,
    arms: Sequence[str],
    clients: Sequence[int] | None,
    greedy: bool,
    curve: bool,
    threads: int,
    log_level: int | None = None,
) -> dict[str, Any]:
    """One worker process's arms (the entry point of `_parallel`'s processes; `log_level`: the
    parent's, when it logs: a spawned process starts without logging handlers)."""
    import torch

    if log_level is not None:
        logging.basicConfig(level=log_level, format="%(asctime)s %(processName)s: %(message)s")
    torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    out = _arms(config, work_dir, arms=arms, clients=clients, greedy=greedy, curve=curve)
    out["worker"] = {"arms": list(arms), "clients": list(clients or []), "threads": threads,
                     "wall_s": round(time.perf_counter() - t0, 1),
                     "cpu_s": round(time.process_time() - c0, 1)}  # fmt: skip
    return out


def _parallel(
    config: DemoConfig,
    work_dir: Path,
    arms: Sequence[str],
    clients: Sequence[int] | None,
    greedy: bool,
    curve: bool,
    n_workers: int,
    budget: int,
) -> dict[str, Any]:
    """The arms split over `n_workers` processes, merged.

    Measured (quick preset, 2026-12-03, BENCHMARKS.md): the federation (and the base's pass)
    costs about as much CPU as centralized DPO and all local-only clients together (16 short
    runs, each with its own reference pass, plus encoding and aggregation, against 5 runs), so
    the federation and the base get one worker and the other arms the rest; more workers
    spread the local-only clients."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    wanted = [c for c in range(config.clients) if clients is None or c in clients]
    wanted = wanted if "local" in arms else []
    groups: list[tuple[list[str], list[int]]] = [([], []) for _ in range(n_workers)]
    for arm, g in (("federated", 0), ("base", 0), ("centralized", 1 % n_workers)):
        if arm in arms:
            groups[g][0].append(arm)
    others = list(range(1, n_workers)) or [0]
    for i, c in enumerate(wanted):
        groups[others[i % len(others)]][1].append(c)
    jobs = [(a + (["local"] if cs else []), cs) for a, cs in groups if a or cs]
    threads = max(1, budget // len(jobs))
    root = logging.getLogger()
    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(
                _worker,
                config,
                work_dir,
                a,
                cs,
                greedy and "federated" in a,
                curve,
                threads,
                root.getEffectiveLevel() if root.handlers else None,
            )
            for a, cs in jobs
        ]
        parts = [f.result() for f in futures]
    out: dict[str, Any] = {"workers": [p.pop("worker") for p in parts]}
    for part in parts:
        local = part.pop("local_only", {})
        out.update(part)
        if local:
            out.setdefault("local_only", {}).update(local)
    if "local_only" in out:
        out["local_only"] = dict(sorted(out["local_only"].items(), key=lambda kv: int(kv[0])))
    out["threads"] = threads
    return out


def _arms(
    config: DemoConfig,
    work_dir: Path,
    *,
    arms: Sequence[str],
    clients: Sequence[int] | None,
    greedy: bool,
    curve: bool,
) -> dict[str, Any]:
    """The arms in this process (see `experiment`), one model and one tokenization for all."""
    import torch

    from edge_sdk.demo.simulate import initial_global, simulate_federation, train_run
    from edge_sdk.demo.simulate import train_config as demo_train_config
    from edge_sdk.models import resolve
    from edge_sdk.training.tokenizer import load_tokenizer
    from edge_sdk.training.trainer import load_for_training

    if config.method != "dpo":
        raise ValueError(f"`method` should be 'dpo' for the preference demo, got {config.method!r}")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise ValueError(f"`arms` should be among {ARMS}, got {unknown}")
    model_path = resolve(config.model)
    data = generate(config.task_config())
    tokenizer = load_tokenizer(model_path)
    datasets = [pair_dataset(ex, tokenizer, config) for ex in data.clients]
    eval_pairs = pair_dataset(data.eval, tokenizer, config)
    model = load_for_training(model_path, demo_train_config(config, 1))
    judge = PreferenceEvaluator(model, tokenizer, data.eval, eval_pairs)
    init = initial_global(model, config)
    out: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "threads": torch.get_num_threads(),
        "pairs_per_client": [len(d.train) for d in datasets],
        "eval_pairs": len(eval_pairs.train),
        "example_pair": dataclasses.asdict(preference_pair(data.eval[0])),
    }
    adapters: dict[str, dict[str, np.ndarray]] = {}
    steps = config.total_local_steps
    if "base" in arms:
        out["base"] = judge.score(None)
    if "local" in arms:
        local = {}
        for c, ds in enumerate(datasets):
            if clients is not None and c not in clients:
                continue
            run = train_run(model, ds, config, init, steps, seed=config.seed * 1000 + 7 + c)
            local[str(c)] = judge.score(run.adapter) | {"train_s": round(run.seconds, 1)}
            logger.info("local-only client %d: %s", c, local[str(c)])
        out["local_only"] = local
    if "federated" in arms:
        points: list[dict[str, Any]] = []

        def on_version(v: int, tensors: dict[str, np.ndarray]) -> None:
            # Only the reported versions are scored: the last one, and the even ones for --curve.
            if v == config.rounds or (curve and v % 2 == 0):
                points.append({"version": v} | judge.score(tensors))
                logger.info("global version %d: %s", v, points[-1])

        fed = simulate_federation(model, datasets, config, on_version=on_version)
        adapters["federated"] = fed.versions[-1]
        out["federated"] = points[-1] | {"train_s": round(fed.seconds, 1)}
        out["curve"] = [
            {k: p[k] for k in ("version", "win_rate", "reward_accuracy")} for p in points
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
        out["centralized"] = judge.score(cen.adapter) | {"train_s": round(cen.seconds, 1)}
    if greedy and "federated" in adapters:
        out["greedy_llama_cpp"] = _greedy(model, model_path, adapters["federated"], data.eval,
                                          config, work_dir)  # fmt: skip
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
    """The preference demo's quick preset, a smoke run: fewer rounds, pairs and held-out
    prompts. It does not show the targets (32 held-out prompts make one prompt 3 points)."""
    return config.replace(rounds=4, train_per_client=48, eval_per_family=8)


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - an experiment driver
    import argparse
    import tempfile

    from edge_sdk.demo.simulate import _parse_value

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke preset (misses the targets)")
    parser.add_argument("--greedy", action="store_true", help="also judge llama.cpp greedy answers")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--clients", default="", help="local-only clients to run (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in all (default: "
                        "every core)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per "
                        "thread, at most 2)")  # fmt: skip
    parser.add_argument("--curve", action="store_true", help="also score versions 2, 4, ...")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = DemoConfig.preference()
    if args.quick:
        config = quick(config)
    changes = dict(item.split("=", 1) for item in args.set)
    config = config.replace(**{k: _parse_value(v) for k, v in changes.items()})
    if args.threads:
        config = config.replace(threads=args.threads)
    if config.threads and (args.workers or min(2, config.threads)) == 1:
        import torch

        torch.set_num_threads(config.threads)
    with tempfile.TemporaryDirectory(prefix="fedlm-dpo-") as tmp:
        result = experiment(
            config, Path(tmp), arms=args.arms.split(","), greedy=args.greedy, curve=args.curve,
            clients=[int(c) for c in args.clients.split(",")] if args.clients else None,
            workers=args.workers,
        )  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
