"""The torch model itself: llama.cpp agreement on tiny models of every family, the fused loss,
gradient checkpointing and the sliding window."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_sdk.models.loader import load_model
from edge_sdk.models.transformer import apply_rope, fused_linear_cross_entropy, rope_cache
from tests.models.tiny_families import FamilySpec, write_family_gguf

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing"
)


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2", "qwen3"])
def test_tiny_family_matches_llama_cpp(tmp_path: Path, arch: str) -> None:
    """Random weights make every wiring mistake visible: a wrong Q/K permutation (llama), RoPE
    base, sliding-window edge (gemma3: window 5 over 24 tokens), bias or norm changes the logits."""
    from llama_cpp import Llama

    path = write_family_gguf(tmp_path / f"{arch}.gguf", arch, spec=FamilySpec(n_layer=3))
    ids = [1] + [int(i) for i in np.random.default_rng(1).integers(5, 290, size=23)]
    llm = Llama(str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False)
    llm.eval(ids)
    ref = np.array(llm.scores[: len(ids)], dtype=np.float32)
    with torch.no_grad():
        ours = load_model(path, precision="fp32")(torch.tensor([ids]))[0].numpy()
    # llama.cpp keeps K/V in f16, which explains differences of a few 1e-3 on logits of size ~5.
    assert np.abs(ref - ours).max() < 0.03
    assert (ref.argmax(-1) == ours.argmax(-1)).all()


@needs_llama_cpp
def test_rope_frequency_factors_match_llama_cpp(tmp_path: Path) -> None:
    """Llama 3.1+ GGUFs carry `rope_freqs.weight`; llama.cpp divides each RoPE frequency by it."""
    from llama_cpp import Llama

    path = write_family_gguf(tmp_path / "llama31.gguf", "llama", rope_freqs=True)
    ids = [1] + [int(i) for i in np.random.default_rng(2).integers(5, 290, size=31)]
    llm = Llama(str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False)
    llm.eval(ids)
    ref = np.array(llm.scores[: len(ids)], dtype=np.float32)
    model = load_model(path, precision="fp32")
    assert model.rope_freq_factors is not None and model.rope_freq_factors.shape == (8,)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
        model.rope_freq_factors = None  # what ignoring the factors would compute
        ignored = model(torch.tensor([ids]))[0].numpy()
    assert np.abs(ref - ours).max() < 0.03
    assert (ref.argmax(-1) == ours.argmax(-1)).all()
    assert np.abs(ref - ignored).max() > 10 * np.abs(ref - ours).max()


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fused_cross_entropy_matches_autograd(softcap: float | None) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g)
    t = torch.randint(0, 50, (37,), generator=g)
    t[::5] = -100
    loss = fused_linear_cross_entropy(h, w, t, softcap)
    loss.backward()
    grad = h.grad.clone()
    h.grad = None
    logits = h @ w.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    ref = torch.nn.functional.cross_entropy(logits, t, ignore_index=-100, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, h.grad, rtol=1e-4, atol=1e-5)


def test_fused_cross_entropy_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_sdk.models.transformer as tr

    g = torch.Generator().manual_seed(1)
    h = torch.randn(23, 8, generator=g, requires_grad=True)
    w = torch.randn(40, 8, generator=g)
    t = torch.randint(0, 40, (23,), generator=g)
    whole = fused_linear_cross_entropy(h, w, t)
    (gw,) = torch.autograd.grad(whole, h)
    monkeypatch.setattr(tr, "_CE_CHUNK_ELEMENTS", 23 * 4)  # 4 vocabulary rows per chunk: 10 chunks
    chunked = fused_linear_cross_entropy(h, w, t)
    (gc,) = torch.autograd.grad(chunked, h)
    torch.testing.assert_close(whole, chunked)
    torch.testing.assert_close(gw, gc)


def test_gradient_checkpointing_same_grads(tmp_path: Path) -> None:
    from edge_sdk.training.lora import LoraConfig, lora_parameters

    path = write_family_gguf(tmp_path / "g.gguf", "gemma3")
    ids = torch.from_numpy(np.random.default_rng(0).integers(5, 290, size=(2, 12)))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = load_model(
            path, precision="fp32", lora=LoraConfig(rank=4), gradient_checkpointing=ckpt
        )
        for p in lora_parameters(model):  # non-zero B so that A gets a gradient too
            torch.nn.init.normal_(p, std=0.02)
        model.train()
        model(ids, ids).backward()
        grads.append([p.grad.clone() for p in lora_parameters(model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_rope_rotates_pairs_half_apart() -> None:
    cos, sin = rope_cache(torch.arange(3), 4, base=10000.0)
    x = torch.zeros(1, 1, 3, 6)
    x[..., 0] = 1.0  # first channel of pair (0, 2)
    y = apply_rope(x, cos, sin)
    # Position p rotates pair (0, 2) by angle p * base^0 = p radians; channels 4, 5 pass through.
    torch.testing.assert_close(y[0, 0, :, 0], torch.cos(torch.arange(3.0)))
    torch.testing.assert_close(y[0, 0, :, 2], torch.sin(torch.arange(3.0)))
    assert y[..., 4:].abs().max() == 0


def test_sliding_window_limits_attention(tmp_path: Path) -> None:
    """Changing a token outside every window of a later query leaves that query's logits alone."""
    path = write_family_gguf(
        tmp_path / "g.gguf", "gemma3", spec=FamilySpec(n_layer=1, sliding_window=4)
    )
    model = load_model(path, precision="fp32")
    ids = torch.from_numpy(np.random.default_rng(0).integers(5, 290, size=(1, 12)))
    changed = ids.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 290
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # One local layer, window 4: position 5 still sees 2, position 6 no longer does.
    assert (a[0, 5] - b[0, 5]).abs().max() > 1e-4
    torch.testing.assert_close(a[0, 6:], b[0, 6:])


