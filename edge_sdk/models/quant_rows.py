"""The token embedding (and tied output projection) kept in its GGUF blocks (issue 16, part 2).

A QLoRA base never trains the embedding, and the GGUF already holds it quantized: SmolLM2's
49,152 x 576 table is 30 MB as Q8_0 and 113 MB as fp32 (Gemma 3 270M's 262,144 x 640 table:
178 MB against 671 MB). `QuantizedEmbedding` keeps the file's blocks and dequantizes only the
rows a step reads: the looked-up tokens, and the output projection one vocabulary chunk at a
time inside the fused loss (`edge_sdk.models.transformer.fused_linear_cross_entropy`). The
values are those the fp32 table held (the same C kernel, `native.dequant`), so the model
computes what it computed before, up to the order of the loss's float sums.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import nn

from native.dequant import KERNEL_TYPES, block_bytes, dequantize_into

_scratch = threading.local()


class QuantizedEmbedding(nn.Module):
    """A frozen (num_embeddings, embedding_dim) table in GGUF blocks (Q8_0, Q4_0 or Q4_1).

    `weight` holds the raw blocks, (num_embeddings, row_bytes) uint8, as a frozen parameter so
    that parameter counts see it (`logical_numel`); `forward(ids)` returns fp32 rows like
    `nn.Embedding`.
    """

    def __init__(self, raw: torch.Tensor, qtype: int, embedding_dim: int) -> None:
        super().__init__()
        if int(qtype) not in KERNEL_TYPES:
            raise ValueError(f"`qtype` should be one of {sorted(KERNEL_TYPES)}, got {qtype!r}")
        nbytes = block_bytes(qtype)
        if embedding_dim % 32 or raw.dim() != 2 or raw.dtype != torch.uint8:
            raise ValueError(
                f"`raw` should be (rows, row_bytes) uint8 blocks for a width divisible by 32, "
                f"got {tuple(raw.shape)} {raw.dtype}, width {embedding_dim}"
            )
        if raw.shape[1] != embedding_dim // 32 * nbytes:
            raise ValueError(
                f"`raw` rows should hold {embedding_dim // 32 * nbytes} bytes for width "
                f"{embedding_dim}, got {raw.shape[1]}"
            )
        self.num_embeddings, self.embedding_dim, self.qtype = (
            int(raw.shape[0]),
            embedding_dim,
            int(qtype),
        )
        self.weight = nn.Parameter(raw.contiguous(), requires_grad=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(num_embeddings, embedding_dim): the logical table shape."""
        return (self.num_embeddings, self.embedding_dim)

    def logical_numel(self) -> int:
        return math.prod(self.shape)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 rows `ids` (any shape) -> (*ids.shape, embedding_dim), a fresh tensor."""
        flat = ids.reshape(-1)
        picked = self.weight.index_select(0, flat)  # (n, row_bytes): copies n rows of blocks
        out = torch.empty(flat.numel(), self.embedding_dim, dtype=torch.float32)
        dequantize_into(picked, self.qtype, out)
        return out.view(*ids.shape, self.embedding_dim)

    def row_range(self, start: int, end: int) -> torch.Tensor:
        """fp32 rows [start, end) in a per-thread buffer reused by the next call of this size.

        The fused loss walks the vocabulary in chunks of equal size; a fresh (chunk, d) tensor
        per chunk would be a few hundred MB of short-lived allocations per step.
        """
        n = end - start
        bufs: dict[tuple[int, int], torch.Tensor] = _scratch.__dict__.setdefault("bufs", {})
        key = (n, self.embedding_dim)
        buf = bufs.get(key)
        if buf is None:
            if len(bufs) >= 4:  # the last chunk's size differs; keep a handful at most
                bufs.clear()
            buf = bufs[key] = torch.empty(key, dtype=torch.float32)
        return dequantize_into(self.weight[start:end], self.qtype, buf)

    def dequantize(self) -> torch.Tensor:
        """The whole table as a fresh fp32 (num_embeddings, embedding_dim) tensor."""
        out = torch.empty(self.shape, dtype=torch.float32)
        return dequantize_into(self.weight, self.qtype, out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, ggml type {self.qtype}"


def empty_scratch() -> None:
    """Drop this thread's row buffers (they are re-made on the next call)."""
    _scratch.__dict__.pop("bufs", None)


__all__ = ["QuantizedEmbedding", "empty_scratch"]
