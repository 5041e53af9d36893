"""Whole federations on 127.0.0.1: real coordinator, real clients, mDNS, restarts, lost acks,
crashes."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import stat
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from coordinator.server import Service
from coordinator.strategies import FedBuff
from coordinator.tls import ensure_self_signed, tls_directory
from edge_sdk.client import (
    ClientState,
    FederatedClient,
    LicenceRefusedError,
    ModelMismatchError,
)
from edge_sdk.client.joincode import make_join_code
from tests.client.helpers import (
    CANARY,
    JOIN_TOKEN,
    client_config,
    coordinator_config,
    free_port,
    write_data,
)
from tests.tiny_models import write_tiny_gguf

pytestmark = pytest.mark.timeout(300)


class _Capture:
    """Every request body and header block a client's aiohttp session put on the wire."""

    def __init__(self) -> None:
        self.requests = 0
        self.bodies: list[bytes] = []
        self.headers: list[str] = []
        self.config = aiohttp.TraceConfig()
        self.config.on_request_start.append(self._start)
        self.config.on_request_headers_sent.append(self._headers)
        self.config.on_request_chunk_sent.append(self._chunk)

    async def _start(self, session: object, ctx: object, params: object) -> None:
        self.requests += 1
        self.bodies.append(b"")

    async def _headers(
        self, session: object, ctx: object, params: aiohttp.TraceRequestHeadersSentParams
    ) -> None:
        self.headers.append(
            f"{params.method} {params.url}\n"
            + "\n".join(f"{k}: {v}" for k, v in params.headers.items())
        )

    async def _chunk(
        self, session: object, ctx: object, params: aiohttp.TraceRequestChunkSentParams
    ) -> None:
        self.bodies[-1] += params.chunk


