"""The coordinator is authenticated before any secret is sent to it.

Attacks of a hostile LAN host against the real client, with a real coordinator, real zeroconf
adverts on 127.0.0.1 and impostor servers that record everything they receive:

- a fake advert that sorts first (`0-evil`), plain HTTP or TLS with its own certificate, or
  copying the real coordinator's fingerprint into its TXT record;
- a fake advert whose TXT `task` equals the `--coordinator-name` the user asked for;
- a coordinator whose certificate changed since enrollment (the impostor took its address).

In every case the impostor receives no join token and no bearer token.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from coordinator.server import Service
from coordinator.strategies import FedBuff
from edge_sdk.client import (
    ClientState,
    DiscoveryError,
    FederatedClient,
    TlsPinError,
)
from edge_sdk.client.errors import InsecureError, JoinCodeError
from edge_sdk.client.joincode import PREFIX, JoinCode, make_join_code
from edge_sdk.models.identity import model_sha256
from tests.client.helpers import (
    JOIN_TOKEN,
    client_config,
    coordinator_config,
    free_port,
    join_code,
    write_data,
)
from tests.client.impostor import Impostor, fake_advert
from tests.tiny_models import write_tiny_gguf

pytestmark = pytest.mark.timeout(300)

FP = "5a" * 32


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model of its own (a seed no other test uses): other test runs on this machine
    advertise coordinators for the shared tiny model on 127.0.0.1 too, and the mDNS tests here
    count offers."""
    return write_tiny_gguf(
        tmp_path_factory.mktemp("auth") / "tiny.gguf", seed=1000 + os.getpid() % 50_000
    )


# -- the join code -------------------------------------------------------------------------


def test_join_code_round_trip() -> None:
    code = make_join_code(FP, JOIN_TOKEN)
    assert code.startswith(PREFIX) and code == code.strip()
    assert set(code[len(PREFIX) :]) <= set("abcdefghijklmnopqrstuvwxyz234567")
    decoded = JoinCode.decode(code)
    assert (decoded.fingerprint, decoded.token) == (FP, JOIN_TOKEN)
    # Pasted in upper case, wrapped over lines, with 0/1 for O/L: still the same code.
    wrapped = code[:40].upper() + "\n  " + code[40:]
    assert JoinCode.decode(wrapped) == decoded
    payload = code[len(PREFIX) :]
    assert JoinCode.decode(PREFIX + payload.replace("o", "0").replace("l", "1")) == decoded
    assert JOIN_TOKEN not in repr(decoded)  # the secret stays out of logs
    # Any token the coordinator accepts (8+ characters, any Unicode) round-trips.
    for token in ("12345678", "ünïcødé-tøken", "x" * 256):
        assert JoinCode.decode(make_join_code(FP, token)).token == token
    with pytest.raises(ValueError, match="`token` should have 8"):
        make_join_code(FP, "short")
    with pytest.raises(ValueError, match="64 hex digits"):
        make_join_code("ab" * 31, JOIN_TOKEN)


def test_every_single_character_typo_is_caught() -> None:
    code = make_join_code(FP, JOIN_TOKEN)
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    caught = 0
    for i in range(len(PREFIX), len(code)):
        typo = alphabet[(alphabet.index(code[i]) + 1) % 32]
        with pytest.raises(JoinCodeError, match=r"checksum does not match \(a typo\?\)"):
            JoinCode.decode(code[:i] + typo + code[i + 1 :])
        caught += 1
    assert caught == len(code) - len(PREFIX)
    # Swapped neighbours, a dropped or an extra character: all caught, each with the next step.
    swapped = code[:20] + code[21] + code[20] + code[22:]
    for damaged in (swapped, code[:-1], code + "a", code[:50]):
        if damaged == code:
            continue
        with pytest.raises(JoinCodeError, match="copy it again"):
            JoinCode.decode(damaged)
    with pytest.raises(JoinCodeError, match="version 'fedlm2'"):
        JoinCode.decode("fedlm2-" + code[len(PREFIX) :])
    with pytest.raises(JoinCodeError, match="should start with 'fedlm1-'"):
        JoinCode.decode(JOIN_TOKEN)  # the bare token pasted where the code belongs


