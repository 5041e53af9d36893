"""The training step's large fp32 products, through oneDNN where torch ships it.

`torch.mm` on fp32 CPU tensors calls MKL's sgemm. The same torch build also carries oneDNN,
whose JIT kernels (reached through `torch.ops.mkldnn._linear_pointwise`, the op torch's own
compiler emits for CPU linears) ran the step's products in 0.66-1.04x MKL's time on this
project's AVX-512 EPYC, the tied output projection's (256, 576) x (576, 49152) in 0.74x
(`benchmarks/bench_gemm.py`, BENCHMARKS.md, issue 16). Results differ from MKL's by fp32
rounding only (summation order).

Only where no gradient has to flow through the op itself (it has no backward): inside
autograd Functions, and for frozen weights on inputs that need no gradient. The NF4 base's
forward without autograd uses it too, so that a disabled adapter (DPO's reference) and a zero
adapter give the same numbers bit for bit. `FEDLM_GEMM=torch` turns it off; so does a torch
built without oneDNN, a CPU other than x86-64 (not measured), or a failed first call.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ONEDNN = os.environ.get("FEDLM_GEMM", "onednn").strip().lower() != "torch"
"""Whether `linear` and `matmul` may use oneDNN (module-level so a benchmark can pair both)."""


@functools.lru_cache(maxsize=1)
def onednn_works() -> bool:
    """True when torch's oneDNN linear runs here and agrees with F.linear on a small product."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(4, 24, generator=g), torch.randn(16, 24, generator=g)
        with torch.no_grad():
            ok = torch.allclose(op(x, w, None, "none", [], ""), F.linear(x, w), atol=1e-5)
    except (AttributeError, RuntimeError) as exc:  # an op missing or refused in this build
        log.info("oneDNN linear unavailable, using torch.mm: %s", exc)
        return False
    if not ok:
        log.warning("oneDNN linear disagrees with F.linear; using torch.mm")
    return ok


def _use_onednn(a: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        ONEDNN
        and a.dtype == torch.float32
        and w.dtype == torch.float32
        and a.device.type == "cpu"
        and onednn_works()
    )


Scratch = Callable[[], torch.Tensor]
"""Makes the output buffer for the torch.mm path (a reused scratch tensor of the result's
shape); the oneDNN op has no `out=` and returns a new tensor."""


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """x @ wᵀ + bias for x (..., in) and w (out, in) -> (..., out). No autograd."""
    if _use_onednn(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    if scratch is not None and bias is None:
        return torch.matmul(x, w.t(), out=scratch())
    return F.linear(x, w, bias)


def matmul(g: torch.Tensor, w: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
    """g @ w for g (..., out) and w (out, in) -> (..., in): a linear's input gradient.
    No autograd."""
    if _use_onednn(g, w):
        return torch.ops.mkldnn._linear_pointwise(g, w.t(), None, "none", [], "")
    return g @ w if scratch is None else torch.matmul(g, w, out=scratch())


__all__ = ["ONEDNN", "Scratch", "linear", "matmul", "onednn_works"]
