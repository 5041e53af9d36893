"""Route llama.cpp's own log lines into Python logging instead of onto the user's terminal.

llama-cpp-python installs a log callback whose level table predates a renumbering of ggml's
`ggml_log_level` (now NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5; the table still reads
3 as ERROR). So every llama.cpp *warning* reached stderr even with `verbose=False`: Gemma 3
printed `llama_kv_cache_iswa: using full-size SWA cache ...` on each load, and a tiny test
model `n_ctx_seq (512) > n_ctx_train (0)`. Here each line goes to the `edge_sdk.llama_cpp`
logger at DEBUG (`fedlm -v` shows them), or to stderr as before when the last `Llama` was
created with `verbose=True`. Failures still surface as exceptions from llama-cpp-python.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
from typing import Any

log = logging.getLogger("edge_sdk.llama_cpp")

# ggml.h, enum ggml_log_level (llama.cpp b5000 and later).
_LEVEL_NAMES = {0: "", 1: "debug", 2: "info", 3: "warning", 4: "error", 5: ""}

_callback: Any = None  # the ctypes callback must outlive every call llama.cpp makes into it


def _verbose() -> bool:
    # llama-cpp-python records `Llama(verbose=...)` as this logger's level (DEBUG or ERROR).
    return logging.getLogger("llama-cpp-python").level == logging.DEBUG


def install() -> None:
    """Install the routing callback once per process (llama.cpp's logger is process-wide)."""
    global _callback
    if _callback is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _route(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        # An exception must never unwind into llama.cpp's C code: a lost log line is harmless.
        with contextlib.suppress(Exception):
            message = text.decode("utf-8", "replace")
            if _verbose():
                print(message, end="", flush=True, file=sys.stderr)
            elif message.strip():
                tag = f"[{_LEVEL_NAMES[level]}] " if level in (3, 4) else ""
                log.debug("%s%s", tag, message.rstrip("\n"))

    llama_cpp.llama_log_set(_route, ctypes.c_void_p(0))
    _callback = _route