def test_client_config_checks_the_join_code_and_plain_http(tmp_path: Path) -> None:
    data = write_data(tmp_path / "d.jsonl")
    model = tmp_path / "m.gguf"
    code = make_join_code(FP, JOIN_TOKEN)
    bad = code[:30] + ("a" if code[30] != "a" else "b") + code[31:]
    with pytest.raises(JoinCodeError, match="`join_code` .*checksum"):
        client_config(tmp_path / "s", model, data, join_code=bad)
    with pytest.raises(ValueError, match="plain http://.*--insecure"):
        client_config(tmp_path / "s", model, data, coordinator_url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="use https://"):
        client_config(
            tmp_path / "s",
            model,
            data,
            coordinator_url="http://127.0.0.1:1",
            join_code=code,
            insecure=True,
        )
    with pytest.raises(ValueError, match="differs from the fingerprint in the join code"):
        client_config(tmp_path / "s", model, data, join_code=code, tls_fingerprint="00" * 32)
    ok = client_config(
        tmp_path / "s",
        model,
        data,
        join_code=code,
        tls_fingerprint=":".join([FP[i : i + 2].upper() for i in range(0, 64, 2)]),
    )
    assert ok.tls_fingerprint == FP


# -- fake adverts ----------------------------------------------------------------------------


def test_fake_adverts_never_receive_a_token(tmp_path: Path, model: Path) -> None:
    """A real TLS coordinator named `kitchen` and three impostors whose adverts sort first:
    `0-evil` (plain HTTP, its TXT task says `kitchen`), `0-evil-tls` (TLS, its own certificate)
    and `0-copycat` (TLS, its own certificate, but the real fingerprint in its TXT record)."""
    data = write_data(tmp_path / "data.jsonl")
    sha = model_sha256(model)
    state = tmp_path / "state"

    async def scenario() -> None:
        config = coordinator_config(
            tmp_path, model, mdns=True, mdns_name="kitchen", strategy=FedBuff(buffer_size=1)
        )
        plain = await Impostor().start()
        evil_tls = await Impostor(tls_dir=tmp_path / "evil-tls").start()
        copycat = await Impostor(tls_dir=tmp_path / "copycat").start()
        try:
            async with Service(config) as service:
                assert service.tls is not None
                real_fp = service.tls.fingerprint
                async with (
                    fake_advert("0-evil", plain.port, sha, task="kitchen"),
                    fake_advert(
                        "0-evil-tls",
                        evil_tls.port,
                        sha,
                        task="kitchen",
                        fingerprint=evil_tls.tls.fingerprint,
                    ),
                    fake_advert(
                        "0-copycat", copycat.port, sha, task="kitchen", fingerprint=real_fp
                    ),
                ):
                    # First run: the join code; --insecure too, to show it loosens nothing
                    # once a pin is known.
                    first = FederatedClient(
                        client_config(
                            state,
                            model,
                            data,
                            join_code=join_code(service),
                            insecure=True,
                            max_rounds=1,
                            final_wait_s=0.0,
                        )
                    )
                    summary = await asyncio.wait_for(first.run_async(), timeout=150)
                    assert summary.coordinator == service.url and len(summary.rounds) == 1
                    # Second run: no join code, the stored pin; asking for `kitchen` by name.
                    second = FederatedClient(
                        client_config(
                            state,
                            model,
                            data,
                            join_token=None,
                            coordinator_name="kitchen",
                            max_rounds=2,
                            final_wait_s=0.0,
                        )
                    )
                    again = await asyncio.wait_for(second.run_async(), timeout=150)
                    assert again.coordinator == service.url and again.client_id == summary.client_id
                clients = service.coordinator.storage.count_clients()
        finally:
            for server in (plain, evil_tls, copycat):
                await server.close()
        assert clients == 1
        creds = json.loads((state / "token.json").read_text())
        assert creds["tls_fingerprint"] == real_fp and creds["coordinator"] == service.url
        for server in (plain, evil_tls, copycat):
            assert server.received == [], server.url  # not one HTTP request, so no token
        bearer = creds["token"]
        assert (
            plain.secrets_seen(JOIN_TOKEN, bearer),
            copycat.secrets_seen(JOIN_TOKEN, bearer),
        ) == ([], [])
        # The outbox ledger went to the real coordinator only.
        assert {e.url.split("/v1/")[0] for e in ClientState(state).ledger.entries()} == {
            service.url
        }

    asyncio.run(scenario())


