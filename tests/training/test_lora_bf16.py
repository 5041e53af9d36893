"""`--compute bf16`: the NF4 base's products in bf16, the adapter and everything else in fp32.

The gated down projection in bf16 is checked with the fp32 one:
`tests/training/test_lora.py::test_gated_down_projection_equals_the_unfused_path`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from edge_sdk.client.config import ClientConfig
from edge_sdk.models.loader import load_model
from edge_sdk.models.nf4 import NF4Linear
from edge_sdk.training.config import TrainConfig
from edge_sdk.training.lora import (
    LoraConfig,
    LoRALinear,
    lora_modules,
    lora_parameters,
    set_base_compute,
)
from tests.models.tiny_families import write_family_gguf

BF16 = torch.bfloat16


def _layer(seed: int = 4, out_f: int = 48, in_f: int = 64) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    layer = LoRALinear(
        NF4Linear.from_float(torch.randn(out_f, in_f, generator=g) * 0.05), in_f, out_f, 4, 8.0
    )
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(out_f, 4, generator=g) * 0.1)
    layer.compute = "bf16"
    return layer


def _reference(layer: LoRALinear, x: torch.Tensor, weight_out: torch.Tensor) -> tuple:
    """The bf16 formula through plain autograd: (y, dx, dA, dB) for the loss sum(y * w_out)."""
    x = x.detach().clone().requires_grad_(True)
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    w16 = layer.base_weight().to(BF16)

    class BaseBf16(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):  # type: ignore[no-untyped-def,override]
            return (t.to(BF16) @ w16.T).float()

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def,override]
            return (g.to(BF16) @ w16).float()

    y = BaseBf16.apply(x) + (x @ a.T) @ b.T * layer.scale
    (y * weight_out).sum().backward()
    return y.detach(), x.grad, a.grad, b.grad


def test_bf16_layer_is_the_bf16_formula_with_the_adapter_in_fp32() -> None:
    """Output and gradients equal bf16(x)·bf16(W)ᵀ widened + s·x·Aᵀ·Bᵀ in fp32, with the input
    gradient through bf16(g)·bf16(W); the adapter's gradients are fp32 arithmetic."""
    layer = _layer()
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w_out = torch.linspace(-1, 1, 48)
    y = layer(x)
    (y * w_out).sum().backward()
    ours = (y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)
    for got, ref in zip(ours, _reference(layer, x, w_out)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_a_small_adapter_update_is_not_rounded_away() -> None:
    """A young adapter's update (here ~1e-4 of W) moves the output by its own fp32 product, to
    fp32 rounding; merged into a bf16 weight (as the fp32 path merges) it would mostly vanish."""
    layer = _layer()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        layer.lora_B.zero_()
        base = layer(x)
        layer.lora_B.fill_(1e-4)
        expected = (x @ layer.lora_A.T) @ layer.lora_B.T * layer.scale
        # atol: 2 ulps of y (|y| up to ~1.2) from fp32 rounding; the update is ~1.4e-4
        assert float(expected.abs().mean()) > 1e-5
        torch.testing.assert_close(layer(x) - base, expected, rtol=1e-3, atol=2.5e-7)
        merged = (x.to(BF16) @ (layer.base_weight() + layer.delta_weight()).to(BF16).T).float()
    lost = float((merged - base - expected).norm() / expected.norm())
    assert lost > 0.5, lost


def _group(outs: tuple[int, ...], in_f: int, seed: int) -> list[LoRALinear]:
    """bf16 layers reading one input, with random B (and a bias on the first, as Qwen2's)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, out_f in enumerate(outs):
        bias = torch.randn(out_f, generator=g) * 0.1 if i == 0 else None
        w = torch.randn(out_f, in_f, generator=g) * 0.05
        layer = LoRALinear(NF4Linear.from_float(w, bias), in_f, out_f, 4, 4.0 + 4 * i)
        layer.reset_parameters(g)
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(out_f, 4, generator=g) * 0.1)
        layer.compute = "bf16"
        layers.append(layer)
    return layers


def _base16(t: torch.Tensor, *layers: LoRALinear) -> torch.Tensor:
    """bf16(t) · [W_1; W_2; ...]ᵀ in bf16, widened: the base's product as the formula has it."""
    w16 = torch.cat([m.base_weight() for m in layers]).to(BF16)
    return (t.to(BF16) @ w16.T).float()


def _grad16(g: torch.Tensor, *layers: LoRALinear) -> torch.Tensor:
    """bf16(g) · [W_1; W_2; ...] widened: one input-gradient product over the stacked bases."""
    w16 = torch.cat([m.base_weight() for m in layers]).to(BF16)
    return (g.to(BF16) @ w16).float()


def _adapter(t: torch.Tensor, m: LoRALinear) -> torch.Tensor:
    return (t @ m.lora_A.T) @ m.lora_B.T * m.scale


def _adapter_grads(t: torch.Tensor, g: torch.Tensor, m: LoRALinear) -> tuple:
    """(d input, dA, dB) of the adapter s·t·Aᵀ·Bᵀ for the output gradient g, in fp32."""
    gb = g @ m.lora_B
    return gb @ m.lora_A * m.scale, gb.T @ t * m.scale, g.T @ (t @ m.lora_A.T) * m.scale


def test_stacked_bf16_function_is_its_formula() -> None:
    """q, k and v as one function (`lora._StackedNF4LoRA` with `Bf16Products`): each output
    is bf16(x)·bf16(W_i)ᵀ widened + s_i·x·A_iᵀ·B_iᵀ (+ bias); the input gradient is one bf16
    product over the output gradients side by side plus every adapter's own in fp32; dA and
    dB are fp32."""
    q, k, v = _group((48, 16, 16), 64, seed=11)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(12), requires_grad=True)
    ys = q.forward_stacked(x, (k, v))
    assert ys is not None and type(ys[0].grad_fn).__name__ == "_StackedNF4LoRABackward"
    gs = [
        torch.randn(y.shape, generator=torch.Generator().manual_seed(13 + i))
        for i, y in enumerate(ys)
    ]
    sum((y * g).sum() for y, g in zip(ys, gs)).backward()
    with torch.no_grad():
        x2 = x.detach().reshape(-1, 64)
        g2 = [g.reshape(-1, g.shape[-1]) for g in gs]
        grad_x = _grad16(torch.cat(g2, dim=1), q, k, v)
        for m, y, g in zip((q, k, v), ys, g2):
            ref = _base16(x2, m) + _adapter(x2, m)
            if m.base.bias is not None:
                ref += m.base.bias
            torch.testing.assert_close(y.reshape(-1, y.shape[-1]), ref, rtol=1e-5, atol=1e-6)
            dx, da, db = _adapter_grads(x2, g, m)
            grad_x += dx
            torch.testing.assert_close(m.lora_A.grad, da, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m.lora_B.grad, db, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.reshape(-1, 64), grad_x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gelu", [False, True])
def test_mlp_bf16_function_is_its_formula(gelu: bool) -> None:
    """The gated MLP as one function (`lora._NF4LoRAMLP` with `Bf16Products`): gate and up as
    above, h = act(gate) ∘ up, down on h; backward forms the gate and up gradients side by side
    and multiplies them by [W_gate; W_up] in one bf16 product."""
    gate, up = _group((96, 96), 64, seed=21)
    (down,) = _group((64,), 96, seed=22)
    down.base.bias = None
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(23), requires_grad=True)
    y = gate.forward_mlp(x, up, down, gelu)
    assert y is not None and type(y.grad_fn).__name__ == "_NF4LoRAMLPBackward"
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(24))
    (y * g).sum().backward()
    with torch.no_grad():
        x2, g2 = x.detach().reshape(-1, 64), g.reshape(-1, 64)
        a = _base16(x2, gate) + _adapter(x2, gate) + gate.base.bias
        u = _base16(x2, up) + _adapter(x2, up)
        act = (
            torch.nn.functional.gelu(a, approximate="tanh") if gelu else torch.nn.functional.silu(a)
        )
        h = act * u
        torch.testing.assert_close(
            y.reshape(-1, 64), _base16(h, down) + _adapter(h, down), rtol=1e-5, atol=1e-6
        )
        dh_adapter, da_down, db_down = _adapter_grads(h, g2, down)
        dh = _grad16(g2, down) + dh_adapter
        d_up = dh * act
        d_gate = (
            torch.ops.aten.gelu_backward(dh * u, a, approximate="tanh")
            if gelu
            else torch.ops.aten.silu_backward(dh * u, a)
        )
        grad_x = _grad16(torch.cat([d_gate, d_up], dim=1), gate, up)
        for m, gm in ((gate, d_gate), (up, d_up)):
            dx, da, db = _adapter_grads(x2, gm, m)
            grad_x += dx
            torch.testing.assert_close(m.lora_A.grad, da, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(m.lora_B.grad, db, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(down.lora_A.grad, da_down, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(down.lora_B.grad, db_down, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.reshape(-1, 64), grad_x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_whole_model_in_bf16_stays_close_to_fp32(tmp_path: Path, arch: str) -> None:
    """One step of a tiny NF4 model: the loss within 1 % of fp32's, the adapter gradients
    within bf16 rounding (a few %), pointing the same way."""
    model = load_model(
        write_family_gguf(tmp_path / f"{arch}.gguf", arch), precision="nf4", lora=LoraConfig(4)
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    ids = torch.randint(5, 290, (2, 12), generator=torch.Generator().manual_seed(6))
    runs = {}
    for compute in ("fp32", "bf16"):
        set_base_compute(model, compute)
        model.zero_grad()
        loss = model(ids, ids)
        loss.backward()
        runs[compute] = (loss.item(), torch.cat([p.grad.flatten() for p in lora_parameters(model)]))
    (l32, g32), (l16, g16) = runs["fp32"], runs["bf16"]
    assert l16 != l32 and abs(l16 - l32) / l32 < 1e-2
    rel = float((g16 - g32).norm() / g32.norm())
    assert 0 < rel < 5e-2, rel
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 0.99


def test_compute_is_validated_where_it_is_set() -> None:
    with pytest.raises(ValueError, match="`compute` should be one of"):
        TrainConfig(compute="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`compute` bf16 applies to an NF4 base"):
        TrainConfig(compute="bf16", precision="fp32")
    with pytest.raises(ValueError, match="`compute` should be one of"):
        ClientConfig("m.gguf", "d.jsonl", "state", compute="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`compute` bf16 applies to an NF4 base"):
        ClientConfig("m.gguf", "d.jsonl", "state", compute="bf16", precision="bf16")
    with pytest.raises(ValueError, match="`compute` should be one of"):
        set_base_compute(torch.nn.Linear(2, 2), "fp16")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("flags", "precision", "expected"),
    [
        ("fpu avx2 avx512f avx512_bf16", "nf4", "bf16"),
        ("fpu avx2 amx_bf16 amx_tile", "nf4", "bf16"),
        ("fpu avx2 avx512f avx512_bf16", "bf16", "fp32"),  # a bf16 base computes in bf16 anyway
        ("fpu avx2 avx512f avx512_bf16", "fp32", "fp32"),
        ("fpu avx2 fma", "nf4", "fp32"),  # torch would emulate bf16: slower than fp32
        (None, "nf4", "fp32"),  # unknown (ARM, e.g. a Jetson): not measured, fp32
    ],
)
def test_auto_compute_is_bf16_only_over_nf4_on_cpus_with_bf16_dot_products(
    tmp_path: Path, flags: str | None, precision: str, expected: str
) -> None:
    from edge_sdk.compute import resolve_compute

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\n" + (f"flags\t\t: {flags}\n" if flags else "Features: asimd\n")
    )
    assert resolve_compute("auto", precision, info) == expected
    assert resolve_compute("fp32", precision, info) == "fp32"  # an explicit choice stays
    if precision == "nf4":
        assert resolve_compute("bf16", precision, info) == "bf16"


def test_configs_default_to_auto_and_fingerprint_what_it_resolves_to() -> None:
    """`fedlm train`, `fedlm join` and `fedlm demo` default to auto. A config keeps "auto", so
    that changing its precision later stays valid; the run's fingerprint holds the arithmetic
    auto picked here (an auto run and an explicit one of the same arithmetic resume each
    other; `metrics.json`: `test_fedlm_train_compute_bf16_end_to_end`)."""
    from edge_sdk.compute import resolve_compute
    from edge_sdk.demo.config import DemoConfig

    here = resolve_compute("auto", "nf4")
    assert here in ("fp32", "bf16")
    assert TrainConfig().compute == "auto" and TrainConfig().resolved_compute == here
    assert ClientConfig("m.gguf", "d.jsonl", "state").compute == "auto"
    assert DemoConfig().compute == "auto"
    assert TrainConfig(precision="fp32").resolved_compute == "fp32"
    assert TrainConfig(compute="auto", precision="bf16").resolved_compute == "fp32"
    # the precision can change after the fact: auto follows it
    assert dataclasses.replace(TrainConfig(), precision="fp32").resolved_compute == "fp32"
    assert DemoConfig().replace(precision="fp32").precision == "fp32"
    assert TrainConfig().trajectory_fields() == TrainConfig(compute=here).trajectory_fields()


def test_fp32_runs_keep_their_checkpoint_fingerprint() -> None:
    """`compute` joins the fields that change the optimization path only when it is not
    fp32, so a checkpoint written before the field existed still resumes with fp32."""
    assert "compute" not in TrainConfig(compute="fp32").trajectory_fields()
    assert TrainConfig(compute="bf16").trajectory_fields()["compute"] == "bf16"


@pytest.mark.parametrize("compute", ["bf16", None])
def test_fedlm_train_records_the_arithmetic_it_used(tmp_path: Path, compute: str | None) -> None:
    """`--compute bf16`, and no flag (auto): `metrics.json` says which arithmetic ran."""
    from edge_sdk.cli import main
    from edge_sdk.compute import resolve_compute

    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(f"Record {i}: the value is {i * 7}." for i in range(40)))
    out = tmp_path / "out"
    gguf = write_family_gguf(tmp_path / "llama.gguf", "llama")
    args = ["train", str(gguf), "--data", str(data), "--out", str(out), "--steps", "2"]
    args += ["--seq-len", "32", "--no-progress", *(["--compute", compute] if compute else [])]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["compute"] == (compute or resolve_compute("auto", "nf4"))
    assert metrics["metrics"]["eval_loss"] > 0


@pytest.mark.parametrize(
    ("flags", "has", "warns"),
    [
        ("fpu avx2 avx512f avx512_bf16 avx512_vnni", True, False),
        ("fpu avx2 amx_bf16 amx_tile", True, False),
        ("fpu avx2 fma", False, True),
        (None, None, False),  # no flags line (e.g. ARM): unknown, no warning
    ],
)
def test_bf16_products_are_read_from_cpuinfo(
    tmp_path: Path, flags: str | None, has: bool | None, warns: bool
) -> None:
    from edge_sdk.compute import compute_warning, cpu_has_bf16_dot

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\n" + (f"flags\t\t: {flags}\n" if flags else "Features: asimd\n")
    )
    assert cpu_has_bf16_dot(info) is has
    assert (compute_warning("bf16", info) is not None) is warns
    assert compute_warning("fp32", info) is None
    assert compute_warning("auto", info) is None  # auto never picks bf16 there
    assert cpu_has_bf16_dot(tmp_path / "missing") is None
