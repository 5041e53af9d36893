"""What a run reports: `RoundReport` per local round, `RunSummary` at the end."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class RoundReport:
    """One local round: what was trained and what the coordinator said."""

    round: int
    base_version: int
    update_id: str
    steps: int
    resumed_from_step: int
    """0 for a fresh round; k when training continued from a checkpoint at step k."""
    train_loss: float
    update_bytes: int
    outcome: str
    """How the coordinator settled the update: accepted, duplicate, stale or task_complete."""
    seconds: float


@dataclass
class RunSummary:
    """How a `run()` ended."""

    coordinator: str
    task_id: str
    client_id: str
    reason: str
    """`task_complete`, `max_rounds`, or `stopped`."""
    rounds: list[RoundReport]
    global_version: int
    """Newest global version received."""
    adapter_path: Path | None
    """GGUF LoRA of that version (what the runtime serves when one is attached)."""