def test_a_join_token_alone_goes_nowhere(tmp_path: Path, model: Path) -> None:
    """FEDLM_JOIN_TOKEN without a pin and without --insecure: refused before discovery."""
    data = write_data(tmp_path / "data.jsonl")
    sha = model_sha256(model)

    async def scenario() -> None:
        plain = await Impostor().start()
        try:
            async with fake_advert("0-evil", plain.port, sha):
                client = FederatedClient(
                    client_config(tmp_path / "s", model, data)
                )  # join_token only
                with pytest.raises(InsecureError) as refused:
                    await client.run_async()
        finally:
            await plain.close()
        message = str(refused.value)
        for hint in (
            "$FEDLM_JOIN_TOKEN",
            "--join-code",
            "$FEDLM_JOIN_CODE",
            "--tls-fingerprint",
            "--insecure",
        ):
            assert hint in message
        assert plain.received == []
        assert ClientState(tmp_path / "s").ledger.entries() == []

    asyncio.run(scenario())


def test_insecure_without_a_pin_never_breaks_a_tie_on_names(tmp_path: Path, model: Path) -> None:
    """Plain HTTP on both sides: a fake `0-evil` next to the real one means no choice at all,
    unless the user names the real instance (and the fake's TXT task naming it does not count)."""
    data = write_data(tmp_path / "data.jsonl")
    sha = model_sha256(model)

    async def scenario() -> None:
        config = coordinator_config(tmp_path, model, tls=False, mdns=True, mdns_name="kitchen")
        plain = await Impostor().start()
        try:
            async with (
                Service(config) as service,
                fake_advert("0-evil", plain.port, sha, task="kitchen"),
            ):
                ambiguous = FederatedClient(
                    client_config(tmp_path / "a", model, data, insecure=True)
                )
                with pytest.raises(
                    DiscoveryError, match="2 usable plain-HTTP coordinators .*--coordinator-name"
                ):
                    await ambiguous.run_async()
                named = FederatedClient(
                    client_config(
                        tmp_path / "b",
                        model,
                        data,
                        insecure=True,
                        coordinator_name="kitchen",
                        max_rounds=1,
                        final_wait_s=0.0,
                    )
                )
                summary = await asyncio.wait_for(named.run_async(), timeout=150)
                assert summary.coordinator == service.url
        finally:
            await plain.close()
        assert plain.received == []
        assert ClientState(tmp_path / "a").ledger.entries() == []

    asyncio.run(scenario())


# -- trust on first use ------------------------------------------------------------------------


def test_a_changed_certificate_is_refused_without_sending_the_bearer_token(
    tmp_path: Path, model: Path
) -> None:
    data = write_data(tmp_path / "data.jsonl")
    sha = model_sha256(model)
    state = tmp_path / "state"
    port = free_port()

    async def scenario() -> None:
        config = coordinator_config(
            tmp_path / "one", model, port=port, strategy=FedBuff(buffer_size=1)
        )
        (tmp_path / "one").mkdir()
        async with Service(config) as service:
            assert service.tls is not None
            real_fp, url = service.tls.fingerprint, service.url
            enrolled = FederatedClient(client_config(
                state, model, data, service=service, max_rounds=1, final_wait_s=0.0,
            ))  # fmt: skip
            await asyncio.wait_for(enrolled.run_async(), timeout=150)
        creds = json.loads((state / "token.json").read_text())
        assert creds["tls_fingerprint"] == real_fp  # the pin, stored with the credentials
        bearer = creds["token"]
        entries_before = len(ClientState(state).ledger.entries())

        # Another certificate now answers at the coordinator's address (an impostor, or the
        # coordinator reinstalled): the stored pin refuses it before any request is written.
        impostor = await Impostor(tls_dir=tmp_path / "new-cert").start(port=port)
        try:
            assert impostor.tls is not None and impostor.tls.fingerprint != real_fp
            by_url = FederatedClient(
                client_config(state, model, data, coordinator_url=url, join_token=None)
            )
            with pytest.raises(TlsPinError) as refused:
                await by_url.run_async()
            message = str(refused.value)
            assert impostor.tls.fingerprint in message and real_fp in message
            assert (
                str(state / "token.json") in message
                and "re-enroll with its new join code" in message
            )
            # Found by mDNS instead: its advert names its own certificate, and is skipped...
            async with fake_advert("0-new", port, sha, fingerprint=impostor.tls.fingerprint):
                by_mdns = FederatedClient(client_config(state, model, data, join_token=None))
                with pytest.raises(
                    DiscoveryError, match="not the pinned .*re-enroll with its new join code"
                ):
                    await by_mdns.run_async()
            # ...or it copies the pinned fingerprint into its advert: the handshake tells.
            async with fake_advert("0-copy", port, sha, fingerprint=real_fp):
                copy = FederatedClient(client_config(state, model, data, join_token=None))
                with pytest.raises(
                    TlsPinError, match="no advertised coordinator presents the pinned certificate"
                ):
                    await copy.run_async()
        finally:
            await impostor.close()
        assert impostor.received == []
        assert impostor.secrets_seen(bearer, JOIN_TOKEN) == []
        assert json.loads((state / "token.json").read_text()) == creds  # the pin is kept
        # A refused connection is in the ledger as an attempt, but no bytes of it left.
        assert len(ClientState(state).ledger.entries()) <= entries_before + 1

        # The operator reinstalled the coordinator: a new join code re-enrolls and re-pins.
        (tmp_path / "two").mkdir()
        async with Service(coordinator_config(tmp_path / "two", model, port=port)) as fresh:
            assert fresh.tls is not None and fresh.tls.fingerprint != real_fp
            again = FederatedClient(
                client_config(state, model, data, service=fresh, max_rounds=1, final_wait_s=0.0)
            )
            await asyncio.wait_for(again.run_async(), timeout=150)
            assert (
                json.loads((state / "token.json").read_text())["tls_fingerprint"]
                == fresh.tls.fingerprint
            )

    asyncio.run(scenario())


