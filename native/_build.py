"""Compile a C file of this package once (into the fedlm cache) and load it with ctypes.

Kernels are plain C with no Python API, built with the system compiler on first use and
cached by the hash of their source. Without a compiler, or with `FEDLM_NO_NATIVE=1`, `load`
returns None and each kernel's pure-Python twin runs instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_lock = threading.Lock()
_cache: dict[str, ctypes.CDLL | None] = {}

# -ffp-contract=off: no fused multiply-adds, so results equal the numpy / torch twins bit for bit.
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC"]

# Extra flags per source. nf4.c's dequantization runs between the step's GEMMs, on every
# core like bitsandbytes' own CPU kernel (OpenMP; measured 2x on 2 cores).
_EXTRA_CFLAGS = {"nf4.c": ["-fopenmp"]}


def _compile(source: Path) -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler found; %s falls back to Python", source.name)
        return None
    extra = _EXTRA_CFLAGS.get(source.name, [])
    lib = _compile_with(cc, source, [*_CFLAGS, *extra])
    if lib is None and extra:
        # A compiler without OpenMP (e.g. clang without libomp) still gets the serial kernel.
        log.info("building %s without %s", source.name, " ".join(extra))
        lib = _compile_with(cc, source, _CFLAGS)
    return lib


def _compile_with(cc: str, source: Path, flags: list[str]) -> ctypes.CDLL | None:
    from edge_sdk.models.store import cache_dir

    tag = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    out = cache_dir() / "native" / f"{source.stem}-{tag}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cc, *flags, "-o", str(tmp), str(source), "-lm"]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log.warning(
                "building %s failed (%s); using Python", source.name, proc.stderr.strip()[:200]
            )
            return None
        os.replace(tmp, out)
    return ctypes.CDLL(str(out))


def load(source_name: str) -> ctypes.CDLL | None:
    """The compiled library for `native/<source_name>`, or None when unavailable or disabled."""
    with _lock:
        if source_name not in _cache:
            lib = None
            if os.environ.get("FEDLM_NO_NATIVE") != "1":
                try:
                    lib = _compile(Path(__file__).with_name(source_name))
                except (OSError, subprocess.SubprocessError) as exc:
                    log.warning("native kernel %s unavailable (%s); using Python", source_name, exc)
            _cache[source_name] = lib
        return _cache[source_name]
