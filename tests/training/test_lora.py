"""LoRA layers: config validation, what trains, base reproduction, merging, state dict naming."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_sdk.choices import Compute
from edge_sdk.errors import AdapterMismatchError
from edge_sdk.models.loader import load_model
from edge_sdk.models.naming import LORA_TARGETS, hf_module
from edge_sdk.training.lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    max_merge_error,
    merged_weights,
    set_base_compute,
    set_lora_enabled,
)
from tests.models.tiny_families import write_family_gguf


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_family_gguf(tmp_path_factory.mktemp("lora") / "llama.gguf", "llama")


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(5, 290, size=(2, 10)))


def _randomize_b(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "`rank` should be a positive integer, got 0"),
        ({"rank": 2.5}, "`rank` should be a positive integer, got 2.5"),
        ({"alpha": -1.0}, "`alpha` should be a positive number, got -1.0"),
        ({"dropout": 1.0}, r"`dropout` should be in \[0, 1\), got 1.0"),
        ({"targets": ("q_proj", "lm_head")}, "`targets` has unknown modules \\['lm_head'\\]"),
        ({"targets": ()}, "`targets` should name at least one projection"),
        ({"targets": ("q_proj", "q_proj")}, "`targets` lists a module twice"),
        ({"layers": (-1,)}, "`layers` should be non-negative integers"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_defaults_target_every_projection() -> None:
    cfg = LoraConfig()
    assert cfg.targets == LORA_TARGETS and cfg.scale == cfg.alpha / cfg.rank


@pytest.mark.parametrize("precision", ["fp32", "nf4"])
def test_only_adapter_trains(tiny_path: Path, precision: str) -> None:
    model = load_model(tiny_path, precision=precision, lora=LoraConfig(rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * len(LORA_TARGETS) * model.config.n_layer
    before = {
        n: p.detach().clone() for n, p in model.named_parameters() if p.dtype.is_floating_point
    }
    opt = torch.optim.SGD(lora_parameters(model), lr=0.5)
    for _ in range(2):  # the first step moves only B (A's grad is B^T·…, zero while B = 0)
        model(_ids(), _ids()).backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n not in before:
            continue
        changed = not torch.equal(before[n], p.detach())
        assert changed == n.endswith((".lora_A", ".lora_B")), n


def test_zero_b_and_disabled_adapter_reproduce_base(tiny_path: Path) -> None:
    base = load_model(tiny_path, precision="fp32")
    with torch.no_grad():
        ref = base(_ids())
        apply_lora(base, LoraConfig(rank=4, dropout=0.1))
        base.train()  # dropout active: still exact, since B = 0
        torch.testing.assert_close(base(_ids()), ref, rtol=0, atol=0)
        _randomize_b(base)
        assert (base(_ids()) - ref).abs().max() > 1e-3
        set_lora_enabled(base, False)
        torch.testing.assert_close(base(_ids()), ref, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["fp32", "nf4"])
def test_merged_weight_equals_base_plus_scaled_ba(tiny_path: Path, precision: str) -> None:
    model = load_model(tiny_path, precision=precision, lora=LoraConfig(rank=4, alpha=8))
    _randomize_b(model)
    x = torch.randn(3, 7, model.config.d_model)
    assert max_merge_error(model, x) < 1e-4
    merged = merged_weights(model)
    q = model.get_submodule(hf_module(0, "q_proj"))
    assert isinstance(q, LoRALinear)
    expected = q.base_weight() + 2.0 * q.lora_B.detach() @ q.lora_A.detach()
    torch.testing.assert_close(merged[hf_module(0, "q_proj")], expected)
    # A model whose base weight *is* the merged weight gives the same logits.
    if precision == "fp32":
        dense = load_model(tiny_path, precision="fp32")
        with torch.no_grad():
            for path, w in merged.items():
                dense.get_submodule(path).weight.copy_(w)
            torch.testing.assert_close(dense(_ids()), model(_ids()), rtol=1e-4, atol=1e-4)


def test_state_dict_names_shapes_and_round_trip(tiny_path: Path) -> None:
    cfg = LoraConfig(rank=3, targets=("q_proj", "down_proj"))
    model = load_model(tiny_path, precision="fp32", lora=cfg)
    _randomize_b(model, seed=3)
    sd = lora_state_dict(model)
    shapes = model.config.target_shapes()
    assert len(sd) == 2 * 2 * model.config.n_layer
    for i in range(model.config.n_layer):
        for t in cfg.targets:
            out_f, in_f = shapes[t]
            assert sd[f"{hf_module(i, t)}.lora_A"].shape == (3, in_f)
            assert sd[f"{hf_module(i, t)}.lora_B"].shape == (out_f, 3)
    other = load_model(tiny_path, precision="fp32", lora=cfg)
    load_lora_state_dict(other, {k: v.numpy() for k, v in sd.items()})  # numpy is accepted
    with torch.no_grad():
        torch.testing.assert_close(other(_ids()), model(_ids()))
    # The returned tensors are copies: changing them does not touch the model.
    sd[f"{hf_module(0, 'q_proj')}.lora_B"].zero_()
    assert lora_state_dict(model)[f"{hf_module(0, 'q_proj')}.lora_B"].abs().sum() > 0


def test_load_state_dict_rejects_mismatches(tiny_path: Path) -> None:
    model = load_model(tiny_path, precision="fp32", lora=LoraConfig(rank=2, targets=("v_proj",)))
    sd = lora_state_dict(model)
    key = f"{hf_module(0, 'v_proj')}.lora_A"
    with pytest.raises(AdapterMismatchError, match="shape"):
        load_lora_state_dict(model, {**sd, key: torch.zeros(5, 64)})
    with pytest.raises(AdapterMismatchError, match="NaN"):
        load_lora_state_dict(model, {**sd, key: torch.full_like(sd[key], float("nan"))})
    with pytest.raises(AdapterMismatchError, match="lacks"):
        load_lora_state_dict(model, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(AdapterMismatchError, match="no LoRA layer"):
        load_lora_state_dict(model, {**sd, f"{hf_module(0, 'q_proj')}.lora_A": torch.zeros(2, 64)})
    load_lora_state_dict(
        model, {f"{hf_module(0, 'q_proj')}.lora_A": torch.zeros(2, 64)}, strict=False
    )


def test_frozen_a_trains_b_only(tiny_path: Path) -> None:
    g = torch.Generator().manual_seed(42)
    model = load_model(tiny_path, precision="fp32")
    apply_lora(model, LoraConfig(rank=4, freeze_a=True), generator=g)
    params = lora_parameters(model)
    assert params and all(p.shape[1] == 4 for p in params)  # only B (out, r)
    g2 = torch.Generator().manual_seed(42)
    again = apply_lora(
        load_model(tiny_path, precision="fp32"), LoraConfig(rank=4, freeze_a=True), generator=g2
    )
    a1, a2 = lora_state_dict(model), lora_state_dict(again)
    assert all(torch.equal(a1[k], a2[k]) for k in a1)  # a shared seed gives the same A everywhere


def test_apply_twice_and_bad_layers(tiny_path: Path) -> None:
    model = load_model(tiny_path, precision="fp32", lora=LoraConfig(rank=2))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, LoraConfig(rank=2))
    with pytest.raises(ValueError, match="out of range"):
        apply_lora(load_model(tiny_path, precision="fp32"), LoraConfig(layers=(99,)))


def test_merged_nf4_path_matches_unmerged_gradients(tiny_path: Path) -> None:
    """The NF4 fast path (W + s·B·A in one matmul, custom backward) against plain autograd."""
    model = load_model(tiny_path, precision="nf4", lora=LoraConfig(rank=4, alpha=8))
    _randomize_b(model)
    layer = model.get_submodule(hf_module(1, "up_proj"))
    assert isinstance(layer, LoRALinear)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    got = (y.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())

    x2 = x.detach().clone().requires_grad_(True)
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    ref_y = x2 @ layer.base_weight().T + (x2 @ a.T) @ b.T * layer.scale
    (ref_y * torch.linspace(-1, 1, ref_y.shape[-1])).sum().backward()
    for ours, ref in zip(got, (ref_y.detach(), x2.grad, a.grad, b.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_an_eval_of_the_disabled_adapter_keeps_the_nf4_layout(tiny_path: Path) -> None:
    """bitsandbytes >= 0.49 repacks a Linear4bit's weight on CPUs with AVX512-BF16 at its first
    eval-mode, no-grad forward; our NF4 kernels then read garbage, and the demo's base
    evaluation before training silently corrupted every later step (eval loss 2.3 -> 10.7)."""
    model = load_model(tiny_path, precision="nf4", lora=LoraConfig(rank=4))
    ids = _ids()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.1)  # a non-zero adapter
    before = model(ids).detach()
    model.eval()
    set_lora_enabled(model, False)
    with torch.no_grad():
        model(ids)  # what the demo's base-model evaluation runs
    set_lora_enabled(model, True)
    model.train()
    # The loader builds our own NF4Linear (no bitsandbytes layer that could repack itself).
    from edge_sdk.models.nf4 import NF4Linear

    assert all(isinstance(m.base, NF4Linear) for m in model.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(model(ids).detach(), before)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bf16_saved_activations_keep_the_loss_and_move_gradients_by_rounding_only(
    tmp_path: Path, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SAVE_16BIT (FEDLM_LOW_MEMORY=1) keeps the MLP's gate and up in bf16 for the backward:
    the loss is bit-identical, the LoRA gradients move by bf16 rounding only (SmolLM2, one
    step at seq 256: 0.14 % globally, cosine 0.999999), and the saved copies are bf16."""
    from edge_sdk.models import transformer

    model, ids = _nf4_family_model(tmp_path, arch)
    runs = []
    for save_16bit in (True, False):
        monkeypatch.setattr(transformer, "SAVE_16BIT", save_16bit)
        model.zero_grad()
        loss = model(ids, ids)
        saved = [  # the gate and up each gated MLP node saved
            t.dtype
            for node in _graph_nodes(loss.grad_fn)
            if type(node).__name__ in _GATED_NODES
            for t in node.saved_tensors[_GATED_NODES[type(node).__name__]]
        ]
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in lora_parameters(model)], saved))
    (loss16, g16, saved16), (loss32, g32, saved32) = runs
    assert torch.equal(loss16, loss32)
    assert saved16 and set(saved16) == {torch.bfloat16}
    assert saved32 and set(saved32) == {torch.float32}
    diff = sum(float((a - b).pow(2).sum()) for a, b in zip(g16, g32)) ** 0.5
    norm = sum(float(b.pow(2).sum()) for b in g32) ** 0.5
    assert 0 < diff / norm < 1e-2, diff / norm


