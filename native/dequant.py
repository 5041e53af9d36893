"""GGUF block dequantization for the loader: C kernels for Q8_0/Q4_0/Q4_1, else `gguf`.

Profiling `load_model` on SmolLM2-135M (Q4_1 blocks, Q8_0 embedding) showed gguf's numpy
dequantization as the largest remaining cost after NF4 quantization moved to C: ~1.5 s of
vectorised numpy with several full-size temporaries per tensor. `ggml_dequant.c` does it in
one pass, with results equal to `gguf.quants.dequantize` bit for bit (tested); every other
type (K-quants, IQ, floats) goes to `gguf.quants.dequantize`, the pure-Python twin.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from native import _build

# GGMLQuantizationType value -> (C function, bytes per block of 32 weights)
_KERNELS = {8: ("dequant_q8_0", 34), 2: ("dequant_q4_0", 18), 3: ("dequant_q4_1", 20)}


def native_lib() -> ctypes.CDLL | None:
    lib = _build.load("ggml_dequant.c")
    if lib is not None and not getattr(lib, "_fedlm_typed", False):
        for name, _ in _KERNELS.values():
            fn = getattr(lib, name)
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        lib._fedlm_typed = True  # type: ignore[attr-defined]  # a CDLL takes any attribute
    return lib


KERNEL_TYPES: frozenset[int] = frozenset(_KERNELS)
"""GGML types with a C kernel here (Q8_0, Q4_0, Q4_1)."""


def block_bytes(qtype: int) -> int:
    """Bytes per block of 32 weights of a `KERNEL_TYPES` type."""
    return _KERNELS[int(qtype)][1]


def dequantize_into(raw: Any, qtype: int, out: Any) -> Any:
    """Dequantize the GGUF rows `raw` (torch uint8 (rows, row_bytes), contiguous) into `out`
    (torch float32 (rows, row_bytes / block_bytes * 32), contiguous) and return `out`.

    For a table kept in its GGUF blocks and read back a few rows at a time (the tied embedding:
    `edge_sdk.models.quant_rows`); the values equal `dequantize` (and gguf's) bit for bit.
    """
    import torch

    name, nbytes = _KERNELS[int(qtype)]
    if raw.dtype != torch.uint8 or not raw.is_contiguous() or raw.shape[-1] % nbytes:
        raise ValueError(f"raw blocks should be contiguous uint8 rows of {nbytes}-byte blocks")
    nblocks = raw.numel() // nbytes
    if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != nblocks * 32:
        raise ValueError(f"out should be a contiguous float32 tensor of {nblocks * 32} values")
    lib = native_lib()
    if lib is None:
        out.view(raw.shape[0], -1).copy_(torch.from_numpy(dequantize(raw.numpy(), qtype)))
        return out
    getattr(lib, name)(raw.data_ptr(), nblocks, out.data_ptr())
    return out


def dequantize(data: np.ndarray, qtype: int) -> np.ndarray:
    """Like `gguf.quants.dequantize(data, qtype)`: raw blocks (rows, bytes) -> float32 (rows, n)."""
    kernel = _KERNELS.get(int(qtype))
    lib = native_lib() if kernel is not None else None
    if lib is None or kernel is None or data.dtype != np.uint8 or data.shape[-1] % kernel[1]:
        import gguf

        # Any int works: GGMLQuantizationType is an IntEnum and gguf only looks it up.
        return gguf.quants.dequantize(data, qtype)  # type: ignore[arg-type]
    name, block_bytes = kernel
    src = np.ascontiguousarray(data)
    nblocks = src.size // block_bytes
    out = np.empty((*src.shape[:-1], src.shape[-1] // block_bytes * 32), dtype=np.float32)
    getattr(lib, name)(src.ctypes.data, nblocks, out.ctypes.data)
    return out
