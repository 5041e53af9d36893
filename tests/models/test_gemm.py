"""The step's large products through oneDNN (`edge_sdk.models.gemm`): the same values as torch's
within fp32 rounding, the same training step, and torch's own path when switched off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edge_sdk.models import gemm
from tests.models.tiny_families import write_family_gguf


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


needs_onednn = pytest.mark.skipif(not gemm.onednn_works(), reason="no oneDNN linear here")


@needs_onednn
@pytest.mark.parametrize("shape", [(256, 576, 1536), (3, 7, 5), (2, 33, 64, 48)])
def test_linear_and_matmul_equal_torch_within_fp32_rounding(shape: tuple[int, ...]) -> None:
    *lead, k, n = shape
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(*lead, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n)
    y = gemm.linear(x, w, b)
    assert y.shape == (*lead, n)
    assert _rel(y, F.linear(x, w, b)) < 1e-5
    grad = torch.randn(*lead, n, generator=g)
    dx = gemm.matmul(grad, w)
    assert dx.shape == (*lead, k)
    assert _rel(dx, grad @ w) < 1e-5


def test_switched_off_it_is_torch_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemm, "ONEDNN", False)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(16, 32, generator=g), torch.randn(24, 32, generator=g)
    assert torch.equal(gemm.linear(x, w), F.linear(x, w))
    grad = torch.randn(16, 24, generator=g)
    assert torch.equal(gemm.matmul(grad, w), grad @ w)
    buf = torch.empty(16, 32)
    assert gemm.matmul(grad, w, lambda: buf).data_ptr() == buf.data_ptr()  # the reused buffer


def test_other_dtypes_take_torch_path() -> None:
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(6, 8, dtype=torch.bfloat16)
    assert torch.equal(gemm.linear(x, w), F.linear(x, w))


@needs_onednn
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_training_step_gives_the_same_loss_and_grads_either_way(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, arch: str
) -> None:
    """The whole NF4 LoRA step (merged projections both ways, the fused loss) with oneDNN and
    with torch.mm: equal within fp32 rounding, and the oneDNN path really ran (not equal bit
    for bit, which would mean the switch did nothing)."""
    from edge_sdk.models.loader import load_model
    from edge_sdk.training.lora import LoraConfig, lora_parameters

    path = write_family_gguf(tmp_path / f"{arch}.gguf", arch)
    model = load_model(path, precision="nf4", lora=LoraConfig(rank=4, alpha=8.0))
    for p in lora_parameters(model):  # B starts at zero: give it values so A's gradient lives
        torch.nn.init.normal_(p, std=0.05)
    model.train()
    ids = torch.randint(5, 290, (2, 24), generator=torch.Generator().manual_seed(2))

    def run(on: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(gemm, "ONEDNN", on)
        loss = model(ids, ids)
        loss.backward()
        grads = [p.grad.clone() for p in lora_parameters(model)]
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    (loss_t, grads_t), (loss_d, grads_d) = run(False), run(True)
    assert _rel(loss_d, loss_t) < 1e-5
    assert max(_rel(a, b) for a, b in zip(grads_d, grads_t)) < 1e-3
    assert not all(torch.equal(a, b) for a, b in zip(grads_d, grads_t))


def test_a_disabled_adapter_gives_the_zero_adapters_numbers_bit_for_bit() -> None:
    """DPO's reference is the policy with its adapter disabled: with B = 0 the two must agree
    exactly (every pair a tie before training), so the NF4 base alone runs the same product as
    the merged LoRA path. A mismatch of GEMM libraries made 3 of 8 real pairs look ranked."""
    from edge_sdk.models.nf4 import NF4Linear
    from edge_sdk.training.lora import LoRALinear

    g = torch.Generator().manual_seed(3)
    base = NF4Linear.from_float(torch.randn(1536, 576, generator=g) * 0.05)
    layer = LoRALinear(base, 576, 1536, rank=8, alpha=16.0)  # B = 0
    x = torch.randn(2, 128, 576, generator=g)
    with torch.no_grad():
        policy = layer(x)
        layer.enabled = False
        reference = layer(x)
        layer.enabled = True
    assert torch.equal(policy, reference)
    trained_path = layer(x.clone().requires_grad_(True))  # the autograd functions as well
    assert torch.equal(trained_path.detach(), reference)
