"""Resource bounds of the real service on 127.0.0.1, attacked the way the measurements did.

Each test is one attack from issue 11 ("the service can be stalled or crashed"): a 48 MiB join
body, slowloris headers and bodies, a peer that stops reading, a connection flood from one
address, a metrics bomb, integers past int64, a device name that forges log lines, and one
client reading another's status. /healthz keeps answering throughout (median within 100 ms,
no stall past 1 s).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import time
from pathlib import Path

import aiohttp
import msgpack
import numpy as np
import pytest

from coordinator import http_api
from coordinator.connections import GUARD
from coordinator.server import Service
from edge_sdk.wire import CONTENT_TYPE
from edge_sdk.wire.limits import MAX_METRICS
from tests.coordinator.helpers import (
    JOIN_TOKEN,
    client_tensors,
    join,
    make_config,
    post_update,
    update_bytes,
)
from tests.coordinator.limits_helpers import (
    HealthPoller,
    ServiceThread,
    read_all,
    rss_mb,
    wait_closed,
)

pytestmark = pytest.mark.timeout(120)

HEALTHZ_MS = 100.0
OPERATOR = "operator-token-for-the-tests"


def _post(port: int, path: str, body: bytes | object, headers: dict[str, str]) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST", path, body=body, headers=headers, encode_chunked=not isinstance(body, bytes)
        )  # type: ignore[arg-type]
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


# -- 1. authenticate before reading a body ------------------------------------------------------


def test_a_48_mib_join_body_is_refused_unread_while_healthz_answers(tmp_path: Path) -> None:
    """Was: parsed on the loop before the token check, /healthz stalled 2.24 s, +200 MB RSS."""
    big = b"[" + b"1," * (24 << 20) + b"1]"  # a 48 MiB JSON array
    assert len(big) >= 48 << 20
    with ServiceThread(make_config(tmp_path, max_body_bytes=64 << 20)) as st:
        before = rss_mb()
        with HealthPoller(st.port) as poller:
            time.sleep(0.2)
            started = time.process_time()
            declared = _post(st.port, "/v1/join", big, {"Content-Type": "application/json"})
            declared_cpu_s = time.process_time() - started

            def chunks():
                for i in range(0, len(big), 1 << 20):
                    yield big[i : i + (1 << 20)]

            chunked = _post(st.port, "/v1/join", chunks(), {"Content-Type": "application/json"})
            time.sleep(0.2)
        grown = rss_mb() - before
        clients = st.service.coordinator.storage.count_clients()
    assert not poller.failures and len(poller.latencies) >= 5
    poller.assert_responsive(HEALTHZ_MS)
    assert grown < 50, f"RSS grew by {grown:.0f} MB"
    for status, error in (declared, chunked):
        assert status == 413 and error["error"]["code"] == "request_entity_too_large", error
        assert "4096 bytes" in error["error"]["message"]
    assert clients == 0
    # CPU time of this process (server thread and client), not wall time: busy neighbours do not
    # count. Refused unread: ~0.05 s here, mostly the client's send; the old bug parsed the body
    # on the loop, and json.loads of it alone costs ~1.8 s of CPU here.
    assert declared_cpu_s < 1.0, declared_cpu_s


def test_join_bodies_at_the_cap_and_hostile_json(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(make_config(tmp_path)) as service, aiohttp.ClientSession() as session:
            url = service.url
            padded = json.dumps({"join_token": JOIN_TOKEN, "name": "n" * 4000}).encode()
            assert len(padded) <= 4096
            async with session.post(f"{url}/v1/join", data=padded) as resp:
                assert resp.status == 200, await resp.text()
            async with session.post(f"{url}/v1/join", data=padded + b" " * 200) as resp:
                assert resp.status == 413
            # 4 KiB of '[' makes json raise RecursionError: a 400, never a 500.
            for hostile in (b"[" * 4096, b'{"a":' * 800, b"\xff\xfe", b"null", b"[]"):
                async with session.post(f"{url}/v1/join", data=hostile) as resp:
                    assert resp.status == 400, (hostile[:10], await resp.text())
            async with session.post(
                f"{url}/v1/join", json={"join_token": JOIN_TOKEN, "name": 7}
            ) as resp:
                assert resp.status == 400
            # A wrong token is refused before the database: nothing is stored.
            async with session.post(
                f"{url}/v1/join", json={"join_token": "wrong-token-x", "name": "x"}
            ) as resp:
                assert resp.status == 401
            assert service.coordinator.storage.count_clients() == 1

    asyncio.run(scenario())


def test_a_lone_surrogate_in_a_join_is_a_401_not_a_500(tmp_path: Path) -> None:
    """Strict UTF-8 cannot encode "\\ud800": the token comparison raised (a 500)."""

    async def scenario() -> None:
        async with Service(make_config(tmp_path)) as service, aiohttp.ClientSession() as session:
            for body in (b'{"join_token": "\\ud800"}', b'{"join_token": "\\udfff", "name": "x"}'):
                async with session.post(f"{service.url}/v1/join", data=body) as resp:
                    assert resp.status == 401, await resp.text()
            async with session.post(
                f"{service.url}/v1/join",
                data=b'{"join_token": "%s", "name": "\\ud800"}' % JOIN_TOKEN.encode(),
            ) as resp:
                assert resp.status == 200, await resp.text()
            async with session.get(f"{service.url}/healthz") as resp:
                assert resp.status == 200

    asyncio.run(scenario())


def test_updates_authenticate_before_the_body_and_refuse_declared_oversize(tmp_path: Path) -> None:
    """No token: 401 with the body unread. A declared size over the limit: 413 before reading."""
    with ServiceThread(make_config(tmp_path, max_body_bytes=1 << 20)) as st:
        body = b"\0" * (8 << 20)
        status, error = _post(st.port, "/v1/updates", body, {"Content-Type": CONTENT_TYPE})
        assert status == 401 and error["error"]["code"] == "unauthorized"
        status, joined = _post(
            st.port,
            "/v1/join",
            json.dumps({"join_token": JOIN_TOKEN}).encode(),
            {"Content-Type": "application/json"},
        )
        auth = {"Authorization": f"Bearer {joined['token']}", "Content-Type": CONTENT_TYPE}
        status, error = _post(st.port, "/v1/updates", body, auth)
        assert status == 413 and error["error"]["code"] == "request_entity_too_large"
        # Same without a declared length (chunked): aiohttp stops at client_max_size.
        status, error = _post(st.port, "/v1/updates", iter([body[: 4 << 20]] * 2), auth)
        assert status == 413


# -- 2. server timeouts and connection caps -----------------------------------------------------

_HEAD = b"POST /v1/join HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/jso"
_BODY = (
    b"POST /v1/join HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n" + b'{"join_token": "'
)
_UNREAD_BODY = (
    b"POST /v1/updates HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + CONTENT_TYPE.encode()
    + b"\r\nContent-Length: 1000000\r\n\r\n" + b"\0" * 1000
)  # fmt: skip


def _connect(port: int, payload: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if payload:
        s.sendall(payload)
    return s


def test_half_open_heads_and_bodies_are_closed_within_the_timeouts(tmp_path: Path) -> None:
    """Was: 100 connections with unfinished heads or bodies all still open after 100 s."""
    config = make_config(
        tmp_path, header_timeout_s=1.0, body_timeout_s=1.5, max_connections_per_address=200
    )
    with ServiceThread(config) as st, HealthPoller(st.port) as poller:
        kinds = {"nothing": b"", "head": _HEAD, "body": _BODY, "unread body": _UNREAD_BODY}
        socks = {kind: [_connect(st.port, p) for _ in range(25)] for kind, p in kinds.items()}
        everything = [s for group in socks.values() for s in group]
        closed = wait_closed(everything, timeout_s=6.0)
        guard = st.service.app[GUARD]
        for s in everything:
            s.close()
    still_open = {kind: sum(s not in closed for s in group) for kind, group in socks.items()}
    assert len(closed) == 100, f"still open: {still_open}"
    for kind, group in socks.items():
        worst = max(closed[s] for s in group)
        limit = 1.0 if kind in ("nothing", "head") else 1.5
        assert worst <= limit + 1.0, f"{kind}: closed after {worst:.2f} s"
    assert guard.closed["request head not complete"] == 50, guard.closed
    assert guard.closed["request body not complete"] == 50, guard.closed
    assert not poller.failures
    poller.assert_responsive(HEALTHZ_MS)


def test_a_keep_alive_connection_trickling_its_next_head_is_closed(tmp_path: Path) -> None:
    with ServiceThread(make_config(tmp_path, keepalive_timeout_s=1.0)) as st:
        s = _connect(st.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        # 100 bytes at 10 a second: 10 s to finish the (still incomplete) head, against the 1 s
        # keep-alive timeout. Counted in bytes, not seconds, so a slow machine slows both sides.
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
        head += b"a" * (100 - len(head))
        sent = 0
        try:
            for byte in head:
                s.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        closed = wait_closed([s], timeout_s=3.0)
        s.close()
    # Closed while it trickled (after ~10 bytes), long before its head could be complete.
    assert s in closed and sent < len(head), (sent, closed)


def test_a_peer_that_stops_reading_its_responses_is_dropped(tmp_path: Path) -> None:
    with ServiceThread(make_config(tmp_path, body_timeout_s=1.0)) as st:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        s.connect(("127.0.0.1", st.port))
        request = b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        count = 3000  # ~20 MB of responses, far beyond the socket buffers
        s.sendall(request * count)
        guard = st.service.app[GUARD]
        deadline = time.monotonic() + 5.0
        while guard.closed["response not read"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert guard.closed["response not read"] == 1
        received = read_all(s)
        s.close()
        assert received.count(b"HTTP/1.1 200") < count


def test_the_connection_after_the_per_address_cap_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_connections_per_address=8, header_timeout_s=30.0)
    with ServiceThread(config) as st:
        held = [_connect(st.port, b"") for _ in range(8)]
        time.sleep(0.2)  # let the server accept them
        extra = _connect(st.port, b"")
        answer = read_all(extra)
        assert answer.startswith(b"HTTP/1.1 429 Too Many Requests")
        assert (
            json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"
        )
        held.pop().close()
        time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", st.port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200  # a slot freed up
        conn.close()
        for s in held + [extra]:
            s.close()


def test_the_connection_after_the_total_cap_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_connections=4, header_timeout_s=30.0)
    with ServiceThread(config) as st:
        held = [_connect(st.port, b"") for _ in range(4)]
        time.sleep(0.2)
        extra = _connect(st.port, b"")
        assert read_all(extra).startswith(b"HTTP/1.1 503 Service Unavailable")
        for s in held + [extra]:
            s.close()


def test_a_connection_flood_with_the_default_cap(tmp_path: Path) -> None:
    """100 idle connections from one address: 32 are held (until the header timeout), 68 refused."""
    with ServiceThread(make_config(tmp_path, header_timeout_s=1.0)) as st:
        socks = [_connect(st.port, b"") for _ in range(100)]
        closed = wait_closed(socks, timeout_s=4.0)
        answers = st.service.app[GUARD].closed
        for s in socks:
            s.close()
        conn = http.client.HTTPConnection("127.0.0.1", st.port, timeout=5)
        conn.request("GET", "/metrics")
        exposition = conn.getresponse().read().decode()
        conn.close()
    assert (
        'fedlm_connections_closed_total{reason="too many connections from one address"} 68.0'
        in exposition
    )
    assert len(closed) == 100
    assert answers["too many connections from one address"] == 68
    assert answers["request head not complete"] == 32


# -- 3, 4. metrics and integers -----------------------------------------------------------------


def _tamper(body: bytes, **fields: object) -> bytes:
    header, payload = body[:8], msgpack.unpackb(body[8:], raw=False)
    payload.update(fields)
    return header + msgpack.packb(payload, use_bin_type=True)


def test_integers_past_int64_are_422_never_500(tmp_path: Path) -> None:
    """Was: num_examples = 2^64-1 gave a 500 OverflowError, which clients retry."""
    rng = np.random.default_rng(0)

    async def scenario() -> None:
        async with Service(make_config(tmp_path)) as service, aiohttp.ClientSession() as session:
            client_id, headers = await join(session, service.url)
            good = update_bytes(client_id, client_tensors(rng, 8))
            for field in ("num_examples", "num_tokens", "base_version"):
                for value in ((1 << 64) - 1, 1 << 63):
                    status, error = await post_update(
                        session, service.url, headers, _tamper(good, **{field: value})
                    )
                    assert (status, error["error"]["code"]) == (422, "wire.out_of_range"), error
                    assert field in error["error"]["message"]
            # The largest int64 is stored (SQLite holds it); the aggregation side bounds weights.
            status, _ = await post_update(
                session, service.url, headers, _tamper(good, num_examples=(1 << 63) - 1)
            )
            assert status == 202
            assert service.coordinator.storage.update_counts()["pending"] == 1

    asyncio.run(scenario())


def test_a_metrics_bomb_is_refused_and_status_stays_small(tmp_path: Path) -> None:
    """Was: 65,536 metrics with 256-char keys stored forever; /v1/status returned 52.9 MB."""
    rng = np.random.default_rng(1)
    config = make_config(tmp_path, max_body_bytes=64 << 20, operator_token=OPERATOR)

    async def scenario() -> None:
        async with Service(config) as service, aiohttp.ClientSession() as session:
            client_id, headers = await join(session, service.url)
            good = update_bytes(client_id, client_tensors(rng, 8))
            bomb = {f"{i:08d}" + "k" * 248: 1.0 for i in range(65536)}
            cases = [
                bomb,
                {f"m{i}": 1.0 for i in range(MAX_METRICS + 1)},
                {"k" * 65: 1.0},
                {"loss": float("inf")},
                {"bad name": 1.0},
            ]
            for metrics in cases:
                status, error = await post_update(
                    session, service.url, headers, _tamper(good, metrics=metrics)
                )
                assert (status, error["error"]["code"]) == (422, "wire.invalid_metrics"), error
            most = {f"m{i:02d}" + "x" * 61: float(i) for i in range(MAX_METRICS)}
            assert (await post_update(session, service.url, headers, _tamper(good, metrics=most)))[
                0
            ] == 202
            async with session.get(
                f"{service.url}/v1/status", headers={"Authorization": f"Bearer {OPERATOR}"}
            ) as resp:
                raw = await resp.read()
            assert len(raw) < 20_000, len(raw)
            assert json.loads(raw)["recent_updates"][0]["metrics"] == most

    asyncio.run(scenario())


# -- 5. device names -----------------------------------------------------------------------------


def test_a_device_name_cannot_forge_log_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    forged = (
        "phone\n2026-01-01 00:00:00 INFO coordinator.state_machine client c-admin (root) "
        "joined\x1b[2J\u202e"
    )

    async def scenario() -> None:
        config = make_config(tmp_path, operator_token=OPERATOR)
        async with Service(config) as service, aiohttp.ClientSession() as session:
            client_id, _ = await join(session, service.url, forged)
            await join(session, service.url, "x" * 500)
            async with session.get(
                f"{service.url}/v1/status", headers={"Authorization": f"Bearer {OPERATOR}"}
            ) as resp:
                listed = {c["client_id"]: c["name"] for c in (await resp.json())["client_list"]}
            # An encoded newline in a path is answered 404 and never reaches a log raw.
            async with session.get(f"{service.url}/v1/st%0Aatus\x7f") as resp:
                assert resp.status == 404
        return client_id, listed

    with caplog.at_level(logging.INFO, logger="coordinator"):
        client_id, listed = asyncio.run(scenario())
    joined = [r.getMessage() for r in caplog.records if "joined" in r.getMessage()]
    assert len(joined) == 2
    for message in (r.getMessage() for r in caplog.records):
        assert "\n" not in message and "\x1b" not in message and "\u202e" not in message
    assert listed[client_id].startswith("phone?2026-01-01") and "\n" not in listed[client_id]
    assert max(len(n) for n in listed.values()) == 64


# -- 6. who sees what in /v1/status ---------------------------------------------------------------


def test_status_shows_a_client_only_its_own_updates(tmp_path: Path) -> None:
    """Was: any client's /v1/status showed every client's ids, update ids and losses."""
    rng = np.random.default_rng(2)
    config = make_config(tmp_path, operator_token=OPERATOR)

    async def scenario() -> None:
        async with Service(config) as service, aiohttp.ClientSession() as session:
            url = service.url
            (id_a, h_a), (id_b, h_b) = await join(session, url, "a"), await join(session, url, "b")
            body_a = update_bytes(
                id_a, client_tensors(rng, 4), rank=4, alpha=8.0, update_id="upd-a"
            )
            body_b = update_bytes(
                id_b, client_tensors(rng, 4), rank=4, alpha=8.0, update_id="upd-b"
            )
            assert (await post_update(session, url, h_a, body_a))[0] == 202
            assert (await post_update(session, url, h_b, body_b))[0] == 202
            async with session.get(f"{url}/v1/status", headers=h_a) as resp:
                text = await resp.text()
            mine = json.loads(text)
            assert mine["view"] == "client" and mine["client_id"] == id_a
            assert [u["update_id"] for u in mine["recent_updates"]] == ["upd-a"]
            assert id_b not in text and "upd-b" not in text  # B appears only as counts
            assert mine["clients"] == 2 and sum(mine["updates"].values()) == 2
            async with session.get(
                f"{url}/v1/status", headers={"Authorization": f"Bearer {OPERATOR}"}
            ) as resp:
                everything = await resp.json()
            assert everything["view"] == "operator"
            assert {u["update_id"] for u in everything["recent_updates"]} == {"upd-a", "upd-b"}
            assert {c["name"] for c in everything["client_list"]} == {"a", "b"}
            async with session.get(
                f"{url}/v1/status", headers={"Authorization": "Bearer not-the-operator-token"}
            ) as resp:
                assert resp.status == 401
            # The operator token is not a client token: it cannot post or fetch the task.
            async with session.get(
                f"{url}/v1/task", headers={"Authorization": f"Bearer {OPERATOR}"}
            ) as resp:
                assert resp.status == 401

    asyncio.run(scenario())


def test_without_an_operator_token_nobody_sees_everything(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(make_config(tmp_path)) as service, aiohttp.ClientSession() as session:
            _, headers = await join(session, service.url)
            async with session.get(f"{service.url}/v1/status", headers=headers) as resp:
                assert (await resp.json())["view"] == "client"
            async with session.get(
                f"{service.url}/v1/status", headers={"Authorization": "Bearer "}
            ) as resp:
                assert resp.status == 401

    asyncio.run(scenario())


def test_limit_settings_are_validated(tmp_path: Path) -> None:
    for field, value in (
        ("header_timeout_s", 0.0),
        ("body_timeout_s", float("inf")),
        ("keepalive_timeout_s", -1.0),
        ("max_connections_per_address", 0),
        ("max_connections", 0),
        ("max_inflight_body_bytes", 1024),
        ("local_steps", 1 << 64),
        ("max_rounds", 1 << 63),
    ):
        with pytest.raises(ValueError, match=field):
            make_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match="--operator-token"):
        make_config(tmp_path, operator_token="short")


def test_a_tls_handshake_that_never_starts_is_closed_within_the_header_timeout(
    tmp_path: Path,
) -> None:
    """asyncio's own TLS handshake timeout is 60 s; the service bounds it by the header timeout."""
    with ServiceThread(make_config(tmp_path, tls=True, header_timeout_s=1.0)) as st:
        assert st.url.startswith("https://")
        silent = [_connect(st.port, b"") for _ in range(10)]
        closed = wait_closed(silent, timeout_s=5.0)
        for s in silent:
            s.close()
    assert len(closed) == 10 and max(closed.values()) <= 2.5, closed.values()


