"""A real zeroconf browser on loopback finds the coordinator's advert and its TXT record."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from coordinator import http_api
from coordinator.advertise import SERVICE_TYPE, Advertiser, txt_properties
from coordinator.server import Service
from edge_sdk.wire import PROTOCOL_VERSION
from tests.coordinator.helpers import SHA, make_config

pytestmark = pytest.mark.timeout(120)


async def _browse(
    events: list[tuple[str, ServiceStateChange]],
) -> tuple[AsyncZeroconf, AsyncServiceBrowser]:
    zc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)

    def handler(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        events.append((name, state_change))

    browser = AsyncServiceBrowser(zc.zeroconf, [SERVICE_TYPE], handlers=[handler])
    return zc, browser


async def _until(predicate, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_browser_finds_txt_records_and_sees_the_goodbye(tmp_path: Path) -> None:
    config = make_config(tmp_path, mdns=True, mdns_interfaces=("127.0.0.1",))

    async def scenario() -> None:
        events: list[tuple[str, ServiceStateChange]] = []
        zc, browser = await _browse(events)
        try:
            async with Service(config) as service:
                await _until(lambda: any(s is ServiceStateChange.Added for _, s in events))
                found = next(n for n, s in events if s is ServiceStateChange.Added)
                assert found == service.app[http_api.RUNTIME].advertised_name
                info = AsyncServiceInfo(SERVICE_TYPE, found)
                assert await info.async_request(zc.zeroconf, 3000)
                props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
                assert props["proto"] == str(PROTOCOL_VERSION)
                assert props["model"] == SHA
                assert props["task"] == service.coordinator.task_id
                assert props["auth"] == "1" and props["tls"] == "0" and "fp" not in props
                assert info.port == service.port
                assert "127.0.0.1" in info.parsed_addresses()
            await _until(lambda: any(s is ServiceStateChange.Removed for _, s in events))
        finally:
            await browser.async_cancel()
            await zc.async_close()

    asyncio.run(scenario())


def test_txt_carries_the_tls_fingerprint_and_close_is_idempotent() -> None:
    props = txt_properties(1, SHA, "task-1", True, "f" * 64)
    assert props["tls"] == "1" and props["fp"] == "f" * 64
    assert all(len(k) + len(v) < 255 for k, v in props.items())  # RFC 6763 string limit

    async def scenario() -> None:
        advertiser = Advertiser(
            "fedlm-test-close", 9, props, ["127.0.0.1"], interfaces=["127.0.0.1"]
        )
        async with advertiser:
            assert advertiser.name.endswith(SERVICE_TYPE)
        await advertiser.close()  # a second close is a no-op

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="addresses"):
        Advertiser("x", 9, props, [])


def test_a_chosen_instance_name_is_advertised_and_found_without_waiting_out_the_browse(
    tmp_path: Path,
) -> None:
    from edge_sdk.client.discovery import discover

    config = make_config(
        tmp_path, mdns=True, mdns_interfaces=("127.0.0.1",), mdns_name="kitchen-coordinator"
    )

    async def scenario() -> None:
        async with Service(config) as service:
            assert service.app[http_api.RUNTIME].advertised_name.startswith("kitchen-coordinator.")
            loop = asyncio.get_running_loop()
            start = loop.time()
            report = await discover(
                SHA,
                name="kitchen-coordinator",
                insecure=True,  # make_config serves plain HTTP
                timeout_s=60.0,
                interfaces=["127.0.0.1"],
            )
            # The named browse returns once the advert resolves, not after its 60 s budget.
            assert loop.time() - start < 30.0
            assert report.chosen is not None and report.chosen.port == service.port

    asyncio.run(scenario())


@pytest.mark.parametrize("bad", ["", "has space", "dot.ted", "x" * 64])
def test_instance_names_are_validated(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="`mdns_name`"):
        make_config(tmp_path, mdns_name=bad)
