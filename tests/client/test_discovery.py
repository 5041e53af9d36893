"""Choosing a coordinator: the pure decision, and real mDNS adverts on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from coordinator.service import Service
from edge_sdk.client import Offer, discover, evaluate_offers
from edge_sdk.models.identity import model_sha256
from tests.client.helpers import coordinator_config
from tests.tiny_models import write_tiny_gguf

pytestmark = pytest.mark.timeout(120)

SHA = "ab" * 32


def _offer(name: str, **props: str) -> Offer:
    base = {"proto": "1", "model": SHA, "task": f"task-{name}", "tls": "0"}
    base.update(props)
    return Offer(f"{name}._fedlm._tcp.local.", ("127.0.0.1",), 8750, base)


def test_offers_are_filtered_with_reasons_and_chosen_deterministically(caplog: pytest.LogCaptureFixture) -> None:
    offers = [
        _offer("zeta"),
        _offer("alpha"),
        _offer("old", proto="0"),
        _offer("other", model="cd" * 32),
        _offer("tls-no-pin", tls="1"),
        _offer("noproto", proto="x"),
    ]
    with caplog.at_level(logging.INFO, logger="edge_sdk.client.discovery"):
        report = evaluate_offers(offers, SHA)
    assert [o.instance for o in report.accepted] == ["alpha", "zeta"]
    assert report.chosen is not None and report.chosen.instance == "alpha"
    # Same answer whatever order the adverts arrived in.
    assert evaluate_offers(list(reversed(offers)), SHA).chosen == report.chosen
    why = {o.instance: reason for o, reason in report.ignored}
    assert "protocol version 0" in why["old"]
    assert "trains model cdcdcdcd" in why["other"]
    assert "fingerprint" in why["tls-no-pin"]
    assert "no protocol version" in why["noproto"]
    assert "ignoring coordinator other" in caplog.text
    lines = report.explain()
    assert lines[0] == "found 6 coordinator(s) on mDNS" and lines[-1].startswith("chose alpha")

    by_name = evaluate_offers(offers, SHA, name="zeta")
    assert by_name.chosen is not None and by_name.chosen.instance == "zeta"
    by_task = evaluate_offers(offers, SHA, name="task-zeta")
    assert by_task.chosen == by_name.chosen
    missing = evaluate_offers(offers, SHA, name="other")  # exists, but unusable
    assert missing.chosen is None and "no usable coordinator is named 'other'" in missing.explain()[-1]


def test_offer_url_uses_tls_and_first_address() -> None:
    offer = _offer("a", tls="1", fp="ef" * 32)
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
        async with Service(coordinator_config(tmp_path / "a", ours, mdns=True)) as good, Service(
            coordinator_config(tmp_path / "b", theirs, mdns=True)
        ) as wrong:
            report = await discover(sha, timeout_s=2.0, interfaces=["127.0.0.1"])
            assert report.chosen is not None
            assert report.chosen.url == good.url
            assert report.chosen.task_id == good.coordinator.task_id
            ignored = {o.port: why for o, why in report.ignored}
            assert "trains model" in ignored[wrong.port]
            # Choosing by name returns as soon as that advert resolves.
            named = await discover(sha, name=good.coordinator.task_id, timeout_s=5.0, interfaces=["127.0.0.1"])
            assert named.chosen is not None and named.chosen.port == good.port
            other = await discover(model_sha256(theirs), timeout_s=1.5, interfaces=["127.0.0.1"])
            assert other.chosen is not None and other.chosen.port == wrong.port

    asyncio.run(scenario())
