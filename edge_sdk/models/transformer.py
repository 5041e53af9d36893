"""A lean decoder-only transformer covering llama, gemma3, qwen2 and qwen3, in one file.

Reads top to bottom: RMSNorm → RoPE → attention → MLP → block → model → loss. Family
differences are switches on `ModelConfig` (see `edge_sdk.models.config`), not subclasses.

The module tree mirrors Hugging Face's (`model.layers.{i}.self_attn.q_proj`, ...), so the
LoRA tensors that `edge_sdk.training.lora` attaches are named exactly as in
`edge_sdk.models.naming` and PEFT without any renaming.

Weights are expected in Hugging Face layout: the loader undoes llama.cpp's Q/K row permutation
for llama, so RoPE here is always the "rotate half" (NEOX) form. All norms are computed in fp32,
like llama.cpp, and the logits are returned in fp32.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import weakref
from collections.abc import Iterator
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from edge_sdk.env import LOW_MEMORY_ENV
from edge_sdk.models import gemm
from edge_sdk.models.config import ModelConfig
from edge_sdk.models.nf4 import scratch_buffer
from edge_sdk.models.quant_rows import QuantizedEmbedding

IGNORE_INDEX = -100
"""Label value that is not scored (same convention as Hugging Face / PyTorch)."""

# Tokens per chunk of the fused output-projection + cross-entropy is chosen so that one chunk
# of logits holds about this many fp32 elements (1M elements = 4 MiB, ~21 tokens of a 49k
# vocabulary). The loss is computed when every activation is alive, so its temporaries (logits,
# softmax: 2-3 chunks) land on the step's memory peak: 16 MiB chunks measured 60 MB more peak
# RSS for a SmolLM2 step (1085 -> 1024 MB; issue 16).
_CE_CHUNK_ELEMENTS = 1 << 20

FEWER_PASSES = True
"""Write the temporaries of the step's element-wise chains (RMSNorm and RoPE both ways, the
gated MLP's backward in `edge_sdk.training.lora`, the fused loss's logit chunks) into reused
buffers (`scratch_buffer`) or in place, with the same arithmetic in the same order: the loss
and gradients are bit-identical. Fresh activation-sized tensors are what cost: with glibc's
mmap threshold pinned for peak RSS, each is a new mapping whose pages fault in on first write
(SmolLM2 QLoRA step, seq 256: 278-324k minor page faults per step without, 113-127k with).
False: the plain forms, for measuring (`benchmarks/bench_train.py --stacks floor-ab`)."""

LEAN_BACKWARD = True
"""Recompute RMSNorm, RoPE and the gated activation in backward instead of saving their
intermediates (the `_RMSNormFn`, `_RopeFn`, `_GatedActFn` below). False: plain autograd, for
measuring what it saves (`benchmarks/bench_train.py --stacks ours-plain-backward`)."""

SAVE_16BIT = os.environ.get(LOW_MEMORY_ENV) == "1"
"""Keep the gated MLP's gate and up projections, which its backward needs, in bfloat16 until
then (`save_16bit` / `restore_gate_up`): they are half of the step's saved activations, and
halving them takes 45 MB off a SmolLM2 step's peak (seq 256, batch 1; issue 16). The forward
and the loss are unchanged; the gradients see gate and up rounded to bf16's 8-bit mantissa
(SmolLM2, one step: 0.14 % relative error over all LoRA gradients, cosine 0.999999). On with
FEDLM_LOW_MEMORY=1 only: federated runs that sit on a knife edge move with it (the DPO demo's
federated arm: 53 → 48 of 64 prompts won; BENCHMARKS.md)."""

_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32.

    Gemma stores its norm weights as (1 + w) already in the GGUF (the converter adds the 1), so
    one formula serves every family.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            LEAN_BACKWARD
            and x.requires_grad
            and torch.is_grad_enabled()
            and not self.weight.requires_grad
        ):
            y = cast(torch.Tensor, _RMSNormFn.apply(x, self.weight, self.eps))
            recipes = _norm_recipes.get()
            if recipes is not None:
                recipes[id(y)] = (weakref.ref(y), y._version, _NormRecipe(x, self.weight, self.eps))
            return y
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


# Memory-lean backward passes for the cheap element-wise parts of a block (issue 16, part 2).
# Plain autograd saves every intermediate of these chains: the normalised x of each RMSNorm,
# the rotated copy of q and k and their pre-RoPE values, SwiGLU's activation next to its two
# inputs. These functions keep only what their backward cannot cheaply recompute (for SmolLM2
# at seq 256: ~4 MB per block, ~120 MB per step) and recompute the rest, a few element-wise
# passes against the step's GEMMs. Gradients equal plain autograd's
# (tests/models/test_transformer.py).


class _RMSNormFn(torch.autograd.Function):
    """y = x · rsqrt(mean(x²) + eps) · w with a frozen w; saves x and the (…, 1) rsqrt only.

    dx = r·(w∘g) − x·r³·mean(x∘w∘g), the RMSNorm input gradient (Zhang & Sennrich 2019).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        r = _rms_rsqrt(xf, eps)  # (..., 1)
        ctx.save_for_backward(x, r, weight)
        return _rms_scale(xf, r, weight).to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, r, weight = ctx.saved_tensors
        xf = x.float()
        if not FEWER_PASSES:
            gw = g.float() * weight.float()  # (..., d)
            dot = (gw * xf).mean(-1, keepdim=True)  # (..., 1)
            dx = gw * r - xf * (r.pow(3) * dot)
            return dx.to(x.dtype), None, None
        # The same arithmetic, op for op, with one fresh (..., d) tensor (dx) instead of five:
        # the two (..., d) temporaries go to a reused buffer (see `scratch_buffer`).
        gw = g.float() * weight.float()  # (..., d): becomes dx
        tmp = torch.mul(gw, xf, out=scratch_buffer("temp", gw.shape))
        dot = tmp.mean(-1, keepdim=True)  # (..., 1)
        torch.mul(xf, r.pow(3) * dot, out=tmp)
        return gw.mul_(r).sub_(tmp).to(x.dtype), None, None