class _LossyProxy:
    """A TCP relay that records every client byte and, once, drops the answer to POST /v1/updates.

    The coordinator receives and stores the update, but the client never sees the 202: exactly
    the "sent but not acknowledged" case.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.client_bytes = bytearray()
        self.drop_next_update_answer = True
        self.dropped = 0
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        last_request = bytearray()

        async def upstream() -> None:
            while data := await reader.read(65536):
                self.client_bytes += data
                if data[:4] in (b"GET ", b"POST"):
                    last_request[:] = data[:32]
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if self.drop_next_update_answer and last_request.startswith(b"POST /v1/updates"):
                    self.drop_next_update_answer = False
                    self.dropped += 1
                    writer.transport.abort()  # the 202 never reaches the client
                    up_writer.close()
                    return
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)


def _db_updates(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return list(conn.execute("SELECT update_id, client_id, status FROM updates ORDER BY seq"))


def test_licence_policy_refuses_before_anything_is_sent(tmp_path: Path) -> None:
    unlicensed = write_tiny_gguf(tmp_path / "nolicence.gguf", licence=None)
    data = write_data(tmp_path / "data.jsonl")
    config = client_config(
        tmp_path / "state",
        unlicensed,
        data,
        coordinator_url=f"http://127.0.0.1:{free_port()}",
        insecure=True,
    )
    client = FederatedClient(config)
    with pytest.raises(LicenceRefusedError, match="class unknown"):
        client.run()
    assert ClientState(tmp_path / "state").ledger.entries() == []  # nothing left the device
    # A policy that allows unknown licences passes the same model.
    permissive = client_config(tmp_path / "s2", unlicensed, data, refuse_licences=frozenset())
    assert FederatedClient(permissive).verify_model().licence_class.value == "unknown"


def test_a_coordinator_for_another_model_is_refused_before_training(
    tmp_path: Path, model: Path
) -> None:
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=7)
    data = write_data(tmp_path / "data.jsonl")

    async def scenario() -> None:
        async with Service(coordinator_config(tmp_path, other)) as service:
            client = FederatedClient(
                client_config(tmp_path / "state", model, data, service=service)
            )
            with pytest.raises(ModelMismatchError, match="refusing to train") as refused:
                await client.run_async()
            assert "'tiny.gguf'" in str(refused.value)  # names the local model, not only hashes
        kinds = [e.kind for e in ClientState(tmp_path / "state").ledger.entries()]
        assert kinds == ["join", "task"]  # no update was ever built

    asyncio.run(scenario())


def test_unacknowledged_update_is_resent_with_the_same_id(tmp_path: Path, model: Path) -> None:
    data = write_data(tmp_path / "data.jsonl")

    async def scenario() -> None:
        # Plain HTTP (insecure on both sides): the proxy reads the requests to drop the right
        # answer.
        config = coordinator_config(
            tmp_path, model, strategy=FedBuff(buffer_size=1), max_rounds=1, tls=False
        )
        async with Service(config) as service:
            proxy = _LossyProxy(service.port)
            await proxy.start()
            try:
                client = FederatedClient(
                    client_config(
                        tmp_path / "state",
                        model,
                        data,
                        coordinator_url=f"http://127.0.0.1:{proxy.port}",
                        insecure=True,
                    )
                )
                summary = await asyncio.wait_for(client.run_async(), timeout=120)
            finally:
                await proxy.close()
        assert proxy.dropped == 1
        assert summary.reason == "task_complete" and summary.global_version == 1
        [report] = summary.rounds
        assert report.outcome == "duplicate"  # the retry found the first copy stored
        updates = [
            e for e in ClientState(tmp_path / "state").ledger.entries() if e.kind == "update"
        ]
        assert [e.attempt for e in updates] == [1, 2]
        assert {e.detail["update_id"] for e in updates} == {report.update_id}
        assert updates[0].sha256 == updates[1].sha256  # byte-identical resend
        rows = _db_updates(tmp_path / "coordinator.sqlite")
        assert [r[0] for r in rows] == [report.update_id] and rows[0][2] == "aggregated"
        assert CANARY.encode() not in bytes(proxy.client_bytes)  # raw TCP capture
        assert not (tmp_path / "state" / "pending.json").exists()

    asyncio.run(scenario())


def test_crash_mid_training_resumes_from_the_checkpoint(tmp_path: Path, model: Path) -> None:
    data = write_data(tmp_path / "data.jsonl")

    async def scenario() -> None:
        config = coordinator_config(tmp_path, model, strategy=FedBuff(buffer_size=1), local_steps=8)
        async with Service(config) as service:
            state_dir = tmp_path / "state"
            cfg = client_config(state_dir, model, data, service=service, max_rounds=1)
            first = FederatedClient(cfg)
            checkpoint = ClientState(state_dir).checkpoint_path

            def stop_after_a_checkpoint() -> None:
                deadline = time.monotonic() + 120
                while not checkpoint.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
                first.stop()

            watcher = threading.Thread(target=stop_after_a_checkpoint)
            watcher.start()
            stopped = await asyncio.wait_for(first.run_async(), timeout=150)
            watcher.join()
            assert stopped.reason == "stopped" and stopped.rounds == []
            assert checkpoint.exists() and ClientState(state_dir).round_marker() is not None
            assert not any(e.kind == "update" for e in ClientState(state_dir).ledger.entries())

            second = FederatedClient(cfg)
            summary = await asyncio.wait_for(second.run_async(), timeout=150)
        [report] = summary.rounds
        assert report.outcome == "accepted" and report.steps == 8
        assert 1 <= report.resumed_from_step < 8
        assert not checkpoint.exists()  # the round is finished and settled

    asyncio.run(scenario())


@pytest.mark.slow
def test_three_clients_with_mdns_and_a_coordinator_restart(tmp_path: Path, model: Path) -> None:
    from edge_sdk.runtime import EdgeModel

    rounds = 3
    port = free_port()
    config = coordinator_config(
        tmp_path,
        model,
        port=port,
        mdns=True,
        strategy=FedBuff(buffer_size=3, max_staleness=4, min_updates=3),
        max_rounds=rounds,
    )
    names = ("alpha", "bravo", "charlie")
    # The certificate the coordinator will load, made first so the join code is known up front.
    tls = ensure_self_signed(tls_directory(config.db_path))
    code = make_join_code(tls.fingerprint, JOIN_TOKEN)
    captures = {n: _Capture() for n in names}
    runtimes = {n: EdgeModel(model, n_ctx=64, n_threads=1) for n in names}
    clients = {
        n: FederatedClient(
            client_config(
                tmp_path / n, model, write_data(tmp_path / f"{n}.jsonl"), seed=i, join_code=code
            ),
            runtime=runtimes[n],
            trace_configs=[captures[n].config],
        )
        for i, n in enumerate(names)
    }
    restarted_at: list[int] = []

    async def scenario() -> list:
        service = Service(config)
        await service.start()
        try:
            runs = [asyncio.create_task(c.run_async()) for c in clients.values()]
            deadline = time.monotonic() + 200
            while service.coordinator.version < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            restarted_at.append(service.coordinator.version)
            await service.close()  # mid-run: clients are training or pushing round 2
            await asyncio.sleep(0.5)
            service = Service(config)
            await service.start()
            return await asyncio.wait_for(asyncio.gather(*runs), timeout=240)
        finally:
            await service.close()

    try:
        summaries = asyncio.run(scenario())
        served = {n: rt.adapter_path for n, rt in runtimes.items()}
        # The swapped-in adapter really runs: the logits differ from the bare base model's.
        with_adapter = runtimes["alpha"].next_token_logits("hello world")
        runtimes["alpha"].remove_adapter()
        base_logits = runtimes["alpha"].next_token_logits("hello world")
    finally:
        for rt in runtimes.values():
            rt.close()
    assert not np.allclose(with_adapter, base_logits)

    assert restarted_at and restarted_at[0] < rounds
    rows = _db_updates(tmp_path / "coordinator.sqlite")
    stored_ids = [r[0] for r in rows]
    assert len(stored_ids) == len(set(stored_ids)) == 3 * rounds  # none duplicated
    assert all(r[2] == "aggregated" for r in rows)
    delivered: set[str] = set()
    for name, summary in zip(names, summaries):
        assert summary.reason == "task_complete" and summary.global_version == rounds
        assert len(summary.rounds) == rounds
        assert {r.outcome for r in summary.rounds} <= {"accepted", "duplicate"}
        delivered |= {r.update_id for r in summary.rounds}
        # The app's runtime serves the newest global adapter.
        assert served[name] == summary.adapter_path
        assert (
            summary.adapter_path is not None
            and summary.adapter_path.name == f"global-v{rounds:06d}.gguf"
        )

        state = ClientState(tmp_path / name)
        assert stat.S_IMODE(state.token_path.stat().st_mode) == 0o600
        entries = state.ledger.entries()
        cap = captures[name]
        assert len(entries) == cap.requests  # one ledger line per request that left
        sent = {hashlib.sha256(b).hexdigest() for b in cap.bodies}
        assert {e.sha256 for e in entries} <= sent
        updates = [e for e in entries if e.kind == "update"]
        assert {e.detail["update_id"] for e in updates} == {r.update_id for r in summary.rounds}
        for e in updates:
            assert {t["name"].rsplit(".", 1)[-1] for t in e.detail["tensors"]} == {
                "lora_A",
                "lora_B",
            }
        # The canary is in every training record and in no byte that left the device.
        assert all(CANARY.encode() not in b for b in cap.bodies)
        assert all(CANARY not in h for h in cap.headers)
        assert CANARY not in state.ledger.path.read_text()
    assert delivered == set(stored_ids)  # none lost
