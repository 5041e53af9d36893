"""One call that writes an adapter in both formats: PEFT (for Hugging Face) and GGUF (llama.cpp)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_sdk.adapters.gguf_lora import BaseModelInfo, write_gguf_lora
from edge_sdk.adapters.peft import save_peft

GGUF_NAME = "adapter.gguf"


@dataclass(frozen=True)
class ExportPaths:
    peft_dir: Path
    """Holds `adapter_config.json` and `adapter_model.safetensors`."""
    gguf_path: Path


def export_adapter(
    out_dir: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    *,
    rank: int,
    alpha: float,
    base: BaseModelInfo,
    dropout: float = 0.0,
    base_model_name: str | None = None,
    n_layer: int | None = None,
    gguf_dtype: str = "f32",
) -> ExportPaths:
    """Write `adapter_model.safetensors` + `adapter_config.json` and `adapter.gguf` into `out_dir`.

    The GGUF is written first: it checks every tensor against the base model's shapes, so a
    wrong adapter fails before anything is written.
    """
    out = Path(out_dir)
    gguf_path = write_gguf_lora(out / GGUF_NAME, tensors, alpha=alpha, base=base, dtype=gguf_dtype)
    meta = {"fedlm.base_model.arch": base.arch}
    if base.sha256:
        meta["fedlm.base_model.sha256"] = base.sha256
    if base.name:
        meta["fedlm.base_model.name"] = base.name
    save_peft(
        out,
        tensors,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        base_model_name_or_path=base_model_name or base.name or None,
        n_layer=n_layer,
        metadata=meta,
    )
    return ExportPaths(peft_dir=out, gguf_path=gguf_path)
