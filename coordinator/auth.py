"""Enrollment and bearer tokens, and per-client token-bucket rate limits.

A device enrolls once with the coordinator's join token (shared out of band, e.g. printed at
start) and receives its own bearer token. Only sha256(token) is stored: tokens are 256 random
bits (`secrets.token_urlsafe(32)`), so a fast unsalted hash cannot be brute-forced and a leaked
database does not leak usable tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

TOKEN_BYTES = 32


def generate_token() -> str:
    """A fresh random token (43 URL-safe characters)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """What the database stores for a bearer token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def tokens_equal(given: str, expected: str) -> bool:
    """Constant-time comparison (no timing oracle on the join token).

    surrogatepass: JSON may carry a lone surrogate ("\\ud800"), which strict UTF-8 cannot
    encode; such a token simply does not match (it was a 500).
    """
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


MAX_NAME_LEN = 64
"""Longest stored device name, in characters."""


def printable(text: str, max_len: int = 200) -> str:
    """`text` made safe for one log line or a status field.

    Every character that `str.isprintable` rejects (newlines, other control characters, ANSI
    escapes' ESC, bidi overrides and other format characters) becomes '?', so a hostile value
    cannot forge a log line or reorder what an operator reads; the text is cut at `max_len`.
    """
    head = "".join(c if c.isprintable() else "?" for c in text[:max_len])
    return head + "…" if len(text) > max_len else head


def device_name(name: str) -> str:
    """The name a device gave at enrollment, as it is logged and stored (see `printable`)."""
    clean = "".join(c if c.isprintable() else "?" for c in name[:MAX_NAME_LEN]).strip()
    return clean or "device"


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 512:
        return None
    return token


@dataclass
class TokenBucket:
    """`burst` requests at once, refilled at `rate` per second."""

    rate: float
    burst: float
    tokens: float = -1.0
    updated: float = 0.0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"`rate` should be > 0, got {self.rate}")
        if not self.burst >= 1:
            raise ValueError(f"`burst` should be >= 1, got {self.burst}")
        if self.tokens < 0:
            self.tokens = self.burst

    def take(self, now: float) -> float:
        """0.0 if a request may pass now (and consume a token), else seconds until it may."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """One token bucket per key (client id or remote address), at most `max_keys` remembered.

    The least recently used buckets are forgotten first, so hostile traffic from many keys
    cannot grow memory without bound.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        TokenBucket(rate, burst)  # validates
        if max_keys < 1:
            raise ValueError(f"`max_keys` should be >= 1, got {max_keys}")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def check(self, key: str, now: float | None = None) -> float:
        """0.0 if `key` may make a request now, else the seconds to wait (for Retry-After)."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, updated=now)
        self._buckets[key] = bucket
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return bucket.take(now)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
