"""What a training method plugs into the shared loop: the `Objective` protocol and the
records it returns (`StepOutcome` per optimizer step, `Evaluation` per evaluation)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from edge_sdk.training.config import TrainConfig


@dataclass
class Evaluation:
    """One evaluation on the validation split."""

    loss: float
    perplexity: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """The method's own metrics by name (recorded in the history as `eval_<name>`)."""

    def describe(self) -> str:
        parts = [f"loss {self.loss:.4f}"]
        if self.perplexity is not None:
            parts.append(f"perplexity {self.perplexity:.2f}")
        parts += [f"{k.replace('_', ' ')} {v:.4f}" for k, v in self.metrics.items()]
        return ", ".join(parts)


@dataclass
class StepOutcome:
    """What one optimizer step's forward and backward passes did (gradients are accumulated)."""

    loss: float
    """The step's mean loss (per scored token for sft, per pair for dpo)."""
    tokens: int
    target_tokens: int
    metrics: dict[str, float] = field(default_factory=dict)
    """The method's own per-step metrics, recorded in the history."""


class Objective(Protocol):
    """What a training method adds to the shared loop: data, loss, evaluation, extra state."""

    num_examples: int

    def fingerprint(self, config: TrainConfig, base_id: str) -> str:
        """Digest of everything that fixes the run's trajectory (see `fingerprint`)."""
        ...

    def prepare(self, model: torch.nn.Module, config: TrainConfig) -> None:
        """Called once on a fresh run, after the starting adapter is loaded (dpo: reference
        log-probs); a resumed run gets `load_state_dict` instead."""
        ...

    def step(self, model: torch.nn.Module, position: int, config: TrainConfig) -> StepOutcome:
        """Forward and backward (accumulating gradients) over one step's micro-batches,
        starting at training item `position`; `consumed(config)` items are used."""
        ...

    def consumed(self, config: TrainConfig) -> int:
        """Training items (sequences, pairs) one optimizer step uses."""
        ...

    def evaluate(self, model: torch.nn.Module, config: TrainConfig) -> Evaluation | None: ...

    def state_dict(self) -> dict[str, Any]:
        """Extra checkpoint content (tensors and plain containers only)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
