"""LoRA (Hu et al. 2021, arXiv:2106.09685) on the frozen linear layers of a `Transformer`.

`LoRALinear` wraps a frozen base projection (fp32/bf16 `nn.Linear`, our CPU `NF4Linear`, or
bitsandbytes' `Linear4bit`, e.g. on CUDA) and adds `scale * B(A(dropout(x)))` with A (r, in)
and B (out, r), scale = alpha/r.
B starts at zero, so a fresh adapter reproduces the base exactly.

Tensor names follow `edge_sdk.models.naming` (and PEFT without its `base_model.model.` prefix
and `.weight` suffix): `model.layers.{i}.self_attn.q_proj.lora_A` (r, in), `...lora_B` (out, r).
They are the parameter names inside the model, so `lora_state_dict` is a filter, not a rename.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from edge_sdk.choices import COMPUTES, Compute
from edge_sdk.errors import AdapterMismatchError
from edge_sdk.models import gemm, transformer
from edge_sdk.models.config import model_config
from edge_sdk.models.naming import LORA_TARGETS, hf_module, parse_hf_module
from edge_sdk.models.nf4 import NF4Linear, scratch_buffer
from edge_sdk.validators import is_int_in

FUSED_PROJECTIONS = True
"""Run an attention block's q, k and v as one autograd function (`LoRALinear.forward_stacked`)
and a gated MLP as another (`LoRALinear.forward_mlp`), each with one input-gradient product
over its layers' stacked weights. Only for NF4 bases with fp32 adapters and no dropout, in
either compute (`Fp32Products`, `lora_bf16.Bf16Products`; the MLP's only with
`transformer.LEAN_BACKWARD`, as it recomputes its activation in backward); the
per-projection functions below serve everything else. False: one function per projection,
for measuring (`benchmarks/bench_train.py --stacks flag-ab --flag
edge_sdk.training.lora:FUSED_PROJECTIONS`: 0.95x step time on, BENCHMARKS.md)."""


@dataclass
class LoraConfig:
    """What adapter to attach and how it is scaled."""

    rank: int = 8
    """r: the inner width of B·A."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / rank) · B·A."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training (the base path never sees it)."""
    targets: tuple[str, ...] = LORA_TARGETS
    """Projections that get an adapter; default: all attention and MLP projections."""
    layers: tuple[int, ...] | None = None
    """Block indices to adapt; None means every block."""
    freeze_a: bool = False
    """Train B only, A fixed (the federated 'frozen-a' mode: A comes from a shared seed)."""

    def __post_init__(self) -> None:
        if not is_int_in(self.rank, 1):
            raise ValueError(f"`rank` should be a positive integer, got {self.rank!r}")
        if (
            not isinstance(self.alpha, (int, float))
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise ValueError(f"`alpha` should be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` should be in [0, 1), got {self.dropout!r}")
        self.targets = tuple(self.targets)
        if not self.targets:
            raise ValueError("`targets` should name at least one projection, got an empty list")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(
                f"`targets` has unknown modules {unknown}; "
                f"expected a subset of {list(LORA_TARGETS)}"
            )
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"`targets` lists a module twice: {list(self.targets)}")
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if any(not isinstance(i, int) or i < 0 for i in self.layers):
                raise ValueError(
                    f"`layers` should be non-negative integers, got {list(self.layers)}"
                )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """y = base(x) + scale · B·A·dropout(x). Only `lora_A` / `lora_B` can require grad."""

    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        freeze_a: bool = False,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.scale = rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(
            torch.empty(rank, in_features), requires_grad=not freeze_a
        )  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # (out, r)
        self.enabled = True
        """False bypasses the adapter (the output is the base's)."""
        self.compute: Compute = "fp32"
        """Arithmetic of an NF4 base's products: "bf16" runs them in bf16 (`lora_bf16`)."""
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ kaiming-uniform(a=sqrt(5)) like nn.Linear and PEFT; B = 0."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform(a=sqrt(5)) on fan_in
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nf4 = (
            isinstance(self.base, NF4Linear)
            and isinstance(self.dropout, nn.Identity)
            and x.dtype == torch.float32
        )
        if nf4 and self.compute == "bf16":
            # also with the adapter off: DPO's reference multiplies as the policy does
            args = (x, self.lora_A, self.lora_B, self.scale, self.base, self.enabled)
            return _bf16().Bf16NF4LoRA.apply(*args)
        if not self.enabled:
            return self.base(x)
        if nf4:
            return _MergedNF4LoRA.apply(x, self.lora_A, self.lora_B, self.scale, self.base)
        y = self.base(x)
        a = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T  # (..., r)
        return y + (a @ self.lora_B.T * self.scale).to(y.dtype)  # (..., out)

    def forward_gated(
        self, gate: torch.Tensor, up: torch.Tensor, gelu: bool
    ) -> torch.Tensor | None:
        """self(act(gate) ∘ up) without keeping act(gate) ∘ up for backward, or None when this
        layer has no such path (the caller then applies the activation itself).

        For the MLP's down projection: its input (tokens, d_ff) is the largest tensor a block
        saves; backward recomputes it from gate and up, which the activation's own backward
        keeps anyway (SmolLM2 at seq 256: -45 MB of saved tensors per sequence).
        """
        if (
            not self.enabled
            or not isinstance(self.base, NF4Linear)
            or not isinstance(self.dropout, nn.Identity)
            or gate.dtype != torch.float32
        ):
            return None
        fn = _GatedMergedNF4LoRA if self.compute == "fp32" else _bf16().Bf16GatedNF4LoRA
        return fn.apply(gate, up, gelu, self.lora_A, self.lora_B, self.scale, self.base)

    def forward_stacked(
        self, x: torch.Tensor, others: tuple[nn.Module, ...]
    ) -> tuple[torch.Tensor, ...] | None:
        """(self(x), *(m(x) for m in others)) as one autograd function (`_StackedNF4LoRA`), or
        None when a layer cannot join (the caller then runs each itself).

        For an attention block's q, k and v: backward runs one input-gradient product over the
        three layers' stacked weights instead of three, and autograd adds no (tokens, in)
        gradients.
        """
        layers = (self, *others)
        if not FUSED_PROJECTIONS or not all(
            _fusable(m, self, x.shape[-1], x.dtype) for m in layers
        ):
            return None
        outputs = _StackedNF4LoRA.apply(x, self._arith(), _specs(layers), *_adapters(layers))
        return cast("tuple[torch.Tensor, ...]", outputs)

    def forward_mlp(
        self, x: torch.Tensor, up: nn.Module, down: nn.Module, gelu: bool
    ) -> torch.Tensor | None:
        """down(act(self(x)) ∘ up(x)) as one autograd function (`_NF4LoRAMLP`), this layer being
        the gate projection, or None when a layer cannot join."""
        if not (
            FUSED_PROJECTIONS
            and _fusable(self, self, x.shape[-1], x.dtype)
            and _fusable(up, self, x.shape[-1], x.dtype)
            and _fusable(down, self, self.out_features, x.dtype)
            and cast(LoRALinear, up).out_features == self.out_features
        ):
            return None
        layers = (self, up, down)
        y = _NF4LoRAMLP.apply(x, gelu, self._arith(), _specs(layers), *_adapters(layers))
        return cast(torch.Tensor, y)

    def _arith(self) -> Any:
        """The fused functions' arithmetic for this layer's `compute`."""
        return Fp32Products if self.compute == "fp32" else _bf16().Bf16Products

    def delta_weight(self) -> torch.Tensor:
        """scale · B·A, (out, in): what merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scale

    def base_weight(self) -> torch.Tensor:
        """The base weight (out, in) as fp32 (NF4 is dequantized)."""
        return dense_weight(self.base)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.rank}, scale={self.scale:g}"
        )


def _bf16() -> Any:
    """`lora_bf16`, whose functions run `--compute bf16` (imported here: that module builds on
    this one)."""
    from edge_sdk.training import lora_bf16

    return lora_bf16


def set_base_compute(model: nn.Module, compute: Compute) -> None:
    """Run every NF4 base projection under an adapter in `compute` ("fp32" or "bf16": see
    `lora_bf16`). Other bases (fp32, bf16, bitsandbytes) keep their own arithmetic."""
    if compute not in COMPUTES:
        raise ValueError(f"`compute` should be one of {COMPUTES}, got {compute!r}")
    for _, m in lora_modules(model):
        m.compute = compute


class _MergedNF4LoRA(torch.autograd.Function):
    """y = x (W + s·B·A)^T + bias, for a frozen NF4 W, in one matmul each way.

    An NF4 layer dequantizes W on every forward and backward anyway; adding s·B·A to that
    fresh fp32 copy costs out·in·r multiply-adds (about r / tokens of the main matmul) and
    replaces the four rank-r matmuls and the extra (tokens, out) add of the unmerged form.
    Backward recomputes the merged W instead of keeping it (which would hold the whole model
    in fp32 during the step), and derives the adapter's gradients from x and g directly:
    dB = s·gᵀ(xAᵀ), dA = s·(gB)ᵀx.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, scale, base):
        w = base.dequantize_scratch()  # (out, in)
        w.addmm_(lora_B, lora_A, alpha=scale)  # W + s·B·A
        ctx.save_for_backward(x, lora_A, lora_B)
        ctx.scale, ctx.base = scale, base
        return gemm.linear(x, w, base.bias)  # (..., out)

    @staticmethod
    def backward(ctx, g):
        x, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scale
        grad_x = None
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        if ctx.needs_input_grad[0]:
            w = ctx.base.dequantize_scratch()
            w.addmm_(lora_B, lora_A, alpha=s)
            grad_x = gemm.matmul(g, w)  # (..., in)
        grad_a, grad_b = _lora_grads(x2, g2, lora_A, lora_B, s, *ctx.needs_input_grad[1:3])
        return grad_x, grad_a, grad_b, None, None


