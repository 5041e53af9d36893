"""Connection limits that aiohttp does not enforce: deadlines for headers and bodies, and caps.

aiohttp 3.x closes an idle keep-alive connection after `keepalive_timeout`, but it has no
deadline for the first request's head, none for a request body, and none for a peer that stops
reading its response: a slowloris client holds a socket, a parser and a task for as long as it
likes (100 half-open connections were all still open after 100 s). `ConnectionGuard` wraps
aiohttp's protocol in a transparent `asyncio.Protocol` proxy, and closes a connection that

- has not delivered a complete request head `header_timeout_s` after it opened,
- has not delivered the whole body of a started request `body_timeout_s` after its head,
- has kept its response waiting (the transport paused writing) for `body_timeout_s`;

and refuses, with a short HTTP error, a connection beyond `max_per_address` open connections
from one peer address or beyond `max_total` in all. Between requests on a keep-alive
connection, aiohttp's own `keepalive_timeout` applies: it closes a connection whose next
request head is not complete by then, whatever part of it has arrived.

The middleware `track_requests` tells the guard where each request starts and ends (aiohttp
calls it once the head is parsed, before the body is read).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    """The guard's bounds (`CoordinatorConfig` holds the defaults and their reasons)."""

    header_timeout_s: float
    body_timeout_s: float
    max_per_address: int
    max_total: int

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` should be > 0, got {getattr(self, name)}")
        for name in ("max_per_address", "max_total"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` should be >= 1, got {getattr(self, name)}")


def _http_error(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response, written before any request was read."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's protocol behind a proxy that owns the connection's deadlines.

    The inner protocol is only built once the connection is admitted, so a refused connection
    costs no parser and no task.
    """

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.address = "unknown"
        self._deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        self._content: Any = None  # the StreamReader of the request in progress

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, (tuple, list)) and peer:
            self.address = str(peer[0])
        refusal = self._guard._admit(self)
        if refusal is not None:
            transport.write(refusal)
            transport.close()
            return
        self._arm(self._guard.limits.header_timeout_s, "request head not complete")
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()
            # A peer that does not read its response would hold the handler forever.
            self._cancel_send()
            self._send_deadline = asyncio.get_running_loop().call_later(
                self._guard.limits.body_timeout_s, self._expire, "response not read"
            )

    def resume_writing(self) -> None:
        self._cancel_send()
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self._cancel_send()
        self._content = None
        if self._inner is not None:
            self._guard._release(self)
            inner, self._inner = self._inner, None
            inner.connection_lost(exc)

    # -- deadlines ----------------------------------------------------------------------------

    def request_started(self, content: Any) -> None:
        """The head of a request is parsed; its body (if any) must follow in time."""
        self._cancel()
        if content is not None and not content.is_eof():
            self._content = content
            self._arm(self._guard.limits.body_timeout_s, "request body not complete")

    def request_finished(self) -> None:
        """The handler returned; aiohttp's keep-alive timeout covers the next request head.

        A body the handler did not read (a 401 or 413 answered early) keeps its deadline:
        aiohttp then reads and discards it for up to `lingering_time` (10 s), which must not
        outlast `body_timeout_s`.
        """
        if self._content is None or self._content.is_eof():
            self._cancel()
            self._content = None

    def _arm(self, seconds: float, reason: str) -> None:
        self._cancel()
        self._deadline = asyncio.get_running_loop().call_later(seconds, self._expire, reason)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _cancel_send(self) -> None:
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def _expire(self, reason: str) -> None:
        if reason == "request body not complete" and (
            self._content is None or self._content.is_eof()
        ):
            return  # the body arrived; the handler may take its time
        if self.transport is not None and not self.transport.is_closing():
            log.debug("closing a connection from %s: %s", self.address, reason)
            self._guard._closing(reason)
            # abort, not close: nothing more is owed to this peer, and close() would wait
            # for a write buffer that a peer which does not read never drains.
            self.transport.abort()


class ConnectionGuard:
    """Counts connections per peer address and hands out guarded protocols (see the module)."""

    def __init__(
        self, limits: ConnectionLimits, on_close: Callable[[str], None] | None = None
    ) -> None:
        self.limits = limits
        self._on_close = on_close
        self._by_address: Counter[str] = Counter()
        self._by_transport: dict[int, _GuardedProtocol] = {}
        self.closed: Counter[str] = Counter()
        """Connections closed or refused by the guard, by reason (also passed to `on_close`)."""

    def _closing(self, reason: str) -> None:
        self.closed[reason] += 1
        if self._on_close is not None:
            self._on_close(reason)

    @property
    def open_connections(self) -> int:
        return len(self._by_transport)

    def protocol_factory(
        self, factory: Callable[[], asyncio.Protocol]
    ) -> Callable[[], asyncio.Protocol]:
        """Wrap aiohttp's protocol factory (its `web.Server`) for `loop.create_server`."""
        return lambda: _GuardedProtocol(self, factory)

    def _admit(self, conn: _GuardedProtocol) -> bytes | None:
        """None if `conn` may open (and count it), else the error response to send."""
        if self._by_address[conn.address] >= self.limits.max_per_address:
            self._closing("too many connections from one address")
            log.debug("refusing a connection from %s: per-address cap", conn.address)
            return _http_error(
                429,
                "Too Many Requests",
                "too_many_connections",
                f"more than {self.limits.max_per_address} open connections from this address",
            )
        if len(self._by_transport) >= self.limits.max_total:
            self._closing("too many connections")
            return _http_error(
                503,
                "Service Unavailable",
                "too_many_connections",
                f"the coordinator holds {self.limits.max_total} connections; retry shortly",
            )
        self._by_address[conn.address] += 1
        assert conn.transport is not None
        self._by_transport[id(conn.transport)] = conn
        return None

    def _release(self, conn: _GuardedProtocol) -> None:
        if self._by_transport.pop(id(conn.transport), None) is None:
            return
        self._by_address[conn.address] -= 1
        if self._by_address[conn.address] <= 0:
            del self._by_address[conn.address]

    def connection_of(self, request: web.BaseRequest) -> _GuardedProtocol | None:
        transport = request.transport
        return None if transport is None else self._by_transport.get(id(transport))


GUARD = web.AppKey("connection_guard", ConnectionGuard)


@web.middleware
async def track_requests(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    """Tell the guard where a request starts (head parsed) and ends (outermost middleware)."""
    guard = request.app.get(GUARD)
    conn = guard.connection_of(request) if guard is not None else None
    if conn is None:  # served without the guard (e.g. aiohttp's test utilities)
        return await handler(request)
    conn.request_started(request.content if request.body_exists else None)
    try:
        return await handler(request)
    finally:
        conn.request_finished()
