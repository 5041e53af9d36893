"""The shapes a client update must have, read from the base model's GGUF.

The coordinator never loads weights; it reads only the GGUF tensor directory (through the
model store's fast reader) to learn (out, in) of each LoRA target. GGUF lists dimensions
innermost first (ne0 = in_features), so a weight `blk.3.attn_k.weight` with GGUF shape
[576, 192] is a (192, 576) linear layer: out = 192, in = 576.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from edge_sdk.errors import InvalidModelError
from edge_sdk.models.naming import LORA_TARGETS, hf_module, parse_gguf_stem

Shapes = dict[str, tuple[int, int]]
"""HF module path (`model.layers.0.self_attn.q_proj`) -> (out_features, in_features)."""


def shapes_from_tensor_directory(
    tensors: Iterable[tuple[str, Sequence[int]]], targets: Sequence[str]
) -> Shapes:
    """Shapes of the `targets` from (GGUF name, GGUF shape) pairs, ordered by layer then target."""
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(
            f"unknown LoRA targets {unknown}; expected some of {', '.join(LORA_TARGETS)}"
        )
    found: dict[tuple[int, int], tuple[str, tuple[int, int]]] = {}
    for name, shape in tensors:
        if not name.endswith(".weight"):
            continue
        try:
            layer, target = parse_gguf_stem(name[: -len(".weight")])
        except ValueError:
            continue
        if target not in targets or len(shape) != 2:
            continue
        in_dim, out_dim = int(shape[0]), int(shape[1])
        found[(layer, LORA_TARGETS.index(target))] = (hf_module(layer, target), (out_dim, in_dim))
    return dict(found[key] for key in sorted(found))


def shapes_from_gguf(path: str | os.PathLike[str], targets: Sequence[str]) -> Shapes:
    """(out, in) of every target linear layer of a GGUF model; `InvalidModelError` if none."""
    from edge_sdk.models.identity import open_gguf  # fast header-only reader of the model store

    reader = open_gguf(Path(path))
    shapes = shapes_from_tensor_directory(
        ((t.name, [int(d) for d in t.shape]) for t in reader.tensors), targets
    )
    if not shapes:
        raise InvalidModelError(f"{path}: no weights for LoRA targets {', '.join(targets)}")
    return shapes


def adapter_parameters(shapes: Shapes, rank: int) -> int:
    """Number of LoRA parameters at `rank`: Σ r·(in + out)."""
    return sum(rank * (out_dim + in_dim) for out_dim, in_dim in shapes.values())
