"""HTTP to the coordinator: bearer token, ETags, TLS pinning, retries, and the outbox ledger.

Every attempt of every request is written to the ledger *before* its bytes are handed to
aiohttp. Retries (tenacity: exponential backoff with jitter, at least the server's
`Retry-After`) cover connection failures, timeouts, 5xx and 429; a 4xx answer is final and
raised as `RequestRejectedError` with the coordinator's error code.

TLS on a LAN has no CA: the connection is accepted only if the server's DER certificate
hashes (SHA-256) to the pinned fingerprint (from the join code, `--tls-fingerprint`, or
stored at enrollment; never from mDNS). aiohttp's `Fingerprint` checks it during the TLS
handshake, before a single byte of the request (join token, bearer token, body) is written, and
disables CA/hostname verification, which a self-signed certificate would fail.

First contact: until the coordinator has answered once, connection failures are retried only
for `RetryConfig.first_contact_s` (a coordinator that is still starting is caught), then fail
with `CoordinatorUnreachableError` asking whether `fedlm coordinator` runs at that URL. Once it
has answered, failures are retried with backoff (a restart or a Wi-Fi drop is survived).

Every answer is read with a cap that its request implies (`edge_sdk.client.task_policy`): a
few hundred KiB for JSON, and for GET /v1/adapter what the task's LoRA shapes allow. The body
is streamed with a running count and the read is aborted past the cap (`ResponseTooLargeError`,
not retried), so a hostile coordinator cannot make the client buffer 400 MiB. Error bodies
(4xx/5xx) are read up to the small cap and truncated, since only their first line is used.
Responses are not content-decoded (`Accept-Encoding: identity`, no auto-decompression), so
the count is of the bytes that are kept: a gzip bomb is just an undecodable body.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import math
import ssl
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import msgpack
from multidict import CIMultiDict
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)
from typing_extensions import Self

from edge_sdk.client.errors import (
    AuthenticationError,
    CoordinatorUnreachableError,
    ProtocolError,
    RequestRejectedError,
    ResponseTooLargeError,
    TlsPinError,
    TransportError,
)
from edge_sdk.client.ledger import Ledger, describe_update
from edge_sdk.client.task_policy import (
    SMALL_RESPONSE_BYTES,
    STATUS_RESPONSE_BYTES,
    TASK_RESPONSE_BYTES,
)
from edge_sdk.validators import is_int_in, is_positive_finite
from edge_sdk.wire import CONTENT_TYPE, AdapterUpdate, TaskConfig, WireError
from edge_sdk.wire.limits import DEFAULT_LIMITS

SECAGG_CONTENT_TYPE = "application/vnd.fedlm.secagg"
"""Content type of a secure-aggregation protocol message (FSAG bytes)."""
SECAGG_CONTROL_TYPE = "application/msgpack"
"""Content type of /v1/secagg/setup and /next bodies (a small msgpack map)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryConfig:
    """How hard the client tries before a request fails with `TransportError`."""

    attempts: int = 8
    """Tries per request, the first included."""
    initial_s: float = 0.5
    """First backoff; it doubles per retry (plus jitter) up to `max_s`."""
    max_s: float = 30.0
    """Longest backoff between two tries."""
    jitter_s: float = 0.5
    """Uniform random extra wait in [0, jitter_s] so that clients do not retry in lockstep."""
    timeout_s: float = 120.0
    """Whole-request timeout (connect + send + read) of one try."""
    connect_timeout_s: float = 5.0
    """TCP (and TLS) connect timeout of one try."""
    first_contact_s: float = 3.0
    """Before the coordinator has answered once: how long connection failures are retried
    before the request fails with "is `fedlm coordinator` running at URL?"."""

    def __post_init__(self) -> None:
        if not is_int_in(self.attempts, 1):
            raise ValueError(f"`attempts` should be a positive integer, got {self.attempts!r}")
        for name in ("initial_s", "max_s", "timeout_s", "connect_timeout_s", "first_contact_s"):
            value = getattr(self, name)
            if not is_positive_finite(value):
                raise ValueError(f"`{name}` should be a positive number of seconds, got {value!r}")
        if not (math.isfinite(self.jitter_s) and self.jitter_s >= 0):
            raise ValueError(f"`jitter_s` should be >= 0, got {self.jitter_s!r}")


