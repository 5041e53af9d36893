"""Where the demo's federated adapter comes from: the backend contract and its result.

Two backends exist, each beside what it runs:

- `edge_sdk.demo.network.NetworkFederation` (what `fedlm demo` uses): a coordinator process
  and one `fedlm join` process per client file. It satisfies `Federation`: it needs the
  clients' data files, never the demo's loaded model.
- `edge_sdk.demo.simulate.InProcessFederation` (`fedlm demo --in-process`): the coordinator's
  aggregation over wire-encoded updates trained in this process. It is built from the demo's
  loaded model and tokenized datasets, so `run_demo` builds it when no `Federation` is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from edge_sdk.demo.config import DemoConfig

Tensors = dict[str, np.ndarray]

OnVersion = Callable[[int, Tensors], None]
"""`on_version(v, adapter)`: called for every published global version v >= 1, in order."""


@dataclass
class FederationRecord:
    """A federation's trajectory."""

    versions: list[Tensors]
    """Global adapter of every version, 0..rounds."""
    bytes_sent: list[int]
    """Update bytes each client sent (wire-encoded bodies)."""
    fp32_bytes: list[int]
    """What plain federated LoRA would send for the same rounds: every A and B tensor in fp32."""
    client_loss: list[list[float]] = field(default_factory=list)
    """Per round, each client's mean training loss."""
    tokens: int = 0
    seconds: float = 0.0
    aggregation_s: float = 0.0
    """Time spent in the coordinator's `aggregate` (all versions)."""
    clipped: int = 0
    """Updates the coordinator's clip scaled down (all versions)."""
    norm_ratio_max: float = 0.0
    """Largest effect norm / the clip's reference (lower median) over every version: the
    smallest clip multiplier that would have left every update of this run unclipped."""


class Federation(Protocol):
    """A federation over the clients' data files (one file per client)."""

    name: str
    """Recorded in the report's config as "federation"."""

    def run(
        self, client_paths: Sequence[Path], config: DemoConfig, on_version: OnVersion
    ) -> FederationRecord:
        """Federate `config.rounds` versions; call `on_version` for each one published."""
        ...


__all__ = ["Federation", "FederationRecord", "OnVersion", "Tensors"]
