"""Secure aggregation end to end: a real coordinator `Service` (TLS, 127.0.0.1) with
`secure=True`, real `FederatedClient`s, and hand-driven devices that speak the protocol over
the same REST API (a real `Transport` and a real `DeviceSession`) where a test needs a device
to drop out, replay or misbehave at a chosen point."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.next_version import AggregationConfig
from coordinator.server import Service
from coordinator.strategies import FedAvg, FedBuff
from edge_sdk.client import FederatedClient
from edge_sdk.client.errors import ProtocolError, RequestRejectedError
from edge_sdk.client.ledger import Ledger
from edge_sdk.client.transport import Transport
from edge_sdk.secagg import (
    DeviceSession,
    MaskedInput,
    MaskedInputRequest,
    RoundSetup,
    SecAggParams,
    ShareKeysRequest,
    UnmaskRequest,
    decode_as,
    encode,
    quantize,
)
from edge_sdk.secagg.server import ServerRound
from edge_sdk.wire import CONTENT_TYPE, GlobalAdapter
from tests.client.helpers import (
    FAST_RETRY,
    JOIN_TOKEN,
    client_config,
    coordinator_config,
    write_data,
)

pytestmark = pytest.mark.timeout(300)

CLIP = 0.05


def secure_config(tmp: Path, model_path: Path, cohort: int, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "aggregation": AggregationConfig(mode="frozen-a", rank=4, alpha=8.0),
        "strategy": FedAvg(clients_per_round=cohort, min_clients=3, deadline_s=600),
        "secure": True,
        "min_cohort": 3,
        "secure_clip": CLIP,
        "secure_grid_bits": 8,
        "secure_phase_s": 10.0,
        "max_rounds": 1,
    }
    values.update(overrides)
    return coordinator_config(tmp, model_path, **values)


class Recorder:
    """What each FederatedClient fed the protocol (the plain vector and its weight), read from
    the client's own `SecureUpload.plain_vector` as it runs: the test's ground truth, never sent."""

    def __init__(self) -> None:
        self.plain: dict[str, tuple[np.ndarray, int]] = {}

    def attach(self, name: str, client: FederatedClient) -> None:
        secure = client._upload.secure
        original = secure.plain_vector

        def spy(pending: Any, spec: Any) -> Any:
            out = original(pending, spec)
            if out is not None:
                self.plain[name] = (out[0].copy(), out[1])
            return out

        secure.plain_vector = spy  # type: ignore[method-assign]


def _clients(
    tmp: Path, model_path: Path, service: Service, names: list[str]
) -> dict[str, FederatedClient]:
    return {
        n: FederatedClient(
            client_config(
                tmp / n,
                model_path,
                write_data(tmp / f"{n}.jsonl"),
                service=service,
                seed=i,
                poll_interval_s=0.5,
            )
        )
        for i, n in enumerate(names)
    }


class Device:
    """A hand-driven device: its own token, a real Transport, a real DeviceSession."""

    def __init__(self, service: Service, tmp: Path, name: str) -> None:
        assert service.tls is not None
        self.transport = Transport(
            service.url,
            Ledger(tmp / f"{name}.ledger.jsonl"),
            tls_fingerprint=service.tls.fingerprint,
            retry=FAST_RETRY,
        )
        self.name = name
        self.session: DeviceSession | None = None
        self.masked: MaskedInput | None = None

    async def join(self) -> None:
        creds = await self.transport.join(JOIN_TOKEN, self.name)
        self.transport.token = creds["token"]

    async def next(self, phase: str, cls: type, params: SecAggParams) -> Any:
        assert self.session is not None
        for _ in range(20):
            body = await self.transport.secagg_next(
                self.session.round_id, phase, max_bytes=params.packed_len + (1 << 20)
            )
            if body is not None:
                return decode_as(body, cls)
        raise AssertionError(f"{phase} never opened")

    async def run(
        self, version: int, x: np.ndarray, weight: int, *, stop_after_masked: bool = False
    ) -> str:
        setup = decode_as(await self.transport.secagg_setup(version), RoundSetup)
        self.session = s = DeviceSession(setup)
        p = setup.params
        rid = {"round_id": s.round_id.hex()}
        await self.transport.secagg_send("advertise", encode(s.advertise()), rid)
        await self.transport.secagg_send(
            "share_keys",
            encode(s.share_keys(await self.next("share_keys", ShareKeysRequest, p))),
            rid,
        )
        self.masked = s.masked_input(
            await self.next("masked_input", MaskedInputRequest, p), x, weight
        )
        await self.transport.secagg_send("masked_input", encode(self.masked), rid)
        if stop_after_masked:
            return "gone"
        await self.transport.secagg_send(
            "unmask", encode(s.unmask(await self.next("unmask", UnmaskRequest, p))), rid
        )
        return "done"


def _global_b(service: Service, version: int) -> dict[str, np.ndarray]:
    body, _, got = service.coordinator.current_adapter()
    assert got == version
    tensors = GlobalAdapter.from_bytes(body).dense_tensors()
    return {k: v for k, v in tensors.items() if k.endswith(".lora_B")}


def _flat(service: Service, tensors: dict[str, np.ndarray]) -> np.ndarray:
    secure = service.coordinator.secure
    assert secure is not None
    return np.concatenate([np.asarray(tensors[k], np.float64).ravel() for k in secure.keys])


def _check_mean(service: Service, inputs: list[tuple[np.ndarray, int]]) -> None:
    """The published B (from B = 0 at version 0) is the plain weighted mean of the clipped
    deltas within the grid's rounding: n·Δ·W / Σw per coordinate."""
    secure = service.coordinator.secure
    assert secure is not None
    p = secure.params
    weights = [min(w, p.weight_cap) for _, w in inputs]
    exact = sum(np.clip(x, -p.clip, p.clip) * w for (x, _), w in zip(inputs, weights)) / sum(
        weights
    )
    got = _flat(service, _global_b(service, 1))
    bound = len(inputs) * quantize.grid_step(p) * p.weight_cap / sum(weights)
    err = np.abs(got - exact).max()
    assert err < bound, f"error {err} exceeds the grid bound {bound}"
    assert np.abs(exact).max() > 10 * bound  # a real signal, not zeros compared with zeros


