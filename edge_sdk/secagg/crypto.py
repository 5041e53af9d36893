"""The cryptographic building blocks, all from well-kept libraries (none written here).

- X25519 key agreement, HKDF-SHA256, the ChaCha20 stream cipher (as the PRG), the
  ChaCha20-Poly1305 AEAD and HMAC-SHA256 come from `cryptography`.
- Shamir secret sharing comes from pycryptodome (`Crypto.Protocol.SecretSharing.Shamir`,
  over GF(2^128) on 16-byte blocks); a 32-byte secret is shared as two blocks that use the
  same share indices.

Every derived key takes the round's `binding` (a hash of round id, parameters, cohort and
graph seed) into its HKDF `info`, so nothing computed for one round or cohort is valid in
another: masks do not cancel, shares do not decrypt and masked inputs do not verify.
"""

from __future__ import annotations

import hmac
import os

import msgpack
import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from edge_sdk.secagg.errors import DecryptionError, ReconstructionError

KEY_LEN = 32
"""Bytes of an X25519 public or private key, a seed, a derived key and a commitment."""
NONCE_LEN = 12
"""Bytes of a ChaCha20-Poly1305 nonce (random per encryption, sent in front of the ciphertext)."""
SHARE_LEN = 2 * 16
"""Bytes of one Shamir share of a 32-byte secret (two GF(2^128) blocks)."""

# Domain-separation labels: one per use of a derived key (HKDF `info` prefix).
_PAIR_MASK = b"fedlm-secagg/v1 pairwise-mask"
_SELF_MASK = b"fedlm-secagg/v1 self-mask"
_SHARE_KEY = b"fedlm-secagg/v1 share-encryption"
_INPUT_MAC = b"fedlm-secagg/v1 masked-input-mac"
_COMMIT = b"fedlm-secagg/v1 seed-commitment"


def new_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key (per device, per round)."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of the public key of `key`."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of `key` (what is Shamir-shared for the mask key)."""
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    """Inverse of `private_bytes`."""
    return X25519PrivateKey.from_private_bytes(raw)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=None, info=info).derive(secret)


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The raw X25519 shared secret with a peer's 32-byte public key."""
    return private.exchange(X25519PublicKey.from_public_bytes(peer_public))


def prg_words(key: bytes, count: int) -> np.ndarray:
    """`count` pseudo-random uint32 words: the ChaCha20 keystream of `key` (zero nonce).

    Each key is used for one stream only (it is derived per pair or seed and per round), so a
    fixed nonce is safe here. Words are uniform on Z_{2^32} and so on every Z_{2^b}, b <= 32.
    """
    cipher = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    stream = cipher.update(b"\x00" * (4 * count))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def pairwise_mask_key(private: X25519PrivateKey, peer_public: bytes, binding: bytes) -> bytes:
    """The PRG key for the mask shared by two devices: HKDF(X25519(sk_i, pk_j), round binding)."""
    return _hkdf(agree(private, peer_public), _PAIR_MASK + binding)


def self_mask_key(seed: bytes, binding: bytes) -> bytes:
    """The PRG key of a device's self-mask, from its random 32-byte seed b."""
    return _hkdf(seed, _SELF_MASK + binding)


def seed_commitment(seed: bytes, binding: bytes) -> bytes:
    """SHA-256-based commitment to the self-mask seed, checked after reconstruction.

    The seed is 32 uniformly random bytes, so the commitment hides it.
    """
    h = hashes.Hash(hashes.SHA256())
    h.update(_COMMIT + binding + seed)
    return h.finalize()


def share_key(private: X25519PrivateKey, peer_public: bytes, binding: bytes) -> bytes:
    """The AEAD key that protects the shares one device sends another (same for both ways)."""
    return _hkdf(agree(private, peer_public), _SHARE_KEY + binding)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ChaCha20-Poly1305: random nonce || ciphertext+tag."""
    nonce = os.urandom(NONCE_LEN)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, blob: bytes, associated: bytes) -> bytes:
    """Inverse of `encrypt`; `DecryptionError` if the tag (or the associated data) is wrong."""
    if len(blob) < NONCE_LEN + 16:
        raise DecryptionError(f"ciphertext of {len(blob)} bytes is shorter than nonce + tag")
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], associated)
    except InvalidTag as exc:
        raise DecryptionError(
            "encrypted share does not verify for this pair, round and cohort"
        ) from exc


def input_mac_key(private: X25519PrivateKey, server_public: bytes, binding: bytes) -> bytes:
    """Key of the tag a device puts on its masked input, agreed with the round's server key."""
    return _hkdf(agree(private, server_public), _INPUT_MAC + binding)


def mac(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of `data`."""
    h = crypto_hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def mac_ok(key: bytes, data: bytes, tag: bytes) -> bool:
    """Constant-time check of an HMAC-SHA256 tag."""
    return hmac.compare_digest(mac(key, data), tag)


def sha256(*parts: bytes) -> bytes:
    """SHA-256 of the length-prefixed parts (unambiguous concatenation)."""
    h = hashes.Hash(hashes.SHA256())
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.finalize()


def split_secret(secret: bytes, threshold: int, count: int) -> list[tuple[int, bytes]]:
    """Shamir shares (index 1..count, 32 bytes) of a 32-byte secret; any `threshold` recover it."""
    if len(secret) != KEY_LEN:
        raise ValueError(f"secret should be {KEY_LEN} bytes, got {len(secret)}")
    if not 1 <= threshold <= count:
        raise ValueError(f"threshold should be in [1, {count}], got {threshold}")
    lo = Shamir.split(threshold, count, secret[:16])
    hi = Shamir.split(threshold, count, secret[16:])
    return [(i, a + b) for (i, a), (j, b) in zip(lo, hi) if i == j]


def combine_secret(shares: list[tuple[int, bytes]]) -> bytes:
    """The 32-byte secret from `threshold` shares (distinct indices)."""
    if len({i for i, _ in shares}) != len(shares):
        raise ReconstructionError("Shamir shares with repeated indices cannot be combined")
    if any(len(s) != SHARE_LEN for _, s in shares):
        raise ReconstructionError(f"every Shamir share should be {SHARE_LEN} bytes")
    lo = Shamir.combine([(i, s[:16]) for i, s in shares])
    hi = Shamir.combine([(i, s[16:]) for i, s in shares])
    return lo + hi


def round_binding(
    round_id: bytes,
    params: list[int | float],
    server_key: bytes,
    graph_seed: bytes,
    members: list[int],
) -> bytes:
    """What binds every key of a round to that round and cohort: a SHA-256 of the round id,
    the parameters, the server's round key, the graph seed and the sorted member ids."""
    return sha256(
        b"fedlm-secagg/v1 round",
        round_id,
        msgpack.packb(params),
        server_key,
        graph_seed,
        b"".join(m.to_bytes(4, "big") for m in sorted(members)),
    )
