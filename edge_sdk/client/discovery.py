"""Find a coordinator on the LAN by mDNS/DNS-SD (`_fedlm._tcp.local.`) and explain the choice.

A coordinator's TXT record (see `coordinator.advertise`) carries `proto` (wire protocol
version), `model` (base model sha256), `task`, `tls` and `fp` (certificate fingerprint). An
offer is usable only when its protocol version is one this client speaks and its model is the
local base model; everything else is ignored with a reason, logged and kept in the report.
Among usable offers the choice is deterministic (lowest service name) unless the user names
one. `evaluate_offers` is the pure decision; `discover` browses and then decides.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from edge_sdk.wire import SUPPORTED_VERSIONS

log = logging.getLogger(__name__)

SERVICE_TYPE = "_fedlm._tcp.local."
_INFO_TIMEOUT_MS = 1500


@dataclass(frozen=True)
class Offer:
    """One advertised coordinator, as seen on mDNS."""

    name: str
    """Full service name, e.g. `fedlm-1a2b3c4d-9f8e7d._fedlm._tcp.local.`."""
    addresses: tuple[str, ...]
    """IPv4 addresses of the advert, in the order chosen for connecting."""
    port: int
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def instance(self) -> str:
        """The name without the service type, e.g. `fedlm-1a2b3c4d-9f8e7d`."""
        return self.name.removesuffix("." + SERVICE_TYPE)

    @property
    def protocol_version(self) -> int | None:
        try:
            return int(self.properties.get("proto", ""))
        except ValueError:
            return None

    @property
    def model_sha256(self) -> str:
        return self.properties.get("model", "")

    @property
    def task_id(self) -> str:
        return self.properties.get("task", "")

    @property
    def tls(self) -> bool:
        return self.properties.get("tls") == "1"

    @property
    def tls_fingerprint(self) -> str | None:
        return self.properties.get("fp") or None

    @property
    def url(self) -> str:
        """Base URL of the API (the `/v1/...` paths are appended by the transport)."""
        if not self.addresses:
            raise ValueError(f"{self.name}: the advert has no IPv4 address")
        return f"{'https' if self.tls else 'http'}://{self.addresses[0]}:{self.port}"

    def describe(self) -> str:
        where = f"{self.addresses[0]}:{self.port}" if self.addresses else f"?:{self.port}"
        return f"{self.instance} at {where} (task {self.task_id or '?'}, model {self.model_sha256[:12] or '?'}…)"


@dataclass
class DiscoveryReport:
    """What was found, what was ignored and why, and the choice."""

    offers: list[Offer]
    accepted: list[Offer]
    """Usable offers in the deterministic order (the first is chosen unless a name is given)."""
    ignored: list[tuple[Offer, str]]
    chosen: Offer | None
    wanted_name: str | None = None

    def explain(self) -> list[str]:
        """One line per offer and one for the outcome, for logs and the CLI."""
        lines = [f"found {len(self.offers)} coordinator(s) on mDNS"]
        lines += [f"  ignored {offer.describe()}: {why}" for offer, why in self.ignored]
        lines += [f"  usable  {offer.describe()}" for offer in self.accepted]
        if self.chosen is not None:
            lines.append(f"chose {self.chosen.instance} ({self.chosen.url})")
        elif self.wanted_name and self.accepted:
            lines.append(f"no usable coordinator is named {self.wanted_name!r}")
        else:
            lines.append("no usable coordinator")
        return lines


def _why_unusable(offer: Offer, model_sha256: str, versions: frozenset[int]) -> str | None:
    if offer.protocol_version is None:
        return f"no protocol version in its TXT record ({offer.properties.get('proto')!r})"
    if offer.protocol_version not in versions:
        return f"protocol version {offer.protocol_version}, this client speaks {sorted(versions)}"
    if offer.model_sha256 != model_sha256:
        return f"trains model {offer.model_sha256[:16] or '(none)'}…, the local model is {model_sha256[:16]}…"
    if not offer.addresses or not 0 < offer.port < 65536:
        return "no reachable IPv4 address or port in the advert"
    if offer.tls and not offer.tls_fingerprint:
        return "serves TLS without advertising a certificate fingerprint (nothing to pin)"
    return None


def _matches(offer: Offer, name: str) -> bool:
    return name in (offer.instance, offer.name, offer.name.rstrip("."), offer.task_id)


def evaluate_offers(
    offers: Iterable[Offer],
    model_sha256: str,
    *,
    name: str | None = None,
    protocol_versions: frozenset[int] = SUPPORTED_VERSIONS,
) -> DiscoveryReport:
    """Filter offers by protocol and model, order them, and pick one (by `name` if given)."""
    seen = sorted(offers, key=lambda o: o.name)
    accepted: list[Offer] = []
    ignored: list[tuple[Offer, str]] = []
    for offer in seen:
        why = _why_unusable(offer, model_sha256, protocol_versions)
        if why is None:
            accepted.append(offer)
        else:
            ignored.append((offer, why))
            log.info("ignoring coordinator %s: %s", offer.describe(), why)
    if name is not None:
        chosen = next((o for o in accepted if _matches(o, name)), None)
    else:
        chosen = accepted[0] if accepted else None
    if chosen is not None and len(accepted) > 1:
        log.info("%d usable coordinators; chose %s", len(accepted), chosen.instance)
    return DiscoveryReport(seen, accepted, ignored, chosen, name)


def _order_addresses(addresses: Iterable[str], interfaces: Sequence[str] | None) -> tuple[str, ...]:
    """Addresses on the browsing interfaces first, then the rest; link-local last."""
    unique = sorted(set(addresses))

    def rank(a: str) -> tuple[int, str]:
        if interfaces and a in interfaces:
            return (0, a)
        return (2 if ipaddress.ip_address(a).is_link_local else 1, a)

    return tuple(sorted(unique, key=rank))


async def browse(
    timeout_s: float = 3.0,
    interfaces: Sequence[str] | None = None,
    *,
    stop_when: str | None = None,
) -> list[Offer]:
    """Every `_fedlm._tcp` advert answered within `timeout_s` seconds.

    `interfaces`: IPv4 addresses to browse on (e.g. ["127.0.0.1"] in tests); None = all.
    `stop_when`: return as soon as an offer with this instance name, full name or task id resolves.
    """
    if not timeout_s > 0:
        raise ValueError(f"`timeout_s` should be > 0, got {timeout_s!r}")
    from zeroconf import InterfaceChoice

    azc = AsyncZeroconf(
        interfaces=list(interfaces) if interfaces else InterfaceChoice.All, ip_version=IPVersion.V4Only
    )
    offers: dict[str, Offer] = {}
    pending: dict[str, asyncio.Task[None]] = {}
    found_wanted = asyncio.Event()

    async def resolve(name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(azc.zeroconf, _INFO_TIMEOUT_MS):
            log.debug("mDNS: %s did not answer its SRV/TXT query", name)
            return
        props = {
            k.decode("utf-8", "replace"): (v or b"").decode("utf-8", "replace")
            for k, v in (info.properties or {}).items()
        }
        offer = Offer(
            name=name,
            addresses=_order_addresses(info.parsed_addresses(IPVersion.V4Only), interfaces),
            port=int(info.port or 0),
            properties=props,
        )
        offers[name] = offer
        log.debug("mDNS: %s", offer.describe())
        if stop_when is not None and _matches(offer, stop_when):
            found_wanted.set()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            offers.pop(name, None)
            return
        task = pending.get(name)
        if task is None or task.done():
            pending[name] = asyncio.ensure_future(resolve(name))

    browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[on_change])
    try:
        try:
            await asyncio.wait_for(found_wanted.wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            pass
        waiting = [t for t in pending.values() if not t.done()]
        if waiting:  # answers already asked for get one more short moment
            await asyncio.wait(waiting, timeout=_INFO_TIMEOUT_MS / 1000)
    finally:
        for task in pending.values():
            task.cancel()
        await browser.async_cancel()
        await azc.async_close()
    return list(offers.values())


async def discover(
    model_sha256: str,
    *,
    name: str | None = None,
    timeout_s: float = 3.0,
    interfaces: Sequence[str] | None = None,
    protocol_versions: frozenset[int] = SUPPORTED_VERSIONS,
) -> DiscoveryReport:
    """Browse for `timeout_s` seconds and choose a coordinator for `model_sha256`."""
    offers = await browse(timeout_s, interfaces, stop_when=name)
    report = evaluate_offers(offers, model_sha256, name=name, protocol_versions=protocol_versions)
    for line in report.explain():
        log.info("%s", line)
    return report