def _rms_rsqrt(xf: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(mean(x²) + eps) over the last dim, (..., 1); x² goes to a reused buffer."""
    lean = FEWER_PASSES and not (xf.requires_grad and torch.is_grad_enabled())  # out= cannot
    sq = torch.mul(xf, xf, out=scratch_buffer("temp", xf.shape)) if lean else xf.pow(2)
    return torch.rsqrt(sq.mean(-1, keepdim=True) + eps)


def _rms_scale(xf: torch.Tensor, r: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """xf · r · w as one fresh tensor (the product is formed in place, in the same order)."""
    if FEWER_PASSES:
        return (xf * r).mul_(weight.float())
    return xf * r * weight.float()


def _rmsnorm_values(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`_RMSNormFn.forward`'s arithmetic, op for op (so a recomputed output is bit-identical)."""
    xf = x.float()
    return _rms_scale(xf, _rms_rsqrt(xf, eps), weight).to(x.dtype)


# A normed activation is the input of the next projections (q/k/v after attn_norm, gate/up
# after ffn_norm), and their LoRA functions save it for the adapter's gradients: 2 x (T, d)
# per block, while the norm itself already keeps its input x. Under this context, such a save
# stores (x, weight, eps) instead and backward recomputes the output, bit for bit, from what
# the norm keeps anyway (SmolLM2, seq 256: -35 MB of saved tensors per sequence; issue 16).
_norm_recipes: contextvars.ContextVar[dict[int, tuple[Any, ...]] | None] = contextvars.ContextVar(
    "_norm_recipes", default=None
)


def _pack_saved(t: torch.Tensor) -> Any:
    recipes = _norm_recipes.get()
    entry = recipes.get(id(t)) if recipes is not None else None
    # The weak reference proves that this is the norm's output itself, not a later tensor
    # that reuses its id; anything else is saved as it is.
    # An unchanged version proves that nothing wrote to it in place since the norm made it.
    if entry is not None and entry[0]() is t and t._version == entry[1]:
        return entry[2]
    return t


def _unpack_saved(packed: Any) -> torch.Tensor:
    if isinstance(packed, _NormRecipe):
        return _rmsnorm_values(packed.x, packed.weight, packed.eps)
    return cast(torch.Tensor, packed)


class _NormRecipe:
    __slots__ = ("eps", "weight", "x")

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
        self.x, self.weight, self.eps = x, weight, eps


@contextlib.contextmanager
def _recomputed_norm_outputs() -> Iterator[None]:
    token = _norm_recipes.set({})
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack_saved, _unpack_saved):
            yield
    finally:
        _norm_recipes.reset(token)