_GATED_NODES = {
    "_GatedActFnBackward": slice(0, 2),
    "_GatedMergedNF4LoRABackward": slice(0, 2),
    "_NF4LoRAMLPBackward": slice(1, 3),  # after the input x
}
"""The autograd nodes of a gated MLP, and where their saved gate and up are."""


def _nf4_family_model(tmp_path: Path, arch: str) -> tuple[Any, torch.Tensor]:
    """A tiny NF4 model of `arch` with rank-4 LoRA (B randomized) and a batch of token ids."""
    model = load_model(
        write_family_gguf(tmp_path / f"{arch}.gguf", arch),
        precision="nf4",
        lora=LoraConfig(rank=4),
    )
    _randomize_b(model, seed=5)
    return model, _ids(6)


def _graph_nodes(fn: Any) -> Iterator[Any]:
    """Every autograd node reachable from `fn` (the custom Functions' ctx objects included)."""
    seen, stack = set(), [fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(next_fn for next_fn, _ in node.next_functions)


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
@pytest.mark.parametrize("gelu", [False, True])
def test_gated_down_projection_equals_the_unfused_path(
    gelu: bool, compute: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`forward_gated` (the MLP's down projection recomputing act(gate)·up in backward) gives
    the output and the gate, up and adapter gradients of act(gate)·up through the layer (with
    gate and up saved in fp32; bf16 saving: `test_bf16_saved_activations_...` below), in fp32
    and with `--compute bf16`."""
    from edge_sdk.models import transformer
    from edge_sdk.models.nf4 import NF4Linear

    monkeypatch.setattr(transformer, "SAVE_16BIT", False)

    g = torch.Generator().manual_seed(4)
    layer = LoRALinear(
        NF4Linear.from_float(torch.randn(48, 64, generator=g) * 0.05), 64, 48, 4, 8.0
    )
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(48, 4, generator=g) * 0.1)
    layer.compute = compute  # type: ignore[assignment]  # bf16: `lora_bf16`'s two functions
    gate0, up0 = torch.randn(2, 6, 64, generator=g), torch.randn(2, 6, 64, generator=g)
    act = (
        (lambda t: torch.nn.functional.gelu(t, approximate="tanh"))
        if gelu
        else torch.nn.functional.silu
    )
    results = []
    for fused in (True, False):
        gate, up = gate0.clone().requires_grad_(True), up0.clone().requires_grad_(True)
        layer.zero_grad()
        y = layer.forward_gated(gate, up, gelu) if fused else layer(act(gate) * up)
        assert y is not None
        (y * torch.linspace(-1, 1, 48)).sum().backward()
        results.append((y.detach(), gate.grad, up.grad, layer.lora_A.grad, layer.lora_B.grad))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lean_backward_gives_plain_autograds_gradients(
    tmp_path: Path, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole NF4 model with the memory-lean backward (norms, RoPE, gated activation and the
    fused down projection) gives plain autograd's loss and LoRA gradients (gate and up saved
    in fp32 here: plain autograd saves them so)."""
    from edge_sdk.models import transformer

    monkeypatch.setattr(transformer, "SAVE_16BIT", False)
    model, ids = _nf4_family_model(tmp_path, arch)
    grads = []
    for lean in (True, False):
        transformer.LEAN_BACKWARD = lean
        try:
            model.zero_grad()
            loss = model(ids, ids)
            loss.backward()
        finally:
            transformer.LEAN_BACKWARD = True
        grads.append([loss.detach(), *(p.grad.clone() for p in lora_parameters(model))])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
@pytest.mark.parametrize(
    ("arch", "targets", "packed", "freeze_a"),
    [
        ("llama", LORA_TARGETS, False, False),
        ("gemma3", LORA_TARGETS, True, False),  # GeGLU, q/k norms, sliding window, packed
        ("qwen2", LORA_TARGETS, False, True),  # q/k/v biases; B trains alone
        ("llama", ("q_proj", "v_proj", "down_proj"), True, False),  # groups that cannot form
    ],
)
def test_fused_projections_give_one_function_per_projections_numbers(
    tmp_path: Path,
    arch: str,
    targets: tuple[str, ...],
    packed: bool,
    freeze_a: bool,
    compute: Compute,
) -> None:
    """q/k/v as one function (`forward_stacked`) and the whole MLP as one (`forward_mlp`) give
    the loss of one function per projection (FUSED_PROJECTIONS off) and every LoRA gradient
    within fp32 rounding (the input gradients are summed inside one product), and the fused
    functions really ran. In fp32 the loss is bit-identical (the same products in the same
    order); in bf16 the adapters' x·Aᵀ of a group is one product, so it moves by rounding."""
    from edge_sdk.training import lora

    model = load_model(
        write_family_gguf(tmp_path / f"{arch}.gguf", arch),
        precision="nf4",
        lora=LoraConfig(rank=4, targets=targets, freeze_a=freeze_a),
    )
    set_base_compute(model, compute)
    _randomize_b(model, seed=7)
    ids = torch.from_numpy(np.random.default_rng(8).integers(5, 290, size=(2, 16)))
    positions = torch.tensor([[*range(7), *range(9)], [*range(16)]]) if packed else None
    runs = []
    for fused in (True, False):
        lora.FUSED_PROJECTIONS = fused
        try:
            model.zero_grad()
            loss = model(ids, ids, position_ids=positions)
            nodes = {type(n).__name__ for n in _graph_nodes(loss.grad_fn)}
            loss.backward()
        finally:
            lora.FUSED_PROJECTIONS = True
        runs.append((loss.detach(), [p.grad for p in lora_parameters(model)], nodes))
    (loss_f, grads_f, nodes_f), (loss_u, grads_u, nodes_u) = runs
    full = targets == LORA_TARGETS
    stacked, mlp = "_StackedNF4LoRABackward", "_NF4LoRAMLPBackward"
    assert (stacked in nodes_f) == full
    assert (mlp in nodes_f) == full
    assert not {stacked, mlp} & nodes_u
    assert all(g is not None for g in grads_f)
    assert len(grads_f) == (1 if freeze_a else 2) * len(list(lora_modules(model)))
    if compute == "fp32":
        assert torch.equal(loss_f, loss_u)  # the forward runs the same products, in order
        for ours, ref in zip(grads_f, grads_u):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
        return
    # bf16: a 1e-7 change (x·[A_q; A_k; A_v]ᵀ as one product) flips the rounding of an input
    # here and there, and one stacked input gradient is rounded once instead of per layer. The
    # functions' exact formulas: tests/training/test_lora_bf16.py.
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-3, atol=0)
    ours, ref = (torch.cat([g.flatten() for g in grads]) for grads in (grads_f, grads_u))
    assert float((ours - ref).norm() / ref.norm()) < 2e-2
    assert float(torch.nn.functional.cosine_similarity(ours, ref, dim=0)) > 0.999


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_whole_model_with_disabled_adapters_equals_zero_adapters_bit_for_bit(
    tmp_path: Path, arch: str, compute: Compute
) -> None:
    """DPO's reference (adapters disabled, no grad) and a fresh policy (B = 0, in training)
    must agree exactly, so that every pair is a tie before training: the fused q/k/v and MLP
    functions run in every grad mode and with adapters off, adding nothing, and in bf16 a
    disabled adapter's base multiplies in bf16 as the policy's does."""
    model = load_model(
        write_family_gguf(tmp_path / f"{arch}.gguf", arch), precision="nf4", lora=LoraConfig(rank=4)
    )
    set_base_compute(model, compute)
    ids = _ids(9)
    policy = model(ids).detach()  # grad mode: the adapters are trainable, B = 0
    with torch.no_grad():
        set_lora_enabled(model, False)
        reference = model(ids)
        set_lora_enabled(model, True)
        no_grad_policy = model(ids)
    assert torch.equal(policy, reference)
    assert torch.equal(no_grad_policy, reference)
