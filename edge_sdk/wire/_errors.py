"""Errors raised while encoding or decoding wire messages.

Decoding untrusted bytes raises only `WireError` subclasses, never anything else, so that a
server can answer any malformed request with one `except WireError`. Caller misuse on the
encoding side (a wrong argument type or an out-of-range setting) raises `TypeError`/`ValueError`.
"""

from __future__ import annotations

from edge_sdk.errors import FedlmError


class WireError(FedlmError):
    """Base class: bytes or fields that do not form a valid message of this protocol."""


class BadMagicError(WireError):
    """The message does not start with the 4-byte magic `FDLM`."""


class UnsupportedVersionError(WireError):
    """The envelope carries a protocol version this build does not speak."""


class UnexpectedMessageError(WireError):
    """The envelope's message kind is unknown, or not the kind the caller asked to decode."""


class MalformedMessageError(WireError):
    """The body is not well-formed msgpack, has trailing bytes, or is not a map."""


class LimitExceededError(WireError):
    """A size, count, length or nesting bound of `DecodeLimits` is exceeded."""


class MissingFieldError(WireError):
    """A required field is absent from a message or an encoded tensor."""


class InvalidFieldError(WireError):
    """A field has the wrong type or a value out of its allowed range."""


class OutOfRangeError(InvalidFieldError):
    """An integer is outside its field's range; every integer fits a signed 64-bit (SQLite) one."""


class InvalidMetricsError(InvalidFieldError):
    """An update's metrics break the protocol's bounds: too many, a bad name, or not finite."""


class InvalidKeyError(InvalidFieldError):
    """A tensor, metric or metadata key is empty, too long, or uses characters outside the
    charset."""


class UnknownCodecError(WireError):
    """A codec string or per-tensor value format is not one of the known codecs."""


class CodecMismatchError(WireError):
    """A tensor's encoding disagrees with the codec declared by its message."""


class ShapeMismatchError(WireError):
    """A payload's length does not match its declared shape, or shapes disagree across tensors."""


class NonFiniteError(WireError):
    """A tensor or scalar holds NaN or infinity."""


class MissingReferenceError(WireError):
    """A delta-coded tensor was decoded without the reference tensor it was taken against."""
