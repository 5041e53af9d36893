"""The real service on 127.0.0.1: enrollment, auth, ETags, ingest, every bad input, TLS."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from coordinator import http_api
from coordinator.next_version import a_key, b_key
from coordinator.server import Service
from coordinator.state_machine import Coordinator
from coordinator.storage import SQLiteStorage
from coordinator.strategies import FedAvg
from edge_sdk.wire import CONTENT_TYPE, GlobalAdapter, TaskConfig
from tests.coordinator.helpers import (
    SHAPES,
    client_tensors,
    join,
    make_config,
    post_update,
    update_bytes,
    with_nan,
)

pytestmark = pytest.mark.timeout(120)


async def _wait_for_version(
    session: aiohttp.ClientSession, url: str, headers: dict, version: int
) -> dict:
    for _ in range(200):
        async with session.get(f"{url}/v1/status", headers=headers) as resp:
            status = await resp.json()
        if status["version"] >= version:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"version {version} never appeared: {status}")


def test_join_auth_and_task(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(make_config(tmp_path)) as service, aiohttp.ClientSession() as session:
            url = service.url
            async with session.post(
                f"{url}/v1/join", json={"join_token": "wrong-token", "name": "x"}
            ) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == "unauthorized"
            async with session.post(f"{url}/v1/join", data=b"{not json") as resp:
                assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_request"
            client_id, headers = await join(session, url)
            assert client_id.startswith("c-")
            async with session.get(f"{url}/v1/task") as resp:
                assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
            for path in ("/v1/adapter", "/v1/status"):
                async with session.get(f"{url}{path}") as resp:
                    assert resp.status == 401
                    assert (await resp.json())["error"]["code"] == "unauthorized"
            async with session.get(
                f"{url}/v1/task", headers={"Authorization": "Bearer nope"}
            ) as resp:
                assert resp.status == 401 and "invalid bearer token" in await resp.text()
            async with session.get(f"{url}/v1/task", headers=headers) as resp:
                task = await resp.json()
            assert task["model_sha256"] == "ab" * 32 and task["lora"]["mode"] == "exact"
            assert task["task_id"] == service.coordinator.task_id and task["global_version"] == 0
            async with session.get(
                f"{url}/v1/task", headers={**headers, "Accept": CONTENT_TYPE}
            ) as resp:
                wire_task = TaskConfig.from_bytes(await resp.read())
            assert wire_task.to_json_dict() == task
            # Only a hash of the bearer token is stored.
            token = headers["Authorization"].split()[1]
            raw = (tmp_path / "coordinator.sqlite").read_bytes() + (
                tmp_path / "coordinator.sqlite-wal"
            ).read_bytes()
            assert token.encode() not in raw
            assert hashlib.sha256(token.encode()).hexdigest().encode() in raw

    asyncio.run(scenario())


def test_updates_aggregate_into_a_new_version_with_etag(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    async def scenario() -> None:
        async with Service(make_config(tmp_path)) as service, aiohttp.ClientSession() as session:
            url = service.url
            (id1, h1), (id2, h2) = await join(session, url, "a"), await join(session, url, "b")
            async with session.get(f"{url}/v1/adapter", headers=h1) as resp:
                assert resp.status == 200 and resp.headers["X-Fedlm-Version"] == "0"
                etag0 = resp.headers["ETag"]
                v0 = GlobalAdapter.from_bytes(await resp.read())
            assert v0.version == 0 and not any(v0.dense_tensors()[b_key(m)].any() for m in SHAPES)
            async with session.get(
                f"{url}/v1/adapter", headers={**h1, "If-None-Match": etag0}
            ) as resp:
                assert resp.status == 304 and await resp.read() == b""

            t1, t2 = client_tensors(rng, 4), client_tensors(rng, 4)  # rank 4 + 4 <= 8: exact
            status, ack = await post_update(
                session, url, h1, update_bytes(id1, t1, rank=4, alpha=8.0, num_examples=30)
            )
            assert status == 202 and ack["accepted"] and ack["pending"] == 1
            status, _ = await post_update(
                session, url, h2, update_bytes(id2, t2, rank=4, alpha=8.0, num_examples=10)
            )
            assert status == 202
            await _wait_for_version(session, url, h1, 1)

            async with session.get(
                f"{url}/v1/adapter", headers={**h1, "If-None-Match": etag0}
            ) as resp:
                assert resp.status == 200 and resp.headers["ETag"] != etag0
                v1 = GlobalAdapter.from_bytes(await resp.read()).dense_tensors()
            for module in SHAPES:
                # v0 has B = 0, so the result is Σ wᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ / Σ wᵢ, exactly.
                want = (
                    sum(
                        w * 2.0 * t[b_key(module)].astype(np.float64) @ t[a_key(module)]
                        for t, w in ((t1, 30), (t2, 10))
                    )
                    / 40
                )
                np.testing.assert_allclose(
                    2.0 * v1[b_key(module)].astype(np.float64) @ v1[a_key(module)], want, atol=1e-5
                )

            async with session.get(f"{url}/v1/status", headers=h1) as resp:
                status_body = await resp.json()
            assert status_body["updates"] == {"pending": 0, "aggregated": 2, "dropped": 0}
            assert status_body["clients"] == 2 and status_body["last_aggregation"]["updates"] == 2
            assert status_body["recent_updates"][0]["metrics"] == {"loss": 1.5}
            async with session.get(f"{url}/metrics") as resp:
                text = await resp.text()
            assert "fedlm_updates_accepted_total 2.0" in text and "fedlm_global_version 1.0" in text
            assert "fedlm_aggregations_total 1.0" in text

    asyncio.run(scenario())


def test_every_bad_update_is_a_json_4xx_and_leaves_state_untouched(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    config = make_config(tmp_path, max_body_bytes=256 * 1024, strategy=FedAvg(clients_per_round=5))

    async def scenario() -> None:
        async with Service(config) as service, aiohttp.ClientSession() as session:
            url = service.url
            client_id, headers = await join(session, url)
            other_id, _ = await join(session, url, "other")
            good = client_tensors(rng, 8)
            wrong_shape = dict(good)
            wrong_shape[b_key("model.layers.0.self_attn.v_proj")] = rng.normal(size=(17, 8)).astype(
                np.float32
            )
            missing = {k: v for k, v in good.items() if "layers.1.self_attn.v_proj" not in k}
            huge = {
                k: rng.normal(size=(8, 10000)).astype(np.float32)
                for k in ("model.layers.0.self_attn.q_proj.lora_A",)
            }
            body_ok = update_bytes(client_id, good)
            cases = [
                (b"garbage", 400, "wire.bad_magic"),
                (body_ok[: len(body_ok) // 2], 400, "wire.malformed_message"),
                (update_bytes(client_id, good, sha="cd" * 32), 422, "wrong_model"),
                (update_bytes(client_id, wrong_shape), 422, "wrong_shape"),
                (update_bytes(client_id, missing), 422, "wrong_tensors"),
                (update_bytes(client_id, good, mode="naive"), 422, "lora_mismatch"),
                (update_bytes(client_id, good, targets=("q_proj", "k_proj")), 422, "lora_mismatch"),
                (update_bytes(client_id, client_tensors(rng, 80), rank=80), 422, "lora_mismatch"),
                (with_nan(body_ok), 422, "wire.non_finite"),
                (update_bytes(other_id, good), 403, "forbidden"),
                (update_bytes(client_id, good, base_version=3), 422, "unknown_base_version"),
                (update_bytes(client_id, huge, rank=8), 413, "request_entity_too_large"),
            ]
            for body, want_status, want_code in cases:
                status, error = await post_update(session, url, headers, body)
                assert (status, error["error"]["code"]) == (want_status, want_code), error
                assert "Traceback" not in error["error"]["message"]
            async with session.post(
                f"{url}/v1/updates", data=body_ok, headers={**headers, "Content-Type": "text/plain"}
            ) as resp:
                assert resp.status == 415
            async with session.post(f"{url}/v1/updates", data=body_ok) as resp:
                assert resp.status == 401
            async with session.get(f"{url}/v1/no-such-route") as resp:
                assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
            async with session.delete(f"{url}/v1/updates", headers=headers) as resp:
                assert resp.status == 405 and "error" in await resp.json()

            storage = service.coordinator.storage
            assert storage.update_counts() == {"pending": 0, "aggregated": 0, "dropped": 0}
            assert service.coordinator.version == 0
            # A duplicate id: the first copy is stored, the retry is a 409, nothing doubles.
            assert (await post_update(session, url, headers, body_ok))[0] == 202
            status, error = await post_update(session, url, headers, body_ok)
            assert (status, error["error"]["code"]) == (409, "duplicate_update")
            # FedAvg: one update per client per round.
            status, error = await post_update(session, url, headers, update_bytes(client_id, good))
            assert (status, error["error"]["code"]) == (409, "already_submitted")
            assert (
                storage.update_counts()["pending"] == 1 and service.coordinator.pending_count == 1
            )
            async with session.get(f"{url}/healthz") as resp:
                assert resp.status == 200

    asyncio.run(scenario())


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            Service(make_config(tmp_path, rate_per_s=0.5, rate_burst=2)) as service,
            aiohttp.ClientSession() as session,
        ):
            _, headers = await join(session, service.url)
            statuses = []
            for _ in range(3):
                async with session.get(f"{service.url}/v1/task", headers=headers) as resp:
                    statuses.append(resp.status)
                    retry = resp.headers.get("Retry-After")
            assert statuses == [200, 200, 429] and retry is not None and int(retry) >= 1

    asyncio.run(scenario())


def test_unexpected_errors_are_a_bare_500(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Coordinator) -> dict:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(Coordinator, "status", broken)

    async def scenario() -> None:
        async with Service(make_config(tmp_path)) as service, aiohttp.ClientSession() as session:
            _, headers = await join(session, service.url)
            async with session.get(f"{service.url}/v1/status", headers=headers) as resp:
                assert resp.status == 500
                text = await resp.text()
            assert "secret internal detail" not in text and "Traceback" not in text
            assert (await resp.json())["error"] == {
                "code": "internal_error",
                "message": "internal server error",
            }

    asyncio.run(scenario())


def test_openapi_documents_every_route(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(make_config(tmp_path)) as service, aiohttp.ClientSession() as session:
            async with session.get(f"{service.url}/openapi.json") as resp:
                spec = await resp.json()
            routes = {
                (r.method.lower(), r.resource.canonical)
                for r in service.app.router.routes()
                if r.method != "HEAD"
            }
            documented = {(m, p) for p, ops in spec["paths"].items() for m in ops}
            assert routes == documented
            assert spec["openapi"].startswith("3.")

    asyncio.run(scenario())


def test_restart_resumes_pending_updates(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    config = make_config(tmp_path)

    async def scenario() -> None:
        async with Service(config) as service, aiohttp.ClientSession() as session:
            client_id, headers = await join(session, service.url)
            assert (
                await post_update(
                    session, service.url, headers, update_bytes(client_id, client_tensors(rng, 8))
                )
            )[0] == 202
        async with Service(config) as service, aiohttp.ClientSession() as session:
            assert service.coordinator.pending_count == 1 and service.coordinator.version == 0
            async with session.get(f"{service.url}/v1/task", headers=headers) as resp:
                assert resp.status == 200  # the enrolled token survives a restart
            other_id, other = await join(session, service.url, "other")  # one update per client
            assert (
                await post_update(
                    session, service.url, other, update_bytes(other_id, client_tensors(rng, 8))
                )
            )[0] == 202
            status = await _wait_for_version(session, service.url, headers, 1)
            assert status["updates"]["aggregated"] == 2
        await service.close()  # closing twice is safe

    asyncio.run(scenario())


def test_database_of_another_task_is_refused(tmp_path: Path) -> None:
    with SQLiteStorage(tmp_path / "coordinator.sqlite") as storage:
        Coordinator(make_config(tmp_path), storage)
    with (
        SQLiteStorage(tmp_path / "coordinator.sqlite") as storage,
        pytest.raises(Exception, match="another --db"),
    ):
        Coordinator(make_config(tmp_path, model_sha256="cd" * 32), storage)


def test_tls_serves_the_advertised_fingerprint(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(make_config(tmp_path, tls=True)) as service:
            assert service.url.startswith("https://") and service.tls is not None
            context = ssl.create_default_context(cafile=str(service.tls.cert_path))
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{service.url}/healthz", ssl=context) as resp:
                    assert resp.status == 200
                # How a client pins the advertised fingerprint (no CA on a LAN):
                pinned = aiohttp.Fingerprint(bytes.fromhex(service.tls.fingerprint))
                async with session.get(f"{service.url}/healthz", ssl=pinned) as resp:
                    assert resp.status == 200
                with pytest.raises(aiohttp.ServerFingerprintMismatch) as mismatch:
                    await session.get(f"{service.url}/healthz", ssl=aiohttp.Fingerprint(b"\0" * 32))
                # Refused for the pin, not for anything else: the server showed the advertised one.
                assert mismatch.value.expected == b"\0" * 32
                assert mismatch.value.got == bytes.fromhex(service.tls.fingerprint)
            pem = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", service.port))
            assert (
                hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest() == service.tls.fingerprint
            )
            assert service.app[http_api.RUNTIME].tls_fingerprint == service.tls.fingerprint
            first = service.tls.fingerprint
        async with Service(make_config(tmp_path, tls=True)) as service:
            assert (
                service.tls is not None and service.tls.fingerprint == first
            )  # stable across restarts

    asyncio.run(scenario())


def test_fedavg_round_closes_at_the_deadline_with_min_clients(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    strategy = FedAvg(clients_per_round=3, min_clients=1, deadline_s=0.5)

    async def scenario() -> None:
        async with (
            Service(make_config(tmp_path, strategy=strategy)) as service,
            aiohttp.ClientSession() as session,
        ):
            client_id, headers = await join(session, service.url)
            body = update_bytes(client_id, client_tensors(rng, 8))
            assert (await post_update(session, service.url, headers, body))[0] == 202
            assert service.coordinator.version == 0  # 1 of 3: waits for the deadline
            status = await _wait_for_version(session, service.url, headers, 1)
            assert status["last_aggregation"]["updates"] == 1 and status["round"] == 2

    asyncio.run(scenario())
