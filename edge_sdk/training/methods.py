"""The training methods' defaults, and their choices (defined in `edge_sdk.choices`, re-exported
here; torch-free, so the CLI can read them).

`TrainConfig` types its fields with these Literals and validates against the tuples, and
`fedlm train` takes its `choices` and defaults from here.
"""

from __future__ import annotations

from edge_sdk.choices import (
    DPO_LOSSES,
    DPO_REFERENCES,
    TRAIN_METHODS,
    DpoLoss,
    DpoReference,
    TrainMethod,
)

DEFAULT_METHOD: TrainMethod = "sft"
DEFAULT_DPO_LOSS: DpoLoss = "sigmoid"
DEFAULT_REFERENCE: DpoReference = "base"

DEFAULT_BETA = 0.1
"""DPO's beta: the strength of the pull towards the reference (Rafailov et al. use 0.1)."""

DEFAULT_SFT_WEIGHT = 0.0
"""RPO's alpha (Pang et al. 2024, arXiv:2404.19733; TRL's `rpo_alpha`): the weight of the
chosen answer's per-token negative log-likelihood added to the DPO/IPO loss. 0 is plain DPO,
the paper's formula; the demo measures a positive one (BENCHMARKS.md)."""
MAX_SFT_WEIGHT = 100.0
"""Largest SFT weight any party accepts (the paper uses 1; past that the term swamps DPO)."""

__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_DPO_LOSS",
    "DEFAULT_METHOD",
    "DEFAULT_REFERENCE",
    "DEFAULT_SFT_WEIGHT",
    "DPO_LOSSES",
    "DPO_REFERENCES",
    "MAX_SFT_WEIGHT",
    "TRAIN_METHODS",
    "DpoLoss",
    "DpoReference",
    "TrainMethod",
]
