"""Hostile input: random bytes, mutated valid messages and type-confused bodies raise only
WireError."""

from __future__ import annotations

import os
import zlib
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sdk.wire import (
    MAGIC,
    AdapterUpdate,
    DecodeLimits,
    WireError,
    decode_message,
)
from tests.wire.wire_helpers import lora_tensors, valid_messages

# FEDLM_FUZZ_EXAMPLES=5000 runs a longer campaign locally.
FUZZ = settings(
    max_examples=int(os.environ.get("FEDLM_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
MESSAGES = valid_messages()
REFERENCE = lora_tensors(99)
# Small limits as well, so limit checks are exercised by the same inputs.
LIMITS = [
    None,
    DecodeLimits(max_bytes=4096, max_tensors=3, max_key_len=20, max_elements=300, max_depth=2),
]


def _decode_only_wire_errors(data: bytes) -> None:
    """Decode with each limit set and, on success, decode the tensors too; only WireError may
    escape."""
    for limits in LIMITS:
        try:
            msg = decode_message(data, limits)
        except WireError:
            continue
        if isinstance(msg, AdapterUpdate):
            try:
                dense = msg.dense_tensors(REFERENCE)
            except WireError:
                continue
            assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in dense.values())


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    _decode_only_wire_errors(data)


@FUZZ
@given(kind=st.integers(0, 6), body=st.binary(max_size=512))
def test_random_body_behind_a_valid_header(kind: int, body: bytes) -> None:
    _decode_only_wire_errors(MAGIC + b"\x00\x01" + bytes([kind, 0]) + body)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(MESSAGES)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutated_valid_messages(data: bytes) -> None:
    _decode_only_wire_errors(data)


# msgpack-representable values of every type, to put where the decoder expects something else.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=12,
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every (container path, key) in a decoded body."""
    out = []
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    )
    for key, child in items:
        out.append(prefix + (key,))
        out.extend(_paths(child, prefix + (key,)))
    return out


@st.composite
def type_confused(draw: st.DrawFn) -> bytes:
    data = draw(st.sampled_from(MESSAGES))
    deflated = bool(data[7] & 0x01)
    body = msgpack.unpackb(zlib.decompress(data[8:]) if deflated else data[8:], raw=False)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(body)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        node = body
        for part in path[:-1]:
            node = node[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            node[path[-1]] = draw(values)
        elif action == "delete" and isinstance(node, dict):
            del node[path[-1]]
        elif action == "add" and isinstance(node, dict):
            node[draw(st.text(max_size=8))] = draw(values)
    raw = msgpack.packb(body, use_bin_type=True)
    return data[:8] + (zlib.compress(raw) if deflated else raw)


@FUZZ
@given(type_confused())
def test_type_confused_bodies(data: bytes) -> None:
    _decode_only_wire_errors(data)


def test_deeply_nested_body_is_rejected_cleanly() -> None:
    # 100k nested arrays: msgpack's own stack limit, which must surface as a WireError.
    data = MAGIC + b"\x00\x01\x04\x00" + b"\x91" * 100_000 + b"\xc0"
    _decode_only_wire_errors(data)
    try:
        decode_message(data)
    except WireError as exc:
        assert "msgpack" in str(exc) or "expected" in str(exc)
    else:
        raise AssertionError("a nested array body decoded as a message")
