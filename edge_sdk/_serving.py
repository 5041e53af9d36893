"""What every inference backend shares: the generation lock and the adapter swap refusal.

Both `edge_sdk.runtime.EdgeModel` (llama.cpp) and `edge_sdk.onnx.runtime.OnnxEdgeModel` (ONNX
Runtime GenAI) serialise generations with one lock, hold it until a stream is exhausted or
closed, and refuse an adapter swap with the same `RuntimeBusyError` while it is held (or wait
up to `wait` seconds). Keeping this in one class is what makes a swap behave the same whichever
backend the federated client drives.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_sdk.errors import RuntimeBusyError

if TYPE_CHECKING:
    from typing_extensions import Self

"""Inference backends: llama.cpp on a GGUF (`edge_sdk.runtime.EdgeModel`), or ONNX Runtime GenAI
on a `fedlm export-onnx` folder (`edge_sdk.onnx.runtime.OnnxEdgeModel`). Defined here, in a module
that imports nothing heavy, so the CLI's argument parsers can use it."""


def check_wait(wait: float) -> float:
    """`wait` (seconds a swap may wait for a running generation), or ValueError naming it."""
    if not wait >= 0:  # also refuses NaN
        raise ValueError(f"`wait` should be >= 0 seconds, got {wait!r}")
    return float(wait)


class ServingLock:
    """Mixin: `_generating()` for generations, `_swap_lock(wait)` for adapter changes.

    The class using it sets `self.path` (named in the busy message) and calls `_init_lock()`.
    """

    path: Path
    _lock: threading.Lock

    def _init_lock(self) -> None:
        self._lock = threading.Lock()

    @contextmanager
    def _generating(self) -> Iterator[None]:
        with self._lock:
            yield

    def _locked_stream(
        self, pieces: Callable[[], Iterable[str]], guard: Callable[[], Any] | None = None
    ) -> Iterator[str]:
        """An iterator over `pieces()` that holds the lock until it is exhausted or closed.

        The lock is taken at the first `next()`, not here, like a generator function's body;
        `guard()` (a context manager factory, optional) wraps the iteration too.
        """

        def run() -> Iterator[str]:
            with self._generating():
                if guard is None:
                    yield from pieces()
                else:
                    with guard():
                        yield from pieces()

        return run()

    @contextmanager
    def _swap_lock(self, wait: float) -> Iterator[None]:
        wait = check_wait(wait)
        acquired = (
            self._lock.acquire(timeout=wait) if wait > 0 else self._lock.acquire(blocking=False)
        )
        if not acquired:
            waited = f" and did not finish within wait={wait:g} s" if wait > 0 else ""
            raise RuntimeBusyError(
                f"cannot swap the adapter of {self.path.name}: a generation is running{waited}; "
                "finish or close the stream first, or pass wait=SECONDS to wait for it"
            )
        try:
            yield
        finally:
            self._lock.release()

    def close(self) -> None:  # pragma: no cover - every backend overrides it
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