class StopRequested(Exception):
    """Raised inside a backoff wait when the owner asked to stop (not an error)."""


class _Retryable(Exception):
    """A failure worth another try; `retry_after` is the server's hint in seconds."""

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    """Case-insensitive (a `CIMultiDict`)."""
    body: bytes


@dataclass(frozen=True)
class AdapterResponse:
    """GET /v1/adapter: `body` is None when the server answered 304 (our ETag is current)."""

    body: bytes | None
    etag: str
    version: int


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 1.0  # an HTTP date: rare on a LAN; back off a little


def _connect_failure(exc: BaseException, timeout_s: float) -> str:
    """A short human reason for a failed connection (no aiohttp internals)."""
    os_error = getattr(exc, "os_error", None) or (exc if isinstance(exc, OSError) else None)
    if isinstance(exc, asyncio.TimeoutError) or isinstance(os_error, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(os_error, OSError) and os_error.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
        return "connection refused" if os_error.errno == errno.ECONNREFUSED else "connection reset"
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror.lower()
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection (https to a plain-HTTP server, or the reverse?)"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS handshake failed (https to a plain-HTTP server?)"
    return type(exc).__name__


async def tls_peer_fingerprint(base_url: str, timeout_s: float = 5.0) -> str:
    """SHA-256 (hex) of the certificate the server at `base_url` presents.

    A TLS handshake and nothing else: no HTTP request, no secret, no body is sent, so it can be
    asked of any advertised address before the client decides to talk to it.
    """
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"`base_url` should be an https:// URL, got {base_url!r}")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we compare the fingerprint ourselves
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(parts.hostname, parts.port or 443, ssl=context), timeout_s
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            pass
    return hashlib.sha256(der).hexdigest()