def test_stored_pin_follows_the_coordinator_to_a_new_address(tmp_path: Path, model: Path) -> None:
    """Same certificate, new port (a DHCP change): the pin says it is the same coordinator, so
    the stored credentials are used there, without a join code."""
    data = write_data(tmp_path / "data.jsonl")
    state = tmp_path / "state"

    async def scenario() -> None:
        config = coordinator_config(tmp_path, model, strategy=FedBuff(buffer_size=1))
        async with Service(config) as service:
            first = FederatedClient(
                client_config(state, model, data, service=service, max_rounds=1, final_wait_s=0.0)
            )
            summary = await asyncio.wait_for(first.run_async(), timeout=150)
        async with Service(config) as moved:  # the same database and certificate, another port
            assert moved.url != service.url
            again = FederatedClient(
                client_config(
                    state,
                    model,
                    data,
                    coordinator_url=moved.url,
                    join_token=None,
                    max_rounds=1,
                    final_wait_s=0.0,
                )
            )
            resumed = await asyncio.wait_for(again.run_async(), timeout=60)
            assert resumed.client_id == summary.client_id and resumed.reason == "max_rounds"
            assert moved.coordinator.storage.count_clients() == 1  # no second enrollment
        assert json.loads((state / "token.json").read_text())["coordinator"] == moved.url

    asyncio.run(scenario())


def test_https_without_any_pin_is_refused(tmp_path: Path, model: Path) -> None:
    data = write_data(tmp_path / "data.jsonl")

    async def scenario() -> None:
        async with Service(coordinator_config(tmp_path, model)) as service:
            client = FederatedClient(
                client_config(
                    tmp_path / "s", model, data, coordinator_url=service.url, insecure=True
                )
            )
            with pytest.raises(InsecureError, match="--join-code"):
                await client.run_async()
            assert service.coordinator.storage.count_clients() == 0

    asyncio.run(scenario())


def test_a_copycat_advert_that_answers_first_cannot_block_the_choice(
    tmp_path: Path, model: Path
) -> None:
    """The copycat (the real fingerprint in its TXT record, its own certificate) is on mDNS
    before the real coordinator's advert appears: the first browse ends at the copycat, its
    handshake fails, and the second browse finds the real coordinator."""
    data = write_data(tmp_path / "data.jsonl")
    sha = model_sha256(model)

    async def scenario() -> None:
        config = coordinator_config(tmp_path, model, strategy=FedBuff(buffer_size=1))
        copycat = await Impostor(tls_dir=tmp_path / "copycat").start()
        try:
            async with Service(config) as service:  # mdns off: its advert comes late, below
                assert service.tls is not None
                real_fp = service.tls.fingerprint

                async def advertise_late() -> None:
                    await asyncio.sleep(1.0)
                    async with fake_advert("real-late", service.port, sha, fingerprint=real_fp):
                        await asyncio.sleep(30)

                async with fake_advert("0-copycat", copycat.port, sha, fingerprint=real_fp):
                    late = asyncio.create_task(advertise_late())
                    client = FederatedClient(
                        client_config(
                            tmp_path / "state", model, data, join_code=join_code(service),
                            discovery_timeout_s=4.0, max_rounds=1, final_wait_s=0.0,
                        )
                    )  # fmt: skip
                    try:
                        summary = await asyncio.wait_for(client.run_async(), timeout=150)
                    finally:
                        late.cancel()
                assert summary.coordinator == service.url
        finally:
            await copycat.close()
        assert copycat.received == []

    asyncio.run(scenario())
