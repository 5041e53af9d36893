"""The building blocks as the protocol uses them (the primitives themselves are libraries')."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from edge_sdk.secagg import DecryptionError, ReconstructionError, SecAggParams, crypto
from edge_sdk.secagg.graph import neighbours


def test_shamir_any_threshold_subset_recovers_and_fewer_do_not() -> None:
    secret = os.urandom(32)
    shares = crypto.split_secret(secret, 4, 7)
    assert [i for i, _ in shares] == list(range(1, 8))
    for subset in itertools.combinations(shares, 4):
        assert crypto.combine_secret(list(subset)) == secret
    for subset in itertools.combinations(shares, 3):
        assert crypto.combine_secret(list(subset)) != secret
    with pytest.raises(ReconstructionError, match="repeated"):
        crypto.combine_secret([shares[0], shares[0], shares[1], shares[2]])
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.split_secret(b"short", 2, 3)


def test_x25519_mask_key_survives_sharing() -> None:
    sk = crypto.new_private_key()
    shares = crypto.split_secret(crypto.private_bytes(sk), 3, 5)
    back = crypto.private_from_bytes(crypto.combine_secret(shares[1:4]))
    assert crypto.public_bytes(back) == crypto.public_bytes(sk)


def test_pairwise_masks_agree_and_depend_on_the_binding() -> None:
    a, b = crypto.new_private_key(), crypto.new_private_key()
    binding = os.urandom(32)
    ka = crypto.pairwise_mask_key(a, crypto.public_bytes(b), binding)
    kb = crypto.pairwise_mask_key(b, crypto.public_bytes(a), binding)
    assert ka == kb
    assert crypto.pairwise_mask_key(a, crypto.public_bytes(b), os.urandom(32)) != ka
    words = crypto.prg_words(ka, 100_000)
    assert np.array_equal(words, crypto.prg_words(kb, 100_000))
    # Uniform-looking on Z_{2^32}: every byte value about equally often.
    counts = np.bincount(words.view(np.uint8), minlength=256)
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()


def test_share_encryption_is_bound_to_pair_and_round() -> None:
    a, b = crypto.new_private_key(), crypto.new_private_key()
    binding = os.urandom(32)
    key = crypto.share_key(a, crypto.public_bytes(b), binding)
    blob = crypto.encrypt(key, b"share", b"ad")
    assert (
        crypto.decrypt(crypto.share_key(b, crypto.public_bytes(a), binding), blob, b"ad")
        == b"share"
    )
    with pytest.raises(DecryptionError, match="does not verify"):
        crypto.decrypt(key, blob, b"other ad")
    with pytest.raises(DecryptionError, match="does not verify"):
        crypto.decrypt(crypto.share_key(a, crypto.public_bytes(b), os.urandom(32)), blob, b"ad")
    with pytest.raises(DecryptionError, match="shorter"):
        crypto.decrypt(key, b"\x00" * 10, b"ad")


def test_graph_is_symmetric_regular_and_seeded() -> None:
    members = list(range(10, 74))
    seed = os.urandom(32)
    g = neighbours(members, seed, 24)
    assert all(len(n) == 24 and i not in n for i, n in g.items())
    assert all(i in g[j] for i, n in g.items() for j in n)  # symmetric
    assert neighbours(list(reversed(members)), seed, 24) == g  # order of the list is irrelevant
    assert neighbours(members, os.urandom(32), 24) != g
    complete = neighbours(members[:5], seed, 24)
    assert all(len(n) == 4 for n in complete.values())
    with pytest.raises(ValueError, match="distinct"):
        neighbours([1, 1, 2], seed, 2)


def test_round_binding_changes_with_every_input() -> None:
    p = SecAggParams(cohort_size=8, vector_len=10).to_list()
    rid, key, seed = os.urandom(16), os.urandom(32), os.urandom(32)
    base = crypto.round_binding(rid, p, key, seed, [1, 2, 3])
    assert crypto.round_binding(rid, p, key, seed, [3, 2, 1]) == base
    assert crypto.round_binding(os.urandom(16), p, key, seed, [1, 2, 3]) != base
    assert crypto.round_binding(rid, p[:-1] + [6], key, seed, [1, 2, 3]) != base
    assert crypto.round_binding(rid, p, os.urandom(32), seed, [1, 2, 3]) != base
    assert crypto.round_binding(rid, p, key, os.urandom(32), [1, 2, 3]) != base
    assert crypto.round_binding(rid, p, key, seed, [1, 2, 4]) != base
