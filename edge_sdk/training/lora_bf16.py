"""bf16 compute (`--compute bf16`, and auto's choice on CPUs with bf16 dot products): the
frozen NF4 base's two matrix products in bfloat16.

On a CPU with bf16 dot products (AVX512-BF16, AMX; this machine's EPYC), torch's bf16 GEMM
runs 2.0-2.7x faster than fp32 at SmolLM2's shapes, and QLoRA's own recipe computes in bf16.
Here only the base's forward product x·Wᵀ and its input gradient g·W are bf16: the NF4 weight
is unpacked straight into bf16 (the exact fp32 value rounded to nearest-even, `native.nf4`),
the activations and output gradients are rounded to bf16, and each product is widened back to
fp32. Everything else stays fp32: the adapter path s·(x·Aᵀ)·Bᵀ and its gradients, norms,
attention, the loss and the optimizer.

The adapter is not merged into the weight as the fp32 path does (`lora._MergedNF4LoRA`):
rounded to bf16, W + s·B·A would lose most of a young adapter's update (bf16 keeps 8 bits of
mantissa, the update is ~1e-3 of W), so it runs beside the base in fp32. q/k/v and the gated
MLP run as one function each, as in fp32 (`lora.FUSED_PROJECTIONS`): one rounded input per
group, one bf16 input-gradient product over the stacked weights, every adapter's input
gradient added in one rank-Σr product.

Measured (BENCHMARKS.md, "Issue 16, 2026-12-04 (fourth pass)"): eval loss within 0.3 % of
fp32 on the demo task, JSON records and plain text; step time ~0.65-0.8x fp32's.
"""

from __future__ import annotations

from typing import Any

import torch

from edge_sdk.models import transformer
from edge_sdk.models.nf4 import scratch_buffer
from edge_sdk.training import lora

BF16 = torch.bfloat16


def _bf16_weight(specs: tuple[lora._Spec, ...]) -> torch.Tensor:
    """[W_1; W_2; ...] (sum of outs, in) of the specs' NF4 bases in bf16, in this thread's
    buffer (valid until the next call): the fp32 values rounded to nearest-even, written
    directly (`native.nf4`)."""
    rows = sum(base.out_features for base, _, _ in specs)
    w = scratch_buffer("nf4-bf16", (rows, specs[0][0].in_features), BF16)
    o = 0
    for base, _, _ in specs:
        base.dequantize_into(w[o : o + base.out_features])
        o += base.out_features
    return w


def _rounded(t: torch.Tensor) -> torch.Tensor:
    """t in bf16 (nearest-even), in this thread's buffer (valid until the next call)."""
    return scratch_buffer("bf16-in", tuple(t.shape), BF16).copy_(t)


