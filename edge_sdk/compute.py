"""Which arithmetic the NF4 base's products use in training: `--compute auto|fp32|bf16`.

"auto" (the default) picks bf16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX: on
this project's EPYC the step runs ~0.7x fp32's time, eval loss within 0.3 %, BENCHMARKS.md)
and fp32 everywhere else: CPUs without those flags (torch would emulate bf16, slower than
fp32), non-x86 CPUs such as a Jetson's (not measured), and bases that are not NF4 (a bf16 or
fp32 base computes in its own dtype). Imports nothing heavy. Configs keep "auto" as asked (so
that changing their precision later stays valid) and resolve it where a run starts
(`TrainConfig.resolved_compute`); `metrics.json` and the checkpoint fingerprint record what ran.
"""

from __future__ import annotations

import functools
from pathlib import Path

from edge_sdk.choices import Compute

BF16_DOT_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of x86 CPUs with native bf16 dot products."""

CPUINFO = "/proc/cpuinfo"


@functools.lru_cache(maxsize=8)
def cpu_has_bf16_dot(cpuinfo: str | Path = CPUINFO) -> bool | None:
    """Whether this CPU multiplies bf16 natively (`BF16_DOT_FLAGS`), or None when unknown
    (no /proc/cpuinfo: not Linux; no x86 flags line: e.g. ARM, where torch's bf16 support
    varies by core)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return any(flag in line.split() for flag in BF16_DOT_FLAGS)
    return None


def resolve_compute(compute: str, precision: str, cpuinfo: str | Path = CPUINFO) -> Compute:
    """ "fp32" or "bf16" for a validated `compute`: "auto" becomes bf16 over an NF4 base on a
    CPU known to have bf16 dot products, fp32 otherwise; the others stay as given."""
    if compute == "fp32":
        return "fp32"
    if compute == "bf16":
        return "bf16"
    return "bf16" if precision == "nf4" and cpu_has_bf16_dot(cpuinfo) is True else "fp32"


def compute_warning(compute: str, cpuinfo: str | Path = CPUINFO) -> str | None:
    """A line for the user when `compute` is bf16 on a CPU known to lack native bf16 products
    (torch then computes bf16 without them: not measured here, expect it slower than fp32)."""
    if compute != "bf16" or cpu_has_bf16_dot(cpuinfo) is not False:
        return None
    return (
        "--compute bf16 on a CPU without bf16 dot products (no avx512_bf16 or amx_bf16 in "
        "/proc/cpuinfo): expect it slower than --compute fp32"
    )


__all__ = ["BF16_DOT_FLAGS", "compute_warning", "cpu_has_bf16_dot", "resolve_compute"]
