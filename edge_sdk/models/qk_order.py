"""Q/K row order: llama.cpp's converter permutes the rows of llama's Q and K projections.

HF checkpoints apply rotary embeddings to two halves of each head (rotate-half); llama.cpp's
`LLAMA_ROPE_TYPE_NORM` rotates adjacent pairs, so `convert_hf_to_gguf` interleaves each head's
halves. Loading a GGUF into the torch model undoes it; exporting a LoRA re-applies it to the
rows of `lora_B` (the rows of B·A are the rows of the weight). Works on numpy and torch alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import numpy as np

PERMUTED_ARCHS: frozenset[str] = frozenset({"llama"})
"""Architectures whose GGUF Q/K rows are permuted by llama.cpp's converter (gemma3 and qwen
use NEOX rope and are not)."""

if TYPE_CHECKING:
    import torch

ArrayT = TypeVar("ArrayT", "np.ndarray", "torch.Tensor")


def permute_qk(w: ArrayT, n_head: int) -> ArrayT:
    """HF row order → llama.cpp row order for a Q or K projection (rows = n_head * head_dim).

    Works on any array whose first axis is the output rows: a weight (out, in), a bias (out,),
    or a LoRA `B` (out, r). Within each head, rows [0..hd/2) and [hd/2..hd) (the two rotate-half
    halves) are interleaved into adjacent pairs. Use n_kv_head for K.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot permute {rows} rows into {n_head} heads of even width")
    rest = tuple(w.shape[1:])
    x = w.reshape(n_head, 2, rows // n_head // 2, *rest)  # (nh, 2, hd/2, ...)
    x = x.swapaxes(1, 2) if isinstance(x, np.ndarray) else x.transpose(1, 2)  # (nh, hd/2, 2, ...)
    return x.reshape(w.shape)


def unpermute_qk(w: ArrayT, n_head: int) -> ArrayT:
    """Inverse of `permute_qk`: llama.cpp row order → HF row order."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {rows} rows from {n_head} heads of even width")
    rest = tuple(w.shape[1:])
    x = w.reshape(n_head, rows // n_head // 2, 2, *rest)  # (nh, hd/2, 2, ...)
    x = x.swapaxes(1, 2) if isinstance(x, np.ndarray) else x.transpose(1, 2)  # (nh, 2, hd/2, ...)
    return x.reshape(w.shape)