def _lora_grads(
    x2: torch.Tensor,
    g2: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    s: float,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dA = s·(gB)ᵀx and dB = s·gᵀ(xAᵀ) from the layer input x2 (N, in) and the output
    gradient g2 (N, out); None where not needed.

    Operand orders are chosen for CPU BLAS: a GEMM with 8 output columns runs 2-4x slower than
    the same product with 8 output rows (measured on (256, 1536) x r=8)."""
    grad_a = grad_b = None
    if need_b:
        xa = x2 @ lora_A.T  # (N, r)
        grad_b = (xa.T @ g2).T.mul_(s)  # ((r, N) @ (N, out))^T -> (out, r)
    if need_a:
        gb = (lora_B.T @ g2.T).T  # ((r, out) @ (out, N))^T -> (N, r)
        grad_a = (gb.T @ x2).mul_(s)  # (r, N) @ (N, in) -> (r, in)
    return grad_a, grad_b


def _gated_act(gate: torch.Tensor, gelu: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """act(gate), into `out` when given (the same kernel either way)."""
    if out is not None:
        if gelu:
            return torch.ops.aten.gelu.out(gate, approximate="tanh", out=out)
        return torch.ops.aten.silu.out(gate, out=out)
    return (
        torch.nn.functional.gelu(gate, approximate="tanh")
        if gelu
        else torch.nn.functional.silu(gate)
    )


def _gated_act_backward(
    grad: torch.Tensor, gate: torch.Tensor, gelu: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """d act(gate) / d gate applied to `grad`: the kernel autograd's own backward calls, into
    `out` when given."""
    if out is not None:
        if gelu:
            return torch.ops.aten.gelu_backward.grad_input(
                grad, gate, approximate="tanh", grad_input=out
            )
        return torch.ops.aten.silu_backward.grad_input(grad, gate, grad_input=out)
    if gelu:
        return torch.ops.aten.gelu_backward(grad, gate, approximate="tanh")
    return torch.ops.aten.silu_backward(grad, gate)


class _GatedMergedNF4LoRA(torch.autograd.Function):
    """y = (act(gate) ∘ up)(W + s·B·A)^T + bias: `_MergedNF4LoRA` with its input h = act(gate) ∘ up
    recomputed in backward from gate and up instead of saved.
    """

    @staticmethod
    def forward(ctx, gate, up, gelu, lora_A, lora_B, scale, base):
        # h is a temporary here (backward recomputes it): a reused buffer when FEWER_PASSES.
        buf = scratch_buffer("temp", gate.shape) if transformer.FEWER_PASSES else None
        h = _gated_act(gate, gelu, out=buf).mul_(up)  # (..., d_ff)
        w = base.dequantize_scratch()  # (out, d_ff)
        w.addmm_(lora_B, lora_A, alpha=scale)
        save = transformer.save_16bit
        ctx.save_for_backward(save(gate), save(up), lora_A, lora_B)
        ctx.gelu, ctx.scale, ctx.base, ctx.dtype = gelu, scale, base, gate.dtype
        return gemm.linear(h, w, base.bias)  # (..., out)

    @staticmethod
    def backward(ctx, g):
        if transformer.FEWER_PASSES:
            return _GatedMergedNF4LoRA._backward_lean(ctx, g)
        gate, up, lora_A, lora_B = ctx.saved_tensors
        gate, up = transformer.restore_gate_up(gate, up, ctx.dtype)
        s = ctx.scale
        with torch.enable_grad():
            gd = gate.detach().requires_grad_(True)
            act = _gated_act(gd, ctx.gelu)
        h = act.detach() * up  # (..., d_ff): recomputed, never saved
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        h2 = h.reshape(-1, h.shape[-1])  # (N, d_ff)
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            w = ctx.base.dequantize_scratch()
            w.addmm_(lora_B, lora_A, alpha=s)
            grad_h = gemm.matmul(g, w)  # (..., d_ff)
            grad_up = grad_h * act.detach()
            (grad_gate,) = torch.autograd.grad(act, gd, grad_h.mul_(up))
        grad_a, grad_b = _lora_grads(h2, g2, lora_A, lora_B, s, *ctx.needs_input_grad[3:5])
        return grad_gate, grad_up, None, grad_a, grad_b, None, None

    @staticmethod
    def _backward_lean(ctx, g):
        """`backward`'s arithmetic, op for op (bit-identical), with act(gate), h and the
        gradient into h in reused buffers and the activation's backward kernel called directly
        (no autograd graph for it): two fresh (..., d_ff) tensors, the returned gradients,
        instead of five."""
        gate, up, lora_A, lora_B = ctx.saved_tensors
        gate, up = transformer.restore_gate_up(gate, up, ctx.dtype)
        s = ctx.scale
        act = _gated_act(gate, ctx.gelu, out=scratch_buffer("temp", gate.shape))
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        grad_gate = grad_up = grad_a = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            w = ctx.base.dequantize_scratch()
            w.addmm_(lora_B, lora_A, alpha=s)
            grad_h = gemm.matmul(g, w, partial(scratch_buffer, "temp2", gate.shape))  # (..., d_ff)
            grad_up = grad_h * act
            grad_gate = _gated_act_backward(grad_h.mul_(up), gate, ctx.gelu)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            h = torch.mul(act, up, out=act)  # (..., d_ff): recomputed, never saved
            h2 = h.reshape(-1, h.shape[-1])  # (N, d_ff)
            grad_a, grad_b = _lora_grads(h2, g2, lora_A, lora_B, s, *ctx.needs_input_grad[3:5])
        return grad_gate, grad_up, None, grad_a, grad_b, None, None


_Spec = tuple[NF4Linear, float, bool]
"""A layer in a stacked product: its NF4 base, its adapter's scale, whether the adapter is on."""


def _fusable(m: nn.Module, first: LoRALinear, in_features: int, dtype: torch.dtype) -> bool:
    """Whether `m` can join a stacked product (`_StackedNF4LoRA`, `_NF4LoRAMLP`) led by
    `first` (the same `compute`, so one arithmetic serves all)."""
    return (
        isinstance(m, LoRALinear)
        and isinstance(m.base, NF4Linear)
        and isinstance(m.dropout, nn.Identity)
        and m.compute == first.compute
        and m.in_features == in_features
        and dtype == torch.float32
    )


def _specs(layers: tuple[nn.Module, ...]) -> tuple[_Spec, ...]:
    return tuple(
        (cast(NF4Linear, m.base), cast(LoRALinear, m).scale, cast(LoRALinear, m).enabled)
        for m in layers
    )


def _adapters(layers: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """A_1, B_1, A_2, B_2, ...: the autograd inputs of a stacked product."""
    return [t for m in layers for t in (cast(LoRALinear, m).lora_A, cast(LoRALinear, m).lora_B)]


def _stacked_weight(specs: tuple[_Spec, ...], ab: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """[W_1 + s_1·B_1·A_1; W_2 + s_2·B_2·A_2; ...], (sum of outs, in) fp32, in this thread's "nf4"
    buffer (each layer dequantized into its block of rows; an adapter that is off adds nothing)."""
    rows = sum(base.out_features for base, _, _ in specs)
    w = scratch_buffer("nf4", (rows, specs[0][0].in_features))
    o = 0
    for i, (base, scale, on) in enumerate(specs):
        part = base.dequantize_into(w[o : o + base.out_features])
        if on:
            part.addmm_(ab[2 * i + 1], ab[2 * i], alpha=scale)
        o += base.out_features
    return w


def _stacked_lora_grads(
    x2: torch.Tensor,
    g2: torch.Tensor,
    specs: tuple[_Spec, ...],
    ab: tuple[torch.Tensor, ...],
    need: tuple[bool, ...],
) -> list[torch.Tensor | None]:
    """dA_1, dB_1, dA_2, ... of a stacked product from its input x2 (N, in) and output gradient
    g2 (N, sum of outs), each layer's from its columns of g2 (`_lora_grads`).

    With every adapter on and training A and B, the two products that read x2 run once for all
    layers: x2·[A_1; A_2; ...]ᵀ and [(g_1·B_1)ᵀ; (g_2·B_2)ᵀ; ...]·x2."""
    if len(specs) > 1 and all(on for _, _, on in specs) and all(need[: 2 * len(specs)]):
        return _stacked_lora_grads_batched(x2, g2, specs, ab)
    grads: list[torch.Tensor | None] = []
    o = 0
    for i, (base, scale, on) in enumerate(specs):
        g_i = g2[:, o : o + base.out_features]
        o += base.out_features
        if not on:
            grads += [None, None]
            continue
        grads += _lora_grads(x2, g_i, ab[2 * i], ab[2 * i + 1], scale, need[2 * i], need[2 * i + 1])
    return grads


def _stacked_lora_grads_batched(
    x2: torch.Tensor, g2: torch.Tensor, specs: tuple[_Spec, ...], ab: tuple[torch.Tensor, ...]
) -> list[torch.Tensor | None]:
    """`_stacked_lora_grads` with one x2·Aᵀ and one (g·B)ᵀ·x2 product for all layers (each
    layer's rows of the results are its own; operand orders as in `_lora_grads`)."""
    ranks = [ab[2 * i].shape[0] for i in range(len(specs))]
    xa = x2 @ torch.cat(ab[0::2]).T  # (N, sum of r)
    gb_t = x2.new_empty(sum(ranks), x2.shape[0])  # (sum of r, N): (g_i·B_i)ᵀ, layer by layer
    grad_b: list[torch.Tensor] = []
    o = r0 = 0
    for i, ((base, scale, _), r) in enumerate(zip(specs, ranks)):
        g_i = g2[:, o : o + base.out_features]  # (N, out_i)
        grad_b.append((xa[:, r0 : r0 + r].T @ g_i).T.mul_(scale))  # (out_i, r)
        torch.mm(ab[2 * i + 1].T, g_i.T, out=gb_t[r0 : r0 + r])
        o, r0 = o + base.out_features, r0 + r
    grad_a_all = gb_t @ x2  # (sum of r, in)
    grads: list[torch.Tensor | None] = []
    r0 = 0
    for (_, scale, _), r, db in zip(specs, ranks, grad_b):
        grads += [grad_a_all[r0 : r0 + r].mul_(scale), db]
        r0 += r
    return grads


def _side_by_side(
    grads: tuple[torch.Tensor | None, ...], specs: tuple[_Spec, ...], x: torch.Tensor
) -> torch.Tensor:
    """The output gradients of a stacked product side by side, (..., sum of outs), zeros for an
    output that got none, in this thread's "temp3" buffer."""
    outs = [base.out_features for base, _, _ in specs]
    lead = x.shape[:-1]
    return torch.cat(
        [gr if gr is not None else x.new_zeros(*lead, o) for gr, o in zip(grads, outs)],
        dim=-1,
        out=scratch_buffer("temp3", (*lead, sum(outs))),
    )


def _gate_up_grads(
    grad_h: torch.Tensor, act: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool
) -> torch.Tensor:
    """[d/d gate, d/d up] of h = act(gate) ∘ up side by side, (..., 2·d_ff), in this thread's
    "temp3" buffer, from the gradient grad_h into h (overwritten)."""
    d = gate.shape[-1]
    grad_gu = scratch_buffer("temp3", (*gate.shape[:-1], 2 * d))
    torch.mul(grad_h, act, out=grad_gu[..., d:])
    _gated_act_backward(grad_h.mul_(up), gate, gelu, out=grad_gu[..., :d])
    return grad_gu


class Fp32Products:
    """The fused functions' products in fp32 (`_StackedNF4LoRA`, `_NF4LoRAMLP`): each adapter
    merged into its freshly dequantized weight, one product per layer forward, one over the
    stacked weights for the input gradient. `lora_bf16.Bf16Products` is the bf16 twin."""

    @staticmethod
    def forward(x: torch.Tensor, specs: tuple[_Spec, ...], ab: tuple) -> list[torch.Tensor]:
        """One output (..., out_i) per layer of `specs` that reads x, bias included."""
        return [
            gemm.linear(x, _stacked_weight((spec,), ab[2 * i : 2 * i + 2]), spec[0].bias)
            for i, spec in enumerate(specs)
        ]

    @staticmethod
    def input_grad(
        g: torch.Tensor, specs: tuple[_Spec, ...], ab: tuple, scratch: gemm.Scratch | None = None
    ) -> torch.Tensor:
        """g (..., sum of outs) -> (..., in), into `scratch()` when given."""
        return gemm.matmul(g, _stacked_weight(specs, ab), scratch)


class _StackedNF4LoRA(torch.autograd.Function):
    """`_MergedNF4LoRA` for several layers that read the same input x, returning one output
    per layer, in `arith`'s arithmetic (`Fp32Products` or `lora_bf16.Bf16Products`). Forward
    runs one product per layer (each dequantized weight is read while it is still in cache:
    one stacked product measured slower in the step); backward puts the output gradients side
    by side and runs one input-gradient product g·[W_1 + s_1·B_1·A_1; ...] over all of them,
    instead of autograd adding one (tokens, in) gradient per layer."""

    @staticmethod
    def forward(ctx, x, arith, specs, *ab):
        ctx.save_for_backward(x, *ab)
        ctx.arith, ctx.specs = arith, specs
        return tuple(arith.forward(x, specs, ab))

    @staticmethod
    def backward(ctx, *grads):
        x, *ab = ctx.saved_tensors
        specs = ctx.specs
        g = _side_by_side(grads, specs, x)
        grad_x = ctx.arith.input_grad(g, specs, ab) if ctx.needs_input_grad[0] else None
        lora_grads = _stacked_lora_grads(
            x.reshape(-1, x.shape[-1]),
            g.reshape(-1, g.shape[-1]),
            specs,
            ab,
            ctx.needs_input_grad[3:],
        )
        return grad_x, None, None, *lora_grads


class _NF4LoRAMLP(torch.autograd.Function):
    """down(act(gate) ∘ up) for NF4 gate, up and down projections with their adapters, as one
    function, in `arith`'s arithmetic (as `_StackedNF4LoRA`): act(gate) ∘ up is recomputed in
    backward from gate and up (as `_GatedMergedNF4LoRA`), and the gradients into gate and up
    are formed side by side in one reused buffer that goes straight into one input-gradient
    product g·[W_gate + ...; W_up + ...] and the adapters' gradients: no autograd node, fresh
    gradient tensor or gradient sum per projection."""

    @staticmethod
    def forward(ctx, x, gelu, arith, specs, *ab):
        gate, up = arith.forward(x, specs[:2], ab[:4])
        h = _gated_act(gate, gelu, out=scratch_buffer("temp", gate.shape)).mul_(up)
        (y,) = arith.forward(h, specs[2:], ab[4:])
        save = transformer.save_16bit
        ctx.save_for_backward(x, save(gate), save(up), *ab)
        ctx.gelu, ctx.arith, ctx.specs, ctx.dtype = gelu, arith, specs, gate.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        x, gate, up, *ab = ctx.saved_tensors
        gate, up = transformer.restore_gate_up(gate, up, ctx.dtype)
        arith, specs, need = ctx.arith, ctx.specs, ctx.needs_input_grad
        d = gate.shape[-1]
        act = _gated_act(gate, ctx.gelu, out=scratch_buffer("temp", gate.shape))
        grad_h = arith.input_grad(
            g, specs[2:], ab[4:], partial(scratch_buffer, "temp2", gate.shape)
        )  # (..., d_ff)
        grad_gu = _gate_up_grads(grad_h, act, gate, up, ctx.gelu)
        h = torch.mul(act, up, out=act)  # (..., d_ff): recomputed, never saved
        down_grads = _stacked_lora_grads(
            h.reshape(-1, d), g.reshape(-1, g.shape[-1]), specs[2:], ab[4:], need[8:10]
        )
        grad_x = arith.input_grad(grad_gu, specs[:2], ab[:4]) if need[0] else None
        gu_grads = _stacked_lora_grads(
            x.reshape(-1, x.shape[-1]), grad_gu.reshape(-1, 2 * d), specs[:2], ab[:4], need[4:8]
        )
        return grad_x, None, None, None, *gu_grads, *down_grads


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a plain, `NF4Linear` or bitsandbytes 4-bit linear layer, as fp32."""
    if isinstance(linear, NF4Linear):
        return linear.dequantize()
    w: torch.Tensor = linear.weight  # type: ignore[assignment]  # nn.Module attrs are Tensor | Module
    state = getattr(w, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, state).float()
    return w.detach().float()


def _in_out(linear: nn.Module) -> tuple[int, int]:
    return int(linear.in_features), int(linear.out_features)  # type: ignore[arg-type]


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(module path, LoRALinear) pairs, e.g. ('model.layers.0.self_attn.q_proj', ...)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def apply_lora(
    model: nn.Module, cfg: LoraConfig, generator: torch.Generator | None = None
) -> nn.Module:
    """Wrap the configured projections of `model` in `LoRALinear` (in place) and return it.

    Every other parameter is frozen. `generator` seeds A's init for reproducible runs.
    """
    n_layer = model_config(model).n_layer
    layers = range(n_layer) if cfg.layers is None else cfg.layers
    bad = [i for i in layers if i >= n_layer]
    if bad:
        raise ValueError(f"`layers` {bad} out of range for a model with {n_layer} blocks")
    model.requires_grad_(False)
    for i in layers:
        for target in cfg.targets:
            path = hf_module(i, target)
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            base = getattr(parent, attr)
            if isinstance(base, LoRALinear):
                raise ValueError(f"{path} already has a LoRA adapter")  # noqa: TRY004 - a state error, not a type
            fan_in, fan_out = _in_out(base)
            lora = LoRALinear(base, fan_in, fan_out, cfg.rank, cfg.alpha, cfg.dropout, cfg.freeze_a)
            lora.reset_parameters(generator)
            setattr(parent, attr, lora)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters that train (B, and A unless frozen), in a stable order."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B) if p.requires_grad]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed per `edge_sdk.models.naming` (detached, fp32, on CPU)."""
    out: dict[str, torch.Tensor] = {}
    for path, m in lora_modules(model):
        out[f"{path}.lora_A"] = m.lora_A.detach().float().cpu().clone()
        out[f"{path}.lora_B"] = m.lora_B.detach().float().cpu().clone()
    return out


def load_lora_state_dict(model: nn.Module, tensors: Mapping[str, Any], strict: bool = True) -> None:
    """Copy adapter tensors (numpy arrays or torch tensors) into the model's LoRA layers.

    `strict`: every LoRA layer of the model must be covered and no key may be unknown.
    Shapes must match exactly; a mismatch raises `AdapterMismatchError`.
    """
    modules = dict(lora_modules(model))
    seen: set[str] = set()
    for key, value in tensors.items():
        path, _, kind = key.rpartition(".")
        if kind not in ("lora_A", "lora_B"):
            raise AdapterMismatchError(f"adapter key {key!r} does not end in .lora_A or .lora_B")
        parse_hf_module(path)  # ValueError for a non-target path
        if path not in modules:
            if strict:
                raise AdapterMismatchError(
                    f"adapter has {key!r} but the model has no LoRA layer at {path}"
                )
            continue
        t = torch.from_numpy(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
        param = getattr(modules[path], kind)
        if tuple(t.shape) != tuple(param.shape):
            raise AdapterMismatchError(
                f"{key}: shape {tuple(t.shape)} != expected {tuple(param.shape)}"
            )
        if not torch.isfinite(t).all():
            raise AdapterMismatchError(f"{key}: contains NaN or infinite values")
        with torch.no_grad():
            param.copy_(t.to(param.dtype))
        seen.add(key)
    if strict:
        missing = [
            f"{p}.{k}" for p in modules for k in ("lora_A", "lora_B") if f"{p}.{k}" not in seen
        ]
        if missing:
            raise AdapterMismatchError(f"adapter lacks {len(missing)} tensors, e.g. {missing[0]}")


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter on or off (off reproduces the base model)."""
    for _, m in lora_modules(model):
        m.enabled = enabled


def merged_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """W + scale·B·A (out, in), fp32, per adapted module path: for checks and dense export."""
    return {
        path: m.base_weight() + m.delta_weight().detach().float() for path, m in lora_modules(model)
    }


def max_merge_error(model: nn.Module, x: torch.Tensor) -> float:
    """max |LoRALinear(x) - x @ (W + scale·B·A)^T| over all adapted layers, for input x (..., in).

    Only modules whose in_features match x's width are checked. NF4 layers use their
    dequantized weight, which is exactly what the 4-bit matmul multiplies by.
    """
    worst = 0.0
    with torch.no_grad():
        for _, m in lora_modules(model):
            if m.in_features != x.shape[-1]:
                continue
            w = m.base_weight() + m.delta_weight().float()
            bias = getattr(m.base, "bias", None)
            ref = x.float() @ w.T + (bias.float() if bias is not None else 0.0)
            worst = max(worst, (m(x.to(torch.float32)).float() - ref).abs().max().item())
    return worst


__all__ = [
    "LoRALinear",
    "LoraConfig",
    "apply_lora",
    "dense_weight",
    "load_lora_state_dict",
    "lora_modules",
    "lora_parameters",
    "lora_state_dict",
    "max_merge_error",
    "merged_weights",
    "set_base_compute",
    "set_lora_enabled",
]
