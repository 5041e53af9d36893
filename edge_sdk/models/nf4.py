"""A frozen NF4 linear layer for CPU training that needs no bitsandbytes.

QLoRA's NF4 (Dettmers et al. 2023, arXiv:2305.14314): weights in blocks of 64, each block
scaled by its absmax and rounded to the nearest of 16 normal-quantile values, two 4-bit codes
per byte. `NF4Linear` stores exactly bitsandbytes' bytes (packed codes, high nibble first, and
one fp32 absmax per block: `native.nf4` quantizes and dequantizes them bit-identically), so a
forward through it equals bitsandbytes' `Linear4bit` with fp32 compute (tested).

Why not `bnb.nn.Linear4bit` on CPU: importing bitsandbytes imports `torch._inductor`, ~120 MB
of RSS and 1-10 s that a CPU training process never uses, and bitsandbytes >= 0.49 silently
repacks the weight on AVX512-BF16 CPUs. On CUDA bitsandbytes remains the right tool;
`edge_sdk.training.lora` still accepts a `Linear4bit` base.

Every forward and backward dequantizes the weight into a per-thread fp32 scratch
buffer (`dequantize_scratch`), used at once and never kept: the model is never held in fp32.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import nn

from edge_sdk.models import gemm
from native.nf4 import dequantize_nf4, quantize_nf4

NF4_BLOCKSIZE = 64
"""Weights per NF4 absmax block (bitsandbytes' and QLoRA's default)."""

_scratch = threading.local()


class NF4Linear(nn.Module):
    """y = x Wᵀ + b for a frozen NF4 W (out, in); the input gradient is g W.

    `weight` is the packed codes (out·in/2,) uint8 (a frozen parameter, so that parameter
    counts and `requires_grad_` see it), `absmax` the per-block scales (out·in/64,) fp32.
    """

    absmax: torch.Tensor  # a buffer (register_buffer in __init__)

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        out_features: int,
        in_features: int,
        bias: torch.Tensor | None = None,
        blocksize: int = NF4_BLOCKSIZE,
    ) -> None:
        super().__init__()
        n = out_features * in_features
        if packed.dtype != torch.uint8 or packed.numel() * 2 != n:
            raise ValueError(
                f"`packed` should hold {n // 2} uint8 bytes for a ({out_features}, {in_features}) "
                f"weight, got {packed.numel()} {packed.dtype}"
            )
        if n % blocksize or absmax.numel() != n // blocksize:
            raise ValueError(
                f"`absmax` should hold {n // blocksize} block scales, got {absmax.numel()}"
            )
        self.in_features, self.out_features, self.blocksize = in_features, out_features, blocksize
        self.weight = nn.Parameter(packed.reshape(-1).contiguous(), requires_grad=False)
        self.register_buffer("absmax", absmax.reshape(-1).float().contiguous())
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, blocksize: int = NF4_BLOCKSIZE
    ) -> NF4Linear:
        """Quantize an (out, in) float weight (bitsandbytes' bytes, `native.nf4`)."""
        out_f, in_f = weight.shape
        packed, absmax = quantize_nf4(weight, blocksize)
        return cls(packed, absmax, out_f, in_f, bias, blocksize)

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in): the logical weight shape."""
        return (self.out_features, self.in_features)

    def logical_numel(self) -> int:
        return math.prod(self.shape)

    def dequantize(self) -> torch.Tensor:
        """A fresh fp32 (out, in) copy of the weight (for export and checks, not the step)."""
        return dequantize_nf4(self.weight, self.absmax, self.blocksize).view(self.shape)

    def dequantize_scratch(self) -> torch.Tensor:
        """The fp32 (out, in) weight in a per-thread buffer, valid until the next call.

        Every NF4 layer dequantizes twice per step (forward and backward); a fresh tensor each
        time is ~0.9 GB of short-lived allocations per SmolLM2 step. Callers use the buffer and
        drop it before returning.
        """
        return self.dequantize_into(scratch_buffer("nf4", self.shape))

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """The (out, in) weight written into `out` (contiguous, fp32 or bf16: rounded from the
        fp32 values), which is returned: e.g. a block of rows of a buffer that stacks several
        layers' weights."""
        return dequantize_nf4(self.weight, self.absmax, self.blocksize, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _NF4Matmul.apply(x, self)
        # the same product as the LoRA path's: a disabled adapter (the DPO reference) then
        # gives exactly the policy's numbers while B is zero
        return gemm.linear(x, self.dequantize_scratch().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
            f"nf4 blocks of {self.blocksize}"
        )


class _NF4Matmul(torch.autograd.Function):
    """x Wᵀ + b with W dequantized again in backward instead of saved (nothing fp32 is kept)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return gemm.linear(x, layer.dequantize_scratch().to(x.dtype), layer.bias)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w = ctx.layer.dequantize_scratch()
        return gemm.matmul(g, w.to(g.dtype)), None  # (..., in)


def scratch_buffer(
    tag: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """An uninitialised (shape) view of this thread's buffer for (tag, dtype), valid until the
    next call with the same tag: for temporaries that a function uses and drops before it
    returns.

    Every shape asked under one tag shares one flat buffer, grown to the largest asked, so a
    tag names a role, not a tensor: a function holds a tag's view only while it calls nothing
    that takes the same tag. The fp32 step uses four: "nf4" (a dequantized weight, one layer or
    one stack of layers at a time), "temp" and "temp2" (the element-wise chains' temporaries;
    "temp2" where a second one is alive at the same time: the fused loss's logit chunk, the
    MLP's input gradient), "temp3" (a fused function's output gradients side by side); bf16
    compute (`lora_bf16`) adds three bf16 ones: "nf4-bf16" (the weights), "bf16-in" (a
    product's rounded input) and "bf16-out" (its output before widening).

    Why: the step runs with glibc's mmap threshold pinned (`loader.tune_malloc`, for peak
    RSS), so every fresh tensor above it is a new mapping whose pages fault in on first write:
    with the threshold at 256 KiB, a (256, 576) fp32 multiply measured ~300 us into a fresh
    tensor against ~25 us into a reused one.
    """
    n = math.prod(shape)
    bufs: dict[tuple[str, torch.dtype], torch.Tensor] = _scratch.__dict__.setdefault("bufs", {})
    buf = bufs.get((tag, dtype))
    if buf is None or buf.numel() < n:
        buf = bufs[(tag, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def empty_scratch() -> None:
    """Drop this thread's scratch buffers (they are re-made on the next forward)."""
    _scratch.__dict__.pop("bufs", None)


__all__ = ["NF4_BLOCKSIZE", "NF4Linear", "empty_scratch", "scratch_buffer"]
