"""The SecAgg+ communication graph (Bell et al. 2020, §4): a Harary graph on a random ring.

The members are placed on a ring in a pseudo-random order (sorted by SHA-256 of the round's
graph seed and the member id, so that every party computes the same order with no shared
RNG), and each member's neighbours are the k/2 members on either side. With k >= m - 1 the
graph is complete, which is the protocol of Bonawitz et al. 2017. Every device recomputes
its own neighbour set from the seed and the member list the server sent, and refuses a
different one.
"""

from __future__ import annotations

from collections.abc import Sequence

from edge_sdk.secagg.crypto import sha256


def ring_order(members: Sequence[int], seed: bytes) -> list[int]:
    """The members in their pseudo-random ring order for this seed."""
    return sorted(members, key=lambda m: sha256(seed, m.to_bytes(4, "big")))


def neighbours(members: Sequence[int], seed: bytes, degree: int) -> dict[int, frozenset[int]]:
    """Each member's neighbours: the `degree // 2` members on each side of it on the ring.

    For an odd `degree` >= m - 1 (and any degree >= m - 1) the graph is complete.
    """
    m = len(members)
    if len(set(members)) != m:
        raise ValueError("members should be distinct")
    if degree >= m - 1:
        return {i: frozenset(j for j in members if j != i) for i in members}
    order = ring_order(members, seed)
    half = degree // 2
    out: dict[int, frozenset[int]] = {}
    for pos, i in enumerate(order):
        out[i] = frozenset(order[(pos + d) % m] for d in range(-half, half + 1) if d != 0)
    return out
