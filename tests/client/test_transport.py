"""The transport against the real coordinator on 127.0.0.1: ledger-before-send, retries, TLS pins,
and first contact (fail fast when nothing listens, retry once the coordinator was reached)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from coordinator.server import Service
from edge_sdk.client import (
    AuthenticationError,
    Ledger,
    RequestRejectedError,
    RetryConfig,
    TlsPinError,
    Transport,
    TransportError,
)
from edge_sdk.client.errors import CoordinatorUnreachableError
from edge_sdk.client.transport import tls_peer_fingerprint
from tests.client.helpers import FAST_RETRY, JOIN_TOKEN, coordinator_config, free_port
from tests.client.impostor import Impostor

pytestmark = pytest.mark.timeout(120)


def test_every_try_is_ledgered_before_it_is_sent(tmp_path: Path, model: Path) -> None:
    async def scenario() -> None:
        ledger = Ledger(tmp_path / "outbox.jsonl")
        seen_at_send: list[int] = []

        async def on_start(
            session: object, ctx: object, params: aiohttp.TraceRequestStartParams
        ) -> None:
            seen_at_send.append(len(ledger.entries()))  # what the ledger held as the request left

        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(on_start)
        async with Service(coordinator_config(tmp_path, model)) as service:
            assert service.tls is not None  # TLS is the default
            async with Transport(
                service.url, ledger, tls_fingerprint=service.tls.fingerprint, retry=FAST_RETRY,
                trace_configs=[trace],
            ) as t:  # fmt: skip
                joined = await t.join(JOIN_TOKEN, "dev-1")
                t.token = joined["token"]
                task = await t.task()
                first = await t.adapter()
                second = await t.adapter(first.etag)
                status = await t.status()
        assert task.task_id == joined["task_id"] and status["clients"] == 1
        assert first.body is not None and first.version == 0
        assert second.body is None and second.etag == first.etag  # 304 Not Modified
        entries = ledger.entries()
        assert [e.kind for e in entries] == ["join", "task", "adapter", "adapter", "status"]
        assert seen_at_send == [1, 2, 3, 4, 5]
        assert JOIN_TOKEN not in (tmp_path / "outbox.jsonl").read_text()
        assert entries[0].detail["name"] == "dev-1"

    asyncio.run(scenario())


def test_errors_are_typed_and_not_retried(tmp_path: Path, model: Path) -> None:
    async def scenario() -> None:
        ledger = Ledger(tmp_path / "outbox.jsonl")
        async with (
            Service(coordinator_config(tmp_path, model, tls=False)) as service,
            Transport(service.url, ledger, retry=FAST_RETRY) as t,
        ):
            with pytest.raises(AuthenticationError) as auth:
                await t.join("not-the-token", "dev")
            assert auth.value.status == 401 and auth.value.code == "unauthorized"
            t.token = "bogus"
            with pytest.raises(AuthenticationError, match="HTTP 401 unauthorized: invalid bearer"):
                await t.task()
            joined = await t.join(JOIN_TOKEN, "dev")
            t.token = joined["token"]
            with pytest.raises(RequestRejectedError) as bad:
                await t.request(
                    "POST",
                    "/v1/updates",
                    kind="update",
                    body=b"FDLMjunk",
                    content_type="application/x-fedlm+msgpack",
                    ok=(202,),
                )
            assert bad.value.status == 400
        assert [e.attempt for e in ledger.entries()] == [1, 1, 1, 1]  # 4xx: one try each

    asyncio.run(scenario())


def test_retries_with_backoff_until_the_coordinator_comes_up(tmp_path: Path, model: Path) -> None:
    port = free_port()

    async def scenario() -> None:
        ledger = Ledger(tmp_path / "outbox.jsonl")
        config = coordinator_config(tmp_path, model, port=port, tls=False)

        async def start_late() -> Service:
            await asyncio.sleep(0.8)
            service = Service(config)
            await service.start()
            return service

        starter = asyncio.create_task(start_late())
        async with Transport(f"http://127.0.0.1:{port}", ledger, retry=FAST_RETRY) as t:
            joined = await t.join(JOIN_TOKEN, "dev")
        service = await starter
        await service.close()
        assert joined["client_id"].startswith("c-")
        attempts = [e.attempt for e in ledger.entries()]
        assert attempts[0] == 1 and attempts[-1] == len(attempts) > 1  # refused, then retried

        quick = RetryConfig(attempts=3, initial_s=0.01, max_s=0.02, jitter_s=0.0)
        with pytest.raises(CoordinatorUnreachableError, match="after 3 tries"):
            async with Transport(f"http://127.0.0.1:{port}", ledger, retry=quick) as t:
                await t.task()

    asyncio.run(scenario())


def test_stop_interrupts_a_backoff_wait(tmp_path: Path) -> None:
    from edge_sdk.client.transport import StopRequested

    async def scenario() -> None:
        stop = asyncio.Event()
        slow = RetryConfig(attempts=10, initial_s=30.0, max_s=30.0, jitter_s=0.0)
        async with Transport(
            f"http://127.0.0.1:{free_port()}", Ledger(tmp_path / "l.jsonl"), retry=slow, stop=stop
        ) as t:
            asyncio.get_running_loop().call_later(0.3, stop.set)
            with pytest.raises(StopRequested, match="stop requested while waiting to retry"):
                await asyncio.wait_for(t.task(), timeout=10)

    asyncio.run(scenario())


def test_tls_fingerprint_is_pinned(tmp_path: Path, model: Path) -> None:
    async def scenario() -> None:
        ledger = Ledger(tmp_path / "outbox.jsonl")
        async with Service(coordinator_config(tmp_path, model, tls=True)) as service:
            assert service.tls is not None
            async with Transport(
                service.url, ledger, tls_fingerprint=service.tls.fingerprint, retry=FAST_RETRY
            ) as t:
                joined = await t.join(JOIN_TOKEN, "dev")
            assert joined["token"]
            wrong = "00" * 32
            async with Transport(service.url, ledger, tls_fingerprint=wrong, retry=FAST_RETRY) as t:
                with pytest.raises(TlsPinError, match=service.tls.fingerprint) as refused:
                    await t.join(JOIN_TOKEN, "dev")
            assert "nothing was sent" in str(refused.value) and "re-enroll" in str(refused.value)
            assert [e.attempt for e in ledger.entries() if e.kind == "join"] == [
                1,
                1,
            ]  # not retried

        with pytest.raises(TlsPinError, match="not https"):
            Transport("http://127.0.0.1:1", ledger, tls_fingerprint=wrong)

    asyncio.run(scenario())


def test_first_contact_fails_within_seconds_with_a_question(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    retry = RetryConfig(attempts=8, initial_s=0.5, max_s=30.0, jitter_s=0.1, first_contact_s=1.0)

    async def scenario() -> None:
        async with Transport(url, Ledger(tmp_path / "l.jsonl"), retry=retry) as t:
            started = time.monotonic()
            with pytest.raises(CoordinatorUnreachableError) as failed:
                await t.task()
            elapsed = time.monotonic() - started
        message = str(failed.value)
        assert message.startswith(f"cannot reach {url} (connection refused)")
        assert message.endswith(f"is `fedlm coordinator` running at {url}?")
        assert "aiohttp" not in message and "ClientConnectorError" not in message
        assert "ssl:default" not in message
        assert elapsed < 4.0  # not the 8 tries with backoff up to 30 s a reached coordinator gets
        assert isinstance(failed.value, TransportError)

    asyncio.run(scenario())


def test_a_reached_coordinator_is_retried_with_backoff(tmp_path: Path, model: Path) -> None:
    port = free_port()
    retry = RetryConfig(attempts=30, initial_s=0.05, max_s=0.3, jitter_s=0.0, first_contact_s=0.2)

    async def scenario() -> None:
        config = coordinator_config(tmp_path, model, port=port, tls=False)
        ledger = Ledger(tmp_path / "l.jsonl")
        async with Transport(f"http://127.0.0.1:{port}", ledger, retry=retry) as t:
            async with Service(config):
                joined = await t.join(JOIN_TOKEN, "dev")
            t.token = joined["token"]
            assert t.reached
            restarted = asyncio.get_running_loop().create_future()

            async def restart_later() -> None:
                await asyncio.sleep(1.0)  # far past first_contact_s
                service = Service(config)
                await service.start()
                restarted.set_result(service)

            starter = asyncio.create_task(restart_later())
            task = await t.task()  # refused for ~1 s, then the restarted coordinator answers
            await starter
            await (await restarted).close()
        assert task.task_id == joined["task_id"]
        tries = [e.attempt for e in ledger.entries() if e.kind == "task"]
        assert tries[-1] > 1

    asyncio.run(scenario())


def test_tls_peer_fingerprint_is_a_bare_handshake(tmp_path: Path) -> None:
    async def scenario() -> None:
        server = await Impostor(tls_dir=tmp_path / "tls").start()
        try:
            assert server.tls is not None
            assert await tls_peer_fingerprint(server.url) == server.tls.fingerprint
            await asyncio.sleep(0.1)
            assert server.received == []  # a handshake, not one HTTP request
        finally:
            await server.close()
        with pytest.raises(ValueError, match="https"):
            await tls_peer_fingerprint("http://127.0.0.1:1")

    asyncio.run(scenario())


def test_redirects_are_not_followed_with_the_bearer_token(tmp_path: Path) -> None:
    from aiohttp import web

    async def scenario() -> None:
        sink = await Impostor().start()
        app = web.Application()

        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPFound(f"{sink.url}/v1/task")

        app.router.add_get("/v1/task", redirect)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with Transport(
                f"http://127.0.0.1:{port}",
                Ledger(tmp_path / "l.jsonl"),
                token="bearer-secret",
                retry=FAST_RETRY,
            ) as t:
                with pytest.raises(RequestRejectedError, match="HTTP 302"):
                    await t.task()
        finally:
            await runner.cleanup()
            await sink.close()
        assert sink.received == []

    asyncio.run(scenario())
