"""Training checkpoints: everything a killed run needs to continue as if never stopped.

One file, `checkpoint.pt` in the output directory, holding:

- `adapter`: the LoRA tensors (naming-convention keys, fp32);
- `optimizer`: the AdamW state dict (moments and step counts);
- `step`, `position`: optimizer steps done and training sequences consumed (the data order is a
  pure function of (seed, epoch), so the position is the whole data state);
- `rng`: torch's CPU generator state (and CUDA's when present): dropout draws from it;
- `history`, `tokens`, `elapsed`: metrics so far, so the final report covers the whole run;
- `fingerprint`: a digest of everything that shapes the trajectory (config, data, base model);
  resuming with a different one is refused.

The file is written to a temporary name in the same directory, flushed to disk, and renamed
over the old one (`os.replace` is atomic on POSIX and Windows), so a kill at any moment leaves
either the previous checkpoint or the new one, never a torn file. Loading uses
`torch.load(weights_only=True)`: tensors and plain containers only, no pickled code.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from edge_sdk.training.errors import CheckpointError

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1
_REQUIRED = (
    "version",
    "fingerprint",
    "step",
    "position",
    "tokens",
    "elapsed",
    "adapter",
    "optimizer",
    "rng",
    "history",
)


def rng_state() -> dict[str, Any]:
    """The generator states that training consumes (dropout)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write `state` (see the module docstring for its keys) atomically to `path`."""
    missing = [k for k in _REQUIRED if k not in state and k != "version"]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.debug("checkpoint at step %d -> %s", state["step"], dest)
    return dest


def load_checkpoint(path: str | os.PathLike[str], fingerprint: str | None = None) -> dict[str, Any]:
    """Read and validate a checkpoint; `fingerprint`, when given, must match the stored one."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no checkpoint to resume from")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/EOFError on bad files
        raise CheckpointError(
            f"{p}: unreadable checkpoint ({exc.__class__.__name__}: {exc})"
        ) from exc
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED):
        raise CheckpointError(f"{p}: not a fedlm training checkpoint")
    if state["version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format {state['version']}, expected {FORMAT_VERSION}"
        )
    if fingerprint is not None and state["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"{p}: checkpoint was written by a run with another configuration, data or base model; "
            "resume with the same arguments (a run from before `--compute auto` became the "
            "default computed in fp32: add `--compute fp32`), or start afresh in another output "
            "directory"
        )
    return state
