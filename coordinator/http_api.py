"""HTTP handlers and middleware of the REST API (the routes are listed in `add_routes`).

Every failure is answered by `error_middleware` as JSON, `{"error": {"code", "message"}}`,
never with a traceback: coordinator errors keep their status and code, aiohttp's own HTTP
errors (404, 405, 413) are wrapped, and anything unexpected is logged and becomes a bare 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from coordinator.auth import (
    RateLimiter,
    bearer_token,
    hash_token,
    printable,
    retry_after_header,
    tokens_equal,
)
from coordinator.config import CoordinatorConfig
from coordinator.connections import GUARD
from coordinator.errors import (
    AuthError,
    BadRequestError,
    BusyError,
    CoordinatorError,
    RateLimitedError,
)
from coordinator.metrics import Metrics
from coordinator.secure import CONTROL_MAX_BYTES, SecureAggregation, decode_control
from coordinator.secure import PHASES as SECAGG_PHASES
from coordinator.state_machine import Coordinator
from edge_sdk.validators import is_int_in
from edge_sdk.wire import CONTENT_TYPE

log = logging.getLogger(__name__)

T = TypeVar("T")

JOIN_MAX_BYTES = 4096
"""Largest /v1/join body: a join token and a device name take well under 1 KiB. Parsing 4 KiB
of JSON takes microseconds, so it is done on the loop; nothing larger is ever read."""


@dataclass
class Runtime:
    """Per-app mutable state that is not the coordinator itself."""

    ingest: ThreadPoolExecutor
    aggregation: ThreadPoolExecutor
    client_limiter: RateLimiter
    join_limiter: RateLimiter
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    tls_fingerprint: str | None = None
    advertised_name: str | None = None
    operator_token_hash: str | None = None
    """sha256 of the operator token (the token itself is never kept here); None = no view."""
    inflight_clients: set[str] = field(default_factory=set)
    """Clients with an update being received or checked (at most one each)."""
    inflight_bytes: int = 0
    """Bytes reserved by the updates in flight (bounded by `max_inflight_body_bytes`)."""


CONFIG = web.AppKey("config", CoordinatorConfig)
COORDINATOR = web.AppKey("coordinator", Coordinator)
METRICS = web.AppKey("metrics", Metrics)
RUNTIME = web.AppKey("runtime", Runtime)
SPEC = web.AppKey("openapi", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    route = (
        request.match_info.route.resource.canonical
        if request.match_info.route.resource
        else "unmatched"
    )
    try:
        response = await handler(request)
    except CoordinatorError as exc:
        headers: dict[str, str] = {}
        if isinstance(exc, RateLimitedError):
            headers["Retry-After"] = retry_after_header(exc.retry_after)
        if isinstance(exc, AuthError):
            headers["WWW-Authenticate"] = 'Bearer realm="fedlm"'
        if exc.status >= 500 and not isinstance(exc, RateLimitedError):  # 503 busy: shedding
            log.error("%s %s: %s", request.method, printable(request.path), exc)
        response = json_error(exc.status, exc.code, str(exc), headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_") if exc.reason else "http_error"
        response = json_error(
            exc.status,
            code,
            exc.text or exc.reason or code,
            {k: v for k, v in exc.headers.items() if k.lower() == "allow"},
        )
    except asyncio.CancelledError:
        raise
    except ConnectionError:  # the peer left, or the connection guard closed it mid-body
        log.debug("%s %s: connection lost", request.method, printable(request.path))
        response = json_error(400, "connection_lost", "the connection closed mid-request")
    except Exception:  # the contract: no traceback on the wire, whatever failed
        log.exception("unhandled error in %s %s", request.method, printable(request.path))
        response = json_error(500, "internal_error", "internal server error")
    metrics.requests.labels(route=route, status=str(response.status)).inc()
    return response


async def _in_thread(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


async def _client(request: web.Request) -> str:
    """Authenticate the bearer token and apply the client's rate limit; returns its id."""
    coordinator = request.app[COORDINATOR]
    client_id = coordinator.authenticate(bearer_token(request.headers.get("Authorization")))
    wait = request.app[RUNTIME].client_limiter.check(client_id)
    if wait > 0:
        raise RateLimitedError(f"rate limit exceeded for client {client_id}", wait)
    return client_id


def _too_large(size: int | None, limit: int) -> BadRequestError:
    got = f"{size} bytes" if size is not None else "more"
    return BadRequestError(
        f"request body of {got} exceeds this endpoint's {limit} bytes",
        code="request_entity_too_large",
        status=413,
    )


