"""Message bytes: round trips, and bounded decoding of every message type."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.secagg import (
    AdvertiseKeys,
    MaskedInput,
    MaskedInputRequest,
    MessageError,
    RoundSetup,
    SecAggLimits,
    SecAggParams,
    ShareKeys,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskResponse,
    decode,
    decode_as,
    encode,
)
from edge_sdk.secagg.messages import MAGIC, MAX_SHARE_CIPHERTEXT

RID = bytes(range(16))
K32 = b"\x07" * 32
PARAMS = SecAggParams(cohort_size=8, vector_len=10)

SAMPLES = [
    RoundSetup(RID, 3, PARAMS, K32),
    AdvertiseKeys(RID, 3, K32, b"\x08" * 32),
    ShareKeysRequest(RID, 3, K32, (1, 2, 3), {1: (K32, K32), 2: (K32, K32)}),
    ShareKeys(RID, 3, K32, {1: b"c" * 80, 2: b"d" * 80}),
    MaskedInputRequest(RID, 3, {1: b"c" * 80}),
    MaskedInput(RID, 3, b"\x01\x02\x03", K32),
    UnmaskRequest(RID, 3, (1, 2, 3), (4,)),
    UnmaskResponse(RID, 3, {1: (2, b"s" * 32)}, {4: (1, b"k" * 32)}),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    data = encode(message)  # type: ignore[arg-type]
    assert data[:4] == MAGIC
    assert decode(data) == message
    assert decode_as(data, type(message)) == message


def test_decode_as_checks_the_kind() -> None:
    with pytest.raises(MessageError, match="expected a MaskedInput message, got AdvertiseKeys"):
        decode_as(encode(SAMPLES[1]), MaskedInput)


def _body(data: bytes) -> list:
    return msgpack.unpackb(data[6:], raw=False, strict_map_key=False)


def _with_body(data: bytes, fields: list) -> bytes:
    return data[:6] + msgpack.packb(fields, use_bin_type=True)


# For every message type: one bad value per field (wrong type or wrong length/range), and what
# the refusal must say (the field; a string anywhere is refused by the bounded unpacker itself).
NO_STR = r"not valid bounded msgpack \(1 exceeds max_str_len\(0\)\)"
BAD_FIELDS = {
    "RoundSetup": [
        (0, b"short", "`round_id` should be 16 bytes, got 5"),
        (1, -1, r"`device_id` should be a device id in \[0, 4294967295\], got -1"),
        (1, 2**32, r"`device_id` should be a device id .* got 4294967296"),
        (2, [8, 10], r"`params` is invalid: params should be a list of 7 or 9 values"),
        (2, [2, 10, 1.0, 4, 1, 0, 0], r"`params` is invalid: `cohort_size` .* got 2"),
        (3, "k", NO_STR),
    ],
    "AdvertiseKeys": [
        (0, None, "`round_id` should be bytes, got NoneType"),
        (1, "3", NO_STR),
        (2, b"x" * 31, "`mask_key` should be 32 bytes, got 31"),
        (3, b"x" * 33, "`enc_key` should be 32 bytes, got 33"),
    ],
    "ShareKeysRequest": [
        (2, b"", "`graph_seed` should be 32 bytes, got 0"),
        (3, [1, 1], "`members` lists an id twice"),
        (3, [1, -2], "`members` should be a device id .* got -2"),
        (4, {1: [K32]}, r"`keys` values should be \[mask_key, enc_key\]"),
        (4, {"a": [K32, K32]}, NO_STR),
        (4, [], "`keys` should be a map of at most 4096 entries"),
    ],
    "ShareKeys": [
        (2, 5, "`commitment` should be bytes, got int"),
        (
            3,
            {1: b"c" * (MAX_SHARE_CIPHERTEXT + 1)},
            "`shares` should be at most 156 bytes, got 157",
        ),
        (3, {1: 7}, "`shares` should be bytes, got int"),
        (3, {2**40: b"c"}, "`shares key` should be a device id .* got 1099511627776"),
    ],
    "MaskedInputRequest": [
        (1, 1.5, "`device_id` should be a device id .* got 1.5"),
        (2, {1: None}, "`shares` should be bytes, got NoneType"),
    ],
    "MaskedInput": [
        (2, [1], "`payload` should be bytes, got list"),
        (3, b"t" * 16, "`tag` should be 32 bytes, got 16"),
    ],
    "UnmaskRequest": [
        (2, [1, 2, 2], "`active` lists an id twice"),
        (3, "x", NO_STR),
        (2, [True], "`active` should be a device id .* got True"),
    ],
    "UnmaskResponse": [
        (2, {1: [0, b"s" * 32]}, r"`seed_shares` share index should be in \[1, 4096\], got 0"),
        (2, {1: [1, b"s" * 31]}, "`seed_shares` should be 32 bytes, got 31"),
        (3, {1: [1]}, r"`key_shares` should be \[index, share\]"),
        (3, {1: "x"}, NO_STR),
    ],
}


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_field_is_checked(message: object) -> None:
    data = encode(message)  # type: ignore[arg-type]
    body = _body(data)
    for index, value, expected in BAD_FIELDS[type(message).__name__]:
        bad = list(body)
        bad[index] = value
        with pytest.raises(MessageError, match=expected):
            decode(_with_body(data, bad))
    with pytest.raises(MessageError, match="fields"):
        decode(_with_body(data, body + [0]))
    with pytest.raises(MessageError, match="fields"):
        decode(_with_body(data, body[:-1]))


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_prefix_and_trailing_bytes_are_refused(message: object) -> None:
    data = encode(message)  # type: ignore[arg-type]
    for cut in range(len(data)):
        # Cut inside the 6-byte header (magic, version, kind): refused as not ours; after it,
        # the body is incomplete.
        expected = "does not start with the magic" if cut < 6 else "not valid bounded msgpack"
        with pytest.raises(MessageError, match=expected):
            decode(data[:cut])
    with pytest.raises(MessageError, match=r"message body is not valid bounded msgpack"):
        decode(data + b"\x00")


def test_envelope_errors() -> None:
    data = encode(SAMPLES[1])
    with pytest.raises(MessageError, match="magic"):
        decode(b"XXXX" + data[4:])
    with pytest.raises(MessageError, match="version 2"):
        decode(data[:4] + b"\x02" + data[5:])
    with pytest.raises(MessageError, match="unknown message kind 9"):
        decode(data[:5] + b"\x09" + data[6:])
    with pytest.raises(MessageError, match="should be bytes"):
        decode("text")  # type: ignore[arg-type]


def test_size_and_count_limits() -> None:
    big = MaskedInput(RID, 1, b"\x00" * 5000, K32)
    with pytest.raises(MessageError, match="exceeds the limit of 4096"):
        decode(encode(big), SecAggLimits(max_bytes=4096))
    many = UnmaskRequest(RID, 1, tuple(range(100)), ())
    assert decode(encode(many)) == many
    with pytest.raises(MessageError, match=r"message body is not valid bounded msgpack"):
        decode(encode(many), SecAggLimits(max_members=50))
    wide = ShareKeys(RID, 1, K32, {j: b"c" for j in range(100)})
    with pytest.raises(MessageError, match=r"message body is not valid bounded msgpack"):
        decode(encode(wide), SecAggLimits(max_members=50))
    # A msgpack header that claims a huge bin is refused before allocating it.
    header = (
        MAGIC + bytes([1, 6]) + b"\x94" + msgpack.packb(RID) + b"\x01" + b"\xc6\x7f\xff\xff\xff"
    )
    with pytest.raises(MessageError, match=r"message body is not valid bounded msgpack"):
        decode(header)
    deep = MAGIC + bytes([1, 7]) + b"\x91" * 5000 + b"\xc0"
    with pytest.raises(MessageError, match=r"message body is not valid bounded msgpack"):
        decode(deep)
    with pytest.raises(ValueError, match="`max_bytes`"):
        SecAggLimits(max_bytes=0)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_raise_only_message_error(data: bytes) -> None:
    for prefix in (b"", MAGIC + b"\x01\x02", MAGIC + b"\x01\x08"):
        try:
            decode(prefix + data)
        except MessageError:
            pass


@settings(max_examples=300, deadline=None)
@given(
    index=st.sampled_from(range(len(SAMPLES))), pos=st.integers(0, 10**6), byte=st.integers(0, 255)
)
def test_mutated_messages_raise_only_message_error(index: int, pos: int, byte: int) -> None:
    data = bytearray(encode(SAMPLES[index]))
    data[pos % len(data)] = byte
    try:
        decode(bytes(data))
    except MessageError:
        pass


def test_params_in_round_setup_are_validated() -> None:
    data = encode(SAMPLES[0])
    body = _body(data)
    body[2] = dataclasses.replace(PARAMS).to_list()[:6] + [100]  # threshold > degree
    with pytest.raises(MessageError, match="`threshold`"):
        decode(_with_body(data, body))
