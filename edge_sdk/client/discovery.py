"""Find a coordinator on the LAN by mDNS/DNS-SD (`_fedlm._tcp.local.`) and explain the choice.

A coordinator's TXT record (see `coordinator.advertise`) carries `proto` (wire protocol
version), `model` (base model sha256), `mname` (its name, display only), `task`, `tls` and
`fp` (certificate fingerprint). Nothing in an advert is authenticated, so an advert only says
*where* a coordinator might be; *which* coordinator it is, is decided by the certificate pin
(from the join code, `--tls-fingerprint`, or stored at enrollment) on the live TLS connection.

The decision (`evaluate_offers`, pure) in order:

1. An offer is usable only when its protocol version is one this client speaks, its model is
   the local base model, it has an address and a port, and its transport fits what the client
   knows: with a pin, it serves TLS and advertises exactly the pinned fingerprint (any other
   offer cannot be the pinned coordinator); without a pin, it serves plain HTTP and the client
   allows that (`insecure`). A malformed `fp` is a reason to ignore the offer, never a crash.
   Everything else is ignored with a reason, logged and kept in the report.
2. `name` (`--coordinator-name`) keeps only offers with that mDNS instance name. The TXT `task`
   field is not matched: the advertiser writes it freely.
3. With a pin, every usable offer is a candidate, in a fixed order (addresses on the browsing
   interfaces first, then by address, port and name). The order only says which is tried
   first: the client checks each candidate's certificate before it sends anything and skips
   one that does not match (and, when none matches, browses once more for the whole timeout),
   so a forged advert can neither win nor block the choice.
4. Without a pin (plain HTTP, `--insecure`), nothing tells two offers apart but names their
   advertisers chose, so the client takes an offer only when it is the only usable one, and
   otherwise asks for `--coordinator-name` or `--coordinator URL`.

`discover` browses and then decides.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from edge_sdk.wire import SUPPORTED_VERSIONS

log = logging.getLogger(__name__)

SERVICE_TYPE = "_fedlm._tcp.local."
_INFO_TIMEOUT_MS = 1500
_HEX = frozenset("0123456789abcdef")


def _printable(text: str, limit: int = 64) -> str:
    """An advertiser-chosen string made safe for one log line (no newlines or escapes)."""
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


@dataclass(frozen=True)
class Offer:
    """One advertised coordinator, as seen on mDNS (every field is the advertiser's claim)."""

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
    def model_name(self) -> str:
        """The model's name as the advertiser gave it (display only)."""
        return _printable(self.properties.get("mname", ""))

    @property
    def task_id(self) -> str:
        return self.properties.get("task", "")

    @property
    def tls(self) -> bool:
        return self.properties.get("tls") == "1"

    @property
    def tls_fingerprint(self) -> str | None:
        """The advertised fingerprint, normalized; None when absent or malformed (a hint only)."""
        fp = self.properties.get("fp", "").replace(":", "").lower()
        return fp if len(fp) == 64 and set(fp) <= _HEX else None

    @property
    def url(self) -> str:
        """Base URL of the API (the `/v1/...` paths are appended by the transport)."""
        if not self.addresses:
            raise ValueError(f"{_printable(self.name)}: the advert has no IPv4 address")
        return f"{'https' if self.tls else 'http'}://{self.addresses[0]}:{self.port}"

    def describe(self) -> str:
        where = f"{self.addresses[0]}:{self.port}" if self.addresses else f"?:{self.port}"
        model = self.model_name or f"{self.model_sha256[:12] or '?'}…"
        return (
            f"{_printable(self.instance)} at {where} ({'https' if self.tls else 'http'}, "
            f"task {_printable(self.task_id) or '?'}, model {model})"
        )


@dataclass
class DiscoveryReport:
    """What was found, what was ignored and why, and the choice."""

    offers: list[Offer]
    accepted: list[Offer]
    """Usable offers in the deterministic order; with a pin, the candidates to verify in turn."""
    ignored: list[tuple[Offer, str]]
    chosen: Offer | None
    """The first candidate (with a pin), or the only usable offer (without); None: no choice."""
    wanted_name: str | None = None
    pin: str | None = None
    """The certificate pin the choice was made for (None: plain HTTP, `insecure`)."""
    why_none: str = ""
    """When `chosen` is None: why, and what to do."""

    def explain(self) -> list[str]:
        """One line per offer and one for the outcome, for logs and the CLI."""
        lines = [f"found {len(self.offers)} coordinator(s) on mDNS"]
        lines += [f"  ignored {offer.describe()}: {why}" for offer, why in self.ignored]
        lines += [f"  usable  {offer.describe()}" for offer in self.accepted]
        if self.chosen is not None:
            how = (
                "its certificate is checked against the pin "
                f"{self.pin[:16]}… before anything is sent"
                if self.pin
                else "the only usable offer; plain HTTP (--insecure): not authenticated"
            )
            lines.append(f"chose {_printable(self.chosen.instance)} ({self.chosen.url}): {how}")
        else:
            lines.append(self.why_none or "no usable coordinator")
        return lines


def _why_unusable(
    offer: Offer,
    model_sha256: str,
    versions: frozenset[int],
    pin: str | None,
    insecure: bool,
    local_model_name: str,
) -> str | None:
    if offer.protocol_version is None:
        proto = _printable(offer.properties.get("proto", ""))
        return f"no protocol version in its TXT record ({proto!r})"
    if offer.protocol_version not in versions:
        return f"protocol version {offer.protocol_version}, this client speaks {sorted(versions)}"
    if offer.model_sha256 != model_sha256:
        theirs = f"{offer.model_name!r} " if offer.model_name else ""
        ours = f"{local_model_name!r} " if local_model_name else ""
        return (
            f"trains model {theirs}({offer.model_sha256[:16] or 'none'}…), the local model is "
            f"{ours}({model_sha256[:16]}…)"
        )
    if not offer.addresses or not 0 < offer.port < 65536:
        return "no reachable IPv4 address or port in the advert"
    if "fp" in offer.properties and offer.tls_fingerprint is None:
        shown = _printable(offer.properties["fp"], 20)
        return f"malformed certificate fingerprint in its TXT record ({shown!r})"
    if pin is not None:
        if not offer.tls:
            return (
                "serves plain HTTP; the pinned coordinator serves TLS "
                "(a fake, or another coordinator)"
            )
        if offer.tls_fingerprint is None:
            return "serves TLS without advertising a certificate fingerprint"
        if offer.tls_fingerprint != pin:
            return (
                f"advertises certificate {offer.tls_fingerprint[:16]}…, not the pinned "
                f"{pin[:16]}… (another coordinator, a fake, or a new certificate: then "
                "re-enroll with its new join code)"
            )
        return None
    if offer.tls:
        return "serves TLS, but no certificate pin is known: give its join code (--join-code)"
    if not insecure:
        return "serves plain HTTP, which needs --insecure on both sides"
    return None


def _matches(offer: Offer, name: str) -> bool:
    """`--coordinator-name`: the mDNS instance name only (never the advertiser's TXT `task`)."""
    return name in (offer.instance, offer.name, offer.name.rstrip("."))


def _order_key(interfaces: Sequence[str] | None) -> Callable[[Offer], tuple[int, int, int, str]]:
    def key(offer: Offer) -> tuple[int, int, int, str]:
        first = offer.addresses[0] if offer.addresses else "255.255.255.255"
        local = 0 if interfaces and first in interfaces else 1
        return (local, int(ipaddress.ip_address(first)), offer.port, offer.name)

    return key


def evaluate_offers(
    offers: Iterable[Offer],
    model_sha256: str,
    *,
    name: str | None = None,
    pin: str | None = None,
    insecure: bool = False,
    local_model_name: str = "",
    interfaces: Sequence[str] | None = None,
    protocol_versions: frozenset[int] = SUPPORTED_VERSIONS,
) -> DiscoveryReport:
    """Filter offers (protocol, model, transport, pin, name), order them, and choose.

    `pin`: the certificate SHA-256 the coordinator must present (64 lowercase hex digits).
    `insecure`: without a pin, plain-HTTP offers are usable (never with a pin).
    """
    seen = sorted(offers, key=_order_key(interfaces))
    accepted: list[Offer] = []
    ignored: list[tuple[Offer, str]] = []
    for offer in seen:
        why = _why_unusable(offer, model_sha256, protocol_versions, pin, insecure, local_model_name)
        if why is None and name is not None and not _matches(offer, name):
            why = f"not the instance named {name!r}"
        if why is None:
            accepted.append(offer)
        else:
            ignored.append((offer, why))
            log.info("ignoring coordinator %s: %s", offer.describe(), why)
    chosen: Offer | None = None
    why_none = ""
    if not accepted:
        named = f" named {name!r}" if name is not None else ""
        why_none = f"no usable coordinator{named}"
    elif pin is not None or len(accepted) == 1:
        chosen = accepted[0]
    else:
        names = ", ".join(_printable(o.instance) for o in accepted)
        why_none = (
            f"{len(accepted)} usable plain-HTTP coordinators ({names}) and nothing to tell them "
            "apart but the names their advertisers chose: pick one with --coordinator-name NAME "
            "or --coordinator URL (or use its join code)"
        )
    return DiscoveryReport(seen, accepted, ignored, chosen, name, pin, why_none)


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
    stop_if: Callable[[Offer], bool] | None = None,
) -> list[Offer]:
    """Every `_fedlm._tcp` advert answered within `timeout_s` seconds.

    `interfaces`: IPv4 addresses to browse on (e.g. ["127.0.0.1"] in tests); None = all.
    `stop_when`, `stop_if`: return as soon as an offer resolves that has this instance name (or
    full name) and for which `stop_if` is true (either may be None; both None: browse on).
    """
    if not timeout_s > 0:
        raise ValueError(f"`timeout_s` should be > 0, got {timeout_s!r}")
    from zeroconf import InterfaceChoice

    azc = AsyncZeroconf(
        interfaces=list(interfaces) if interfaces else InterfaceChoice.All,
        ip_version=IPVersion.V4Only,
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
        try:
            addresses = _order_addresses(info.parsed_addresses(IPVersion.V4Only), interfaces)
        except ValueError:  # an advertiser's garbage: no usable address (ignored with a reason)
            addresses = ()
        offer = Offer(name=name, addresses=addresses, port=int(info.port or 0), properties=props)
        offers[name] = offer
        log.debug("mDNS: %s", offer.describe())
        if stop_when is None and stop_if is None:
            return
        if (stop_when is None or _matches(offer, stop_when)) and (
            stop_if is None or stop_if(offer)
        ):
            found_wanted.set()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
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
    pin: str | None = None,
    insecure: bool = False,
    local_model_name: str = "",
    timeout_s: float = 3.0,
    interfaces: Sequence[str] | None = None,
    protocol_versions: frozenset[int] = SUPPORTED_VERSIONS,
    early_stop: bool = True,
) -> DiscoveryReport:
    """Browse for `timeout_s` seconds and choose a coordinator for `model_sha256`.

    `early_stop`: end the browse at the first advert that has `name` (if given) and advertises
    `pin` (if given); False browses for the whole `timeout_s`."""

    def pinned(offer: Offer) -> bool:
        return offer.tls and offer.tls_fingerprint == pin

    # With a pin, browsing ends at the first advert that can be the pinned coordinator (adverts
    # still resolving get a short moment more); its certificate is checked before use.
    if early_stop:
        offers = await browse(
            timeout_s, interfaces, stop_when=name, stop_if=pinned if pin else None
        )
    else:
        offers = await browse(timeout_s, interfaces)
    report = evaluate_offers(
        offers,
        model_sha256,
        name=name,
        pin=pin,
        insecure=insecure,
        local_model_name=local_model_name,
        interfaces=interfaces,
        protocol_versions=protocol_versions,
    )
    for line in report.explain():
        log.info("%s", line)
    return report
