"""Supervised fine-tuning: the mean cross-entropy over scored tokens, its evaluation on the
validation split, and the fingerprint of an SFT run (config, packed data, base model)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from edge_sdk.training.data import IGNORE_INDEX, Batch, Dataset
from edge_sdk.training.objective import Evaluation, StepOutcome

if TYPE_CHECKING:
    from edge_sdk.training.config import TrainConfig


@dataclass
class EvalResult:
    loss: float
    """Mean cross-entropy per scored token (nats)."""
    perplexity: float
    tokens: int
    """Scored tokens evaluated."""


def _batch_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed loss of a packed batch, each example isolated from the others in its row."""
    return model(
        torch.from_numpy(batch.ids),
        torch.from_numpy(batch.labels),
        reduction="sum",
        position_ids=torch.from_numpy(batch.positions),
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, dataset: Dataset, *, batch_size: int = 4, max_batches: int = 0
) -> EvalResult | None:
    """Token-weighted mean loss and perplexity on the validation split (None when it is empty)."""
    if not len(dataset.val_ids):
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(dataset.val_batches(batch_size)):
            if max_batches and i >= max_batches:
                break
            n = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
            if n == 0:
                continue
            loss = _batch_loss(model, batch)
            total += float(loss)
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        return None
    mean = total / count
    return EvalResult(loss=mean, perplexity=math.exp(min(mean, 50.0)), tokens=count)


def fingerprint(config: TrainConfig, dataset: Dataset, base_id: str = "") -> str:
    """Digest of the config fields, the packed data and the base model id that fix a run."""
    h = hashlib.sha256()
    h.update(json.dumps(config.trajectory_fields(), sort_keys=True, default=list).encode())
    # The positions are part of it: a checkpoint from before packed examples were isolated
    # followed another trajectory and is not resumed as if it were this run.
    for packed in (dataset.train, dataset.val):
        for arr in (packed.ids, packed.labels, packed.positions):
            h.update(np.ascontiguousarray(arr).tobytes())
    h.update(base_id.encode())
    return h.hexdigest()


class SupervisedObjective:
    """Mean cross-entropy over the scored tokens of a step's packed sequences."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.num_examples = dataset.stats.train_examples

    def fingerprint(self, config: TrainConfig, base_id: str) -> str:
        return fingerprint(config, self.dataset, base_id)

    def prepare(self, model: torch.nn.Module, config: TrainConfig) -> None:
        pass

    def consumed(self, config: TrainConfig) -> int:
        return config.batch_size * config.grad_accum

    def step(self, model: torch.nn.Module, position: int, config: TrainConfig) -> StepOutcome:
        micro = config.batch_size
        batches = [
            self.dataset.train_batch(position + k * micro, micro) for k in range(config.grad_accum)
        ]
        # One normalizer for the whole step, so accumulation does not change what is optimized.
        n_scored = sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        loss_sum = 0.0
        for batch in batches:
            loss = _batch_loss(model, batch)
            (loss / max(n_scored, 1)).backward()
            loss_sum += float(loss.detach())
        return StepOutcome(
            loss=loss_sum / max(n_scored, 1),
            tokens=sum(b.ids.size for b in batches),
            target_tokens=n_scored,
        )

    def evaluate(self, model: torch.nn.Module, config: TrainConfig) -> Evaluation | None:
        ev = evaluate(
            model,
            self.dataset,
            batch_size=max(1, config.batch_size),
            max_batches=config.eval_batches,
        )
        return Evaluation(ev.loss, ev.perplexity) if ev else None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
