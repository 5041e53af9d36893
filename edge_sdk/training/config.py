"""`TrainConfig`: every setting that shapes a training run, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edge_sdk._docfields import document_fields
from edge_sdk.choices import PRECISIONS, Compute, Precision
from edge_sdk.compute import resolve_compute
from edge_sdk.training.data import DataConfig
from edge_sdk.training.lora import LoraConfig
from edge_sdk.training.methods import (
    DEFAULT_BETA,
    DEFAULT_DPO_LOSS,
    DEFAULT_METHOD,
    DEFAULT_REFERENCE,
    DEFAULT_SFT_WEIGHT,
    DPO_LOSSES,
    DPO_REFERENCES,
    MAX_SFT_WEIGHT,
    TRAIN_METHODS,
    DpoLoss,
    DpoReference,
    TrainMethod,
)
from edge_sdk.validators import (
    is_finite,
    is_positive_finite,
    require_compute,
    require_non_negative_ints,
    require_positive_ints,
)

_DPO_FIELDS = ("beta", "dpo_loss", "reference", "sft_weight")


@document_fields
@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run."""

    steps: int = 200
    """Optimizer steps."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter: rank, alpha, dropout, targets, layers, freeze_a (`LoraConfig`)."""
    method: TrainMethod = DEFAULT_METHOD
    """sft (examples) or dpo (preference pairs)."""
    beta: float = DEFAULT_BETA
    """DPO/IPO beta: how far the policy may move from the reference (dpo only)."""
    dpo_loss: DpoLoss = DEFAULT_DPO_LOSS
    """sigmoid (DPO) or ipo (IPO) (dpo only)."""
    reference: DpoReference = DEFAULT_REFERENCE
    """DPO reference policy: base (adapter disabled) or start (the starting adapter) (dpo only)."""
    sft_weight: float = DEFAULT_SFT_WEIGHT
    """RPO alpha: weight of the chosen answer's per-token NLL added to the DPO loss (dpo only;
    0: plain DPO)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    batch_size: int = 1
    """Sequences per micro-batch (dpo: pairs, each a chosen and a rejected sequence)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate."""
    warmup: int = 10
    """Linear warmup steps (capped at `steps`)."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio at the last step."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter."""
    max_grad_norm: float | None = 1.0
    """Clip the adapter gradient's global norm; None disables clipping."""
    seed: int = 0
    """Seeds the adapter init, data split and order, and dropout."""
    val_fraction: float = 0.1
    """Share of examples held out for evaluation."""
    eval_every: int = 0
    """Evaluate every N steps (0: only before and after training)."""
    eval_batches: int = 0
    """Cap on validation batches per evaluation (0: the whole split)."""
    checkpoint_every: int = 50
    """Write a checkpoint every N steps (0: never; `run()` only)."""
    precision: Precision = "nf4"
    """Frozen base precision: nf4 (QLoRA), bf16 or fp32."""
    gradient_checkpointing: bool = False
    """Recompute block activations in backward (less memory, about 30% slower)."""
    compute: Compute = "auto"
    """The NF4 base's matrix products: fp32, or bf16 (faster on CPUs with bf16 dot products,
    AVX512-BF16 or AMX; the adapter and the optimizer stay fp32; only with precision nf4), or
    auto: bf16 where the CPU has them, else fp32 (`resolved_compute` says which)."""

    def __post_init__(self) -> None:
        require_positive_ints(self, "steps", "seq_len", "batch_size", "grad_accum")
        require_non_negative_ints(
            self, "warmup", "eval_every", "eval_batches", "checkpoint_every", "seed"
        )
        if not isinstance(self.lora, LoraConfig):
            raise ValueError(f"`lora` should be a LoraConfig, got {type(self.lora).__name__}")  # noqa: TRY004
        for name in ("lr", "beta"):
            if not is_positive_finite(getattr(self, name)):
                raise ValueError(
                    f"`{name}` should be a positive number, got {getattr(self, name)!r}"
                )
        sw = self.sft_weight
        if not (is_finite(sw) and 0.0 <= sw <= MAX_SFT_WEIGHT):
            raise ValueError(
                f"`sft_weight` should be a finite number in [0, {MAX_SFT_WEIGHT:g}], got {sw!r}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"`min_lr_ratio` should be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"`weight_decay` should be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"`max_grad_norm` should be positive or None, got {self.max_grad_norm!r}"
            )
        for name, choices in (
            ("precision", PRECISIONS),
            ("method", TRAIN_METHODS),
            ("dpo_loss", DPO_LOSSES),
            ("reference", DPO_REFERENCES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"`{name}` should be one of {choices}, got {getattr(self, name)!r}"
                )
        require_compute(self.compute, self.precision)
        DataConfig(seq_len=self.seq_len, val_fraction=self.val_fraction, seed=self.seed)

    @property
    def resolved_compute(self) -> Compute:
        """The arithmetic this run uses on this machine: `compute`, with auto resolved
        (`edge_sdk.compute.resolve_compute`)."""
        return resolve_compute(self.compute, self.precision)

    def data_config(self, skip_bad: bool = False) -> DataConfig:
        return DataConfig(
            seq_len=self.seq_len, val_fraction=self.val_fraction, seed=self.seed, skip_bad=skip_bad
        )

    def trajectory_fields(self) -> dict[str, Any]:
        """The fields that change the optimization path (not how often we look at it).

        Flat, as before `lora` was a `LoraConfig` of its own, and without the DPO fields for
        SFT: an SFT checkpoint written before keeps its fingerprint and still resumes.
        """
        skip = {"eval_every", "eval_batches", "checkpoint_every", "lora", "method", *_DPO_FIELDS}
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }
        lora = dataclasses.asdict(self.lora)
        if lora.pop("layers") is not None:
            lora["layers"] = self.lora.layers
        out.update(lora)
        out["compute"] = self.resolved_compute  # what ran: an auto run resumes as it started
        if out["compute"] == "fp32":
            del out["compute"]  # a checkpoint written before the field existed keeps resuming
        if self.method != "sft":
            out.update(method=self.method, **{k: getattr(self, k) for k in _DPO_FIELDS})
            if self.sft_weight == 0.0:
                # Plain DPO: a checkpoint written before the field existed keeps resuming.
                del out["sft_weight"]
        return out