async def _read_capped(request: web.Request, limit: int) -> bytes:
    """The body, read only while it stays within `limit` bytes (413 as soon as it does not).

    A declared Content-Length over the limit is refused before a byte of the body is read; a
    chunked body is read up to limit + 1 bytes and no further.
    """
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(request.content_length, limit)
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise _too_large(None, limit)
    return b"".join(chunks)


async def join(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    wait = runtime.join_limiter.check(request.remote or "unknown")
    if wait > 0:
        raise RateLimitedError("too many join attempts from this address", wait)
    raw = await _read_capped(request, JOIN_MAX_BYTES)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, or 4 KiB of '['
        raise BadRequestError('expected a JSON object {"join_token": ..., "name": ...}') from None
    if not isinstance(body, dict) or not isinstance(body.get("join_token"), str):
        raise BadRequestError("expected a JSON object with a string `join_token`")
    name = body.get("name", "device")
    if not isinstance(name, str):
        raise BadRequestError("`name` should be a string")
    coordinator = request.app[COORDINATOR]
    # The token is checked here, before any thread, database or token work is queued.
    coordinator.check_join_token(body["join_token"])
    result = await _in_thread(runtime.ingest, coordinator.join, body["join_token"], name)
    return web.json_response(result)


async def task(request: web.Request) -> web.Response:
    await _client(request)
    config = request.app[COORDINATOR].task_config()
    if CONTENT_TYPE in request.headers.get("Accept", ""):
        return web.Response(body=config.to_bytes(), content_type=CONTENT_TYPE)
    return web.json_response(config.to_json_dict())


async def adapter(request: web.Request) -> web.Response:
    await _client(request)
    coordinator = request.app[COORDINATOR]
    body, etag, version = coordinator.current_adapter()
    headers = {"ETag": etag, "X-Fedlm-Version": str(version), "Cache-Control": "no-cache"}
    candidates = [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]
    if etag in candidates or "*" in candidates:
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type=CONTENT_TYPE, headers=headers)


async def updates(request: web.Request) -> web.Response:
    client_id = await _client(request)
    app = request.app
    metrics = app[METRICS]
    if request.content_type != CONTENT_TYPE:
        metrics.updates_rejected.labels(code="unsupported_media_type").inc()
        raise BadRequestError(
            f"expected Content-Type {CONTENT_TYPE}, got {request.content_type}",
            code="unsupported_media_type",
            status=415,
        )
    config, runtime = app[CONFIG], app[RUNTIME]
    limit = config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        # Refused on the declared size, before a byte of the body is read.
        metrics.updates_rejected.labels(code="too_large").inc()
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    reserved = limit if request.content_length is None else request.content_length
    try:
        if client_id in runtime.inflight_clients:
            raise RateLimitedError(
                f"an update from client {client_id} is still being received or checked", 1.0
            )
        if runtime.inflight_bytes + reserved > config.max_inflight_body_bytes:
            raise BusyError(
                f"{runtime.inflight_bytes} bytes of updates are being checked; retry shortly", 2.0
            )
        runtime.inflight_clients.add(client_id)
        runtime.inflight_bytes += reserved
        try:
            body = await request.read()  # aiohttp enforces client_max_size (413) when chunked
            # Checked and admitted in a worker thread, which then goes on to the next update;
            # the 202 waits for the group commit that stores this one (its fsync), not before.
            stored = await _in_thread(runtime.ingest, app[COORDINATOR].stage, client_id, body)
            ack = await asyncio.wrap_future(stored)
        finally:
            runtime.inflight_clients.discard(client_id)
            runtime.inflight_bytes -= reserved
    except CoordinatorError as exc:
        metrics.updates_rejected.labels(code=exc.code).inc()
        raise
    except web.HTTPRequestEntityTooLarge:
        metrics.updates_rejected.labels(code="too_large").inc()
        raise
    metrics.updates_accepted.inc()
    metrics.update_bytes.inc(len(body))
    app[RUNTIME].wake.set()
    return web.json_response(ack, status=202)


def _is_operator(request: web.Request) -> bool:
    expected = request.app[RUNTIME].operator_token_hash
    token = bearer_token(request.headers.get("Authorization"))
    return expected is not None and token is not None and tokens_equal(hash_token(token), expected)


async def status(request: web.Request) -> web.Response:
    """A client sees its own updates and counts of the rest; the operator token sees all."""
    viewer = None if _is_operator(request) else await _client(request)
    runtime = request.app[RUNTIME]
    result = await _in_thread(runtime.ingest, request.app[COORDINATOR].status, viewer)
    result["tls_fingerprint"] = runtime.tls_fingerprint
    result["mdns_name"] = runtime.advertised_name
    return web.json_response(result)


