"""Choosing a coordinator: the pure decision, and real mDNS adverts on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest

from coordinator.server import Service
from edge_sdk.client import Offer, discover, evaluate_offers
from edge_sdk.models.identity import model_sha256
from tests.client.helpers import coordinator_config
from tests.client.impostor import fake_advert
from tests.tiny_models import write_tiny_gguf

pytestmark = pytest.mark.timeout(120)

SHA = "ab" * 32
PIN = "12" * 32
OTHER_FP = "34" * 32


def _offer(name: str, address: str = "127.0.0.1", port: int = 8750, **props: str) -> Offer:
    base = {"proto": "1", "model": SHA, "task": f"task-{name}", "tls": "0"}
    base.update(props)
    return Offer(f"{name}._fedlm._tcp.local.", (address,), port, base)


def test_offers_are_filtered_with_reasons(caplog: pytest.LogCaptureFixture) -> None:
    offers = [
        _offer("zeta"),
        _offer("old", proto="0"),
        _offer("other", model="cd" * 32, mname="gemma3-270m"),
        _offer("tls-no-pin", tls="1", fp=OTHER_FP),
        _offer("noproto", proto="x"),
        _offer("badfp", tls="1", fp="not-hex\nFAKE LOG LINE"),
    ]
    with caplog.at_level(logging.INFO, logger="edge_sdk.client.discovery"):
        report = evaluate_offers(offers, SHA, insecure=True, local_model_name="smollm2-135m")
    assert [o.instance for o in report.accepted] == ["zeta"]
    assert report.chosen is not None and report.chosen.instance == "zeta"
    why = {o.instance: reason for o, reason in report.ignored}
    assert "protocol version 0" in why["old"]
    # The model mismatch names both models, not only hashes.
    assert "'gemma3-270m' (cdcdcdcd" in why["other"] and "'smollm2-135m' (abababab" in why["other"]
    assert "no certificate pin is known" in why["tls-no-pin"] and "--join-code" in why["tls-no-pin"]
    assert "no protocol version" in why["noproto"]
    # A malformed fp is a reason, not a crash (it used to raise ValueError in the transport),
    # and the advertiser's newline does not reach the log.
    assert "malformed certificate fingerprint" in why["badfp"]
    assert "\nFAKE" not in caplog.text and "ignoring coordinator other" in caplog.text
    lines = report.explain()
    assert lines[0] == "found 6 coordinator(s) on mDNS" and lines[-1].startswith("chose zeta")
    assert "not authenticated" in lines[-1]


def test_plain_http_offers_need_insecure() -> None:
    report = evaluate_offers([_offer("a")], SHA)
    assert report.chosen is None
    assert "needs --insecure on both sides" in {o.instance: w for o, w in report.ignored}["a"]


def test_with_a_pin_only_offers_advertising_it_are_candidates() -> None:
    offers = [
        _offer("0-evil"),  # plain HTTP, sorts first by name
        _offer("0-evil-tls", tls="1", fp=OTHER_FP),  # TLS with another certificate
        _offer("1-real", address="127.0.0.2", tls="1", fp=PIN),
    ]
    report = evaluate_offers(offers, SHA, pin=PIN, insecure=True)
    assert [o.instance for o in report.accepted] == ["1-real"]
    assert report.chosen is not None and report.chosen.instance == "1-real"
    why = {o.instance: reason for o, reason in report.ignored}
    assert "serves plain HTTP; the pinned coordinator serves TLS" in why["0-evil"]
    assert (
        f"advertises certificate {OTHER_FP[:16]}…, not the pinned {PIN[:16]}…" in why["0-evil-tls"]
    )
    assert "re-enroll with its new join code" in why["0-evil-tls"]
    assert "checked against the pin" in report.explain()[-1]


def test_order_is_deterministic_and_not_by_advertised_name() -> None:
    # Three offers that all advertise the pin (one may be a copycat: the live handshake decides).
    offers = [
        _offer("aaa-first-by-name", address="192.168.1.9", tls="1", fp=PIN),
        _offer("zzz", address="127.0.0.1", port=9000, tls="1", fp=PIN),
        _offer("mmm", address="127.0.0.1", port=8000, tls="1", fp=PIN),
    ]
    expected = ["mmm", "zzz", "aaa-first-by-name"]  # browsing interface, then address, port
    for seed in range(5):
        shuffled = offers[:]
        random.Random(seed).shuffle(shuffled)
        report = evaluate_offers(shuffled, SHA, pin=PIN, interfaces=["127.0.0.1"])
        assert [o.instance for o in report.accepted] == expected
    # Renaming an offer to sort first does not move it.
    renamed = [_offer("0000", address="192.168.1.9", tls="1", fp=PIN), *offers[1:]]
    report = evaluate_offers(renamed, SHA, pin=PIN, interfaces=["127.0.0.1"])
    assert [o.instance for o in report.accepted] == ["mmm", "zzz", "0000"]


def test_without_a_pin_two_offers_are_ambiguous_and_none_is_chosen() -> None:
    offers = [_offer("0-evil"), _offer("kitchen", task="kitchen")]
    report = evaluate_offers(offers, SHA, insecure=True)
    assert report.chosen is None and len(report.accepted) == 2
    assert "--coordinator-name" in report.explain()[-1]
    # --coordinator-name matches the instance name...
    named = evaluate_offers(offers, SHA, insecure=True, name="kitchen")
    assert named.chosen is not None and named.chosen.instance == "kitchen"
    # ...and never the TXT `task` field, which the advertiser writes freely.
    spoof = [_offer("0-evil", task="kitchen"), _offer("real-one")]
    report = evaluate_offers(spoof, SHA, insecure=True, name="kitchen")
    assert report.chosen is None and "no usable coordinator named 'kitchen'" in report.explain()[-1]


def test_offer_url_uses_tls_and_first_address() -> None:
    offer = _offer("a", tls="1", fp="EF:" * 31 + "EF")
    assert offer.url == "https://127.0.0.1:8750" and offer.tls_fingerprint == "ef" * 32
    assert Offer("x._fedlm._tcp.local.", (), 1, {}).protocol_version is None
    with pytest.raises(ValueError, match="no IPv4 address"):
        _ = Offer("x._fedlm._tcp.local.", (), 1, {}).url


def test_mdns_ignores_a_wrong_model_coordinator_and_finds_ours(tmp_path: Path) -> None:
    ours = write_tiny_gguf(tmp_path / "ours.gguf", seed=0)
    theirs = write_tiny_gguf(tmp_path / "theirs.gguf", seed=1)
    sha = model_sha256(ours)
    assert sha != model_sha256(theirs)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    async def scenario() -> None:
        async with (
            Service(coordinator_config(tmp_path / "a", ours, mdns=True, mdns_name="ours")) as good,
            Service(
                coordinator_config(tmp_path / "b", theirs, mdns=True, model_name="theirs.gguf")
            ) as wrong,
        ):
            assert good.tls is not None and wrong.tls is not None
            pin = good.tls.fingerprint
            report = await discover(sha, pin=pin, timeout_s=2.0, interfaces=["127.0.0.1"])
            assert report.chosen is not None
            assert report.chosen.url == good.url
            assert report.chosen.task_id == good.coordinator.task_id
            ignored = {o.port: why for o, why in report.ignored}
            assert "trains model 'theirs.gguf'" in ignored[wrong.port]
            # Choosing by name returns as soon as that advert resolves.
            named = await discover(
                sha, name="ours", pin=pin, timeout_s=5.0, interfaces=["127.0.0.1"]
            )
            assert named.chosen is not None and named.chosen.port == good.port
            other = await discover(
                model_sha256(theirs),
                pin=wrong.tls.fingerprint,
                timeout_s=1.5,
                interfaces=["127.0.0.1"],
            )
            assert other.chosen is not None and other.chosen.port == wrong.port

    asyncio.run(scenario())


def test_a_bad_fp_in_a_real_advert_is_ignored_not_fatal(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with fake_advert("0-badfp", 9, SHA, extra={"tls": "1", "fp": "zz" * 40}):
            report = await discover(SHA, pin=PIN, timeout_s=1.5, interfaces=["127.0.0.1"])
        assert report.chosen is None
        [why] = [w for o, w in report.ignored if o.instance == "0-badfp"]
        assert "malformed certificate fingerprint" in why

    asyncio.run(scenario())