def _human(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


async def _read_capped(
    resp: aiohttp.ClientResponse, limit: int, what: str, *, truncate: bool
) -> bytes:
    """The body of `resp`, at most `limit` bytes: past it, truncate or raise
    `ResponseTooLargeError`."""

    def too_large(seen: str) -> ResponseTooLargeError:
        return ResponseTooLargeError(
            f"{what}: the answer is {seen}, more than the {_human(limit)} this request can "
            "legitimately return; read aborted (a broken or hostile coordinator?)"
        )

    declared = resp.content_length
    if declared is not None and declared > limit and not truncate:
        raise too_large(f"{_human(declared)} (Content-Length)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            if truncate:
                chunks.append(chunk[: len(chunk) - (size - limit)])
                break
            raise too_large(f"over {_human(limit)}")
        chunks.append(chunk)
    return b"".join(chunks)


def _error_of(status: int, body: bytes) -> tuple[str, str]:
    """(code, message) of the coordinator's JSON error body, tolerating anything else."""
    try:
        err = json.loads(body.decode("utf-8"))["error"]
        return str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"http_{status}", body[:200].decode("utf-8", "replace")


class Transport:
    """One coordinator's REST API. An async context manager; `close()` is idempotent."""

    def __init__(
        self,
        base_url: str,
        ledger: Ledger,
        *,
        token: str | None = None,
        tls_fingerprint: str | None = None,
        pin_source: str = "the pinned certificate",
        retry: RetryConfig | None = None,
        stop: asyncio.Event | None = None,
        trace_configs: Sequence[aiohttp.TraceConfig] | None = None,
    ) -> None:
        base_url = base_url.rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"`base_url` should start with http:// or https://, got {base_url!r}")
        if tls_fingerprint is not None:
            fp = tls_fingerprint.replace(":", "").lower()
            if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
                raise ValueError(
                    f"`tls_fingerprint` should be 64 hex digits (SHA-256), got {tls_fingerprint!r}"
                )
            if not base_url.startswith("https://"):
                raise TlsPinError(
                    f"{base_url}: a TLS fingerprint is pinned, but the URL is not https"
                )
            tls_fingerprint = fp
        self.base_url = base_url
        self.ledger = ledger
        self.token = token
        self.tls_fingerprint = tls_fingerprint
        self.pin_source = pin_source
        """Where the pin came from, for the error message (join code, flag, stored pin)."""
        self.retry = retry or RetryConfig()
        self.reached = False
        """True once the coordinator answered any request (then failures are retried)."""
        self._first_try: float | None = None
        self._stop = stop
        # initial_s * 2**(n-1) + U(0, jitter_s), capped at max_s.
        self._backoff = wait_exponential_jitter(
            multiplier=self.retry.initial_s, max=self.retry.max_s, jitter=self.retry.jitter_s
        )
        self._trace_configs = list(trace_configs or [])
        self._session: aiohttp.ClientSession | None = None

    # -- lifetime ---------------------------------------------------------------------------

    def _ssl(self) -> aiohttp.Fingerprint | bool:
        if self.tls_fingerprint is not None:
            # One object per pin: aiohttp keys its connection pool by the `ssl` argument, and
            # `Fingerprint` compares by identity, so a new one per request never reused a
            # connection (each request opened a new one, up to the coordinator's per-address cap).
            cached = getattr(self, "_fingerprint", None)
            if cached is None or cached[0] != self.tls_fingerprint:
                cached = (
                    self.tls_fingerprint,
                    aiohttp.Fingerprint(bytes.fromhex(self.tls_fingerprint)),
                )
                self._fingerprint = cached
            return cached[1]
        return True  # https without a pin: ordinary CA verification; http: unused

    async def __aenter__(self) -> Self:
        self._ensure_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=self.retry.timeout_s, sock_connect=self.retry.connect_timeout_s
                ),
                trace_configs=self._trace_configs,
                auto_decompress=False,  # count the bytes we keep, not a compressed stream's
            )
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- the retried request ----------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        if self._stop is None:
            await asyncio.sleep(seconds)
            return
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            return
        raise StopRequested("stop requested while waiting to retry")

    def _wait(self, state: RetryCallState) -> float:
        backoff = self._backoff(state)
        exc = state.outcome.exception() if state.outcome is not None else None
        hint = exc.retry_after if isinstance(exc, _Retryable) else 0.0
        return max(backoff, min(hint, self.retry.max_s))

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        if not self.reached:  # first contact: the coordinator may be starting; not alarming yet
            log.info("no answer yet from %s (%s); trying again in %.1f s", self.base_url, exc, wait)
            return
        log.warning(
            "coordinator request failed (%s); try %d in %.1f s", exc, state.attempt_number + 1, wait
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        kind: str,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        detail: Mapping[str, Any] | None = None,
        ok: tuple[int, ...] = (200,),
        max_bytes: int = SMALL_RESPONSE_BYTES,
    ) -> Response:
        """Send with retries; every try is ledgered first. Returns a response whose status is in
        `ok`.

        An answer in `ok` longer than `max_bytes` raises `ResponseTooLargeError` (no retry).
        """
        url = f"{self.base_url}{path}"
        send_headers = {"Accept-Encoding": "identity", **(headers or {})}
        if self.token is not None:
            send_headers["Authorization"] = f"Bearer {self.token}"
        if content_type is not None:
            send_headers["Content-Type"] = content_type
        session = self._ensure_session()
        attempt = 0
        if self._first_try is None:
            self._first_try = time.monotonic()

        async def once() -> Response:
            nonlocal attempt
            attempt += 1
            self.ledger.record(
                method=method, url=url, kind=kind, body=body, content_type=content_type,
                attempt=attempt, detail=detail,
            )  # fmt: skip
            try:
                # No redirects: the bearer token goes to the pinned coordinator and nowhere else.
                async with session.request(
                    method, url, data=body if body else None, headers=send_headers, ssl=self._ssl(),
                    allow_redirects=False,
                ) as resp:  # fmt: skip
                    status, resp_headers = resp.status, CIMultiDict(resp.headers)
                    final = status in ok
                    data = await _read_capped(
                        resp, max_bytes if final else SMALL_RESPONSE_BYTES, f"{method} {path}",
                        truncate=not final,
                    )  # fmt: skip
            except aiohttp.ServerFingerprintMismatch as exc:
                raise TlsPinError(
                    f"{self.base_url} presented a certificate with SHA-256 {exc.got.hex()}, not "
                    f"{self.tls_fingerprint} ({self.pin_source}); nothing was sent to it. If the "
                    "coordinator was reinstalled or its certificate replaced, re-enroll with its "
                    "new join code (--join-code); otherwise something else answers at that address"
                ) from None
            except aiohttp.ClientConnectorCertificateError as exc:
                raise TlsPinError(f"{self.base_url}: certificate refused ({exc})") from None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                reason = _connect_failure(exc, self.retry.connect_timeout_s)
                if (
                    not self.reached
                    and self._first_try is not None
                    and (time.monotonic() - self._first_try >= self.retry.first_contact_s)
                ):
                    raise CoordinatorUnreachableError(
                        f"cannot reach {self.base_url} ({reason}): is `fedlm coordinator` "
                        f"running at {self.base_url}?"
                    ) from None
                raise _Retryable(f"{method} {path}: {reason}") from exc
            self.reached = True
            if status in ok:
                return Response(status, resp_headers, data)
            code, message = _error_of(status, data)
            if status == 429 or status >= 500:
                raise _Retryable(
                    f"{method} {url}: HTTP {status} {code}",
                    _retry_after(resp_headers.get("Retry-After")),
                )
            error_cls = AuthenticationError if status == 401 else RequestRejectedError
            raise error_cls(
                f"{method} {path}: HTTP {status} {code}: {message}", status=status, code=code
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry.attempts),
            wait=self._wait,
            retry=retry_if_exception_type(_Retryable),
            sleep=self._sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        try:
            return await retrying(once)
        except _Retryable as exc:
            if not self.reached:
                raise CoordinatorUnreachableError(
                    f"cannot reach {self.base_url} after {attempt} tries ({exc}): is "
                    f"`fedlm coordinator` running at {self.base_url}?"
                ) from None
            raise TransportError(f"coordinator unreachable after {attempt} tries: {exc}") from None

    # -- the API ----------------------------------------------------------------------------

    async def join(self, join_token: str, name: str) -> dict[str, str]:
        """POST /v1/join; returns {"client_id", "token", "task_id"}."""
        body = json.dumps({"join_token": join_token, "name": name}).encode()
        resp = await self.request(
            "POST", "/v1/join", kind="join", body=body, content_type="application/json",
            detail={"name": name, "join_token": "(secret, not recorded)"},
        )  # fmt: skip
        try:
            obj = json.loads(resp.body)
            result = {k: str(obj[k]) for k in ("client_id", "token", "task_id")}
        except (ValueError, KeyError, TypeError):
            raise ProtocolError(
                "POST /v1/join: the answer lacks client_id, token or task_id"
            ) from None
        return result

    async def task(self) -> TaskConfig:
        resp = await self.request(
            "GET",
            "/v1/task",
            kind="task",
            headers={"Accept": CONTENT_TYPE},
            max_bytes=TASK_RESPONSE_BYTES,
        )
        try:
            if resp.headers.get("Content-Type", "").startswith(CONTENT_TYPE):
                return TaskConfig.from_bytes(resp.body)
            return TaskConfig.from_json_dict(json.loads(resp.body))
        except (WireError, ValueError) as exc:
            raise ProtocolError(f"GET /v1/task: not a valid task ({exc})") from None

    async def adapter(
        self, etag: str | None = None, *, max_bytes: int = DEFAULT_LIMITS.max_bytes
    ) -> AdapterResponse:
        """GET /v1/adapter with If-None-Match; a 304 comes back with `body=None`.

        `max_bytes`: the most the task's adapter can take (`task_policy.adapter_bytes_cap`);
        without it, the wire decoder's own limit.
        """
        headers = {"If-None-Match": etag} if etag else {}
        resp = await self.request(
            "GET",
            "/v1/adapter",
            kind="adapter",
            headers=headers,
            ok=(200, 304),
            max_bytes=max_bytes,
        )
        try:
            version = int(resp.headers.get("X-Fedlm-Version", "-1"))
        except ValueError:
            version = -1
        return AdapterResponse(
            None if resp.status == 304 else resp.body, resp.headers.get("ETag", ""), version
        )

    async def push(self, body: bytes, update: AdapterUpdate | None = None) -> dict[str, Any]:
        """POST /v1/updates with the exact bytes given (a resend reuses them, hence the id)."""
        if update is None:
            try:
                update = AdapterUpdate.from_bytes(body)
            except WireError as exc:
                raise ValueError(f"`body` is not an encoded AdapterUpdate ({exc})") from None
        resp = await self.request(
            "POST", "/v1/updates", kind="update", body=body, content_type=CONTENT_TYPE,
            detail=describe_update(update), ok=(200, 202),
        )  # fmt: skip
        try:
            return dict(json.loads(resp.body))
        except (ValueError, TypeError):
            raise ProtocolError("POST /v1/updates: the acknowledgement is not JSON") from None

    # -- secure aggregation (docs/secure-aggregation.md) ------------------------------------

    async def secagg_setup(self, version: int) -> bytes:
        """POST /v1/secagg/setup: join the cohort of `version`; returns the FSAG RoundSetup."""
        body = msgpack.packb({"version": version}, use_bin_type=True)
        resp = await self.request(
            "POST", "/v1/secagg/setup", kind="update", body=body, content_type=SECAGG_CONTROL_TYPE,
            detail={"secagg": "setup", "version": version},
        )  # fmt: skip
        return resp.body

    async def secagg_send(self, phase: str, message: bytes, detail: Mapping[str, Any]) -> None:
        """POST /v1/secagg/{phase} with one FSAG message; the ledger records its exact bytes."""
        await self.request(
            "POST", f"/v1/secagg/{phase}", kind="update", body=message,
            content_type=SECAGG_CONTENT_TYPE, detail={"secagg": phase, **detail}, ok=(202,),
        )  # fmt: skip

    async def secagg_next(self, round_id: bytes, phase: str, *, max_bytes: int) -> bytes | None:
        """POST /v1/secagg/next: the coordinator's request of `phase`, or None (not open yet)."""
        body = msgpack.packb({"round_id": round_id, "phase": phase}, use_bin_type=True)
        resp = await self.request(
            "POST", "/v1/secagg/next", kind="update", body=body, content_type=SECAGG_CONTROL_TYPE,
            detail={"secagg": "next", "phase": phase}, ok=(200, 204), max_bytes=max_bytes,
        )  # fmt: skip
        return resp.body if resp.status == 200 else None

    async def status(self) -> dict[str, Any]:
        resp = await self.request(
            "GET", "/v1/status", kind="status", max_bytes=STATUS_RESPONSE_BYTES
        )
        try:
            return dict(json.loads(resp.body))
        except (ValueError, TypeError):
            raise ProtocolError("GET /v1/status: the answer is not JSON") from None
