"""Finding the coordinator (a URL or mDNS) and the certificate pin that authenticates it.

The pin comes from the join code, else `--tls-fingerprint`, else the one stored at enrollment.
The mDNS adverts are unauthenticated: with a pin, each candidate's live certificate is checked
(a bare TLS handshake, nothing sent) before it is used.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from edge_sdk.client.config import ClientConfig
from edge_sdk.client.discovery import Offer, discover
from edge_sdk.client.errors import (
    DiscoveryError,
    InsecureError,
    JoinCodeError,
    StateError,
    TlsPinError,
)
from edge_sdk.client.joincode import JoinCode, normalize_fingerprint
from edge_sdk.client.state import ClientState
from edge_sdk.client.transport import tls_peer_fingerprint
from edge_sdk.env import JOIN_CODE_ENV, JOIN_TOKEN_ENV

# The federation loop's log lines keep the logger name they had before the loop was split.
log = logging.getLogger("edge_sdk.client.loop")


@dataclass(frozen=True)
class FoundCoordinator:
    """Where the coordinator is and how it is trusted."""

    url: str
    """Base URL, without a trailing slash."""
    pin: str | None
    """Certificate SHA-256 (hex) it must present; None for plain HTTP (`insecure`)."""
    pin_source: str
    """Where the pin came from, in words (for the log and errors); "" without a pin."""
    model_name: str
    """The model name its mDNS advert states ("" when given as a URL)."""


class CoordinatorFinder:
    """Finds the coordinator of `config` and the pin it must present (see the module doc)."""

    def __init__(self, config: ClientConfig, state: ClientState) -> None:
        self.config = config
        self.state = state

    def join_code(self) -> JoinCode | None:
        """The join code given (config, else `$FEDLM_JOIN_CODE`); None without one."""
        text = self.config.join_code or os.environ.get(JOIN_CODE_ENV)
        if not text:
            return None
        try:
            return JoinCode.decode(text)
        except JoinCodeError as exc:
            raise JoinCodeError(f"${JOIN_CODE_ENV}: {exc}") from None

    def pin(self) -> tuple[str | None, str]:
        """(the certificate pin, where it came from): join code > tls_fingerprint > stored."""
        code = self.join_code()
        if code is not None:
            return code.fingerprint, "the pin from the join code"
        if self.config.tls_fingerprint is not None:
            return self.config.tls_fingerprint, "the pin given as --tls-fingerprint"
        stored = self.state.credentials()
        if stored is not None and stored.tls_fingerprint:
            try:
                pin = normalize_fingerprint(stored.tls_fingerprint)
            except ValueError:
                raise StateError(
                    f"{self.state.token_path}: the stored pin is "
                    "damaged; enroll again with the join code"
                ) from None
            return pin, f"the pin stored at enrollment in {self.state.token_path}"
        return None, ""

    def no_pin_error(self) -> InsecureError:
        """Why no token is sent: there is nothing to tell the coordinator from an impostor."""
        if self.config.join_token or os.environ.get(JOIN_TOKEN_ENV):
            return InsecureError(
                f"a join token alone (--join-token / ${JOIN_TOKEN_ENV}) "
                "cannot tell the coordinator from an "
                "impostor on the LAN, so it is not sent: give "
                "the join code that `fedlm coordinator` prints "
                f"(--join-code or ${JOIN_CODE_ENV}), or add "
                "--tls-fingerprint HEX, or, for a plain-HTTP "
                "coordinator, --insecure"
            )
        return InsecureError(
            "not enrolled and no coordinator to trust yet: "
            "give the join code that `fedlm coordinator` "
            f"prints (--join-code or ${JOIN_CODE_ENV})"
        )

    async def find(self, sha256: str, local_model_name: str) -> FoundCoordinator:
        """The coordinator that trains the model `sha256` (`local_model_name`: its file name)."""
        cfg = self.config
        pin, source = self.pin()
        if cfg.coordinator_url is not None:
            url = cfg.coordinator_url.rstrip("/")
            if url.startswith("http://"):  # ClientConfig allows it only with `insecure`
                return FoundCoordinator(url, None, "", "")
            if pin is None:
                raise self.no_pin_error()
            return FoundCoordinator(url, pin, source, "")
        if pin is None and not cfg.insecure:
            raise self.no_pin_error()
        seen: list[str] = []
        # Two passes: the first ends at the first advert that can be ours; if none of the
        # candidates then presents the pinned certificate (a copycat advert answered first),
        # the second browses for the whole timeout and checks every candidate it finds.
        for early_stop in (True, False) if pin is not None else (True,):
            report = await discover(
                sha256,
                name=cfg.coordinator_name,
                pin=pin,
                insecure=cfg.insecure,
                local_model_name=local_model_name,
                timeout_s=cfg.discovery_timeout_s,
                interfaces=cfg.discovery_interfaces,
                early_stop=early_stop,
            )
            if report.chosen is None:
                raise DiscoveryError(
                    "; ".join(report.explain()) + " (--coordinator URL skips discovery)"
                )
            if pin is None:
                return FoundCoordinator(report.chosen.url, None, "", report.chosen.model_name)
            found = await self._verified(report.accepted, pin, seen)
            if found is not None:
                return FoundCoordinator(found.url, pin, source, found.model_name)
        assert pin is not None
        raise TlsPinError(
            f"no advertised coordinator presents the pinned certificate {pin[:16]}… ({source}): "
            + "; ".join(seen)
            + ". If the coordinator was reinstalled, re-enroll with its new join code"
        )

    async def _verified(self, offers: Sequence[Offer], pin: str, seen: list[str]) -> Offer | None:
        """The first offer whose live certificate is the pinned one (a bare TLS handshake each:
        the adverts are unauthenticated, and nothing is sent to them); the others go to `seen`."""
        for offer in offers:
            try:
                got = await tls_peer_fingerprint(offer.url, self.config.retry.connect_timeout_s)
            except (OSError, asyncio.TimeoutError, ValueError) as exc:
                seen.append(f"{offer.describe()}: cannot connect ({type(exc).__name__})")
                log.warning("skipping %s", seen[-1])
                continue
            if got == pin:
                log.info("%s presents the pinned certificate %s…", offer.url, pin[:16])
                return offer
            seen.append(
                f"{offer.describe()}: presents certificate {got[:16]}…, not the pinned {pin[:16]}…"
            )
            log.warning("skipping %s (a fake advert, or a new certificate)", seen[-1])
        return None
