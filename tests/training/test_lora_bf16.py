"""`--compute bf16`: the NF4 base's products in bf16, the adapter and everything else in fp32.

The gated down projection in bf16 is checked with the fp32 one:
`tests/training/test_lora.py::test_gated_down_projection_equals_the_unfused_path`."""

from __future__ import annotations

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


def test_fp32_runs_keep_their_checkpoint_fingerprint() -> None:
    """`compute` joins the fields that change the optimization path only when it is not the
    default, so a checkpoint written before the field existed still resumes."""
    assert "compute" not in TrainConfig().trajectory_fields()
    assert TrainConfig(compute="bf16").trajectory_fields()["compute"] == "bf16"


def test_fedlm_train_compute_bf16_end_to_end(tmp_path: Path) -> None:
    from edge_sdk.cli import main

    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(f"Record {i}: the value is {i * 7}." for i in range(40)))
    out = tmp_path / "out"
    gguf = write_family_gguf(tmp_path / "llama.gguf", "llama")
    args = ["train", str(gguf), "--data", str(data), "--out", str(out), "--steps", "2"]
    args += ["--seq-len", "32", "--compute", "bf16", "--no-progress"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["compute"] == "bf16"
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
    from edge_sdk.training.lora_bf16 import compute_warning, cpu_has_bf16_dot

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\n" + (f"flags\t\t: {flags}\n" if flags else "Features: asimd\n")
    )
    assert cpu_has_bf16_dot(info) is has
    assert (compute_warning("bf16", info) is not None) is warns
    assert compute_warning("fp32", info) is None
    assert cpu_has_bf16_dot(tmp_path / "missing") is None