def _rotate_half_t(u: torch.Tensor) -> torch.Tensor:
    """The transpose of x ↦ cat(−x2, x1): u ↦ cat(u2, −u1)."""
    h = u.shape[-1] // 2
    return torch.cat([u[..., h:], -u[..., :h]], dim=-1)


class _RopeFn(torch.autograd.Function):
    """Rotate-half RoPE on the first cos.shape[-1] channels; saves only cos and sin (shared by
    every layer), since the map is linear: dx = g·cos + rot_halfᵀ(g·sin)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _apply_rope(x, cos, sin)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        cos, sin = ctx.saved_tensors
        rd = cos.shape[-1]
        if FEWER_PASSES and rd == g.shape[-1] and g.dtype == torch.float32:
            # dx = g·cos + (g2·sin2, −g1·sin1) written into one fresh tensor; the two halves of
            # cos and sin are equal (`rope_cache` concatenates the angles with themselves).
            h = rd // 2
            dx = g * cos
            dx[..., :h].add_(_half_product(g[..., h:], sin[..., h:]))
            dx[..., h:].sub_(_half_product(g[..., :h], sin[..., :h]))
            return dx, None, None
        gr, gp = g[..., :rd], g[..., rd:]
        grf = gr.float()
        dx = (grf * cos + _rotate_half_t(grf * sin)).to(g.dtype)
        return (torch.cat([dx, gp], dim=-1) if gp.shape[-1] else dx), None, None


def save_16bit(t: torch.Tensor) -> torch.Tensor:
    """What a backward saves of an fp32 activation it only reads: a bf16 copy when SAVE_16BIT,
    else the tensor itself (saved with `save_for_backward` either way, so that saved-tensor
    hooks, e.g. gradient checkpointing's, still see it)."""
    if SAVE_16BIT and t.dtype == torch.float32:
        return t.detach().to(torch.bfloat16)
    return t


def restore_gate_up(
    gate: torch.Tensor, up: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A gated backward's saved gate and up (`save_16bit`) in `dtype`, bf16 copies widened into
    this thread's buffers (`scratch_buffer`)."""
    return restore_saved(gate, dtype, "saved_gate"), restore_saved(up, dtype, "saved_up")


def restore_saved(t: torch.Tensor, dtype: torch.dtype, tag: str) -> torch.Tensor:
    """A saved activation (`save_16bit`) in `dtype`: itself, or its bf16 copy widened into
    this thread's buffer `tag` (`scratch_buffer`)."""
    if t.dtype == dtype:
        return t
    return scratch_buffer(tag, tuple(t.shape), dtype).copy_(t)


class _GatedActFn(torch.autograd.Function):
    """act(gate) ∘ up (SwiGLU or tanh-GeGLU) saving gate and up only (`save_16bit`); act is
    recomputed."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
        ctx.save_for_backward(save_16bit(gate), save_16bit(up))
        ctx.gelu, ctx.dtype = gelu, gate.dtype
        act = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
        return act.mul_(up)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        gate, up = ctx.saved_tensors
        gate, up = restore_gate_up(gate, up, ctx.dtype)
        with torch.enable_grad():
            gd = gate.detach().requires_grad_(True)
            act = F.gelu(gd, approximate="tanh") if ctx.gelu else F.silu(gd)
            (d_gate,) = torch.autograd.grad(act, gd, g * up)
        return d_gate, g * act.detach(), None


def rope_cache(
    positions: torch.Tensor,
    dim: int,
    base: float,
    scale: float = 1.0,
    freq_factors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, dim) for the rotate-half RoPE form (Su et al. 2021, §3.4.2).

    `positions` may also be (B, T) (packed sequences, positions restarting per example); the
    result is then (B, 1, T, dim), broadcasting over the heads of (B, nh, T, hd).

    `freq_factors` (dim/2,) divides each frequency, as llama.cpp does with a GGUF's
    `rope_freqs.weight` (Llama 3.1+ long-context scaling baked into per-frequency factors).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # (dim/2,)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.to(torch.float64)
    angles = (positions.double() / scale)[..., None] * inv_freq  # (..., T, dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, dim)
    if angles.dim() == 3:
        angles = angles.unsqueeze(1)  # (B, 1, T, dim)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x; the rest pass through. x is (B, nh, T, hd)
    with cos (T, rd) or (B, 1, T, rd), or (B, T, nh, hd) with cos (B, T, 1, rd) (`_packed`)."""
    if LEAN_BACKWARD and x.requires_grad and torch.is_grad_enabled():
        return _RopeFn.apply(x, cos, sin)
    return _apply_rope(x, cos, sin)


def _half_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a · b in a reused buffer. RoPE adds or subtracts it in place: a − b·s equals the plain
    form's a + (−b)·s bit for bit, where `addcmul_` may fuse the multiply-add and round once."""
    return torch.mul(a, b, out=scratch_buffer("temp", _broadcast_shape(a.shape, b.shape)))


def _broadcast_shape(a: torch.Size, b: torch.Size) -> tuple[int, ...]:
    """The shape `a` and `b` broadcast to. Not `torch.broadcast_shapes`: its first call imports
    torch.fx's symbolic shapes and sympy (+34 MB RSS, 0.3-0.5 s, measured in `fedlm train`)."""
    n = max(len(a), len(b))
    pa, pb = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    if any(x != y and 1 not in (x, y) for x, y in zip(pa, pb)):
        raise ValueError(f"shapes {tuple(a)} and {tuple(b)} do not broadcast")
    return tuple(y if x == 1 else x for x, y in zip(pa, pb))


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rd = cos.shape[-1]
    if (
        FEWER_PASSES
        and rd == x.shape[-1]
        and x.dtype == torch.float32
        and not (x.requires_grad and torch.is_grad_enabled())  # out= does not differentiate
    ):
        # x·cos + (−x2, x1)·sin formed in one fresh tensor instead of five (neg, cat, two
        # products, their sum); the halves of cos and sin are equal (see `rope_cache`).
        h = rd // 2
        out = x * cos
        out[..., :h].sub_(_half_product(x[..., h:], sin[..., :h]))
        out[..., h:].add_(_half_product(x[..., :h], sin[..., h:]))
        return out
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    out = (xr.float() * cos + rotated.float() * sin).to(x.dtype)
    return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out


Spans = tuple[tuple[tuple[int, int], ...], ...]
"""Per batch row, the [start, end) token spans of its packed examples, in order, covering the
row."""


def packed_spans(position_ids: torch.Tensor) -> Spans | None:
    """The examples packed in each row of `position_ids` (B, T), or None when every row is one.

    An example starts wherever a position is not its predecessor's plus one (positions restart
    at 0 per example; padding continues the last example's positions, so it is never a span of
    its own and a row holding one example takes the plain causal path).
    """
    pos = position_ids.detach().cpu().numpy()
    T = pos.shape[1]
    breaks = pos[:, 1:] != pos[:, :-1] + 1  # (B, T-1): True where a new example starts at t+1
    if not breaks.any():
        return None
    spans = []
    for row in breaks:
        starts = [0, *(int(t) + 1 for t in row.nonzero()[0])]
        spans.append(tuple(zip(starts, [*starts[1:], T])))
    return tuple(spans)


def _window_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool: query t sees keys s with t - window < s <= t (LLAMA_SWA_TYPE_STANDARD)."""
    pos = torch.arange(T, device=device)
    diff = pos[:, None] - pos[None, :]  # (T, T): query minus key position
    return (diff >= 0) & (diff < window)


def _stacked(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...] | None:
    """The outputs of `layers` on x, with one autograd node and one input-gradient product for
    all of them (LoRA over NF4, `LoRALinear.forward_stacked`), or None."""
    fn = getattr(layers[0], "forward_stacked", None)
    return cast("tuple[torch.Tensor, ...] | None", fn(x, layers[1:])) if fn is not None else None


class Attention(nn.Module):
    """Grouped-query causal self-attention, optionally with q/k norms and a sliding window.

    With `spans` (packed sequences), each example attends to itself only: one causal SDPA call
    per example (`_packed`) instead of one masked call over the row. Both were measured on
    SmolLM2's shapes (seq 256, batch 4, ~64-token examples, `benchmarks/bench_packed_attention.py`):
    the block-diagonal boolean mask costs ~1.1x the unmasked causal call (CPU SDPA computes every
    masked tile), the per-example calls less than it (they skip the off-diagonal blocks).
    `torch.nn.attention.varlen` has no CPU kernel in torch 2.13.
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (
            config.n_head,
            config.n_kv_head,
            config.head_dim,
        )
        self.scale = config.softmax_scale
        self.window = config.sliding_window if config.is_local(layer) else None
        self.q_proj = nn.Linear(config.d_model, config.q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.d_model, config.kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.d_model, config.kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.q_dim, config.d_model, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal (and, on local layers, windowed) attention of q (B, nh, T, hd) over k, v."""
        gqa: dict[str, Any] = {}
        if self.n_kv_head != self.n_head:
            if _SDPA_GQA:  # torch >= 2.5 shares kv heads inside SDPA, without copies
                gqa = {"enable_gqa": True}
            else:
                rep = self.n_head // self.n_kv_head
                k = k.repeat_interleave(rep, dim=1)  # (B, nh, T, hd)
                v = v.repeat_interleave(rep, dim=1)  # (B, nh, T, hd)
        T = q.shape[2]
        if self.window is not None and T > self.window:
            mask = _window_mask(T, self.window, q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, **gqa)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, **gqa)

    def _packed(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        spans: Spans,
    ) -> torch.Tensor:
        """Attention of each packed example over itself; q (B, T, nh, hd), k, v (B, T, nkv, hd).

        The examples are cut out of the (B*T)-token axis with one `split` rather than one slice
        each: a slice's backward writes its gradient into a zeroed tensor of the whole input
        and autograd adds those up, which made the isolated step 1.13x the unisolated one
        (SliceBackward 36 % of its CPU time); `split`'s backward is a single `cat`.
        """
        B, T = q.shape[:2]
        cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # (B, T, 1, rd): RoPE in this layout
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        lengths = [e - s for row in spans for s, e in row]
        pieces = zip(
            q.flatten(0, 1).split(lengths),  # (L, nh, hd) each
            k.flatten(0, 1).split(lengths),  # (L, nkv, hd) each
            v.flatten(0, 1).split(lengths),
        )
        y = [
            self._sdpa(*(t.transpose(0, 1).unsqueeze(0) for t in qkv))[0].transpose(0, 1)
            for qkv in pieces
        ]  # (L, nh, hd) each
        return torch.cat(y).view(B, T, self.n_head, self.head_dim)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spans: Spans | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = _stacked(x, (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = qkv if qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, nkv, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, nkv, hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if spans is not None:
            y = self._packed(q, k, v, cos, sin, spans)  # (B, T, nh, hd)
            return self.o_proj(y.view(B, T, self.n_head * self.head_dim))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh|nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self._sdpa(q, k, v)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU (silu) or GeGLU (tanh-approximated gelu)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.gelu = config.activation == "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LoRA over NF4 runs the whole MLP as one function (`LoRALinear.forward_mlp`), in every
        # grad mode, so that a disabled adapter (DPO's reference) computes as the policy does.
        whole = getattr(self.gate_proj, "forward_mlp", None) if LEAN_BACKWARD else None
        y = whole(x, self.up_proj, self.down_proj, self.gelu) if whole is not None else None
        if y is not None:
            return y  # (B, T, d_model)
        gate = self.gate_proj(x)  # (B, T, d_ff)
        up = self.up_proj(x)  # (B, T, d_ff)
        if LEAN_BACKWARD and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            # A LoRA down projection can recompute its input from gate and up in backward
            # (`LoRALinear.forward_gated`), so the (B, T, d_ff) product is never saved.
            fused = getattr(self.down_proj, "forward_gated", None)
            y = fused(gate, up, self.gelu) if fused is not None else None
            if y is not None:
                return y  # (B, T, d_model)
            return self.down_proj(_GatedActFn.apply(gate, up, self.gelu))  # (B, T, d_model)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up)  # (B, T, d_model)


class Block(nn.Module):
    """Pre-norm residual block; Gemma adds a norm on each branch output ("sandwich")."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.local = config.is_local(layer)
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)
        self.post_attn_norm = (
            RMSNorm(config.d_model, config.norm_eps) if config.sandwich_norm else None
        )
        self.post_ffn_norm = (
            RMSNorm(config.d_model, config.norm_eps) if config.sandwich_norm else None
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spans: Spans | None = None
    ) -> torch.Tensor:
        a = self.self_attn(self.attn_norm(x), cos, sin, spans)
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        x = x + a
        m = self.mlp(self.ffn_norm(x))
        if self.post_ffn_norm is not None:
            m = self.post_ffn_norm(m)
        return x + m


class Transformer(nn.Module):
    """Decoder-only language model.

    `forward(input_ids)` returns logits (B, T, V) in fp32. `forward(input_ids, labels)` returns
    the cross-entropy loss instead, computed chunk by chunk without materialising the logits
    (see `fused_linear_cross_entropy`). `labels` is aligned with `input_ids` (Hugging Face
    convention): the shift happens inside, position t is scored on predicting `labels[:, t+1]`,
    and `IGNORE_INDEX` (-100) labels are not scored.
    """

    def __init__(self, config: ModelConfig, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        """dtype of the activations between blocks (float32, or bfloat16 for a bf16 base)."""
        self.gradient_checkpointing = False
        """When True (and training), each block's activations are recomputed in backward."""
        self.model = nn.ModuleDict(
            dict(  # noqa: C408 - keyword form mirrors HF's module names
                # Uninitialised: the loader builds this on the meta device and fills it from
                # the GGUF. nn.Embedding's own init (normal_) on meta goes through torch._refs,
                # which imports torch._dynamo and torch._inductor: ~100 MB of RSS for nothing.
                embed_tokens=nn.Embedding(
                    config.vocab_size,
                    config.d_model,
                    _weight=torch.empty(config.vocab_size, config.d_model),
                ),
                layers=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                norm=RMSNorm(config.d_model, config.norm_eps),
            )
        )
        self.lm_head = (
            None
            if config.tie_embeddings
            else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        self.rope_freq_factors: torch.Tensor | None
        """(rope_dim/2,) divisors of the global layers' RoPE frequencies, or None (the loader
        sets them from `rope_freqs.weight`)."""
        self.register_buffer("rope_freq_factors", None, persistent=False)

    @property
    def output_projection(self) -> torch.Tensor | QuantizedEmbedding:
        """The output projection (V, d_model) as held: a frozen tensor, or the tied embedding
        in its GGUF blocks. `fused_linear_cross_entropy` and `output_logits` take either."""
        head = self.model["embed_tokens"] if self.lm_head is None else self.lm_head
        if isinstance(head, QuantizedEmbedding):
            return head
        return cast(torch.Tensor, head.weight)

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, d_model): the output projection (the embedding when tied) as a tensor; a fresh
        fp32 copy when it is held in GGUF blocks (prefer `output_projection` then)."""
        w = self.output_projection
        return w.dequantize() if isinstance(w, QuantizedEmbedding) else w

    def _rope(self, positions: torch.Tensor, local: bool) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        dim = c.rope_dim or c.head_dim
        if local and c.rope_base_local is not None:
            return rope_cache(positions, dim, c.rope_base_local)  # local layers are not scaled
        return rope_cache(positions, dim, c.rope_base, c.rope_scale, self.rope_freq_factors)

    def hidden_states(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, d_model) in `compute_dtype`.

        `position_ids` (B, T) marks packed examples: positions restart at 0 where an example
        starts, and each example then attends to itself only, at the positions inference gives
        it (see `packed_spans`). None: every row is one sequence at positions 0..T-1.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids should have shape (B, T), got {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if T > self.config.context_length:
            raise ValueError(
                f"sequence length {T} exceeds the model's "
                f"context length {self.config.context_length}"
            )
        spans = None
        if position_ids is not None:
            if position_ids.shape != input_ids.shape:
                raise ValueError(
                    f"position_ids shape {tuple(position_ids.shape)} != input_ids shape "
                    f"{tuple(input_ids.shape)}"
                )
            spans = packed_spans(position_ids)
        x = self.model["embed_tokens"](input_ids).to(self.compute_dtype)  # (B, T, d)
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        # Given positions get per-row RoPE tables (B, 1, T, dim); otherwise all share one (T, dim).
        pos = (
            position_ids.to(x.device)
            if position_ids is not None
            else torch.arange(T, device=x.device)
        )
        ropes = {False: self._rope(pos, local=False)}
        if any(self.config.local_layers):
            ropes[True] = self._rope(pos, local=True)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        recompute = LEAN_BACKWARD and not ckpt and torch.is_grad_enabled()
        with _recomputed_norm_outputs() if recompute else contextlib.nullcontext():
            for block in cast("list[Block]", self.model["layers"]):
                cos, sin = ropes[block.local and True in ropes]
                if ckpt:
                    x = checkpoint(block, x, cos, sin, spans, use_reentrant=False)
                else:
                    x = block(x, cos, sin, spans)
            return cast(torch.Tensor, self.model["norm"](x))

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) fp32 when `labels` is None, else the loss (see the class docstring).

        `reduction` is 'mean' (over scored tokens) or 'sum' (for accumulating across batches).
        `position_ids` isolates packed examples (see `hidden_states`).
        """
        h = self.hidden_states(input_ids, position_ids)  # (B, T, d)
        if labels is None:
            # (B, T, V) fp32
            return output_logits(h, self.output_projection, self.config.final_logit_softcap)
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        if reduction not in ("mean", "sum"):
            raise ValueError(f"`reduction` should be 'mean' or 'sum', got {reduction!r}")
        h = h[:, :-1].reshape(-1, h.shape[-1])  # (B*(T-1), d)
        targets = labels[:, 1:].reshape(-1)  # (B*(T-1),)
        scored = targets != IGNORE_INDEX
        n_scored = int(scored.sum())
        if n_scored < targets.numel():
            # Only scored positions go through the output projection: with prompt tokens
            # masked (chat / instruction data) this skips their share of the V-wide matmuls.
            idx = scored.nonzero().squeeze(1)
            h, targets = (
                h.index_select(0, idx),
                targets.index_select(0, idx),
            )  # (n_scored, d), (n_scored,)
        total = fused_linear_cross_entropy(
            h, self.output_projection, targets, self.config.final_logit_softcap
        )
        if reduction == "sum":
            return total
        return total / max(n_scored, 1)


def _vocab_size(weight: torch.Tensor | QuantizedEmbedding) -> int:
    return int(weight.shape[0])


def _weight_range(
    weight: torch.Tensor | QuantizedEmbedding, start: int, end: int, dtype: torch.dtype
) -> torch.Tensor:
    """Rows [start, end) of the output weight as `dtype` (a view when dense, else a buffer)."""
    if isinstance(weight, QuantizedEmbedding):
        return weight.row_range(start, end).to(dtype)
    return weight[start:end].to(dtype)


def _weight_rows(
    weight: torch.Tensor | QuantizedEmbedding, ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    if isinstance(weight, QuantizedEmbedding):
        return weight.rows(ids).to(dtype)
    return weight.index_select(0, ids).to(dtype)


def _vocab_chunk(n_tokens: int, d: int) -> int:
    """Vocabulary rows per chunk: (n_tokens, chunk) logits of about `_CE_CHUNK_ELEMENTS`, and a
    (chunk, d) weight slice of at most twice that."""
    return max(1, min(_CE_CHUNK_ELEMENTS // max(n_tokens, 1), 2 * _CE_CHUNK_ELEMENTS // d))


def output_logits(
    h: torch.Tensor, weight: torch.Tensor | QuantizedEmbedding, softcap: float | None = None
) -> torch.Tensor:
    """fp32 logits (..., V) of `h` (..., d) through the output weight, optionally soft-capped.

    A dense weight is one matmul; a `QuantizedEmbedding` is read one vocabulary chunk at a time.
    """
    if isinstance(weight, QuantizedEmbedding):
        flat = h.reshape(-1, h.shape[-1])  # (N, d)
        V = weight.num_embeddings
        logits = torch.empty(flat.shape[0], V, dtype=torch.float32)  # (N, V)
        step = _vocab_chunk(flat.shape[0], flat.shape[1])
        for v0 in range(0, V, step):
            v1 = min(V, v0 + step)
            logits[:, v0:v1] = flat @ _weight_range(weight, v0, v1, h.dtype).T
        logits = logits.view(*h.shape[:-1], V)
    else:
        logits = (h @ weight.to(h.dtype).T).float()
    return softcap * torch.tanh(logits / softcap) if softcap else logits


class _FusedLinearCE(torch.autograd.Function):
    """Sum of CE(h @ W^T, targets) with d(loss)/dh computed during the forward pass.

    The output weight is frozen (LoRA never trains it), so the only gradient needed is the one
    for h: (softmax - onehot) @ W. Both are computed in one pass over the vocabulary, one chunk
    of W at a time, with the running max / sum of an online softmax (Milakov & Gimelshein 2018,
    the form flash attention uses): per chunk, p = exp(logits - m) and G += p @ W_chunk, both
    rescaled when the running max m grows; at the end lse = m + log(sum p) and
    dh = G / sum p - W[target]. So neither the (N, V) logits nor a whole fp32 W is ever held:
    W may be the tied embedding in its GGUF blocks (`QuantizedEmbedding`), dequantized chunk by
    chunk once per step. Chunks are (N, V/k) rather than (N/k, V) for that reason; the matmuls
    are the same size either way.
    """

    @staticmethod
    def forward(
        ctx,
        h: torch.Tensor,
        weight: torch.Tensor | QuantizedEmbedding,
        targets: torch.Tensor,
        softcap: float | None,
    ):
        N, d = h.shape
        V = _vocab_size(weight)
        want_grad = h.requires_grad
        m = torch.full((N,), -math.inf, dtype=torch.float32)  # running max of each row
        s = torch.zeros(N, dtype=torch.float32)  # running sum of exp(logits - m)
        G = torch.zeros(N, d, dtype=torch.float32) if want_grad else None  # sum p·dcap @ W
        picked = torch.zeros(N, dtype=torch.float32)  # the target's (capped) logit
        valid = targets != IGNORE_INDEX
        safe = targets.clamp(min=0)
        rows = torch.arange(N)
        step = _vocab_chunk(N, d)
        for v0 in range(0, V, step):
            v1 = min(V, v0 + step)
            w = _weight_range(weight, v0, v1, h.dtype)  # (n_v, d)
            lean = FEWER_PASSES and h.dtype == torch.float32
            # (N, n_v), in a reused buffer: p below overwrites it, and neither leaves the loop
            logits = (
                gemm.linear(h, w, scratch=partial(scratch_buffer, "temp2", (N, v1 - v0)))
                if lean
                else gemm.linear(h, w).float()
            )
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            here = (safe >= v0) & (safe < v1)
            if bool(here.any()):
                picked[here] = logits[rows[here], safe[here] - v0]
            m_new = torch.maximum(m, logits.amax(dim=1))  # (N,)
            alpha = torch.exp(m - m_new)  # (N,): 0 on the first chunk (m = -inf)
            dcap = 1.0 - (logits / softcap) ** 2 if (softcap and G is not None) else None
            p = logits.sub_(m_new[:, None]).exp_()  # (N, n_v), in place of the logits
            s.mul_(alpha).add_(p.sum(dim=1))
            if G is not None:
                if dcap is not None:
                    p.mul_(dcap)  # d(cap·tanh(r/cap))/dr
                pw = (
                    gemm.matmul(p, w, partial(scratch_buffer, "temp", (N, d)))
                    if lean
                    else gemm.matmul(p.to(h.dtype), w).float()
                )
                G.mul_(alpha[:, None]).add_(pw)
            m = m_new
        lse = m + torch.log(s)  # (N,)
        total = ((lse - picked) * valid).sum()
        grad_h = None
        if G is not None:
            w_t = _weight_rows(weight, safe, torch.float32)  # (N, d): W[target]
            if softcap:
                w_t.mul_((1.0 - (picked / softcap) ** 2)[:, None])
            grad_h = (G.div_(s[:, None]).sub_(w_t)).mul_(valid[:, None]).to(h.dtype)  # (N, d)
        ctx.save_for_backward(grad_h if grad_h is not None else torch.empty(0))
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None, None


def fused_linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor | QuantizedEmbedding,
    targets: torch.Tensor,
    softcap: float | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of logits `h @ weight.T` (optionally soft-capped) against `targets`.

    h: (N, d), weight: (V, d) (a tensor or a `QuantizedEmbedding`), targets: (N,) with
    `IGNORE_INDEX` for unscored positions. A trainable `weight` falls back to the plain
    (memory-hungry) autograd path.
    """
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        logits = (h @ weight.to(h.dtype).T).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return cast(torch.Tensor, _FusedLinearCE.apply(h, weight, targets, softcap))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit parameters count their logical size."""
    # A packed 4-bit weight holds two weights per byte: count its (out, in) shape instead.
    logical = {
        id(m.weight): math.prod(cast(tuple[int, ...], m.shape))
        for m in model.modules()
        if hasattr(m, "logical_numel") and hasattr(m, "shape")
    }
    trainable = total = 0
    for p in model.parameters():
        n = logical.get(id(p), p.numel())
        shape = getattr(getattr(p, "quant_state", None), "shape", None)  # bitsandbytes' Params4bit
        if shape is not None:
            n = math.prod(shape)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