def _enroll(port: int, name: str) -> tuple[str, dict[str, str]]:
    body = json.dumps({"join_token": JOIN_TOKEN, "name": name}).encode()
    status, joined = _post(port, "/v1/join", body, {"Content-Type": "application/json"})
    assert status == 200, joined
    return joined["client_id"], {
        "Authorization": f"Bearer {joined['token']}",
        "Content-Type": CONTENT_TYPE,
    }


def _start_upload(port: int, headers: dict[str, str], size: int) -> socket.socket:
    """An update whose head and first bytes are sent, the rest held back."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return _connect(
        port,
        (
            f"POST /v1/updates HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}Content-Length: {size}\r\n\r\n"
        ).encode()
        + b"FDLM",
    )


def test_one_update_in_flight_per_client_and_a_memory_budget_over_all(tmp_path: Path) -> None:
    """An enrolled device could hold 32 connections x 64 MiB of bodies in memory."""
    rng = np.random.default_rng(3)
    config = make_config(
        tmp_path, max_body_bytes=1 << 20, max_inflight_body_bytes=2 << 20, rate_per_s=100.0
    )
    with ServiceThread(config) as st:
        clients = [_enroll(st.port, f"d{i}") for i in range(3)]
        (id0, h0), (_, h1), (id2, h2) = clients
        slow = _start_upload(st.port, h0, 1 << 20)
        time.sleep(0.3)
        good = update_bytes(id0, client_tensors(rng, 8))
        status, error = _post(st.port, "/v1/updates", good, h0)
        assert (status, error["error"]["code"]) == (429, "rate_limited"), error
        assert "still being received" in error["error"]["message"]
        second = _start_upload(st.port, h1, 1 << 20)  # 2 MiB reserved now: the budget is full
        time.sleep(0.3)
        status, error = _post(st.port, "/v1/updates", update_bytes(id2, client_tensors(rng, 8)), h2)
        assert (status, error["error"]["code"]) == (503, "busy"), error
        slow.close()
        second.close()
        time.sleep(0.3)
        assert _post(st.port, "/v1/updates", good, h0)[0] == 202  # both released
        runtime = st.service.app[http_api.RUNTIME]
        assert runtime.inflight_bytes == 0 and not runtime.inflight_clients
