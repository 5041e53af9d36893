"""The NF4 quantization kernel and its torch twin reproduce bitsandbytes byte for byte."""

from __future__ import annotations

import pytest
import torch

from native.nf4 import native_lib, quantize_nf4, quantize_nf4_torch


def _bnb(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    return packed, state.absmax


@pytest.mark.parametrize("shape", [(96, 64), (192, 576), (7, 128)])
def test_torch_twin_matches_bitsandbytes(shape: tuple[int, int]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    w[0, :64] = 0.0  # an all-zero block: absmax 0 must not divide by zero
    packed, absmax = quantize_nf4_torch(w)
    ref_packed, ref_absmax = _bnb(w)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax, ref_absmax)


@pytest.mark.skipif(native_lib() is None, reason="no C compiler: the torch twin is in use")
@pytest.mark.parametrize("shape", [(96, 64), (1536, 576)])
def test_kernel_matches_bitsandbytes(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g) * 0.05
    w[1, :64] = 0.0
    w[2, 5] = 10.0  # an outlier sets its block's absmax
    packed, absmax = quantize_nf4(w)
    ref_packed, ref_absmax = _bnb(w)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax, ref_absmax)


def test_round_trip_error_is_nf4_sized() -> None:
    import bitsandbytes.functional as bnbf

    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(2))
    packed, absmax = quantize_nf4(w)
    _, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    state.absmax = absmax
    back = bnbf.dequantize_4bit(packed, state)
    rel = ((back - w).norm() / w.norm()).item()
    assert 0.02 < rel < 0.15  # 4 bits: ~10% relative error on Gaussian weights, never exact


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_gguf_dequant_kernels_match_gguf(qtype: str) -> None:
    """Q8_0/Q4_0/Q4_1 run in C, others fall back to gguf; either way the values are gguf's."""
    import gguf
    import numpy as np

    from native.dequant import dequantize

    t = gguf.GGMLQuantizationType[qtype]
    x = np.random.default_rng(3).standard_normal((48, 256)).astype(np.float32)
    x[0] = 0.0
    x[1, :32] = 6e-8  # fp16 subnormal scales
    q = gguf.quants.quantize(x, t)
    np.testing.assert_array_equal(dequantize(q, t), gguf.quants.dequantize(q, t))


def test_code_table_is_bitsandbytes() -> None:
    from bitsandbytes.functional import get_4bit_type

    from native.nf4 import nf4_code

    assert torch.equal(nf4_code(), get_4bit_type("nf4", device="cpu").float())


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("shape", [(96, 64), (1536, 576), (576, 1536)])
def test_dequantize_matches_bitsandbytes_bit_for_bit(
    shape: tuple[int, int], use_kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our NF4 -> fp32 (C kernel and torch twin) equals bitsandbytes' dequantize_4bit exactly."""
    import bitsandbytes.functional as bnbf

    from native import nf4

    if use_kernel and native_lib() is None:
        pytest.skip("no C compiler: the torch twin is in use")
    if not use_kernel:
        monkeypatch.setattr(nf4, "native_lib", lambda: None)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.05
    w[0, :64] = 0.0
    w[3, 7] = -8.0
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    ref = bnbf.dequantize_4bit(packed, state).float().reshape(-1)
    out = torch.full((w.numel(),), float("nan"))
    got = nf4.dequantize_nf4(packed, state.absmax, 64, out=out)
    assert got.data_ptr() == out.data_ptr()  # filled in place
    assert torch.equal(got, ref)
    assert torch.equal(nf4.dequantize_nf4(packed, state.absmax, 64), ref)


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize(("shape", "blocksize"), [((96, 64), 64), ((1536, 576), 64), ((7, 96), 32)])
def test_dequantize_into_bf16_is_the_fp32_value_rounded_to_nearest_even(
    shape: tuple[int, int], blocksize: int, use_kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16 `out` gets the fp32 dequantization rounded as torch rounds it (ties to even),
    bit for bit: the C kernel rounds each block's 16-entry table (both of its loops: 32-byte
    blocks take only the scalar tail), the torch twin copies."""
    from native import nf4

    if use_kernel and native_lib() is None:
        pytest.skip("no C compiler: the torch twin is in use")
    if not use_kernel:
        monkeypatch.setattr(nf4, "native_lib", lambda: None)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 0.05
    w[1, :8] = torch.tensor([1.0, -1.0, 3.0e-3, 0.0, 1.5, -2.5, 7.0e-4, 65504.0])
    packed, absmax = quantize_nf4(w, blocksize)
    fp32 = nf4.dequantize_nf4(packed, absmax, blocksize)
    out = torch.zeros(w.numel(), dtype=torch.bfloat16)
    got = nf4.dequantize_nf4(packed, absmax, blocksize, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got.view(torch.int16), fp32.to(torch.bfloat16).view(torch.int16))
    if shape == (1536, 576):  # ties were met: values exactly halfway between two bf16s
        assert bool(((fp32.view(torch.int32) & 0xFFFF) == 0x8000).any())
