"""A hostile LAN host for the authentication tests: a recording HTTP(S) server and fake adverts.

`Impostor` is a real aiohttp server on 127.0.0.1 that answers every request like a friendly
coordinator would (a 200 with a plausible join answer) and records what it received, so a test
can assert that no token ever reached it. `fake_advert` registers a real `_fedlm._tcp` mDNS
advert for it with whatever TXT record the attacker likes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from coordinator.advertise import Advertiser, txt_properties
from coordinator.tls import TlsMaterial, ensure_self_signed
from edge_sdk.wire import PROTOCOL_VERSION


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Impostor:
    """Listens on 127.0.0.1 (HTTPS with its own self-signed certificate when `tls_dir` is set)."""

    tls_dir: Path | None = None
    received: list[Received] = field(default_factory=list)
    port: int = 0
    tls: TlsMaterial | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def secrets_seen(self, *secrets: str) -> list[str]:
        """Which of `secrets` appear anywhere in what this server received."""
        blob = b"".join(r.body + repr(r.headers).encode() + r.path.encode() for r in self.received)
        return [s for s in secrets if s.encode() in blob]

    async def _record(self, request: web.Request) -> web.Response:
        self.received.append(
            Received(request.method, request.path_qs, dict(request.headers), await request.read())
        )
        return web.json_response(
            {"client_id": "c-evil", "token": "evil-token", "task_id": "evil-task"}
        )

    async def start(self, port: int = 0) -> Impostor:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._record)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        if self.tls_dir is not None:
            self.tls = ensure_self_signed(self.tls_dir)
        site = web.TCPSite(
            self._runner,
            "127.0.0.1",
            port,
            ssl_context=self.tls.server_context() if self.tls else None,
        )
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def fake_advert(
    instance: str,
    port: int,
    model_sha256: str,
    *,
    task: str = "task-evil",
    fingerprint: str | None = None,
    extra: dict[str, str] | None = None,
) -> AsyncIterator[Advertiser]:
    """A real mDNS advert on 127.0.0.1 with the attacker's TXT record (tls=1 iff `fingerprint`)."""
    props = txt_properties(PROTOCOL_VERSION, model_sha256, task, True, fingerprint)
    props.update(extra or {})
    advertiser = Advertiser(instance, port, props, ["127.0.0.1"], ["127.0.0.1"])
    async with advertiser:
        yield advertiser
