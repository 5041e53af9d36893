"""mDNS/DNS-SD advertisement of the coordinator (`_fedlm._tcp.local.`) with zeroconf's async API.

TXT record (RFC 6763, section 6; every value is a short string):

    proto   wire protocol version (edge_sdk.wire.PROTOCOL_VERSION)
    model   sha256 of the base model's GGUF file
    mname   the base model's name as the operator gave it (display only, at most 63 chars)
    task    task id
    auth    "1" when a join token is required (always, today)
    tls     "1" when the API is served over HTTPS (the default), "0" for plain HTTP
    fp      sha256 fingerprint of the TLS certificate (only with tls=1)
    path    API prefix ("/v1")

Nothing in an advert is authenticated: anyone on the LAN can send one. Devices use it only to
learn where to connect; they authenticate the coordinator by the certificate pin from the join
code (or stored at enrollment), never by `fp`, which only helps them skip adverts that cannot
be the pinned coordinator.

`Advertiser` is an async context manager; `close()` sends the goodbye packets, and closing
twice is safe.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Mapping, Sequence
from types import TracebackType

from typing_extensions import Self
from zeroconf import InterfaceChoice, IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_fedlm._tcp.local."


def txt_properties(
    protocol_version: int,
    model_sha256: str,
    task_id: str,
    auth_required: bool = True,
    tls_fingerprint: str | None = None,
    model_name: str = "",
) -> dict[str, str]:
    props = {
        "proto": str(protocol_version),
        "model": model_sha256,
        "mname": "".join(c for c in model_name if c.isprintable())[:63],
        "task": task_id,
        "auth": "1" if auth_required else "0",
        "tls": "1" if tls_fingerprint else "0",
        "path": "/v1",
    }
    if tls_fingerprint:
        props["fp"] = tls_fingerprint
    return props


def lan_addresses() -> list[str]:
    """IPv4 addresses of this host's interfaces, loopback excluded (for a 0.0.0.0 bind)."""
    import ifaddr  # a dependency of zeroconf

    out: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                address = ipaddress.ip_address(ip.ip)
                if not address.is_loopback and not address.is_link_local:
                    out.append(ip.ip)
    return sorted(set(out))


class Advertiser:
    """Registers one `_fedlm._tcp` service instance for as long as it is open."""

    def __init__(
        self,
        instance: str,
        port: int,
        properties: Mapping[str, str],
        addresses: Sequence[str],
        interfaces: Sequence[str] | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("`addresses` should name at least one IPv4 address to advertise")
        if not 0 < port < 65536:
            raise ValueError(f"`port` should be in 1..65535, got {port}")
        self.instance = instance
        self.port = port
        self.properties = dict(properties)
        self.addresses = list(addresses)
        self.interfaces = list(interfaces) if interfaces is not None else None
        self._zeroconf: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None

    @property
    def name(self) -> str:
        """The registered service name (zeroconf may have renamed it on a conflict)."""
        return self._info.name if self._info is not None else f"{self.instance}.{SERVICE_TYPE}"

    async def start(self) -> None:
        if self._zeroconf is not None:
            return
        self._zeroconf = AsyncZeroconf(
            interfaces=self.interfaces if self.interfaces is not None else InterfaceChoice.All,
            ip_version=IPVersion.V4Only,
        )
        label = "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:40] or "fedlm"
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.instance}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in self.addresses],
            port=self.port,
            properties=self.properties,
            server=f"{label}-{self.instance[-8:]}.local.",
        )
        try:
            await self._zeroconf.async_register_service(self._info, allow_name_change=True)
        except BaseException:
            await self.close()
            raise
        log.info("advertising %s on %s:%d", self._info.name, ",".join(self.addresses), self.port)

    async def close(self) -> None:
        zc, info = self._zeroconf, self._info
        self._zeroconf = None
        if zc is None:
            return
        try:
            if info is not None:
                goodbye = await zc.async_unregister_service(info)
                await goodbye  # the goodbye packets are out
        finally:
            await zc.async_close()
        log.info("stopped advertising %s", info.name if info else self.instance)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
