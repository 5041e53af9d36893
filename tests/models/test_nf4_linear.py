"""Our CPU `NF4Linear` against bitsandbytes' `Linear4bit`, and a CPU NF4 path free of
bitsandbytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge_sdk.models.nf4 import NF4Linear
from edge_sdk.training.lora import LoRALinear
from tests.models.tiny_families import write_family_gguf

ROOT = Path(__file__).resolve().parents[2]


def _bnb_linear(w: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module:
    """What `BitsAndBytesConfig(load_in_4bit, nf4, fp32 compute)` builds from `w`."""
    import bitsandbytes as bnb

    out_f, in_f = w.shape
    q = bnb.nn.Linear4bit(
        in_f,
        out_f,
        bias=bias is not None,
        compute_dtype=torch.float32,
        compress_statistics=False,
        quant_type="nf4",
    )
    q.weight = bnb.nn.Params4bit(
        w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=False, module=q
    )
    if bias is not None:
        q.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    q = q.to("cpu")  # quantizes
    q.support_avx512bf16_for_cpu = False  # the standard layout, as our loader always had it
    return q


@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_and_input_grad_match_bitsandbytes(with_bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(192, 128, generator=g) * 0.05
    bias = torch.randn(192, generator=g) if with_bias else None
    ours, ref = NF4Linear.from_float(w, bias), _bnb_linear(w, bias)
    x = torch.randn(3, 5, 128, generator=g)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = ours(x1), ref(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    gy = torch.randn(y1.shape, generator=g)
    y1.backward(gy)
    y2.backward(gy)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the eval path (no autograd function)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    # The packed bytes are bitsandbytes' own, so the weights are identical, not just close.
    import bitsandbytes.functional as bnbf

    assert torch.equal(
        ours.dequantize(), bnbf.dequantize_4bit(ref.weight.data, ref.weight.quant_state)
    )


def test_lora_over_nf4_equals_lora_over_bitsandbytes() -> None:
    """The merged NF4 LoRA path (ours) and the unmerged one over a `Linear4bit` (kept for
    CUDA) give the same outputs and adapter gradients."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g) * 0.05
    layers = [
        LoRALinear(base, 64, 96, rank=4, alpha=8.0)
        for base in (NF4Linear.from_float(w), _bnb_linear(w, None))
    ]
    a, b = torch.randn(4, 64, generator=g) * 0.1, torch.randn(96, 4, generator=g) * 0.1
    x = torch.randn(2, 7, 64, generator=g)
    outs = []
    for layer in layers:
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * torch.linspace(-1, 1, 96)).sum().backward()
        outs.append((y.detach(), xi.grad, layer.lora_A.grad, layer.lora_B.grad))
    for ours, ref in zip(*outs):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("packed", "absmax", "message"),
    [
        (torch.zeros(10, dtype=torch.uint8), torch.zeros(2), "`packed` should hold 64 uint8 bytes"),
        (torch.zeros(64, dtype=torch.uint8), torch.zeros(3), "`absmax` should hold 2 block scales"),
        (torch.zeros(64, dtype=torch.int8), torch.zeros(2), "`packed` should hold 64 uint8 bytes"),
    ],
)
def test_bad_buffers_are_refused(packed: torch.Tensor, absmax: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NF4Linear(packed, absmax, 8, 16)


def test_cpu_training_never_imports_bitsandbytes(tmp_path: Path) -> None:
    """Loading an NF4 model, a training step (with our AdamW, packed or not) and an eval import
    neither bitsandbytes nor torch._inductor (bitsandbytes' import pulls it in: ~120 MB RSS),
    nor sympy (`torch.broadcast_shapes` imports it: +34 MB RSS and 0.3-0.5 s on the first
    step)."""
    path = write_family_gguf(tmp_path / "llama.gguf", "llama")
    code = f"""
import json, sys, torch
from edge_sdk.models.loader import load_model
from edge_sdk.training.lora import LoraConfig, lora_parameters
m = load_model({str(path)!r}, precision="nf4", lora=LoraConfig(rank=4))
ids = torch.randint(5, 200, (2, 10), generator=torch.Generator().manual_seed(0))
m(ids, ids).backward()
m(ids, ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]] * 2)).backward()
from edge_sdk.training.adamw import AdapterAdamW
opt = AdapterAdamW(lora_parameters(m))
opt.step()
torch.nn.utils.clip_grad_norm_(lora_parameters(m), 1.0)
m.eval()
with torch.no_grad():
    m(ids)
print(json.dumps(sorted(k for k in sys.modules if k.split(".")[0] in ("bitsandbytes", "sympy")
                        or k.startswith("torch._inductor"))))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_WAIT_POLICY": "PASSIVE"},
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_scratch_buffers_are_reused_per_tag_and_per_thread() -> None:
    """One tag is one reused buffer whatever the shape asked (grown to the largest: no fresh
    allocation per call); another tag, dtype or thread gets its own memory, so temporaries
    held under different tags never overlap."""
    import itertools
    import threading

    from edge_sdk.models.nf4 import empty_scratch, scratch_buffer

    empty_scratch()
    a = scratch_buffer("t-a", (4, 8))
    assert a.shape == (4, 8) and a.is_contiguous()
    assert scratch_buffer("t-a", (8, 4)).data_ptr() == a.data_ptr()  # same role, same memory
    big = scratch_buffer("t-a", (16, 8))  # grown: a new buffer, the old view stays valid
    assert big.shape == (16, 8) and scratch_buffer("t-a", (2, 2)).data_ptr() == big.data_ptr()
    others = [scratch_buffer("t-b", (16, 8)), scratch_buffer("t-a", (16, 8), torch.float64)]

    def span(t: torch.Tensor) -> tuple[int, int]:
        return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()

    spans = sorted(span(t) for t in [big, *others])
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))  # disjoint
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(scratch_buffer("t-a", (4, 8)).data_ptr()))
    thread.start()
    thread.join()
    assert seen and seen[0] != big.data_ptr()
    empty_scratch()
    assert scratch_buffer("t-a", (16, 8)).data_ptr() != big.data_ptr()  # `big` still holds its own
