"""Where a run is (`RunState`), and the checkpoint of a run (`RunCheckpoint`): the state with
the adapter, AdamW, the RNG and the objective's own state, written and put back together. The
file format itself is `edge_sdk.training.checkpoint`'s."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edge_sdk.training.adamw import AdapterAdamW
from edge_sdk.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from edge_sdk.training.lora import load_lora_state_dict
from edge_sdk.training.model_setup import adapter_arrays
from edge_sdk.training.objective import Evaluation, Objective


@dataclass
class RunState:
    """Where a run is: everything besides the adapter, optimizer and RNG that a checkpoint
    must hold for a resumed run to continue as if never stopped."""

    step: int = 0
    """Optimizer steps done."""
    position: int = 0
    """Training items (sequences, or pairs) consumed: with the seed, the whole data state."""
    tokens: int = 0
    target_tokens: int = 0
    elapsed: float = 0.0
    """Seconds spent in optimizer steps so far."""
    history: list[dict[str, float]] = field(default_factory=list)
    eval_before: Evaluation | None = None

    def to_checkpoint(self) -> dict[str, Any]:
        ev = self.eval_before
        return {
            "step": self.step,
            "position": self.position,
            "tokens": self.tokens,
            "target_tokens": self.target_tokens,
            "elapsed": self.elapsed,
            "history": self.history,
            "eval_before": ev.loss if ev else None,
            "eval_metrics_before": dict(ev.metrics) if ev else {},
        }

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any]) -> RunState:
        loss = state.get("eval_before")
        ev = None
        if loss is not None:
            ev = Evaluation(float(loss), metrics=dict(state.get("eval_metrics_before") or {}))
        return cls(
            step=int(state["step"]),
            position=int(state["position"]),
            tokens=int(state["tokens"]),
            target_tokens=int(state.get("target_tokens", 0)),
            elapsed=float(state["elapsed"]),
            history=list(state["history"]),
            eval_before=ev,
        )


@dataclass
class RunCheckpoint:
    """The checkpoint of one run: what `save` writes and `restore` puts back, besides the
    `RunState`, is the model's adapter, the optimizer, torch's RNG and the objective's state."""

    path: Path
    fingerprint: str
    """The run's `Objective.fingerprint`: a checkpoint with another one is not restored."""
    model: torch.nn.Module
    optimizer: AdapterAdamW
    objective: Objective

    def save(self, state: RunState) -> None:
        """Write everything a resumed run needs to continue as if never stopped."""
        extra = self.objective.state_dict()
        save_checkpoint(
            self.path,
            {
                "fingerprint": self.fingerprint,
                **state.to_checkpoint(),
                "adapter": {k: torch.from_numpy(v) for k, v in adapter_arrays(self.model).items()},
                "optimizer": self.optimizer.state_dict(),
                "rng": rng_state(),
                **({"objective": extra} if extra else {}),
            },
        )

    def restore(self) -> RunState:
        """Load the checkpoint (refused unless its fingerprint matches) into the adapter, the
        optimizer, torch's RNG and the objective; returns where the run was."""
        saved = load_checkpoint(self.path, fingerprint=self.fingerprint)
        load_lora_state_dict(self.model, saved["adapter"], strict=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"])
        self.objective.load_state_dict(saved.get("objective") or {})
        return RunState.from_checkpoint(saved)
