"""The training methods and their choices, defined once (torch-free, so the CLI can read them).

`TrainConfig` types its fields with these Literals and validates against the tuples, and
`fedlm train` takes its `choices` and defaults from here.
"""

from __future__ import annotations

from typing import Literal

TrainMethod = Literal["sft", "dpo"]
"""sft: supervised fine-tuning on examples; dpo: preference tuning on (chosen, rejected) pairs."""
TRAIN_METHODS: tuple[TrainMethod, ...] = ("sft", "dpo")
DEFAULT_METHOD: TrainMethod = "sft"

DpoLoss = Literal["sigmoid", "ipo"]
"""sigmoid: DPO (Rafailov et al. 2023, arXiv:2305.18290); ipo: IPO (Azar et al. 2023,
arXiv:2310.12036)."""
DPO_LOSSES: tuple[DpoLoss, ...] = ("sigmoid", "ipo")
DEFAULT_DPO_LOSS: DpoLoss = "sigmoid"

DpoReference = Literal["base", "start"]
"""The frozen reference policy of DPO: the base model (adapter disabled), or the model with the
adapter the run started from (e.g. an SFT adapter, or the federation's global adapter)."""
DPO_REFERENCES: tuple[DpoReference, ...] = ("base", "start")
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
