"""The messages of a secure-aggregation round and their bytes, decoded within stated bounds.

Every message is

    magic b"FSAG" | version u8 (= 1) | kind u8 | msgpack array of the fields, in order

Fields are msgpack ints, bins (raw bytes), arrays and maps with int keys; no strings, floats
only in `RoundSetup.params`. Decoding checks the length of the whole message, every bin's
length, every list's and map's count, every id's range and the exact field count and types
before any value is used, and raises only `MessageError`.

| kind | message              | direction       | fields                                         |
|------|----------------------|-----------------|------------------------------------------------|
| 1    | RoundSetup           | server → device | round_id, device_id, params, server_key        |
| 2    | AdvertiseKeys        | device → server | round_id, device_id, mask_key, enc_key         |
| 3    | ShareKeysRequest     | server → device | round_id, device_id, graph_seed, members, keys |
| 4    | ShareKeys            | device → server | round_id, device_id, commitment, shares        |
| 5    | MaskedInputRequest   | server → device | round_id, device_id, shares                    |
| 6    | MaskedInput          | device → server | round_id, device_id, payload, tag              |
| 7    | UnmaskRequest        | server → device | round_id, device_id, active, dropped           |
| 8    | UnmaskResponse       | device → server | round_id, device_id, seed_shares, key_shares   |

`keys` maps a neighbour id to [mask_key, enc_key]; `shares` maps a peer id to a ChaCha20-Poly1305
ciphertext; `seed_shares`/`key_shares` map a device id to [share index, 32-byte share].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgpack

from edge_sdk.secagg.crypto import KEY_LEN, NONCE_LEN, SHARE_LEN
from edge_sdk.secagg.errors import MessageError
from edge_sdk.secagg.params import MAX_COHORT, SecAggParams
from edge_sdk.validators import is_int_in, require_positive_ints

MAGIC = b"FSAG"
VERSION = 1
ROUND_ID_LEN = 16
"""Bytes of a round id (random, chosen by the server)."""
MAX_DEVICE_ID = (1 << 32) - 1
"""Device ids within a round are integers in [0, 2^32 - 1]."""
MAX_SHARE_CIPHERTEXT = NONCE_LEN + 128 + 16
"""Longest encrypted share: nonce, a msgpack plaintext of at most 128 bytes, Poly1305 tag."""


@dataclass(frozen=True)
class SecAggLimits:
    """What a decoder accepts."""

    max_bytes: int = 256 << 20
    """Largest whole message in bytes (a masked update of 2^30 values at 2 bits fits)."""
    max_members: int = MAX_COHORT
    """Most ids in any list or map."""

    def __post_init__(self) -> None:
        require_positive_ints(self, "max_bytes", "max_members")


DEFAULT_LIMITS = SecAggLimits()


# --- field checkers: each raises MessageError naming the field -------------------------------


def _bin(value: Any, name: str, length: int | None = None, max_len: int | None = None) -> bytes:
    if not isinstance(value, bytes):
        raise MessageError(f"field `{name}` should be bytes, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise MessageError(f"field `{name}` should be {length} bytes, got {len(value)}")
    if max_len is not None and len(value) > max_len:
        raise MessageError(f"field `{name}` should be at most {max_len} bytes, got {len(value)}")
    return value


def _id(value: Any, name: str) -> int:
    if not is_int_in(value, 0, MAX_DEVICE_ID):
        raise MessageError(
            f"field `{name}` should be a device id in [0, {MAX_DEVICE_ID}], got {value!r:.40}"
        )
    return value


def _ids(value: Any, name: str, limits: SecAggLimits) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > limits.max_members:
        raise MessageError(f"field `{name}` should be a list of at most {limits.max_members} ids")
    ids = tuple(_id(v, name) for v in value)
    if len(set(ids)) != len(ids):
        raise MessageError(f"field `{name}` lists an id twice")
    return ids


def _map(value: Any, name: str, limits: SecAggLimits) -> dict[int, Any]:
    if not isinstance(value, dict) or len(value) > limits.max_members:
        raise MessageError(
            f"field `{name}` should be a map of at most {limits.max_members} entries"
        )
    for k in value:
        _id(k, f"{name} key")
    return value


def _share(value: Any, name: str) -> tuple[int, bytes]:
    if not isinstance(value, list) or len(value) != 2:
        raise MessageError(f"field `{name}` should be [index, share]")
    index, share = value
    if not is_int_in(index, 1, MAX_COHORT):
        raise MessageError(
            f"field `{name}` share index should be in [1, {MAX_COHORT}], got {index!r:.40}"
        )
    return index, _bin(share, name, SHARE_LEN)


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundSetup:
    """Server → device: join round `round_id` as `device_id`, with these parameters."""

    KIND: ClassVar[int] = 1
    round_id: bytes
    device_id: int
    params: SecAggParams
    server_key: bytes
    """The server's X25519 public key for this round (masked inputs are tagged against it)."""

    def _fields(self) -> list[Any]:
        return [self.round_id, self.device_id, self.params.to_list(), self.server_key]

    @classmethod
    def _parse(cls, f: list[Any], limits: SecAggLimits) -> RoundSetup:
        try:
            params = SecAggParams.from_list(f[2])
        except (ValueError, TypeError) as exc:
            raise MessageError(f"field `params` is invalid: {exc}") from exc
        return cls(
            _bin(f[0], "round_id", ROUND_ID_LEN),
            _id(f[1], "device_id"),
            params,
            _bin(f[3], "server_key", KEY_LEN),
        )


