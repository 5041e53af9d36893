"""A real round driver for the tests: every message goes through its bytes (encode/decode)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from edge_sdk.secagg import (
    AggregateResult,
    DeviceSession,
    Message,
    ServerRound,
    decode,
    encode,
    quantize,
)
from edge_sdk.secagg.params import SecAggParams

PHASES = ("after_advertise", "after_share", "after_masked", "during_unmask")
"""Where a device drops out: it advertised keys but sends no shares; it shared keys but sends
no masked input; it sent its masked input but never answers the unmask request; it answers the
unmask request but the answer arrives after the server closed the phase (a late device)."""


def wire(message: Message) -> Message:
    """The message as the other side sees it: encoded and decoded."""
    return decode(encode(message))


@dataclass
class Round:
    """A round's parties and inputs."""

    params: SecAggParams
    server: ServerRound
    devices: dict[int, DeviceSession]
    updates: dict[int, np.ndarray]
    weights: dict[int, int]
    late: dict[int, object] = field(default_factory=dict)
    """Unmask responses that arrived too late (device id -> message), for the tests to replay."""


def make_round(params: SecAggParams, n: int, seed: int = 0, scale: float = 0.5) -> Round:
    """A server, `n` devices (ids 1..n), random updates (N(0, scale), some beyond the clip)
    and random weights up to the cap."""
    rng = np.random.default_rng(seed)
    server = ServerRound(params)
    ids = list(range(1, n + 1))
    devices = {
        i: DeviceSession(wire(server.setup(i)), rng=np.random.default_rng(seed * 1000 + i))
        for i in ids
    }
    updates = {i: rng.normal(0.0, scale, params.vector_len) for i in ids}
    weights = {i: int(rng.integers(1, params.weight_cap + 1)) for i in ids}
    return Round(params, server, devices, updates, weights)


def run(
    r: Round,
    drops: dict[str, Collection[int]] | None = None,
) -> AggregateResult:
    """Run every phase, with the devices in `drops[phase]` dropping out at that phase."""
    drops = {p: set(drops.get(p, ())) for p in PHASES} if drops else {p: set() for p in PHASES}
    s = r.server
    for i, d in r.devices.items():
        s.receive(wire(d.advertise()))
    requests = s.close_advertise()
    for i, req in requests.items():
        if i in drops["after_advertise"]:
            continue
        s.receive(wire(r.devices[i].share_keys(wire(req))))
    requests = s.close_share_keys()
    for i, req in requests.items():
        if i in drops["after_share"]:
            continue
        s.receive(wire(r.devices[i].masked_input(wire(req), r.updates[i], r.weights[i])))
    requests = s.close_masked_input()
    for i, req in requests.items():
        if i in drops["after_masked"]:
            continue
        response = wire(r.devices[i].unmask(wire(req)))
        if i in drops["during_unmask"]:
            r.late[i] = response
            continue
        s.receive(response)
    return s.close_unmask()


def exact_sum(r: Round, ids: Collection[int]) -> np.ndarray:
    """The plain Σ (wᵢ/W)·clip(xᵢ) over `ids` (float64)."""
    p = r.params
    return sum(np.clip(r.updates[i], -p.clip, p.clip) * (r.weights[i] / p.weight_cap) for i in ids)


def assert_sum_within_grid(r: Round, result: AggregateResult) -> None:
    """The secure sum is the plain weighted sum within the grid's rounding (< Δ per device)."""
    ids = result.survivors
    p = r.params
    err = np.abs(result.sum_weighted - exact_sum(r, ids))
    bound = len(ids) * quantize.grid_step(p)
    assert err.max() < bound, f"error {err.max()} exceeds {len(ids)}·Δ = {bound}"
    assert result.total_weight == sum(r.weights[i] for i in ids)
    exact_mean = sum(np.clip(r.updates[i], -p.clip, p.clip) * r.weights[i] for i in ids) / sum(
        r.weights[i] for i in ids
    )
    mean_bound = bound * p.weight_cap / result.total_weight
    assert np.abs(result.mean - exact_mean).max() < mean_bound
