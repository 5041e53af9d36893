"""The envelope: an 8-byte header (magic, version, kind, flags) followed by one msgpack map.

offset  size  field
0       4     magic   b"FDLM"
4       2     version uint16 big-endian (PROTOCOL_VERSION)
6       1     kind    uint8, a MessageKind
7       1     flags   uint8: bit 0 (FLAG_DEFLATE) = body is zlib-compressed (RFC 1950);
                      the other bits are 0 in version 1
8       ...   body    exactly one msgpack map with string keys, no trailing bytes (after
                      decompression when FLAG_DEFLATE is set)
"""

from __future__ import annotations

import enum
import struct
import zlib
from typing import Any

import msgpack

from edge_sdk.wire._errors import (
    BadMagicError,
    LimitExceededError,
    MalformedMessageError,
    UnexpectedMessageError,
    UnsupportedVersionError,
)
from edge_sdk.wire.limits import DEFAULT_LIMITS, DecodeLimits

MAGIC = b"FDLM"
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})
CONTENT_TYPE = "application/x-fedlm+msgpack"
HEADER = struct.Struct(">4sHBB")  # magic, version, kind, flags
HEADER_SIZE = HEADER.size  # 8
FLAG_DEFLATE = 0x01
KNOWN_FLAGS = FLAG_DEFLATE
# Level 6: within 2% of level 9's size on quantized tensors, at a third of the time.
DEFLATE_LEVEL = 6


class MessageKind(enum.IntEnum):
    """The envelope's kind byte."""

    ADAPTER_UPDATE = 1
    GLOBAL_ADAPTER = 2
    TASK_CONFIG = 3
    ERROR = 4


def pack(kind: MessageKind, body: dict[str, Any], *, deflate: bool = False) -> bytes:
    raw = msgpack.packb(body, use_bin_type=True, strict_types=False)
    if deflate:
        return HEADER.pack(MAGIC, PROTOCOL_VERSION, int(kind), FLAG_DEFLATE) + zlib.compress(
            raw, DEFLATE_LEVEL
        )
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, int(kind), 0) + raw


def _inflate(body: memoryview, limits: DecodeLimits) -> memoryview:
    # Bounded: a small hostile body cannot expand past max_bytes (no zip bomb).
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(body, limits.max_bytes)
    except zlib.error as exc:
        raise MalformedMessageError(
            f"FLAG_DEFLATE set but the body is not zlib data: {exc}"
        ) from None
    if inflater.unconsumed_tail:
        raise LimitExceededError(f"decompressed body exceeds max_bytes={limits.max_bytes}")
    if not inflater.eof or inflater.unused_data:
        raise MalformedMessageError(
            "FLAG_DEFLATE set but the zlib stream is truncated or has trailing bytes"
        )
    return memoryview(out)


def read_header(
    data: bytes | bytearray | memoryview, limits: DecodeLimits
) -> tuple[MessageKind, int]:
    """Check size, magic, version and flags; returns the message kind and the flags."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > limits.max_bytes:
        raise LimitExceededError(
            f"message of {len(data)} bytes exceeds max_bytes={limits.max_bytes}"
        )
    if len(data) < HEADER_SIZE:
        raise BadMagicError(
            f"expected at least an {HEADER_SIZE}-byte header "
            f"starting with {MAGIC!r}, got {len(data)} bytes"
        )
    magic, version, kind, flags = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise BadMagicError(f"expected magic {MAGIC!r}, got {bytes(magic)!r}")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(
            "expected protocol version "
            f"{', '.join(map(str, sorted(SUPPORTED_VERSIONS)))}, got {version}"
        )
    if flags & ~KNOWN_FLAGS:
        raise MalformedMessageError(
            f"expected flags within {KNOWN_FLAGS:#04x} in "
            f"protocol version {version}, got {flags:#04x}"
        )
    try:
        return MessageKind(kind), flags
    except ValueError:
        known = ", ".join(f"{k.value} ({k.name})" for k in MessageKind)
        raise UnexpectedMessageError(f"expected a message kind in {known}, got {kind}") from None


def unpack(
    data: bytes | bytearray | memoryview, expected: MessageKind | None, limits: DecodeLimits | None
) -> tuple[MessageKind, dict[str, Any]]:
    """Header checks, then the body decoded by a bounded msgpack Unpacker."""
    limits = limits or DEFAULT_LIMITS
    kind, flags = read_header(data, limits)
    if expected is not None and kind != expected:
        raise UnexpectedMessageError(
            f"expected a {expected.name} message (kind "
            f"{int(expected)}), got {kind.name} (kind {int(kind)})"
        )
    unpacker = msgpack.Unpacker(
        raw=False,
        use_list=True,
        strict_map_key=True,
        max_buffer_size=limits.max_bytes,
        max_str_len=limits.max_str_len,
        max_bin_len=limits.max_bytes,
        max_array_len=limits.max_container_len,
        max_map_len=max(limits.max_container_len, limits.max_tensors),
        max_ext_len=0,  # no ext types in this protocol
    )
    # msgpack raises a zoo of exceptions on hostile input (FormatError, StackError, OutOfData,
    # ExtraData, BufferFull, ValueError, UnicodeDecodeError, TypeError, ...): every one of them
    # means "not a valid body", and the contract is to surface only WireError.
    payload = memoryview(data)[HEADER_SIZE:]
    if flags & FLAG_DEFLATE:
        payload = _inflate(payload, limits)
    try:
        unpacker.feed(payload)
        body = unpacker.unpack()
        trailing = unpacker.tell() != len(payload)
    except Exception as exc:
        raise MalformedMessageError(
            f"body is not one valid msgpack object: {type(exc).__name__}: {exc}"[:300]
        ) from exc
    if trailing:
        raise MalformedMessageError(
            "expected exactly one msgpack object after the header, found trailing bytes"
        )
    if not isinstance(body, dict):
        raise MalformedMessageError(
            f"expected the body to be a msgpack map, got {type(body).__name__}"
        )
    return kind, body
