"""NF4 quantization for the loader: a C kernel (`nf4.c`) with a pure-torch twin.

Profiling `load_model` on SmolLM2-135M showed bitsandbytes' CPU `quantize_4bit` (a
`torch.bucketize` per weight, ~40 ns each) taking ~70% of the load. The C loop does the same
arithmetic in ~2 ns per weight. Both produce exactly bitsandbytes' packed bytes and absmax
(tested bit for bit); `edge_sdk.models.nf4.NF4Linear` holds the result, and `nf4_dequantize`
reads it back (also bit-identical to bitsandbytes), so the CPU path never imports bitsandbytes.

The kernel is compiled once (native/_build.py) and called through ctypes, which releases the
GIL while it runs. Without a compiler, or with `FEDLM_NO_NATIVE=1`, the torch twin runs.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from edge_sdk.wire._quant import NF4_LEVELS
from native import _build


@functools.lru_cache(maxsize=1)
def nf4_code() -> torch.Tensor:
    """(16,) float32 NF4 code values, sorted ascending: the wire codec's table, equal to
    bitsandbytes' `get_4bit_type("nf4")` (tested) without importing bitsandbytes."""
    return torch.from_numpy(NF4_LEVELS.copy())  # the one NF4 table (float32)


@functools.lru_cache(maxsize=1)
def nf4_midpoints() -> torch.Tensor:
    """(15,) float32 midpoints between the sorted NF4 code values, as bitsandbytes computes them."""
    code = nf4_code()
    return ((code[:-1] + code[1:]) / 2).contiguous()


def native_lib() -> ctypes.CDLL | None:
    """The compiled kernel, or None when it is unavailable or disabled."""
    lib = _build.load("nf4.c")
    if lib is not None and not getattr(lib, "_fedlm_typed", False):
        lib.nf4_dequantize.restype = None
        lib.nf4_dequantize.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.nf4_dequantize_bf16.restype = None
        lib.nf4_dequantize_bf16.argtypes = lib.nf4_dequantize.argtypes
        lib.nf4_quantize.restype = None
        lib.nf4_quantize.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib._fedlm_typed = True  # type: ignore[attr-defined]  # a CDLL takes any attribute
    return lib


def quantize_nf4_torch(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure-torch twin: (packed uint8 (ceil(n/2), 1), absmax float32 (blocks,))."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)  # (blocks, bs)
    absmax = blocks.abs().amax(dim=1)  # (blocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # a zero maps to code 7, as in bnb
    q = torch.bucketize(scaled, nf4_midpoints(), out_int32=True).to(torch.uint8)
    return ((q[::2] << 4) | q[1::2]).unsqueeze(1), absmax


def quantize_nf4(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize `w` like bitsandbytes: (packed uint8 (ceil(n/2), 1), absmax float32
    (blocks,))."""
    lib = native_lib()
    n = w.numel()
    if lib is None or n % blocksize or blocksize % 2 or blocksize > 4096:
        return quantize_nf4_torch(w, blocksize)
    flat = w.reshape(-1).float().contiguous()
    mid = nf4_midpoints()
    packed = torch.empty(n // 2, 1, dtype=torch.uint8)
    absmax = torch.empty(n // blocksize, dtype=torch.float32)
    lib.nf4_quantize(
        flat.data_ptr(), n, blocksize, mid.data_ptr(), packed.data_ptr(), absmax.data_ptr()
    )
    return packed, absmax


def dequantize_nf4_torch(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int = 64
) -> torch.Tensor:
    """The pure-torch twin of the C kernel: packed uint8 (n/2,) + absmax (blocks,) -> fp32 (n,)."""
    p = packed.reshape(-1)
    q = torch.stack((p >> 4, p & 0x0F), dim=1).reshape(-1).long()  # (n,) codes, high nibble first
    return (nf4_code()[q].view(-1, blocksize) * absmax.float()[:, None]).reshape(-1)


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int = 64,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """NF4 -> fp32 like bitsandbytes' `dequantize_4bit`: (n,) values, into `out` when given.

    `out` (any shape with n elements, contiguous) is filled in place and returned; a reused
    buffer spares the allocator ~0.9 GB of short-lived weights per SmolLM2 step. A bf16 `out`
    gets the fp32 values rounded to nearest-even (`--compute bf16`), written directly.
    """
    n = packed.numel() * 2
    lib = native_lib()
    if (
        lib is None
        or n % blocksize
        or blocksize % 2
        or packed.dtype != torch.uint8
        or not packed.is_contiguous()
        or packed.device.type != "cpu"
    ):
        values = dequantize_nf4_torch(packed, absmax, blocksize)
        if out is None:
            return values
        out.view(-1).copy_(values)
        return out
    if out is None:
        out = torch.empty(n, dtype=torch.float32)
    assert out.dtype in (torch.float32, torch.bfloat16), out.dtype
    assert out.is_contiguous() and out.numel() == n
    am = (
        absmax
        if absmax.dtype == torch.float32 and absmax.is_contiguous()
        else absmax.float().contiguous()
    )
    kernel = lib.nf4_dequantize if out.dtype == torch.float32 else lib.nf4_dequantize_bf16
    kernel(packed.data_ptr(), am.data_ptr(), n, blocksize, nf4_code().data_ptr(), out.data_ptr())
    return out
