"""`--compute bf16`: the frozen NF4 base's two matrix products in bfloat16.

On a CPU with bf16 dot products (AVX512-BF16, AMX; this machine's EPYC), torch's bf16 GEMM
runs 2.2-2.7x faster than fp32 at SmolLM2's shapes, and QLoRA's own recipe computes in bf16.
Here only the base's forward product x·Wᵀ and its input gradient g·W are bf16: the NF4 weight
is dequantized (exactly, in fp32) and rounded to bf16, the activations and output gradients
are rounded to bf16, and each product is widened back to fp32. Everything else stays fp32: the
adapter path s·(x·Aᵀ)·Bᵀ and its gradients, norms, attention, the loss and the optimizer.

The adapter is not merged into the weight as the fp32 path does (`lora._MergedNF4LoRA`):
rounded to bf16, W + s·B·A would lose most of a young adapter's update (bf16 keeps 8 bits of
mantissa, the update is ~1e-3 of W), so it runs beside the base in fp32.

Measured (BENCHMARKS.md, "bf16 compute"): eval loss within 0.4 % of fp32 on the demo task,
JSON records and plain text; step time 0.77x fp32's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edge_sdk.models import transformer
from edge_sdk.models.nf4 import scratch_buffer
from edge_sdk.training import lora

BF16_DOT_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of x86 CPUs with native bf16 dot products."""


def cpu_has_bf16_dot(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU multiplies bf16 natively (`BF16_DOT_FLAGS`), or None when unknown
    (no /proc/cpuinfo: not Linux; no x86 flags line: e.g. ARM, where torch's bf16 support
    varies by core)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return any(flag in line.split() for flag in BF16_DOT_FLAGS)
    return None


def compute_warning(compute: str, cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """A line for the user when `compute` is bf16 on a CPU known to lack native bf16 products
    (torch then computes bf16 without them: not measured here, expect it slower than fp32)."""
    if compute != "bf16" or cpu_has_bf16_dot(cpuinfo) is not False:
        return None
    return (
        "--compute bf16 on a CPU without bf16 dot products (no avx512_bf16 or amx_bf16 in "
        "/proc/cpuinfo): expect it slower than --compute fp32"
    )


def bf16_weight(base: Any) -> torch.Tensor:
    """The NF4 layer's weight (out, in) in bf16, in this thread's buffer (valid until the next
    call): dequantized in fp32, then rounded."""
    w = base.dequantize_scratch()
    return scratch_buffer("nf4-bf16", tuple(w.shape), torch.bfloat16).copy_(w)


def _forward(
    x2: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, base: Any
) -> torch.Tensor:
    """x2 (N, in) -> (N, out): the base in bf16, widened, plus the adapter in fp32."""
    y = F.linear(x2.to(torch.bfloat16), bf16_weight(base)).float()
    y.add_((x2 @ lora_A.T) @ lora_B.T, alpha=scale)
    if base.bias is not None:
        y.add_(base.bias)
    return y


def _backward(
    g2: torch.Tensor,
    x2: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    base: Any,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d input, dA, dB) from the output gradient g2 (N, out) and the input x2 (N, in)."""
    grad_x = None
    if need[0]:
        grad_x = (g2.to(torch.bfloat16) @ bf16_weight(base)).float()  # (N, in)
        grad_x.add_((g2 @ lora_B) @ lora_A, alpha=scale)
    grad_a, grad_b = lora._lora_grads(x2, g2, lora_A, lora_B, scale, need[1], need[2])
    return grad_x, grad_a, grad_b


class Bf16NF4LoRA(torch.autograd.Function):
    """y = bf16(x)·bf16(W)ᵀ + s·x·Aᵀ·Bᵀ + bias for a frozen NF4 W; x and y fp32."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, scale, base):
        ctx.save_for_backward(x, lora_A, lora_B)
        ctx.scale, ctx.base = scale, base
        return _forward(x.reshape(-1, x.shape[-1]), lora_A, lora_B, scale, base).view(
            *x.shape[:-1], -1
        )

    @staticmethod
    def backward(ctx, g):
        x, lora_A, lora_B = ctx.saved_tensors
        grad_x, grad_a, grad_b = _backward(
            g.reshape(-1, g.shape[-1]),
            x.reshape(-1, x.shape[-1]),
            lora_A,
            lora_B,
            ctx.scale,
            ctx.base,
            ctx.needs_input_grad[:3],
        )
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_a, grad_b, None, None


class Bf16GatedNF4LoRA(torch.autograd.Function):
    """`Bf16NF4LoRA` of h = act(gate) ∘ up, with h recomputed in backward from gate and up
    (as `lora._GatedMergedNF4LoRA` does in fp32) instead of saved."""

    @staticmethod
    def forward(ctx, gate, up, gelu, lora_A, lora_B, scale, base):
        h = lora._gated_act(gate, gelu).mul_(up)  # (..., d_ff)
        save = transformer.save_16bit  # bf16 copies with FEDLM_LOW_MEMORY=1, as in fp32
        ctx.save_for_backward(save(gate), save(up), lora_A, lora_B)
        ctx.gelu, ctx.scale, ctx.base, ctx.dtype = gelu, scale, base, gate.dtype
        return _forward(h.reshape(-1, h.shape[-1]), lora_A, lora_B, scale, base).view(
            *h.shape[:-1], -1
        )

    @staticmethod
    def backward(ctx, g):
        gate, up, lora_A, lora_B = ctx.saved_tensors
        gate, up = transformer.restore_gate_up(gate, up, ctx.dtype)
        act = lora._gated_act(gate, ctx.gelu)
        need_h = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h, grad_a, grad_b = _backward(
            g.reshape(-1, g.shape[-1]),
            (act * up).reshape(-1, gate.shape[-1]),
            lora_A,
            lora_B,
            ctx.scale,
            ctx.base,
            (need_h, *ctx.needs_input_grad[3:5]),
        )
        grad_gate = grad_up = None
        if grad_h is not None:
            grad_h = grad_h.view(gate.shape)
            grad_up = grad_h * act
            grad_gate = lora._gated_act_backward(grad_h.mul_(up), gate, ctx.gelu)
        return grad_gate, grad_up, None, grad_a, grad_b, None, None
