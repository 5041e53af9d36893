"""Errors of the federated client: one base class, one subclass per kind of failure.

All are `FedlmError`s, so `fedlm join` prints them as one line and exits 2.
"""

from __future__ import annotations

from edge_sdk.errors import FedlmError


class ClientError(FedlmError):
    """Base class of every error the federated client raises on purpose."""


class DiscoveryError(ClientError):
    """No usable coordinator was found on mDNS (the message says what was seen and why ignored)."""


class VerificationError(ClientError):
    """A check that must pass before any training failed (model, licence or TLS identity)."""


class ModelMismatchError(VerificationError):
    """The coordinator's task trains another base model than the local file (sha256 differs)."""


class LicenceRefusedError(VerificationError):
    """The local base model's licence class is refused by the client's policy."""


class TlsPinError(VerificationError):
    """The coordinator's TLS certificate is not the pinned one (join code, --tls-fingerprint or
    the pin stored at enrollment); no secret was sent to it."""


class TransportError(ClientError):
    """The coordinator stayed unreachable (or kept failing) after every retry."""


class ProtocolError(ClientError):
    """The coordinator answered with bytes that are not a valid message of the wire protocol."""


class ResponseTooLargeError(ProtocolError):
    """An answer was longer than the most its request can legitimately return (read aborted)."""


class AdapterRefusedError(ProtocolError):
    """A global adapter failed the client's checks (spec, keys, shapes, finite, magnitude)."""


class TaskRefusedError(VerificationError):
    """The coordinator's task exceeds a bound of the client's `TaskPolicy` (field and bound
    named)."""


class RequestRejectedError(ClientError):
    """The coordinator answered a request with a 4xx error; `status` and `code` say which."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class AuthenticationError(RequestRejectedError):
    """The join token or the stored client token was refused (HTTP 401)."""


class StateError(ClientError):
    """The client's state directory is unusable: locked by another client, or a file is corrupt."""


class JoinCodeError(ClientError, ValueError):
    """A join code is malformed, of another version, or fails its checksum (a typo)."""


class InsecureError(ClientError):
    """A secret would go to a coordinator that is not authenticated (plain HTTP, no pin)."""


class CoordinatorUnreachableError(TransportError):
    """The coordinator never answered on first contact (nothing listens at the URL)."""
