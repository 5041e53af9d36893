"""The aiohttp service, built by composition: typed `web.AppKey` state and `cleanup_ctx` steps.

    app = build_app(config)                  # what aiohttp's test utilities can serve
    async with Service(config) as service:   # bound socket + TLS + mDNS: what the CLI runs
        print(service.url)

Start-up order (clean-up runs in reverse): open the database and the task, start the worker
threads, start the aggregation loop, advertise on mDNS. So the advert disappears first on
shutdown, an aggregation in flight finishes (its commit is atomic either way), and the
database closes last.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

from aiohttp import web
from typing_extensions import Self

import edge_sdk
from coordinator import connections, http_api
from coordinator.advertise import Advertiser, lan_addresses, txt_properties
from coordinator.auth import RateLimiter, hash_token
from coordinator.config import CoordinatorConfig
from coordinator.errors import CoordinatorError, PortInUseError
from coordinator.metrics import Metrics
from coordinator.openapi import build_spec
from coordinator.state_machine import Coordinator
from coordinator.storage import SQLiteStorage
from coordinator.tls import TlsMaterial, ensure_self_signed, tls_directory
from edge_sdk.wire import PROTOCOL_VERSION

log = logging.getLogger(__name__)

_PORT = web.AppKey("advertised_port", int)


def build_app(
    config: CoordinatorConfig,
    *,
    advertised_port: int | None = None,
    tls_fingerprint: str | None = None,
    coordinator_factory: Callable[[CoordinatorConfig, SQLiteStorage], Coordinator] = Coordinator,
) -> web.Application:
    """The application; mDNS runs only when `advertised_port` is given and `config.mdns` is on."""
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[connections.track_requests, http_api.error_middleware],
    )
    app[http_api.CONFIG] = config
    metrics = app[http_api.METRICS] = Metrics()
    app[connections.GUARD] = connections.ConnectionGuard(
        connections.ConnectionLimits(
            header_timeout_s=config.header_timeout_s,
            body_timeout_s=config.body_timeout_s,
            max_per_address=config.max_connections_per_address,
            max_total=config.max_connections,
        ),
        on_close=lambda reason: metrics.connections_closed.labels(reason=reason).inc(),
    )
    app[http_api.SPEC] = build_spec(edge_sdk.__version__, http_api.JOIN_MAX_BYTES)
    if advertised_port is not None:
        app[_PORT] = advertised_port
    app[http_api.RUNTIME] = http_api.Runtime(
        ingest=ThreadPoolExecutor(config.ingest_workers, thread_name_prefix="fedlm-ingest"),
        aggregation=ThreadPoolExecutor(1, thread_name_prefix="fedlm-aggregate"),
        client_limiter=RateLimiter(config.rate_per_s, config.rate_burst),
        join_limiter=RateLimiter(1.0, 10),
        tls_fingerprint=tls_fingerprint,
        operator_token_hash=hash_token(config.operator_token) if config.operator_token else None,
    )

    async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
        storage = SQLiteStorage(config.db_path)
        try:
            app[http_api.COORDINATOR] = await asyncio.get_running_loop().run_in_executor(
                app[http_api.RUNTIME].ingest, coordinator_factory, config, storage
            )
            dropped = app[http_api.METRICS].updates_dropped
            app[http_api.COORDINATOR].on_drop = lambda reason: dropped.labels(reason=reason).inc()
            yield
        finally:
            if http_api.COORDINATOR in app:  # the updates queued for the group commit first
                await asyncio.get_running_loop().run_in_executor(
                    None, app[http_api.COORDINATOR].close
                )
            storage.close()

    async def executors_ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        runtime = app[http_api.RUNTIME]
        # wait=True: an aggregation in flight finishes before the database closes.
        await asyncio.get_running_loop().run_in_executor(None, runtime.aggregation.shutdown, True)
        await asyncio.get_running_loop().run_in_executor(None, runtime.ingest.shutdown, True)

    async def aggregation_ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_aggregation_loop(app), name="fedlm-aggregation")
        app[http_api.RUNTIME].wake.set()  # resume a round that was due before a restart
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def mdns_ctx(app: web.Application) -> AsyncIterator[None]:
        if not config.mdns or _PORT not in app:
            yield
            return
        coordinator = app[http_api.COORDINATOR]
        interfaces = list(config.mdns_interfaces) if config.mdns_interfaces is not None else None
        if interfaces is None and config.host not in ("0.0.0.0", ""):
            interfaces = [config.host]
        addresses = interfaces or lan_addresses() or ["127.0.0.1"]
        advertiser = Advertiser(
            instance=config.mdns_name or f"fedlm-{coordinator.task_id[-8:]}-{uuid.uuid4().hex[:6]}",
            port=app[_PORT],
            properties=txt_properties(
                PROTOCOL_VERSION,
                config.model_sha256,
                coordinator.task_id,
                True,
                tls_fingerprint,
                model_name=config.model_name,
            ),
            addresses=addresses,
            interfaces=interfaces,
        )
        await advertiser.start()
        app[http_api.RUNTIME].advertised_name = advertiser.name
        try:
            yield
        finally:
            await advertiser.close()

    app.cleanup_ctx.extend([storage_ctx, executors_ctx, aggregation_ctx, mdns_ctx])
    http_api.add_routes(app)
    return app


async def _aggregation_loop(app: web.Application) -> None:
    """Aggregate when woken by an accepted update, or every `tick_s` for deadlines."""
    config, runtime, metrics = app[http_api.CONFIG], app[http_api.RUNTIME], app[http_api.METRICS]
    coordinator = app[http_api.COORDINATOR]
    loop = asyncio.get_running_loop()
    failures = 0
    while True:
        # asyncio.wait, not wait_for: Python 3.11's wait_for can swallow a cancellation that
        # races with its timeout, which would hang shutdown.
        waiter = asyncio.ensure_future(runtime.wake.wait())
        try:
            await asyncio.wait({waiter}, timeout=config.tick_s)
        finally:
            waiter.cancel()
        runtime.wake.clear()
        # In the aggregation thread: due() takes the state lock, which ingest holds across fsync.
        if not await loop.run_in_executor(runtime.aggregation, coordinator.due):
            continue
        try:
            version = await loop.run_in_executor(runtime.aggregation, coordinator.aggregate)
        except asyncio.CancelledError:
            raise
        except Exception:  # keep serving; the pending updates stay stored
            # Only the machinery fails here (storage, memory): an update at fault is dropped
            # by the coordinator itself. Back off so a broken disk does not burn a core.
            failures += 1
            delay = min(60.0, config.tick_s * 2**failures)
            log.exception(
                "aggregation failed; the pending updates are kept, retry in %.0f s", delay
            )
            await asyncio.sleep(delay)
            continue
        failures = 0
        if version is not None:
            metrics.aggregations.inc()
            metrics.aggregation_seconds.observe(
                float(coordinator.last_aggregation.get("seconds", 0.0))
            )
            runtime.wake.set()  # more may already be due (FedBuff under load)


class _GuardedSockSite(web.SockSite):
    """`web.SockSite` whose connections go through the `ConnectionGuard` (timeouts and caps).

    Only `start` differs: the same `create_server` call as aiohttp's, with the guard's wrapper
    around the protocol factory, and the TLS handshake bounded by the header timeout (asyncio's
    default is 60 s).
    """

    def __init__(
        self,
        runner: web.AppRunner,
        sock: socket.socket,
        guard: connections.ConnectionGuard,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        handshake = self._guard.limits.header_timeout_s if self._ssl_context else None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(server),
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=handshake,
        )


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # SO_REUSEADDR lets a restart take the port from its own TIME_WAIT sockets; on Linux it does
    # not let two live listeners share a port, so "in use" below still means another process.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"port {port} on {host or '0.0.0.0'} is already in use (another coordinator?): "
                "stop that process, or pick another port (--port 0 chooses a free one)"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise CoordinatorError(
                f"cannot listen on {host}: not an address of this machine (--host)"
            ) from None
        raise
    return sock


class Service:
    """A running coordinator: socket bound first (so port 0 is known before mDNS), then the app.

    An async context manager; `close()` is idempotent.
    """

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.tls: TlsMaterial | None = None
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._sock: socket.socket | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def app(self) -> web.Application:
        assert self._runner is not None, "Service is not started"
        return self._runner.app

    @property
    def coordinator(self) -> Coordinator:
        return self.app[http_api.COORDINATOR]

    async def start(self) -> None:
        config = self.config
        # Bind first: a port in use fails before anything is created on disk.
        self._sock = _bind(config.host, config.port)
        self.port = self._sock.getsockname()[1]
        if config.tls:
            try:
                self.tls = await asyncio.get_running_loop().run_in_executor(
                    None, ensure_self_signed, tls_directory(config.db_path)
                )
            except BaseException:
                await self.close()
                raise
        else:
            log.warning(
                "TLS is off (--insecure): the join token and every bearer token cross the LAN "
                "in clear text, and devices cannot tell this coordinator from an impostor"
            )
        app = build_app(
            config,
            advertised_port=self.port,
            tls_fingerprint=self.tls.fingerprint if self.tls else None,
        )
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=5.0,
            keepalive_timeout=config.keepalive_timeout_s,
        )
        try:
            await self._runner.setup()
            site = _GuardedSockSite(
                self._runner,
                self._sock,
                app[connections.GUARD],
                ssl_context=self.tls.server_context() if self.tls else None,
            )
            await site.start()
        except BaseException:
            await self.close()
            raise
        log.info("coordinator listening on %s", self.url)

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def serve(
    config: CoordinatorConfig, on_ready: Callable[[Service], None] | None = None
) -> None:
    """Run until SIGINT/SIGTERM (the CLI's entry point)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(sig, stop.set)
    async with Service(config) as service:
        if on_ready is not None:
            on_ready(service)
        await stop.wait()
        log.info("shutting down")
