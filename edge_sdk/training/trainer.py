"""LoRA / QLoRA fine-tuning: plain functions, `setup -> fit -> evaluate -> export`.

- Only adapter parameters train (AdamW), with linear warmup and cosine decay
  (`edge_sdk.training.schedule`), gradient accumulation and clipping.
- One loop (`Trainer`) for every method; what is trained on and how the loss is computed is
  an `Objective`'s (`edge_sdk.training.objective`): SFT in `edge_sdk.training.sft` (the mean
  cross-entropy over scored tokens of an optimizer step, all its micro-batches together, so
  accumulation does not change what is optimized), DPO and IPO in `edge_sdk.training.dpo`
  (`TrainConfig(method="dpo")`).
- Deterministic: the adapter init is a seeded numpy draw (independent of device and of which
  modules are adapted), the data order is a pure function of (seed, epoch), and dropout draws
  from torch's generator, seeded here and saved in checkpoints. A resumed run reproduces an
  uninterrupted one bit for bit on the same machine.

Library use (the federated client): load the model once, then
`fit(model, dataset, TrainConfig(..., lora=LoraConfig(freeze_a=True)), init_adapter=global_adapter)`
returns the new adapter as numpy arrays plus metrics. The CLI uses `run()`
(`edge_sdk.training.pipeline`), which adds loading, checkpoints and export of both adapter formats.

The other parts of a run: `TrainConfig` (`config`), the model and its starting adapter
(`model_setup`), where a run is and its checkpoint (`run_state`; the file format is
`checkpoint`'s), the progress bar (`progress`). This module re-exports the names callers
import from it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from edge_sdk.training.adamw import AdapterAdamW
from edge_sdk.training.config import TrainConfig
from edge_sdk.training.data import Dataset
from edge_sdk.training.errors import CheckpointError, TrainingError
from edge_sdk.training.lora import load_lora_state_dict, lora_modules, lora_parameters
from edge_sdk.training.model_setup import (
    adapter_arrays,
    adapter_shapes,
    check_lora_layers,
    load_for_training,
    seeded_adapter,
)
from edge_sdk.training.objective import Evaluation, Objective, StepOutcome
from edge_sdk.training.pipeline import run
from edge_sdk.training.progress import ProgressBar
from edge_sdk.training.run_state import RunCheckpoint, RunState
from edge_sdk.training.schedule import lr_at
from edge_sdk.training.sft import SupervisedObjective

if TYPE_CHECKING:
    from edge_sdk.training.preferences import PreferenceDataset

logger = logging.getLogger(__name__)

__all__ = [
    "Evaluation",
    "StepOutcome",
    "TrainConfig",
    "TrainMetrics",
    "TrainResult",
    "Trainer",
    "adapter_shapes",
    "fit",
    "load_for_training",
    "run",
    "seeded_adapter",
]


@dataclass
class TrainMetrics:
    """What a run did; `num_examples`/`num_tokens` are what a federated strategy weighs by."""

    num_examples: int
    """Training examples (records; dpo: pairs) available to the run."""
    num_tokens: int
    """Tokens processed in training (sft: batch * seq_len per micro-batch, padding included;
    dpo: the tokens of the chosen and rejected sequences, padding excluded)."""
    num_target_tokens: int
    """Scored tokens processed in training."""
    steps: int
    train_loss: float
    """Mean loss over the last min(10, steps) steps."""
    eval_loss_before: float | None
    eval_loss: float | None
    perplexity: float | None
    seconds: float
    """Wall time of the optimization (excluding model loading)."""
    tokens_per_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    """Per-step records: step, loss, lr, tokens/s, the method's own metrics (dpo: reward
    accuracy and margin, chosen and rejected log-probs), and eval loss where evaluated."""
    eval_metrics_before: dict[str, float] = field(default_factory=dict)
    """The method's own evaluation metrics before training (dpo: reward_accuracy, ...)."""
    eval_metrics: dict[str, float] = field(default_factory=dict)
    """The method's own evaluation metrics after training."""


@dataclass
class TrainResult:
    adapter: dict[str, np.ndarray]
    """Naming-convention LoRA tensors, float32: A (r, in), B (out, r)."""
    metrics: TrainMetrics


