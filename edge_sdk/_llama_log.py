"""The process's one llama.cpp log hook: route its lines into logging, and keep them on request.

llama.cpp has a single, process-wide log callback, so this module owns it. Each line
goes two ways:

- **Routing.** llama-cpp-python's own callback has a level table that predates a renumbering
  of ggml's `ggml_log_level` (now NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5; its table
  still reads 3 as ERROR), so every llama.cpp *warning* reached stderr even with
  `verbose=False`: Gemma 3 printed `llama_kv_cache_iswa: using full-size SWA cache ...` on each
  load. Here each line goes to the `edge_sdk.llama_cpp` logger at DEBUG (`fedlm -v` shows
  them), or to stderr as before when the last `Llama` was created with `verbose=True`.
- **Capture.** llama-cpp-python reports a refused file only as "Failed to load model from
  file". Lines logged inside `llama_log.capture()` are kept, so that a refusal can quote
  llama.cpp's own reason (`LlamaLog.reason`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("edge_sdk.llama_cpp")

Lines = collections.deque[tuple[int, str]]


def _verbose() -> bool:
    # llama-cpp-python records `Llama(verbose=...)` as this logger's level (DEBUG or ERROR).
    return logging.getLogger("llama-cpp-python").level == logging.DEBUG


class LlamaLog:
    """The installed callback and the capture buffer of the lines logged meanwhile."""

    WARN, ERROR, CONT = 3, 4, 5
    """ggml_log_level values (ggml.h, llama.cpp b5000 and later)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held only to install or change the list of captures
        self._captures: tuple[Lines, ...] = ()
        self._callback: Any = None  # kept alive: llama.cpp holds only the C pointer
        self._last_level = 0

    def install(self) -> None:
        """Install the callback once per process (idempotent)."""
        with self._lock:
            if self._callback is not None:
                return
            import llama_cpp

            @llama_cpp.llama_log_callback
            def callback(level: int, text: bytes, user_data: Any) -> None:
                # An exception must never unwind into llama.cpp's C code.
                with contextlib.suppress(Exception):
                    self._on_line(level, text.decode("utf-8", errors="replace"))

            llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
            self._callback = callback

    def _on_line(self, level: int, message: str) -> None:
        # CONT continues the previous line's level.
        effective = self._last_level if level == self.CONT else level
        if level != self.CONT:
            self._last_level = level
        for lines in self._captures:  # a tuple, replaced whole: no lock needed here
            lines.append((effective, message))
        if _verbose():
            print(message, end="", flush=True, file=sys.stderr)
        elif message.strip():
            tag = {self.WARN: "[warning] ", self.ERROR: "[error] "}.get(effective, "")
            log.debug("%s%s", tag, message.rstrip("\n"))

    @contextlib.contextmanager
    def capture(self) -> Iterator[Lines]:
        """Keep (level, text) of what llama.cpp logs meanwhile (the last 200 pieces)."""
        self.install()
        # No lock is held while the caller runs: a capture may span a stream that another
        # thread closes, and captures in several threads may overlap (each sees every line).
        lines: Lines = collections.deque(maxlen=200)
        with self._lock:
            self._captures = (*self._captures, lines)
        try:
            yield lines
        finally:
            with self._lock:
                self._captures = tuple(c for c in self._captures if c is not lines)

    @staticmethod
    def reason(lines: Lines, limit: int = 300) -> str:
        """llama.cpp's error (else warning) lines, joined on one escaped line and cut."""
        for wanted in (LlamaLog.ERROR, LlamaLog.WARN):
            text = "".join(t for lvl, t in lines if lvl == wanted).strip()
            if text:
                one = "; ".join(part.strip() for part in text.splitlines() if part.strip())
                one = "".join(c if c.isprintable() else " " for c in one)
                return one if len(one) <= limit else one[:limit] + "..."
        return ""


llama_log = LlamaLog()
"""The process's one llama.cpp log hook."""


def install() -> None:
    """Route llama.cpp's log into logging from now on (idempotent)."""
    llama_log.install()