@dataclass(frozen=True)
class AdvertiseKeys:
    """Device → server: the device's two fresh public keys for this round."""

    KIND: ClassVar[int] = 2
    round_id: bytes
    device_id: int
    mask_key: bytes
    """X25519 public key whose agreements seed the pairwise masks."""
    enc_key: bytes
    """X25519 public key whose agreements encrypt the shares sent between devices."""

    def _fields(self) -> list[Any]:
        return [self.round_id, self.device_id, self.mask_key, self.enc_key]

    @classmethod
    def _parse(cls, f: list[Any], limits: SecAggLimits) -> AdvertiseKeys:
        return cls(
            _bin(f[0], "round_id", ROUND_ID_LEN),
            _id(f[1], "device_id"),
            _bin(f[2], "mask_key", KEY_LEN),
            _bin(f[3], "enc_key", KEY_LEN),
        )


@dataclass(frozen=True)
class ShareKeysRequest:
    """Server → device: the members that advertised, the graph seed, and the neighbours' keys."""

    KIND: ClassVar[int] = 3
    round_id: bytes
    device_id: int
    graph_seed: bytes
    members: tuple[int, ...]
    keys: dict[int, tuple[bytes, bytes]]
    """Neighbour id -> (mask_key, enc_key), for exactly the device's neighbours."""

    def _fields(self) -> list[Any]:
        keys = {j: [m, e] for j, (m, e) in self.keys.items()}
        return [self.round_id, self.device_id, self.graph_seed, list(self.members), keys]

    @classmethod
    def _parse(cls, f: list[Any], limits: SecAggLimits) -> ShareKeysRequest:
        keys: dict[int, tuple[bytes, bytes]] = {}
        for j, pair in _map(f[4], "keys", limits).items():
            if not isinstance(pair, list) or len(pair) != 2:
                raise MessageError("field `keys` values should be [mask_key, enc_key]")
            keys[j] = (
                _bin(pair[0], "keys mask_key", KEY_LEN),
                _bin(pair[1], "keys enc_key", KEY_LEN),
            )
        return cls(
            _bin(f[0], "round_id", ROUND_ID_LEN),
            _id(f[1], "device_id"),
            _bin(f[2], "graph_seed", KEY_LEN),
            _ids(f[3], "members", limits),
            keys,
        )


@dataclass(frozen=True)
class ShareKeys:
    """Device → server: a commitment to the self-mask seed and one encrypted share per neighbour."""

    KIND: ClassVar[int] = 4
    round_id: bytes
    device_id: int
    commitment: bytes
    shares: dict[int, bytes]
    """Neighbour id -> ChaCha20-Poly1305 ciphertext of (sender, receiver, shares)."""

    def _fields(self) -> list[Any]:
        return [self.round_id, self.device_id, self.commitment, dict(self.shares)]

    @classmethod
    def _parse(cls, f: list[Any], limits: SecAggLimits) -> ShareKeys:
        shares = {
            j: _bin(c, "shares", max_len=MAX_SHARE_CIPHERTEXT)
            for j, c in _map(f[3], "shares", limits).items()
        }
        return cls(
            _bin(f[0], "round_id", ROUND_ID_LEN),
            _id(f[1], "device_id"),
            _bin(f[2], "commitment", KEY_LEN),
            shares,
        )


@dataclass(frozen=True)
class MaskedInputRequest:
    """Server → device: the encrypted shares its neighbours sent it (sender id -> ciphertext)."""

    KIND: ClassVar[int] = 5
    round_id: bytes
    device_id: int
    shares: dict[int, bytes]

    def _fields(self) -> list[Any]:
        return [self.round_id, self.device_id, dict(self.shares)]

    @classmethod
    def _parse(cls, f: list[Any], limits: SecAggLimits) -> MaskedInputRequest:
        shares = {
            j: _bin(c, "shares", max_len=MAX_SHARE_CIPHERTEXT)
            for j, c in _map(f[2], "shares", limits).items()
        }
        return cls(_bin(f[0], "round_id", ROUND_ID_LEN), _id(f[1], "device_id"), shares)


@dataclass(frozen=True)
class MaskedInput:
    """Device → server: the packed masked vector and its tag (bound to round and cohort)."""

    KIND: ClassVar[int] = 6
    round_id: bytes
    device_id: int
    payload: bytes
    """`quantize.pack` of the masked ring vector: N values at ring_bits bits + 4-byte weight."""
    tag: bytes
    """HMAC-SHA256 over round binding, device id and payload, keyed by agreement with the
    round's server key: a vector from another round or cohort does not verify."""

    def _fields(self) -> list[Any]:
        return [self.round_id, self.device_id, self.payload, self.tag]

    @classmethod
    def _parse(cls, f: list[Any], limits: SecAggLimits) -> MaskedInput:
        return cls(
            _bin(f[0], "round_id", ROUND_ID_LEN),
            _id(f[1], "device_id"),
            _bin(f[2], "payload", max_len=limits.max_bytes),
            _bin(f[3], "tag", KEY_LEN),
        )


