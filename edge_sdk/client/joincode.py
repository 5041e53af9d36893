"""The join code: one string that carries the join token *and* the coordinator's identity.

`fedlm coordinator` prints it; a device takes it as `--join-code` or `$FEDLM_JOIN_CODE`.
With it the device knows, before it sends any secret, which certificate the coordinator must
present, so a fake coordinator on the LAN (a forged mDNS advert) never sees the join token.

Format, version 1 (everything is ASCII; case does not matter after the prefix):

    fedlm1-<payload>

    payload  = base32(fingerprint || token || check), RFC 4648 alphabet, lower case, no "="
    fingerprint = the 32 bytes of SHA-256 over the coordinator's DER certificate
    token       = the join token, UTF-8 (8..256 bytes)
    check       = the first 4 bytes of SHA-256("fedlm-join-code-v1" || fingerprint || token)

Base32 is used because it survives being read aloud, typed or put in a QR code, and needs no
quoting in a shell (no `+`, `/`, `=` or `&`). The 32-bit check catches any typo with
probability 1 - 2^-32; a code for another version gets its own prefix (`fedlm2-`), so an old
client says "unsupported version" instead of "typo". A 43-character generated token gives a
code of 7 + 127 characters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from edge_sdk.client.errors import JoinCodeError

PREFIX = "fedlm1-"
_DOMAIN = b"fedlm-join-code-v1"
_FP_BYTES = 32
_CHECK_BYTES = 4
MIN_TOKEN_CHARS = 8
MAX_TOKEN_BYTES = 256


def normalize_fingerprint(value: str, what: str = "`tls_fingerprint`") -> str:
    """64 lowercase hex digits from `value` (colons and case as `openssl x509 -fingerprint`
    prints them are accepted); ValueError naming `what` otherwise."""
    fp = value.strip().replace(":", "").lower()
    if len(fp) != 2 * _FP_BYTES or any(c not in "0123456789abcdef" for c in fp):
        raise ValueError(f"{what} should be 64 hex digits (a SHA-256), got {value!r}")
    return fp


@dataclass(frozen=True)
class JoinCode:
    """A decoded join code: the certificate pin and the join token."""

    fingerprint: str
    """SHA-256 of the coordinator's DER certificate, 64 lowercase hex digits."""
    token: str
    """The join token (the enrollment secret)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", normalize_fingerprint(self.fingerprint))
        if len(self.token) < MIN_TOKEN_CHARS or len(self.token.encode()) > MAX_TOKEN_BYTES:
            raise ValueError(
                f"`token` should have {MIN_TOKEN_CHARS} to {MAX_TOKEN_BYTES} bytes, "
                f"got {len(self.token)} characters"
            )

    def __repr__(self) -> str:  # the token is a secret: keep it out of logs and tracebacks
        return f"JoinCode(fingerprint={self.fingerprint!r})"

    def encode(self) -> str:
        fp, token = bytes.fromhex(self.fingerprint), self.token.encode()
        check = hashlib.sha256(_DOMAIN + fp + token).digest()[:_CHECK_BYTES]
        payload = base64.b32encode(fp + token + check).decode("ascii").rstrip("=").lower()
        return PREFIX + payload

    @classmethod
    def decode(cls, text: str) -> JoinCode:
        """Parse a join code; `JoinCodeError` says what is wrong (never echoes the secret)."""
        code = "".join(text.split())  # pasted from a wrapped line or a chat: drop whitespace
        prefix, sep, payload = code.partition("-")
        if not sep or not prefix.lower().startswith("fedlm"):
            raise JoinCodeError(
                "the join code should start with 'fedlm1-' (copy the whole line "
                "`join code: ...` that `fedlm coordinator` printed)"
            )
        if prefix.lower() + "-" != PREFIX:
            raise JoinCodeError(
                f"the join code has version {prefix!r}; this client reads {PREFIX[:-1]!r} "
                "(update fedlm on this device or on the coordinator)"
            )
        padded = payload.upper() + "=" * (-len(payload) % 8)
        try:
            raw = base64.b32decode(padded, map01="L")  # a typed 0/1 means O/L
        except (binascii.Error, ValueError):
            raise JoinCodeError(
                "the join code is damaged (a character outside a-z, 2-7, or a wrong length): "
                "copy it again from the coordinator's output"
            ) from None
        if len(raw) < _FP_BYTES + MIN_TOKEN_CHARS + _CHECK_BYTES:
            raise JoinCodeError("the join code is too short (cut off?): copy it again")
        fp, token, check = raw[:_FP_BYTES], raw[_FP_BYTES:-_CHECK_BYTES], raw[-_CHECK_BYTES:]
        if hashlib.sha256(_DOMAIN + fp + token).digest()[:_CHECK_BYTES] != check:
            raise JoinCodeError(
                "the join code's checksum does not match (a typo?): copy it again from the "
                "coordinator's output"
            )
        try:
            return cls(fp.hex(), token.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise JoinCodeError(f"the join code holds no valid token ({exc})") from None


def make_join_code(fingerprint: str, token: str) -> str:
    """The join code for a coordinator's certificate fingerprint and join token."""
    return JoinCode(fingerprint, token).encode()