async def metrics_handler(request: web.Request) -> web.Response:
    metrics, coordinator = request.app[METRICS], request.app[COORDINATOR]
    metrics.global_version.set(coordinator.version)
    metrics.pending_updates.set(coordinator.pending_count)
    metrics.clients.set(coordinator.storage.count_clients())
    metrics.dp_epsilon.set(coordinator.epsilon_spent())
    metrics.connections_open.set(request.app[GUARD].open_connections)
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})


async def healthz(request: web.Request) -> web.Response:
    coordinator = request.app[COORDINATOR]
    return web.json_response({"status": "ok", "version": coordinator.version, "time": time.time()})


SECAGG_CONTENT_TYPE = "application/vnd.fedlm.secagg"
"""Content type of the FSAG protocol messages (`edge_sdk.secagg.messages`)."""

NEXT_WAIT_S = 10.0
"""How long POST /v1/secagg/next holds a request open waiting for the phase to open (204 after)."""

_NEXT_POLL_S = 0.05


def _secure(request: web.Request) -> SecureAggregation:
    secure = request.app[COORDINATOR].secure
    if secure is None:
        raise BadRequestError(
            "secure aggregation is off for this task (POST /v1/updates instead)",
            code="secure_aggregation_off",
            status=404,
        )
    return secure


async def secagg_setup(request: web.Request) -> web.Response:
    """Join the cohort of the current round; the answer is the protocol's RoundSetup."""
    client_id = await _client(request)
    secure = _secure(request)
    obj = decode_control(await _read_capped(request, CONTROL_MAX_BYTES), ("version",))
    version = obj["version"]
    if not is_int_in(version, 0):
        raise BadRequestError(f"`version` should be a non-negative integer, got {version!r:.40}")
    body = await _in_thread(request.app[RUNTIME].ingest, secure.setup, client_id, version)
    return web.Response(body=body, content_type=SECAGG_CONTENT_TYPE)


async def secagg_next(request: web.Request) -> web.Response:
    """The device's request of a phase, once that phase opens (long poll; 204 if not yet)."""
    client_id = await _client(request)
    secure = _secure(request)
    obj = decode_control(await _read_capped(request, CONTROL_MAX_BYTES), ("round_id", "phase"))
    round_id, phase = obj["round_id"], obj["phase"]
    if not isinstance(round_id, bytes) or phase not in SECAGG_PHASES[1:]:
        raise BadRequestError(
            f"`round_id` should be bytes and `phase` one of {', '.join(SECAGG_PHASES[1:])}",
            code="bad_secagg_message",
        )
    loop = asyncio.get_running_loop()
    give_up = loop.time() + NEXT_WAIT_S
    pool = request.app[RUNTIME].ingest
    while True:
        body = await _in_thread(pool, secure.next_request, client_id, round_id, phase)
        if body is not None:
            return web.Response(body=body, content_type=SECAGG_CONTENT_TYPE)
        if loop.time() >= give_up:
            return web.Response(status=204, headers={"Retry-After": "0"})
        await asyncio.sleep(_NEXT_POLL_S)


async def secagg_phase(request: web.Request) -> web.Response:
    """A device's message of one protocol phase (FSAG bytes); 202 once the round holds it."""
    phase = request.match_info["phase"]
    if phase == "setup":
        return await secagg_setup(request)
    if phase == "next":
        return await secagg_next(request)
    if phase not in SECAGG_PHASES:
        raise web.HTTPNotFound(text=f"no secure-aggregation phase {printable(phase)[:40]!r}")
    client_id = await _client(request)
    secure = _secure(request)
    body = await _read_capped(request, secure.limits.max_bytes)
    await _in_thread(request.app[RUNTIME].ingest, secure.receive, client_id, phase, body)
    if phase == "masked_input":
        request.app[METRICS].update_bytes.inc(len(body))
    return web.json_response({"accepted": True, "phase": phase}, status=202)


async def _secagg_ticker(app: web.Application) -> AsyncIterator[None]:
    """Close secure-aggregation phases at their deadlines (every tick, in a worker thread)."""
    secure = app[COORDINATOR].secure
    if secure is None:
        yield
        return
    runtime = app[RUNTIME]
    period = min(app[CONFIG].tick_s, 0.5)

    async def loop_forever() -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await _in_thread(runtime.ingest, secure.tick)
            except asyncio.CancelledError:
                raise
            except Exception:  # keep ticking; the round fails or retries on its own
                log.exception("secure-aggregation tick failed")

    task = asyncio.create_task(loop_forever(), name="fedlm-secagg")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    secure.close()


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[SPEC])


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/join", join)
    app.router.add_get("/v1/task", task)
    app.router.add_get("/v1/adapter", adapter)
    app.router.add_post("/v1/updates", updates)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_post("/v1/secagg/{phase}", secagg_phase)
    app.cleanup_ctx.append(_secagg_ticker)