@dataclass(frozen=True)
class UnmaskRequest:
    """Server → device: which devices survived (reveal seed shares) and which dropped (key
    shares)."""

    KIND: ClassVar[int] = 7
    round_id: bytes
    device_id: int
    active: tuple[int, ...]
    dropped: tuple[int, ...]

    def _fields(self) -> list[Any]:
        return [self.round_id, self.device_id, list(self.active), list(self.dropped)]

    @classmethod
    def _parse(cls, f: list[Any], limits: SecAggLimits) -> UnmaskRequest:
        return cls(
            _bin(f[0], "round_id", ROUND_ID_LEN),
            _id(f[1], "device_id"),
            _ids(f[2], "active", limits),
            _ids(f[3], "dropped", limits),
        )


@dataclass(frozen=True)
class UnmaskResponse:
    """Device → server: Shamir shares of survivors' seeds and of drop-outs' mask keys."""

    KIND: ClassVar[int] = 8
    round_id: bytes
    device_id: int
    seed_shares: dict[int, tuple[int, bytes]]
    key_shares: dict[int, tuple[int, bytes]]

    def _fields(self) -> list[Any]:
        return [
            self.round_id,
            self.device_id,
            {j: [i, s] for j, (i, s) in self.seed_shares.items()},
            {j: [i, s] for j, (i, s) in self.key_shares.items()},
        ]

    @classmethod
    def _parse(cls, f: list[Any], limits: SecAggLimits) -> UnmaskResponse:
        seeds = {j: _share(v, "seed_shares") for j, v in _map(f[2], "seed_shares", limits).items()}
        keys = {j: _share(v, "key_shares") for j, v in _map(f[3], "key_shares", limits).items()}
        return cls(_bin(f[0], "round_id", ROUND_ID_LEN), _id(f[1], "device_id"), seeds, keys)


Message = (
    RoundSetup
    | AdvertiseKeys
    | ShareKeysRequest
    | ShareKeys
    | MaskedInputRequest
    | MaskedInput
    | UnmaskRequest
    | UnmaskResponse
)
_TYPES: dict[int, Any] = {
    t.KIND: t
    for t in (
        RoundSetup,
        AdvertiseKeys,
        ShareKeysRequest,
        ShareKeys,
        MaskedInputRequest,
        MaskedInput,
        UnmaskRequest,
        UnmaskResponse,
    )
}
_FIELD_COUNTS = {1: 4, 2: 4, 3: 5, 4: 4, 5: 3, 6: 4, 7: 4, 8: 4}
M = TypeVar("M")


def encode(message: Message) -> bytes:
    """The bytes of `message`."""
    body = msgpack.packb(message._fields(), use_bin_type=True)
    return MAGIC + bytes([VERSION, message.KIND]) + body


def decode(data: bytes, limits: SecAggLimits = DEFAULT_LIMITS) -> Message:
    """The message in `data`; `MessageError` for anything malformed or over `limits`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"message should be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > limits.max_bytes:
        raise MessageError(f"message of {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    if len(data) < 6 or data[:4] != MAGIC:
        raise MessageError("message does not start with the magic b'FSAG'")
    if data[4] != VERSION:
        raise MessageError(f"message version {data[4]} is not the supported version {VERSION}")
    kind = data[5]
    if kind not in _TYPES:
        raise MessageError(f"unknown message kind {kind}")
    n = limits.max_members
    try:
        fields = msgpack.unpackb(
            data[6:],
            raw=False,
            use_list=True,
            strict_map_key=False,
            max_bin_len=limits.max_bytes,
            max_str_len=0,
            max_ext_len=0,
            max_array_len=max(n, 9),  # 9: the params list under distributed DP
            max_map_len=n,
        )
    except (ValueError, TypeError, msgpack.exceptions.UnpackException) as exc:
        raise MessageError(f"message body is not valid bounded msgpack ({exc})") from exc
    except RecursionError as exc:  # deeply nested arrays
        raise MessageError("message body nests too deeply") from exc
    if not isinstance(fields, list) or len(fields) != _FIELD_COUNTS[kind]:
        raise MessageError(f"message kind {kind} should have {_FIELD_COUNTS[kind]} fields")
    return _TYPES[kind]._parse(fields, limits)


def decode_as(data: bytes, cls: type[M], limits: SecAggLimits = DEFAULT_LIMITS) -> M:
    """`decode`, then check the message is a `cls`."""
    message = decode(data, limits)
    if not isinstance(message, cls):
        raise MessageError(f"expected a {cls.__name__} message, got {type(message).__name__}")
    return message