def _product(a16: torch.Tensor, w16: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a16 (..., k) · w16 (k, n) in bf16, widened to fp32: a fresh tensor, or `out`."""
    shape = (*a16.shape[:-1], w16.shape[-1])
    y16 = torch.matmul(a16, w16, out=scratch_buffer("bf16-out", shape, BF16))
    return y16.float() if out is None else out.copy_(y16)


def _add_adapters_forward(
    ys: list[torch.Tensor], x2: torch.Tensor, specs: tuple[lora._Spec, ...], ab: tuple
) -> None:
    """ys[i] (N, out_i) += s_i·(x2·A_iᵀ)·B_iᵀ for every layer whose adapter is on, in fp32, with
    one x2·[A_1; A_2; ...]ᵀ for all of them."""
    on = [i for i, (_, _, enabled) in enumerate(specs) if enabled]
    if not on:
        return
    xa = x2 @ torch.cat([ab[2 * i] for i in on]).T  # (N, sum of r)
    r0 = 0
    for i in on:
        r = ab[2 * i].shape[0]
        ys[i].addmm_(xa[:, r0 : r0 + r], ab[2 * i + 1].T, alpha=specs[i][1])
        r0 += r


def _add_adapters_backward(
    grad_x2: torch.Tensor, g2: torch.Tensor, specs: tuple[lora._Spec, ...], ab: tuple
) -> None:
    """grad_x2 (N, in) += Σ s_i·(g_i·B_i)·A_i over the layers whose adapter is on, g_i being
    layer i's columns of g2 (N, sum of outs): one rank-Σr product into grad_x2."""
    gb_t, a_s = [], []
    o = 0
    for i, (base, scale, enabled) in enumerate(specs):
        if enabled:
            gb_t.append(ab[2 * i + 1].T @ g2[:, o : o + base.out_features].T)  # (r, N)
            a_s.append(ab[2 * i] * scale)  # (r, in)
        o += base.out_features
    if gb_t:
        grad_x2.addmm_(torch.cat(gb_t).T, torch.cat(a_s))


def _layer_products(
    x: torch.Tensor, specs: tuple[lora._Spec, ...], ab: tuple
) -> list[torch.Tensor]:
    """One output (..., out_i) per layer of `specs` that reads x: its base in bf16, widened, its
    adapter in fp32, its bias."""
    x16 = _rounded(x)
    ys = [_product(x16, _bf16_weight((spec,)).T) for spec in specs]
    flat = [y.view(-1, y.shape[-1]) for y in ys]
    _add_adapters_forward(flat, x.reshape(-1, x.shape[-1]), specs, ab)
    for y, (base, _, _) in zip(ys, specs):
        if base.bias is not None:
            y.add_(base.bias)
    return ys


def _input_grad(
    g: torch.Tensor, specs: tuple[lora._Spec, ...], ab: tuple, out: torch.Tensor | None = None
) -> torch.Tensor:
    """g (..., sum of outs) -> (..., in): the stacked bases' input gradient in bf16, widened,
    plus the adapters' in fp32."""
    grad_x = _product(_rounded(g), _bf16_weight(specs), out)
    _add_adapters_backward(grad_x.view(-1, grad_x.shape[-1]), g.reshape(-1, g.shape[-1]), specs, ab)
    return grad_x


class Bf16NF4LoRA(torch.autograd.Function):
    """y = bf16(x)·bf16(W)ᵀ + s·x·Aᵀ·Bᵀ + bias for a frozen NF4 W; x and y fp32. With the
    adapter off (`on` False) only the base's product: DPO's reference then computes exactly
    what a policy with B = 0 does."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, scale, base, on):
        ctx.save_for_backward(x, lora_A, lora_B)
        ctx.specs = ((base, scale, on),)
        return _layer_products(x, ctx.specs, (lora_A, lora_B))[0]

    @staticmethod
    def backward(ctx, g):
        x, lora_A, lora_B = ctx.saved_tensors
        ab = (lora_A, lora_B)
        grad_x = _input_grad(g, ctx.specs, ab) if ctx.needs_input_grad[0] else None
        grads = lora._stacked_lora_grads(
            x.reshape(-1, x.shape[-1]),
            g.reshape(-1, g.shape[-1]),
            ctx.specs,
            ab,
            ctx.needs_input_grad[1:3],
        )
        return grad_x, *grads, None, None, None


class Bf16GatedNF4LoRA(torch.autograd.Function):
    """`Bf16NF4LoRA` of h = act(gate) ∘ up, with h recomputed in backward from gate and up
    (as `lora._GatedMergedNF4LoRA` does in fp32) instead of saved."""

    @staticmethod
    def forward(ctx, gate, up, gelu, lora_A, lora_B, scale, base):
        h = lora._gated_act(gate, gelu, out=scratch_buffer("temp", gate.shape)).mul_(up)
        save = transformer.save_16bit  # bf16 copies with FEDLM_LOW_MEMORY=1, as in fp32
        ctx.save_for_backward(save(gate), save(up), lora_A, lora_B)
        ctx.gelu, ctx.specs, ctx.dtype = gelu, ((base, scale, True),), gate.dtype
        return _layer_products(h, ctx.specs, (lora_A, lora_B))[0]

    @staticmethod
    def backward(ctx, g):
        gate, up, lora_A, lora_B = ctx.saved_tensors
        gate, up = transformer.restore_gate_up(gate, up, ctx.dtype)
        ab, need = (lora_A, lora_B), ctx.needs_input_grad
        act = lora._gated_act(gate, ctx.gelu, out=scratch_buffer("temp", gate.shape))
        grad_gate = grad_up = None
        if need[0] or need[1]:
            grad_h = _input_grad(g, ctx.specs, ab, scratch_buffer("temp2", gate.shape))
            grad_up = grad_h * act
            grad_gate = lora._gated_act_backward(grad_h.mul_(up), gate, ctx.gelu)
        h = torch.mul(act, up, out=act)  # (..., d_ff): recomputed, never saved
        grads = lora._stacked_lora_grads(
            h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1]), ctx.specs, ab, need[3:5]
        )
        return grad_gate, grad_up, None, *grads, None, None


class Bf16Products:
    """`lora.Fp32Products` in bf16, for the fused q/k/v and MLP functions
    (`lora._StackedNF4LoRA`, `lora._NF4LoRAMLP`): the bases in bf16, the adapters beside them in
    fp32."""

    forward = staticmethod(_layer_products)

    @staticmethod
    def input_grad(
        g: torch.Tensor, specs: tuple[lora._Spec, ...], ab: tuple, scratch: Any = None
    ) -> torch.Tensor:
        """g (..., sum of outs) -> (..., in), into `scratch()` when given."""
        return _input_grad(g, specs, ab, scratch() if scratch is not None else None)
