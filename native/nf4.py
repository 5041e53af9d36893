"""NF4 quantization for the loader: a C kernel (`nf4.c`) with a pure-torch twin.

Profiling `load_model` on SmolLM2-135M showed bitsandbytes' CPU `quantize_4bit` (a
`torch.bucketize` per weight, ~40 ns each) taking ~70% of the load. The C loop does the same
arithmetic in ~2 ns per weight. Both produce exactly bitsandbytes' packed bytes and absmax
(tested bit for bit), so the result goes straight into a `bnb.nn.Params4bit`.

The kernel is compiled once (native/_build.py) and called through ctypes, which releases the
GIL while it runs. Without a compiler, or with `FEDLM_NO_NATIVE=1`, the torch twin runs.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from native import _build


@functools.lru_cache(maxsize=1)
def nf4_midpoints() -> torch.Tensor:
    """(15,) float32 midpoints between bitsandbytes' sorted NF4 code values."""
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type("nf4", device="cpu").float()  # (16,), sorted ascending
    return ((code[:-1] + code[1:]) / 2).contiguous()


def native_lib() -> ctypes.CDLL | None:
    """The compiled kernel, or None when it is unavailable or disabled."""
    lib = _build.load("nf4.c")
    if lib is not None and not getattr(lib, "_fedlm_typed", False):
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