def test_rejects_sequences_beyond_context(tmp_path: Path) -> None:
    path = write_family_gguf(tmp_path / "l.gguf", "llama", spec=FamilySpec(context_length=8))
    model = load_model(path, precision="fp32")
    with pytest.raises(ValueError, match="context length 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def _plain_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * w.float()).to(x.dtype)


def _grads(fn, *inputs: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    y.backward(g)
    return [y.detach(), *(t.grad for t in leaves)]


def test_lean_rmsnorm_backward_equals_autograd() -> None:
    """The norm that saves only x and rsqrt gives plain autograd's output and input gradient."""
    from edge_sdk.models.transformer import RMSNorm

    norm = RMSNorm(48, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48) + 0.5)
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(1)) * 3
    ours = _grads(norm, x)
    ref = _grads(lambda t: _plain_rmsnorm(t, norm.weight, 1e-6), x)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_lean_rope_backward_equals_autograd(partial: bool, per_row: bool) -> None:
    """RoPE's backward from cos/sin alone (it is linear) equals autograd's, for partial rotary
    dims and for the per-row tables of packed rows."""
    from edge_sdk.models.transformer import _apply_rope

    hd, rd = 16, (8 if partial else 16)
    pos = (
        torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]]) if per_row else torch.arange(7)
    )
    cos, sin = rope_cache(pos, rd, 10000.0)
    x = torch.randn(2, 3, 7, hd, generator=torch.Generator().manual_seed(2))
    ours = _grads(lambda t: apply_rope(t, cos, sin), x)
    ref = _grads(lambda t: _apply_rope(t, cos, sin), x)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("save_16bit", [False, True])