def _stored_masked(db: Path) -> list[tuple[str, int, bytes]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return list(conn.execute("SELECT round_id, device_id, payload FROM secagg_masked_inputs"))


def _independent(masked: np.ndarray, plain_grid: np.ndarray) -> float:
    a = masked.astype(np.float64) - masked.mean()
    b = plain_grid.astype(np.float64) - plain_grid.mean()
    return float(abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def test_three_clients_complete_a_secure_round_and_the_coordinator_keeps_only_masked_data(
    tmp_path: Path,
    model: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    config = secure_config(tmp_path, model, cohort=3)
    names = ["alpha", "bravo", "charlie"]
    recorder = Recorder()

    async def scenario() -> list:
        async with Service(config) as service:
            clients = _clients(tmp_path, model, service, names)
            for n, c in clients.items():
                recorder.attach(n, c)
            summaries = await asyncio.wait_for(
                asyncio.gather(*(c.run_async() for c in clients.values())), 200
            )
            _check_mean(service, [recorder.plain[n] for n in names])
            secure = service.coordinator.secure
            assert secure is not None and secure.completed == 1
            stats = service.coordinator.last_aggregation["secure"]
            assert stats["survivors"] == 3 and stats["dropped"] == 0
            # The plain path is closed under --secure.
            device = Device(service, tmp_path, "plain")
            await device.join()
            with pytest.raises(RequestRejectedError) as refused:
                await device.transport.request(
                    "POST",
                    "/v1/updates",
                    kind="update",
                    body=b"FDLM plain update",
                    content_type=CONTENT_TYPE,
                )
            assert (
                refused.value.status == 409 and refused.value.code == "secure_aggregation_required"
            )
            await device.transport.close()
            params = secure.params
            return [summaries, params]

    summaries, params = asyncio.run(scenario())
    for s in summaries:
        assert s.reason == "task_complete" and s.global_version == 1
        assert [r.outcome for r in s.rounds] == ["accepted"]
    # The ledger records what was sent: the protocol's messages, the masked input among them,
    # and the demo's tally reads it as one update against its fp32 size.
    from edge_sdk.demo.network import read_client_ledger

    for n in names:
        tally = read_client_ledger(tmp_path / n)
        assert tally.updates == 1 and tally.fp32_bytes == 4 * params.vector_len
        assert params.packed_len < tally.bytes_sent < tally.fp32_bytes
        phases = [e.detail.get("secagg") for e in _ledger_entries(tmp_path / n)]
        assert {"setup", "advertise", "share_keys", "masked_input", "unmask"} <= set(phases)
    # Storage: three masked vectors, no plain update; each independent of every plain input.
    db = tmp_path / "coordinator.sqlite"
    rows = _stored_masked(db)
    assert len(rows) == 3
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT COUNT(*) FROM updates").fetchone()[0] == 0
    raw = db.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("coordinator.sqlite-*"))
    for _, _, payload in rows:
        masked = quantize.unpack(payload, params)[:-1]
        for n in names:
            x, w = recorder.plain[n]
            grid = quantize.encode(x, min(w, params.weight_cap), params, np.random.default_rng(0))[
                :-1
            ]
            assert _independent(masked, grid) < 0.2, n
            # Nor is the plain vector anywhere in the database file, as fp32 or fp64.
            assert x.astype(np.float32).tobytes()[:64] not in raw
            assert x.tobytes()[:64] not in raw
    # Logs: no record carries a plain value of any device.
    text = "\n".join(r.getMessage() for r in caplog.records)
    for n in names:
        x, _ = recorder.plain[n]
        for v in x[np.abs(x) > 1e-4][:5]:
            assert repr(float(v)) not in text and f"{v:.6f}" not in text


def test_a_device_that_drops_after_its_masked_input_is_still_summed(
    tmp_path: Path, model: Path
) -> None:
    # The leaver joins at once and the clients only after training: a phase of 10 s closed
    # the advertise phase without a client under load (a cohort of 3, where one drop-out
    # leaves a device with fewer than t = 2 share holders). The unmask phase waits it out.
    config = secure_config(tmp_path, model, cohort=4, secure_phase_s=45.0)
    names = ["alpha", "bravo", "charlie"]
    recorder = Recorder()

    async def scenario() -> tuple[list, np.ndarray, int]:
        async with Service(config) as service:
            secure = service.coordinator.secure
            assert secure is not None
            rng = np.random.default_rng(5)
            x = rng.normal(0.0, CLIP / 2, secure.vector_len)
            weight = secure.params.weight_cap
            leaver = Device(service, tmp_path, "leaver")
            await leaver.join()
            clients = _clients(tmp_path, model, service, names)
            for n, c in clients.items():
                recorder.attach(n, c)
            results = await asyncio.wait_for(
                asyncio.gather(
                    leaver.run(0, x, weight, stop_after_masked=True),
                    *(c.run_async() for c in clients.values()),
                ),
                200,
            )
            await leaver.transport.close()
            stats = service.coordinator.last_aggregation["secure"]
            assert stats["cohort"] == 4 and stats["survivors"] == 4
            _check_mean(service, [(x, weight), *(recorder.plain[n] for n in names)])
            return results, x, weight

    results, _, _ = asyncio.run(scenario())
    assert results[0] == "gone"
    assert all(s.reason == "task_complete" for s in results[1:])


def test_replayed_masked_vector_and_impersonation_are_refused_over_http(
    tmp_path: Path, model: Path
) -> None:
    config = secure_config(tmp_path, model, cohort=3, max_rounds=2)

    async def scenario() -> None:
        async with Service(config) as service:
            secure = service.coordinator.secure
            assert secure is not None
            devices = [Device(service, tmp_path, f"d{i}") for i in range(3)]
            for d in devices:
                await d.join()
            rng = np.random.default_rng(1)
            xs = [rng.normal(0.0, CLIP / 2, secure.vector_len) for _ in devices]
            await asyncio.gather(*(d.run(0, x, 10) for d, x in zip(devices, xs)))
            deadline = time.monotonic() + 30
            while service.coordinator.version < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert service.coordinator.version == 1
            old = [d.masked for d in devices]
            assert all(m is not None for m in old)

            # Round 2: everyone gets as far as the masked-input phase.
            sessions = []
            for d in devices:
                setup = decode_as(await d.transport.secagg_setup(1), RoundSetup)
                d.session = DeviceSession(setup)
                sessions.append(d.session)
                await d.transport.secagg_send("advertise", encode(d.session.advertise()), {})
            p = sessions[0].params
            for d in devices:
                req = await d.next("share_keys", ShareKeysRequest, p)
                await d.transport.secagg_send("share_keys", encode(d.session.share_keys(req)), {})
            requests = [await d.next("masked_input", MaskedInputRequest, p) for d in devices]
            d0, s0 = devices[0], sessions[0]
            # 1. Round 1's masked vector, relabelled with round 2's id: the tag does not verify.
            prev = old[0]
            assert prev is not None
            replay = MaskedInput(s0.round_id, s0.device_id, prev.payload, prev.tag)
            with pytest.raises(RequestRejectedError) as refused:
                await d0.transport.secagg_send("masked_input", encode(replay), {})
            assert refused.value.status == 400 and refused.value.code == "replay_refused"
            # 2. Round 1's message as it was: wrong round.
            with pytest.raises(RequestRejectedError) as refused:
                await d0.transport.secagg_send("masked_input", encode(prev), {})
            assert refused.value.status in (400, 403)
            # 3. Device 0 sending device 1's fresh input as its own: refused (not its id).
            fresh1 = sessions[1].masked_input(requests[1], xs[1], 10)
            with pytest.raises(RequestRejectedError) as refused:
                await d0.transport.secagg_send("masked_input", encode(fresh1), {})
            assert refused.value.status == 403
            # 4. The genuine input is taken once. The same bytes again (a retry whose answer was
            # lost) are acknowledged without a second row; other bytes for the same device are
            # refused.
            fresh0 = s0.masked_input(requests[0], xs[0], 10)
            await d0.transport.secagg_send("masked_input", encode(fresh0), {})
            await d0.transport.secagg_send("masked_input", encode(fresh0), {})
            rows = [
                r
                for r in _stored_masked(tmp_path / "coordinator.sqlite")
                if r[0] == s0.round_id.hex()
            ]
            assert len(rows) == 1 and rows[0][2] == fresh0.payload
            flipped = bytes([fresh0.payload[0] ^ 1]) + fresh0.payload[1:]
            with pytest.raises(RequestRejectedError) as refused:
                await d0.transport.secagg_send(
                    "masked_input",
                    encode(MaskedInput(s0.round_id, s0.device_id, flipped, fresh0.tag)),
                    {},
                )
            assert refused.value.status == 400
            # 5. A message of another kind on a phase endpoint, and garbage: 400, not 500.
            for body in (b"FSAG\x01\x02\x90", b"\x00" * 10):
                with pytest.raises(RequestRejectedError) as refused:
                    await d0.transport.secagg_send("masked_input", body, {})
                assert refused.value.status == 400
            for d in devices:
                await d.transport.close()

    asyncio.run(scenario())


def test_a_client_refuses_a_coordinator_that_asks_for_both_shares(
    tmp_path: Path,
    model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A curious coordinator names a device both active and dropped in its unmask requests
    (to get the seed share and the mask-key share of one device): the real client refuses,
    aborts, and sends no share at all."""
    honest = ServerRound.close_masked_input

    def hostile(self: ServerRound) -> dict[int, UnmaskRequest]:
        requests = honest(self)
        active = tuple(sorted(requests))
        return {
            i: UnmaskRequest(r.round_id, i, active, (active[-1] if i != active[-1] else active[0],))
            for i, r in requests.items()
        }

    monkeypatch.setattr(ServerRound, "close_masked_input", hostile)
    config = secure_config(tmp_path, model, cohort=3)

    async def scenario() -> list:
        async with Service(config) as service:
            secure = service.coordinator.secure
            assert secure is not None
            helpers = [Device(service, tmp_path, f"h{i}") for i in range(2)]
            for d in helpers:
                await d.join()
            client = _clients(tmp_path, model, service, ["victim"])["victim"]
            rng = np.random.default_rng(2)
            runs = [d.run(0, rng.normal(0, CLIP / 2, secure.vector_len), 10) for d in helpers]
            out = await asyncio.wait_for(
                asyncio.gather(client.run_async(), *runs, return_exceptions=True), 200
            )
            for d in helpers:
                await d.transport.close()
            assert service.coordinator.version == 0  # nothing was published
            return out

    out = asyncio.run(scenario())
    assert isinstance(
        out[0], ProtocolError
    ) and "both the seed share and the mask-key share" in str(out[0])
    phases = [e.detail.get("secagg") for e in _ledger_entries(tmp_path / "victim")]
    assert "masked_input" in phases and "unmask" not in phases


def _ledger_entries(state_dir: Path) -> list:
    from edge_sdk.client import ClientState

    return ClientState(state_dir).ledger.entries()


def test_secure_config_refuses_what_it_cannot_honour(tmp_path: Path, model: Path) -> None:
    with pytest.raises(ValueError, match="frozen-a"):
        secure_config(
            tmp_path,
            model,
            cohort=3,
            aggregation=AggregationConfig(mode="exact", rank=4, alpha=8.0),
        )
    # fedbuff cohorts are the first buffer_size devices of a version: below 3, refused.
    with pytest.raises(ValueError, match="--buffer-size"):
        secure_config(tmp_path, model, cohort=3, strategy=FedBuff(buffer_size=2))
    with pytest.raises(ValueError, match="min_cohort"):
        secure_config(tmp_path, model, cohort=3, min_cohort=2)
    with pytest.raises(ValueError, match="min_cohort"):
        secure_config(tmp_path, model, cohort=3, min_cohort=4)
    with pytest.raises(ValueError, match="clients_per_round"):
        secure_config(
            tmp_path,
            model,
            cohort=2,
            strategy=FedAvg(clients_per_round=2, min_clients=1),
            min_cohort=3,
        )
    with pytest.raises(ValueError, match="grid_bits"):
        secure_config(tmp_path, model, cohort=3, secure_grid_bits=31)


def test_the_task_states_the_minimum_cohort_and_openapi_lists_the_endpoints(
    tmp_path: Path, model: Path
) -> None:
    config = secure_config(tmp_path, model, cohort=5, min_cohort=3)

    async def scenario() -> tuple[dict, dict]:
        async with Service(config) as service:
            d = Device(service, tmp_path, "reader")
            await d.join()
            task = await d.transport.task()
            spec = await d.transport.request(
                "GET", "/openapi.json", kind="status", max_bytes=1 << 20
            )
            await d.transport.close()
            import json

            return task.extra["secure"], json.loads(spec.body)

    secure, spec = asyncio.run(scenario())
    # n = 5: k = 4, t = 3, so the protocol needs 4 devices: the stated minimum is raised to it.
    assert secure["min_cohort"] == 4 and secure["cohort_size"] == 5 and secure["threshold"] == 3
    assert secure["clip"] == CLIP and secure["grid_bits"] == 8
    assert "/v1/secagg/{phase}" in spec["paths"]


def test_cli_secure_defaults_to_frozen_a_fedavg_and_refuses_other_modes(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_sdk.cli import build_parser, main
    from edge_sdk.cli.coordinator_cmd import _config

    base = ["coordinator", "--model", str(model), "--db", str(tmp_path / "c.sqlite")]
    args = build_parser().parse_args([*base, "--secure", "--min-cohort", "4"])
    config = _config(args, JOIN_TOKEN)
    assert config.secure and config.aggregation.mode == "frozen-a"
    assert isinstance(config.strategy, FedAvg) and config.strategy.clients_per_round == 4
    assert config.min_cohort == 4
    plain = _config(build_parser().parse_args(base), JOIN_TOKEN)
    assert not plain.secure and plain.aggregation.mode == "exact"
    assert isinstance(plain.strategy, FedBuff)
    buffered = _config(
        build_parser().parse_args([*base, "--secure", "--strategy", "fedbuff"]), JOIN_TOKEN
    )
    assert isinstance(buffered.strategy, FedBuff) and buffered.secure
    # The DP flags under --secure mean distributed DP (devices add the noise).
    noisy = _config(build_parser().parse_args([*base, "--secure", "--dp-noise", "1.0"]), JOIN_TOKEN)
    assert noisy.secure and noisy.aggregation.dp is not None
    for extra in (
        ["--lora-mode", "exact"],
        ["--strategy", "fedbuff", "--buffer-size", "2"],
    ):
        assert main([*base, "--secure", *extra]) == 2
        assert "secure aggregation" in capsys.readouterr().err


def test_secagg_endpoint_of_a_secure_coordinator_survives_schemathesis(
    tmp_path: Path, model: Path
) -> None:
    """Generated bodies (valid and invalid) for every phase, with a client token and without:
    never a 5xx, and every answer documented."""
    pytest.importorskip("schemathesis")
    import schemathesis

    from tests.coordinator.fuzz_helpers import fuzz_operation, join_fuzz_client
    from tests.coordinator.helpers import JOIN_TOKEN as FUZZ_TOKEN
    from tests.coordinator.limits_helpers import ServiceThread

    config = secure_config(
        tmp_path,
        model,
        cohort=3,
        tls=False,
        rate_per_s=1000.0,
        rate_burst=1000,
        join_token=FUZZ_TOKEN,
    )
    with ServiceThread(config) as st:
        schema = schemathesis.openapi.from_url(f"{st.url}/openapi.json")
        token = join_fuzz_client(st.port)
        ops = [r.ok() for r in schema.get_all_operations()]
        (op,) = [o for o in ops if o.label == "POST /v1/secagg/{phase}"]
        for headers in ({"Authorization": f"Bearer {token}"}, {}):
            fuzz_operation(op, st.url, headers)


def test_demo_secure_runs_the_network_federation_with_secure_flags() -> None:
    from edge_sdk.demo.config import DemoConfig
    from edge_sdk.demo.network import _strategy_flags

    config = DemoConfig.quick().replace(secure=True, mode="frozen-a")
    flags = _strategy_flags(config)
    assert "--secure" in flags and flags[flags.index("--strategy") + 1] == "fedavg"
    assert flags[flags.index("--min-cohort") + 1] == str(config.clients)
    assert "--secure" not in _strategy_flags(DemoConfig.quick())
    with pytest.raises(ValueError, match="frozen-a"):
        DemoConfig.quick().replace(secure=True)


@pytest.mark.slow
def test_secure_network_federation_of_three_client_processes(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    """`fedlm demo --secure`'s federation on a tiny model: a `fedlm coordinator --secure`
    process and three `fedlm join` processes publish a version; the ledgers show masked
    inputs smaller than fp32."""
    from edge_sdk.demo.config import DemoConfig
    from edge_sdk.demo.network import NetworkFederation, read_client_ledger
    from edge_sdk.demo.tasks import generate, write_task_data

    config = DemoConfig(
        model=str(tiny_gguf), clients=3, rounds=1, local_steps=2, batch_size=2, seq_len=128,
        train_per_client=12, eval_per_family=1, precision="fp32", lr=1e-2, greedy_eval=False,
        mode="frozen-a", secure=True, secure_grid_bits=5,
    )  # fmt: skip
    paths, _ = write_task_data(generate(config.task_config()), tmp_path / "data")
    seen: list[int] = []
    fed = NetworkFederation(work_dir=tmp_path / "fed", timeout_s=400.0)
    fed.run(paths, config, lambda v, adapter: seen.append(v))
    assert seen == [1]
    for c in range(3):
        ledger = read_client_ledger(tmp_path / "fed" / f"client-{c}")
        assert ledger.updates == 1 and 0 < ledger.bytes_sent < ledger.fp32_bytes
    log = (tmp_path / "fed" / "coordinator.log").read_text()
    assert "from a secure sum" in log


def test_a_pinned_transport_reuses_its_connection(tmp_path: Path, model: Path) -> None:
    """The protocol's many small requests (and long polls) ride one pooled TLS connection: a
    pinned `Transport` used to open a new connection per request, until the coordinator's
    per-address cap answered 429 to everyone on that address."""
    from coordinator.connections import GUARD

    config = secure_config(tmp_path, model, cohort=3)

    async def scenario() -> list[int]:
        async with Service(config) as service:
            d = Device(service, tmp_path, "reuse")
            await d.join()
            counts = []
            for _ in range(6):
                await d.transport.task()
                await d.transport.adapter()
                counts.append(service.app[GUARD].open_connections)
            await d.transport.close()
            return counts

    assert asyncio.run(scenario()) == [1] * 6


def _current_b(service: Service) -> tuple[int, np.ndarray]:
    body, _, version = service.coordinator.current_adapter()
    tensors = GlobalAdapter.from_bytes(body).dense_tensors()
    return version, _flat(service, {k: v for k, v in tensors.items() if k.endswith(".lora_B")})


def test_fedbuff_cohorts_of_one_version_enter_with_the_staleness_weight(
    tmp_path: Path, model: Path
) -> None:
    """fedbuff: a cohort is the first buffer_size devices that pulled one version; its sum is
    one buffered update. A cohort of version 1 that closes when version 2 is current moves the
    adapter by (1 + 1)^-0.5 times its mean delta; a version past max_staleness is refused."""
    strategy = FedBuff(buffer_size=3, max_staleness=1, min_updates=3, staleness_exponent=0.5)
    config = secure_config(tmp_path, model, cohort=3, strategy=strategy, max_rounds=None)

    async def scenario() -> dict[str, Any]:
        async with Service(config) as service:
            secure = service.coordinator.secure
            assert secure is not None
            p = secure.params
            rng = np.random.default_rng(11)
            devices = {}
            for name in ("a", "b", "c", "d", "e", "f", "g", "h", "i", "late"):
                devices[name] = Device(service, tmp_path, name)
                await devices[name].join()
            task = await devices["a"].transport.task()

            def inputs() -> list[np.ndarray]:
                return [rng.normal(0.0, CLIP / 2, p.vector_len) for _ in range(3)]

            async def cohort(names: list[str], version: int, xs: list[np.ndarray]) -> None:
                await asyncio.wait_for(
                    asyncio.gather(
                        *(devices[n].run(version, x, p.weight_cap) for n, x in zip(names, xs))
                    ),
                    120,
                )

            out: dict[str, Any] = {"spec": task.extra["secure"], "params": p}
            xs0 = inputs()
            await cohort(["a", "b", "c"], 0, xs0)  # version 0 -> 1, fresh
            v1, b1 = _current_b(service)
            xs1, xs1_stale = inputs(), inputs()
            await cohort(["d", "e", "f"], 1, xs1)  # version 1 -> 2, fresh
            v2, b2 = _current_b(service)
            stats2 = dict(service.coordinator.last_aggregation["secure"])
            await cohort(["g", "h", "i"], 1, xs1_stale)  # trained from 1, lands on 2: stale 1
            v3, b3 = _current_b(service)
            stats3 = dict(service.coordinator.last_aggregation["secure"])
            with pytest.raises(RequestRejectedError) as too_old:  # 3 - 1 > max_staleness
                await devices["late"].transport.secagg_setup(1)
            for d in devices.values():
                await d.transport.close()
            out.update(
                versions=(v1, v2, v3), b=(b1, b2, b3), xs=(xs0, xs1, xs1_stale),
                stats=(stats2, stats3), too_old=too_old.value,
            )  # fmt: skip
            return out

    out = asyncio.run(scenario())
    p = out["params"]
    assert out["spec"]["strategy"] == "fedbuff" and out["spec"]["cohort_size"] == 3
    assert out["spec"]["min_cohort"] == 3 and "first cohort_size devices" in out["spec"]["cohort"]
    assert out["versions"] == (1, 2, 3)
    b1, b2, b3 = out["b"]
    xs0, xs1, stale = out["xs"]

    def mean(xs: list[np.ndarray]) -> np.ndarray:
        return np.mean([np.clip(x, -p.clip, p.clip) for x in xs], axis=0)

    bound = 3 * quantize.grid_step(p)  # n·Δ·W/Σw with equal weights at the cap: Δ per device
    assert np.abs(b1 - mean(xs0)).max() < bound
    assert np.abs((b2 - b1) - mean(xs1)).max() < bound
    scale = 2.0**-0.5
    assert np.abs((b3 - b2) - scale * mean(stale)).max() < scale * bound
    # Not the unweighted step: the difference is far above the grid's rounding.
    assert np.abs((b3 - b2) - mean(stale)).max() > 10 * bound
    assert out["stats"][0]["staleness"] == 0 and out["stats"][0]["staleness_scale"] == 1.0
    assert out["stats"][1]["staleness"] == 1 and out["stats"][1]["base_version"] == 1
    assert out["stats"][1]["staleness_scale"] == pytest.approx(scale)
    assert out["too_old"].status == 409 and out["too_old"].code == "stale_update"


def test_distributed_dp_round_publishes_a_noisy_sum_and_reports_epsilon(
    tmp_path: Path, model: Path
) -> None:
    """--secure with the DP flags: DP is distributed. The task states the noise, three real
    clients add their Skellam shares, the coordinator adds none, publishes the noisy mean and
    reports ε from the Skellam accountant."""
    from coordinator.privacy import DpConfig
    from edge_sdk.secagg import dp as secagg_dp

    dp_config = DpConfig(noise_multiplier=0.8, clip_norm=0.2, delta=1e-5)
    config = secure_config(
        tmp_path,
        model,
        cohort=3,
        # The published mean is clipped to [-C, C] after the noise (post-processing): a
        # value clip far above the noise's std keeps that from truncating what is measured.
        secure_clip=0.5,
        aggregation=AggregationConfig(
            mode="frozen-a", rank=4, alpha=8.0, dp=dp_config, clip_multiplier=None
        ),
    )
    names = ["alpha", "bravo", "charlie"]
    recorder = Recorder()

    async def scenario() -> dict[str, Any]:
        async with Service(config) as service:
            clients = _clients(tmp_path, model, service, names)
            for n, c in clients.items():
                recorder.attach(n, c)
            summaries = await asyncio.wait_for(
                asyncio.gather(*(c.run_async() for c in clients.values())), 200
            )
            secure = service.coordinator.secure
            assert secure is not None
            return {
                "summaries": summaries,
                "spec": secure.describe(),
                "params": secure.params,
                "stats": dict(service.coordinator.last_aggregation),
                "epsilon": service.coordinator.epsilon_spent(),
                "b": _flat(service, _global_b(service, 1)),
                "min_cohort": secure.min_cohort,
            }

    out = asyncio.run(scenario())
    p = out["params"]
    assert all(s.reason == "task_complete" for s in out["summaries"])
    assert p.dp and p.l2_clip == 0.2 and out["spec"]["dp"]["noise_mu"] == p.noise_mu
    # Calibrated: the minimum cohort's summed noise has std z·Δ₂ grid steps.
    sigma = 0.8 * secagg_dp.l2_sensitivity(p)
    assert 2 * out["min_cohort"] * p.noise_mu == pytest.approx(sigma**2)
    # Published B = mean of the L2- and value-clipped deltas + (Skellam sum)·Δ / 3.
    plain = [
        np.clip(secagg_dp.clip_l2(recorder.plain[n][0], p.l2_clip), -p.clip, p.clip) for n in names
    ]
    noise = (out["b"] - np.mean(plain, axis=0)) * 3 / quantize.grid_step(p)  # grid steps
    expected = 2 * 3 * p.noise_mu + 3 / 4
    assert 0.7 * expected < noise.var() < 1.3 * expected  # 768 values: a loose band
    eps = secagg_dp.epsilon_spent(p, out["min_cohort"], 1, 1e-5)
    assert out["stats"]["dp_epsilon"] == pytest.approx(eps)
    assert out["epsilon"] == pytest.approx(eps) and 0 < eps < float("inf")