class Trainer:
    """One training run of the model's LoRA layers: the loop every method shares.

    `fit()` goes through its stages in order: load the starting adapter and build the
    optimizer, restore a checkpoint or prepare a fresh run, evaluate before training, run the
    optimizer steps (checkpointing every `config.checkpoint_every`), evaluate, and write the
    last checkpoint. What is trained on, and how the loss is computed, is the `Objective`'s.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        objective: Objective,
        config: TrainConfig,
        *,
        checkpoint_path: str | os.PathLike[str] | None = None,
        base_id: str = "",
        progress: bool = False,
        on_step: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        check_lora_layers(model, config)
        self.model, self.objective, self.config = model, objective, config
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.base_id, self.progress, self.on_step = base_id, progress, on_step
        self.state = RunState()
        self.params: list[torch.nn.Parameter] = []
        self.optimizer: AdapterAdamW | None = None
        self.checkpoint: RunCheckpoint | None = None

    # -- stages -----------------------------------------------------------------------------

    def fit(
        self, *, init_adapter: Mapping[str, np.ndarray] | None = None, resume: bool = False
    ) -> TrainResult:
        self._load_start(init_adapter)
        digest = self.objective.fingerprint(self.config, self.base_id)
        if self.checkpoint_path is not None:
            assert self.optimizer is not None
            self.checkpoint = RunCheckpoint(
                self.checkpoint_path, digest, self.model, self.optimizer, self.objective
            )
        if resume:
            self._restore()
        else:
            self.objective.prepare(self.model, self.config)
        if self.state.step > self.config.steps:
            raise CheckpointError(
                f"checkpoint is at step {self.state.step}, past the configured "
                f"{self.config.steps} steps"
            )
        if self.state.step == 0 and self.state.eval_before is None:
            self.state.eval_before = self.objective.evaluate(self.model, self.config)
            if self.state.eval_before:
                logger.info("eval before training: %s", self.state.eval_before.describe())
        self._loop()
        return self._finish()

    def _load_start(self, init_adapter: Mapping[str, np.ndarray] | None) -> None:
        """The seeded adapter (or `init_adapter` where given), trainable params, AdamW."""
        config = self.config
        torch.manual_seed(config.seed)
        start = seeded_adapter(adapter_shapes(self.model), config.lora.rank, config.seed)
        if init_adapter is not None:
            start.update({k: np.asarray(v, dtype=np.float32) for k, v in init_adapter.items()})
        load_lora_state_dict(self.model, start, strict=True)
        for _, m in lora_modules(self.model):
            m.lora_A.requires_grad_(not config.lora.freeze_a)
            m.lora_B.requires_grad_(True)
        self.params = lora_parameters(self.model)
        # Not torch.optim.AdamW: same arithmetic and state dict, without importing torch._dynamo.
        self.optimizer = AdapterAdamW(
            self.params,
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=(0.9, 0.999),
            eps=1e-8,
        )

    def _restore(self) -> None:
        if self.checkpoint is None:
            raise ValueError("resume=True needs a checkpoint_path")
        self.state = self.checkpoint.restore()
        logger.info(
            "resumed from %s at step %d/%d",
            self.checkpoint_path,
            self.state.step,
            self.config.steps,
        )

    def _checkpoint(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.save(self.state)

    def _loop(self) -> None:
        config, state = self.config, self.state
        bar = ProgressBar(config.steps, state.step, self.progress)
        self.model.train()
        try:
            while state.step < config.steps:
                record = self._step()
                if (
                    config.eval_every
                    and state.step % config.eval_every == 0
                    and state.step < config.steps
                ):
                    ev = self.objective.evaluate(self.model, config)
                    if ev:
                        record.update(_eval_record(ev))
                        bar.note(f"step {state.step}: eval {ev.describe()}")
                state.history.append(record)
                extra = {k: f"{v:.3g}" for k, v in record.items() if k in _BAR_METRICS}
                bar.update(
                    record["loss"], state.tokens / state.elapsed if state.elapsed else 0.0,
                    record["lr"], extra,
                )  # fmt: skip
                if self.on_step is not None:
                    self.on_step(record)
                if (
                    config.checkpoint_every
                    and state.step % config.checkpoint_every == 0
                    and state.step < config.steps
                ):
                    self._checkpoint()
        finally:
            bar.close()

    def _step(self) -> dict[str, float]:
        """One optimizer step; returns its history record."""
        config, state = self.config, self.state
        assert self.optimizer is not None
        t0 = time.perf_counter()
        lr = lr_at(
            state.step,
            base_lr=config.lr,
            warmup=config.warmup,
            total=config.steps,
            min_ratio=config.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        out = self.objective.step(self.model, state.position, config)
        if not math.isfinite(out.loss):
            raise TrainingError(
                f"loss became {out.loss} at step {state.step + 1}; try a lower --lr"
            )
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
        self.optimizer.step()
        state.step += 1
        state.position += self.objective.consumed(config)
        state.tokens += out.tokens
        state.target_tokens += out.target_tokens
        dt = time.perf_counter() - t0
        state.elapsed += dt
        return {
            "step": state.step,
            "loss": out.loss,
            "lr": lr,
            "tokens_per_s": out.tokens / dt,
            **out.metrics,
        }

    def _finish(self) -> TrainResult:
        state = self.state
        self.model.eval()
        final = self.objective.evaluate(self.model, self.config)
        if final is not None and state.history:
            state.history[-1].update(_eval_record(final))
        self._checkpoint()
        recent = [h["loss"] for h in state.history[-10:]]
        before = state.eval_before
        metrics = TrainMetrics(
            num_examples=self.objective.num_examples,
            num_tokens=state.tokens,
            num_target_tokens=state.target_tokens,
            steps=state.step,
            train_loss=float(np.mean(recent)) if recent else float("nan"),
            eval_loss_before=before.loss if before else None,
            eval_loss=final.loss if final else None,
            perplexity=final.perplexity if final else None,
            seconds=state.elapsed,
            tokens_per_s=state.tokens / state.elapsed if state.elapsed else 0.0,
            history=state.history,
            eval_metrics_before=dict(before.metrics) if before else {},
            eval_metrics=dict(final.metrics) if final else {},
        )
        return TrainResult(adapter=adapter_arrays(self.model), metrics=metrics)


_BAR_METRICS = ("reward_accuracy", "reward_margin")


def _eval_record(ev: Evaluation) -> dict[str, float]:
    return {"eval_loss": ev.loss, **{f"eval_{k}": v for k, v in ev.metrics.items()}}


def fit(
    model: torch.nn.Module,
    dataset: Dataset | PreferenceDataset,
    config: TrainConfig,
    *,
    init_adapter: Mapping[str, np.ndarray] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    base_id: str = "",
    progress: bool = False,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train the model's LoRA layers on `dataset` and return the adapter and metrics.

    `config.method` says how: "sft" takes a `Dataset` (packed examples), "dpo" a
    `PreferenceDataset` (pairs; see `edge_sdk.training.dpo`).
    `init_adapter` (e.g. the federation's global adapter) replaces the seeded init for the
    modules it covers; with `config.lora.freeze_a` only B trains.
    With `checkpoint_path`, a checkpoint is written every `config.checkpoint_every` steps and at
    the end; `resume=True` continues from it (refused when `fingerprint` differs).
    """
    objective: Objective
    if config.method == "dpo":
        from edge_sdk.training.dpo import DpoObjective
        from edge_sdk.training.preferences import PreferenceDataset

        if not isinstance(dataset, PreferenceDataset):
            raise TypeError(
                f"method 'dpo' trains on a PreferenceDataset, got {type(dataset).__name__}"
            )
        objective = DpoObjective(dataset)
    else:
        if not isinstance(dataset, Dataset):
            raise TypeError(f"method 'sft' trains on a Dataset, got {type(dataset).__name__}")
        objective = SupervisedObjective(dataset)
    trainer = Trainer(
        model,
        objective,
        config,
        checkpoint_path=checkpoint_path,
        base_id=base_id,
        progress=progress,
        on_step=on_step,
    )
    return trainer.fit(init_adapter=init_adapter, resume=resume)