@pytest.mark.parametrize("gelu", [False, True])
def test_lean_gated_activation_backward_equals_autograd(
    gelu: bool, save_16bit: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain autograd's gradients, at gate and up as saved: fp32, or rounded to bf16 when
    SAVE_16BIT (the forward is exact either way)."""
    from edge_sdk.models import transformer
    from edge_sdk.models.transformer import _GatedActFn

    monkeypatch.setattr(transformer, "SAVE_16BIT", save_16bit)
    g = torch.Generator().manual_seed(3)
    gate, up = torch.randn(2, 5, 32, generator=g) * 2, torch.randn(2, 5, 32, generator=g)
    act = (
        (lambda t: torch.nn.functional.gelu(t, approximate="tanh"))
        if gelu
        else torch.nn.functional.silu
    )
    out = _GatedActFn.apply(gate, up, gelu)
    torch.testing.assert_close(out, act(gate) * up, rtol=0, atol=0)
    ours = _grads(lambda a, b: _GatedActFn.apply(a, b, gelu), gate, up)
    saved = (gate, up) if not save_16bit else (gate.bfloat16().float(), up.bfloat16().float())
    ref = _grads(lambda a, b: act(a) * b, *saved)
    for a, b in zip(ours[1:], ref[1:]):  # [0] is the output, checked above
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if save_16bit:  # and the rounding is visible against fp32 (the flag does something)
        exact = _grads(lambda a, b: act(a) * b, gate, up)
        assert not torch.equal(ours[1], exact[1])


@pytest.mark.parametrize("precision", ["nf4", "fp32"])
def test_recomputed_norm_outputs_give_the_same_grads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """The normed inputs of q/k/v and gate/up are recomputed in backward, not saved: the same
    loss and LoRA gradients bit for bit, and each such save replaced by a recipe."""
    import contextlib

    import edge_sdk.models.transformer as tr
    from edge_sdk.training import lora
    from edge_sdk.training.lora import LoraConfig, lora_parameters

    path = write_family_gguf(tmp_path / "g.gguf", "gemma3")
    torch.manual_seed(0)
    model = load_model(path, precision=precision, lora=LoraConfig(rank=4))
    for p in lora_parameters(model):  # non-zero B so that A gets a gradient too
        torch.nn.init.normal_(p, std=0.02)
    model.train()
    ids = torch.from_numpy(np.random.default_rng(0).integers(5, 290, size=(2, 12)))
    recipes = []
    real_pack = tr._pack_saved

    def counting_pack(t: torch.Tensor) -> object:
        out = real_pack(t)
        if isinstance(out, tr._NormRecipe):
            recipes.append(out)
        return out

    monkeypatch.setattr(tr, "_pack_saved", counting_pack)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = model(ids, ids)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]

    loss_a, grads_a = run()
    # The fused q/k/v function saves attn_norm's output, the fused MLP ffn_norm's: 2 per
    # block, except block 0's attn_norm, whose input (the frozen embedding's output) needs no
    # gradient (one function per projection: q, k, v, gate and up each, 5 per block).
    # (fp32: autograd's own linear saves its input through a wrapper of its own, which the
    # identity check does not take for the norm's output, so it is saved as before.)
    n = model.config.n_layer
    per_block = (2 * n - 1) if lora.FUSED_PROJECTIONS else (5 * n - 3)
    assert len(recipes) == (per_block if precision == "nf4" else 0)
    monkeypatch.setattr(tr, "_recomputed_norm_outputs", contextlib.nullcontext)
    loss_b, grads_b = run()
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


def _lora_loss_and_grads(
    model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from edge_sdk.training.lora import lora_parameters

    model.zero_grad(set_to_none=True)
    loss = model(ids, ids, position_ids=positions)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]


def _tiny_lora_model(tmp_path: Path, arch: str, freeze_a: bool = False) -> torch.nn.Module:
    from edge_sdk.training.lora import LoraConfig, lora_parameters

    path = write_family_gguf(tmp_path / f"{arch}.gguf", arch)
    torch.manual_seed(0)
    model = load_model(path, precision="nf4", lora=LoraConfig(rank=4, freeze_a=freeze_a))
    for p in lora_parameters(model):  # non-zero B so that A gets a gradient too
        torch.nn.init.normal_(p, std=0.02)
    model.train()
    return model


@pytest.mark.parametrize("freeze_a", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3"])
def test_fewer_passes_give_bit_identical_loss_and_grads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, freeze_a: bool
) -> None:
    """Issue 16 part 3: the reused-buffer forms of RMSNorm, RoPE, the gated MLP's backward and
    the fused loss's chunks change no bit of the loss or of any LoRA gradient: SwiGLU (llama),
    GeGLU + q/k norms + a window crossed (gemma3, 12 tokens over a window of 5), q/k norms
    (qwen3), with and without a trained A, packed or not."""
    import edge_sdk.models.transformer as tr

    model = _tiny_lora_model(tmp_path, arch, freeze_a)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(5, 290, size=(2, 12)))
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], list(range(12))])
    for positions in (None, packed):
        monkeypatch.setattr(tr, "FEWER_PASSES", False)
        loss_a, grads_a = _lora_loss_and_grads(model, ids, positions)
        monkeypatch.setattr(tr, "FEWER_PASSES", True)
        loss_b, grads_b = _lora_loss_and_grads(model, ids, positions)
        assert torch.equal(loss_a, loss_b)
        assert len(grads_a) == len(grads_b) > 0
        for a, b in zip(grads_a, grads_b):
            assert torch.equal(a, b)
