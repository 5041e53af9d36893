"""`RunState`: where a run is, and how that is written to and read from a checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_sdk.training.objective import Evaluation


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
