"""The post-training method a task asks for: `TaskConfig.extra["method"]`.

See docs/wire-format.md, section 3.4.1.

    {"name": "sft"}                                        supervised fine-tuning (also: absent)
    {"name": "dpo", "beta": 0.1, "loss": "sigmoid"}        DPO on preference pairs
    {"name": "dpo", ..., "sft_weight": 1.0}                DPO + an NLL term on chosen (RPO)

Both methods train the same LoRA adapter and federate the same way; only the local objective
and the data it needs differ (SFT: examples; DPO: chosen/rejected pairs). The spec lives in
`extra` so that the envelope and `TaskConfig`'s fields stay as they are (protocol version 1).

Standard library only (the choices come from the torch-free `edge_sdk.training.methods`): the
coordinator, the device and the CLI (without numpy for --help) import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from edge_sdk.training.methods import (
    DEFAULT_BETA,
    DEFAULT_DPO_LOSS,
    DEFAULT_METHOD,
    DEFAULT_SFT_WEIGHT,
    DPO_LOSSES,
    MAX_SFT_WEIGHT,
    TRAIN_METHODS,
    DpoLoss,
    TrainMethod,
)
from edge_sdk.validators import is_finite

Method = TrainMethod
METHODS: tuple[Method, ...] = TRAIN_METHODS
"""Post-training methods a task may name (the first is the default)."""

MAX_BETA = 100.0
"""Largest β any party accepts: β scales the log-ratio inside σ; past ~10 the loss is a step
function of the margin and gradients vanish or explode. Devices hold tasks to a tighter
`TaskPolicy.max_beta`."""

METHOD_KEY = "method"
"""The key of the spec in `TaskConfig.extra`."""

DEFAULT_CODECS: dict[Method, str] = {"sft": "delta+int4+zlib", "dpo": "delta+int8+zlib"}
"""The update codec a task of each method asks for unless told otherwise, as measured by the
demos (BENCHMARKS.md): sft meets its targets with int4 deltas (1.18 MB per SmolLM2-135M r=8
update against 4.92 MB for `delta+fp16`); with int4 the federated preference demo lost 3-7 of
64 held-out prompts against int8 (seeds 0 and 1), so dpo asks for int8."""


@dataclass(frozen=True)
class MethodSpec:
    """The method a task trains with, and its parameters."""

    name: Method = DEFAULT_METHOD
    """`sft` (examples) or `dpo` (preference pairs)."""
    beta: float = DEFAULT_BETA
    """DPO: strength of the pull towards the reference policy (ignored for sft)."""
    loss: DpoLoss = DEFAULT_DPO_LOSS
    """DPO: `sigmoid` (the paper's loss) or `ipo` (ignored for sft)."""
    sft_weight: float = DEFAULT_SFT_WEIGHT
    """DPO: RPO alpha, the weight of the chosen answer's per-token NLL (0: plain DPO; ignored
    for sft). Devices hold tasks to `TaskPolicy.max_sft_weight`."""

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"`method` should be one of {', '.join(METHODS)}, got {self.name!r}")
        beta = self.beta
        if not (is_finite(beta) and 0.0 < beta <= MAX_BETA):
            raise ValueError(f"`beta` should be a finite number in (0, {MAX_BETA:g}], got {beta!r}")
        object.__setattr__(self, "beta", float(beta))
        if self.loss not in DPO_LOSSES:
            raise ValueError(f"`loss` should be one of {', '.join(DPO_LOSSES)}, got {self.loss!r}")
        sw = self.sft_weight
        if not (is_finite(sw) and 0.0 <= sw <= MAX_SFT_WEIGHT):
            raise ValueError(
                f"`sft_weight` should be a finite number in [0, {MAX_SFT_WEIGHT:g}], got {sw!r}"
            )
        object.__setattr__(self, "sft_weight", float(sw))

    def to_extra(self) -> dict[str, Any]:
        """The JSON-like map stored at `extra["method"]`."""
        if self.name == "sft":
            return {"name": "sft"}
        out: dict[str, Any] = {"name": self.name, "beta": self.beta, "loss": self.loss}
        if self.sft_weight:  # absent when 0: a plain-DPO task's extra reads as before
            out["sft_weight"] = self.sft_weight
        return out

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> MethodSpec:
        """The method a task's `extra` names (absent: sft); `ValueError` names the bad field.

        Strict: an unknown key, a non-map, a bool for beta are refused rather than guessed
        at, because a device trains on what this returns.
        """
        raw = extra.get(METHOD_KEY)
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ValueError(f"`extra.method` should be a map, got {type(raw).__name__}")  # noqa: TRY004
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in raw if k not in known)
        if unknown:
            raise ValueError(f"`extra.method` has unknown keys {unknown[:4]}")
        name = raw.get("name", DEFAULT_METHOD)
        if not isinstance(name, str):
            raise ValueError(f"`extra.method.name` should be a string, got {name!r}")  # noqa: TRY004
        loss = raw.get("loss", DEFAULT_DPO_LOSS)
        if not isinstance(loss, str):
            raise ValueError(f"`extra.method.loss` should be a string, got {loss!r}")  # noqa: TRY004
        try:
            return cls(
                name=name,  # type: ignore[arg-type]
                beta=raw.get("beta", DEFAULT_BETA),
                loss=loss,  # type: ignore[arg-type]
                sft_weight=raw.get("sft_weight", DEFAULT_SFT_WEIGHT),
            )
        except ValueError as exc:
            raise ValueError(f"`extra.method`: {exc}") from None

    def describe(self) -> str:
        if self.name == "sft":
            return "sft"
        sft = f", sft weight {self.sft_weight:g}" if self.sft_weight else ""
        return f"dpo (beta {self.beta:g}, {self.loss} loss{sft})"
