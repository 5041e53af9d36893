"""`StopSignal`: the client's `stop()`, seen by its waits (asyncio) and its training (a thread)."""

from __future__ import annotations

import asyncio
import threading


class StopSignal:
    """Set from any thread or a signal handler; read by the event loop and the training thread.

    A `threading.Event` carries it to the training thread (checked at each optimizer step); an
    `asyncio.Event` of the running loop ends any wait at once (`sleep`, the transport's backoff).
    """

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def set(self) -> None:
        """Ask to stop; safe from any thread or a signal handler."""
        self._flag.set()
        loop, event = self._loop, self._event
        if loop is not None and event is not None and not loop.is_closed():
            loop.call_soon_threadsafe(event.set)

    def is_set(self) -> bool:
        return self._flag.is_set()

    def bind(self) -> asyncio.Event:
        """Attach to the running event loop (at the start of a run); its event, for the waits."""
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        if self._flag.is_set():
            self._event.set()
        return self._event

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds`, or less when stopped meanwhile."""
        assert self._event is not None
        try:
            await asyncio.wait_for(self._event.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass
