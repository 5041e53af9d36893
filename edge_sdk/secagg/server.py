"""The server's side of a round: collect each phase's messages, close the phase, and finally
reconstruct the sum. The server never sees an individual update unmasked.

    ADVERTISE --close_advertise()--> SHARE_KEYS --close_share_keys()--> MASKED_INPUT
              --close_masked_input()--> UNMASK --close_unmask()--> DONE   (or FAILED)

`receive(message)` accepts the messages of the current phase only: anything else raises
`PhaseError` (`expected SHARE_KEYS, got MASKED_INPUT`), which is also how a device that comes
back late is refused: once a phase is closed, a device that did not answer in it is a drop-out
for the rest of the round. Closing a phase computes who is still in (U1 ⊇ U2 ⊇ U3 ⊇ U4 in the
notation of Bonawitz et al. 2017) and returns the next request for each of them.
"""

from __future__ import annotations

import enum
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_sdk.secagg import crypto, quantize
from edge_sdk.secagg.device import input_tag_data, mask_sign
from edge_sdk.secagg.errors import (
    DropoutError,
    PhaseError,
    ProtocolViolationError,
    ReconstructionError,
    ReplayError,
)
from edge_sdk.secagg.graph import neighbours
from edge_sdk.secagg.messages import (
    MAX_DEVICE_ID,
    ROUND_ID_LEN,
    AdvertiseKeys,
    MaskedInput,
    MaskedInputRequest,
    Message,
    RoundSetup,
    ShareKeys,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskResponse,
)
from edge_sdk.secagg.params import MIN_COHORT, SecAggParams
from edge_sdk.validators import is_int

log = logging.getLogger(__name__)

_MAX_SUBSET_TRIES = 64
"""Random t-subsets of revealed shares tried when the first t give a wrong secret."""


class ServerState(enum.Enum):
    """The phase a round is in (the phase whose messages it accepts)."""

    ADVERTISE = "ADVERTISE"
    SHARE_KEYS = "SHARE_KEYS"
    MASKED_INPUT = "MASKED_INPUT"
    UNMASK = "UNMASK"
    DONE = "DONE"
    FAILED = "FAILED"


_PHASE_OF = {
    AdvertiseKeys: ServerState.ADVERTISE,
    ShareKeys: ServerState.SHARE_KEYS,
    MaskedInput: ServerState.MASKED_INPUT,
    UnmaskResponse: ServerState.UNMASK,
}


@dataclass(frozen=True)
class AggregateResult:
    """What the server learns from a round: sums over the survivors, nothing per device."""

    sum_weighted: np.ndarray
    """Σ (wᵢ/W)·clip(xᵢ), float64 (N,), within n·Δ of the exact value per coordinate."""
    total_weight: int
    """Σ wᵢ over the survivors (recovered from the masked weight coordinate)."""
    survivors: tuple[int, ...]
    """Devices whose inputs are in the sum (U3)."""
    dropped: tuple[int, ...]
    """Devices that advertised keys but whose input is not in the sum."""
    params: SecAggParams

    @property
    def mean(self) -> np.ndarray:
        """The weighted mean Σ wᵢ·xᵢ / Σ wᵢ (float64 (N,)), clipped to [-C, C].

        Honest inputs are clipped to [-C, C], so their mean is too (up to the grid's rounding).
        The server cannot see a single input, but it can bound the sum: a device that masked a
        value outside the grid (any residue of the ring) moves the mean at most to ±C here.
        """
        mean = quantize.weighted_mean(self.sum_weighted, self.total_weight, self.params)
        return np.clip(mean, -self.params.clip, self.params.clip)


class ServerRound:
    """One round of secure aggregation on the server. Not thread-safe: callers serialise."""

    def __init__(self, params: SecAggParams, *, round_id: bytes | None = None) -> None:
        if round_id is not None and len(round_id) != ROUND_ID_LEN:
            raise ValueError(f"round_id should be {ROUND_ID_LEN} bytes, got {len(round_id)}")
        self.params = params
        self.round_id = round_id or os.urandom(ROUND_ID_LEN)
        self.state = ServerState.ADVERTISE
        self._sk = crypto.new_private_key()
        self.server_key = crypto.public_bytes(self._sk)
        self._graph_seed = os.urandom(crypto.KEY_LEN)
        self._invited: set[int] = set()
        self._keys: dict[int, tuple[bytes, bytes]] = {}  # U1: id -> (mask_key, enc_key)
        self._graph: dict[int, frozenset[int]] = {}
        self._binding = b""
        self._shares: dict[int, ShareKeys] = {}  # U2 candidates
        self._u2: frozenset[int] = frozenset()
        self._forwarded: dict[int, frozenset[int]] = {}  # i -> senders whose shares i got
        self._inputs: dict[int, bytes] = {}  # U3: id -> packed masked vector
        self._responses: dict[int, UnmaskResponse] = {}  # U4
        self._total = np.zeros(params.vector_len + 1, dtype=np.uint32)

    # --- guards ------------------------------------------------------------------------------

    def _expect(self, state: ServerState, got: str) -> None:
        if self.state is not state:
            raise PhaseError(f"round {self.round_id.hex()}: expected {self.state.value}, got {got}")

    def _fail(self, error: Exception) -> None:
        self.state = ServerState.FAILED
        log.warning("secagg round %s failed: %s", self.round_id.hex(), error)
        raise error

    # --- invitations and messages ------------------------------------------------------------

    def setup(self, device_id: int) -> RoundSetup:
        """Invite `device_id` to the round (at most `cohort_size` devices, each once)."""
        self._expect(ServerState.ADVERTISE, "SETUP")
        if not is_int(device_id):
            raise TypeError(f"device_id should be an int, got {device_id!r}")
        if not 0 <= device_id <= MAX_DEVICE_ID:
            raise ValueError(f"device_id should be in [0, {MAX_DEVICE_ID}], got {device_id}")
        if device_id in self._invited:
            raise ValueError(f"device {device_id} is already invited to this round")
        if len(self._invited) >= self.params.cohort_size:
            raise ValueError(f"the cohort is full ({self.params.cohort_size} devices)")
        self._invited.add(device_id)
        return RoundSetup(self.round_id, device_id, self.params, self.server_key)

    def receive(self, message: Message) -> None:
        """Accept one device message of the current phase (see the class doc for errors)."""
        phase = _PHASE_OF.get(type(message))
        if phase is None:
            raise PhaseError(f"a {type(message).__name__} is not a device-to-server message")
        self._expect(phase, phase.value)
        if message.round_id != self.round_id:
            raise ProtocolViolationError(
                f"message for round {message.round_id.hex()} sent to round {self.round_id.hex()}"
            )
        handlers: dict[ServerState, Callable[[Any], None]] = {
            ServerState.ADVERTISE: self._on_advertise,
            ServerState.SHARE_KEYS: self._on_share_keys,
            ServerState.MASKED_INPUT: self._on_masked_input,
            ServerState.UNMASK: self._on_unmask,
        }
        handlers[phase](message)

    def _on_advertise(self, m: AdvertiseKeys) -> None:
        if m.device_id not in self._invited:
            raise ProtocolViolationError(f"device {m.device_id} is not invited to this round")
        if m.device_id in self._keys:
            raise ProtocolViolationError(f"device {m.device_id} already advertised keys")
        used = {k for pair in self._keys.values() for k in pair}
        if m.mask_key == m.enc_key or {m.mask_key, m.enc_key} & used:
            raise ProtocolViolationError(f"device {m.device_id} advertised a key already in use")
        self._keys[m.device_id] = (m.mask_key, m.enc_key)

    def _on_share_keys(self, m: ShareKeys) -> None:
        i = m.device_id
        if i not in self._keys or i in self._shares:
            raise ProtocolViolationError(f"device {i} may not send shares now (unknown or repeat)")
        if set(m.shares) != self._graph[i]:
            raise ProtocolViolationError(
                f"device {i} sent shares for {sorted(m.shares)}, expected {sorted(self._graph[i])}"
            )
        self._shares[i] = m

    def _on_masked_input(self, m: MaskedInput) -> None:
        i = m.device_id
        if i not in self._u2 or i in self._inputs:
            raise ProtocolViolationError(f"device {i} may not send a masked input now")
        if len(m.payload) != self.params.packed_len:
            raise ProtocolViolationError(
                f"device {i}: masked input of {len(m.payload)} bytes, expected "
                f"{self.params.packed_len}"
            )
        key = crypto.input_mac_key(self._sk, self._keys[i][1], self._binding)
        if not crypto.mac_ok(key, input_tag_data(self._binding, i, m.payload), m.tag):
            raise ReplayError(
                f"device {i}: masked input is not bound to round {self.round_id.hex()} and this "
                "cohort (tag does not verify); refused"
            )
        self._inputs[i] = m.payload
        # Sum on arrival (wrapping mod 2^32, as the masks do): the work is spread over the
        # phase instead of piling up when the round closes.
        self._total += quantize.unpack(m.payload, self.params)

    def _on_unmask(self, m: UnmaskResponse) -> None:
        i = m.device_id
        if i not in self._inputs or i in self._responses:
            raise ProtocolViolationError(f"device {i} may not send an unmask response now")
        active, dropped = set(self._inputs), self._u2 - set(self._inputs)
        held = self._forwarded[i]
        if not set(m.seed_shares) <= active & held or not set(m.key_shares) <= dropped & held:
            raise ProtocolViolationError(f"device {i} revealed shares it was not asked for")
        for owner, (index, _) in (*m.seed_shares.items(), *m.key_shares.items()):
            if index != sorted(self._graph[owner]).index(i) + 1:
                raise ProtocolViolationError(f"device {i}: share of {owner} has a wrong index")
        self._responses[i] = m

    # --- closing phases ----------------------------------------------------------------------

    def close_advertise(self) -> dict[int, ShareKeysRequest]:
        """End round 0: fix the members (U1) and the graph; one request per member."""
        self._expect(ServerState.ADVERTISE, "close of ADVERTISE")
        p = self.params
        members = sorted(self._keys)
        if len(members) < max(MIN_COHORT, p.threshold + 1):
            self._fail(
                DropoutError(
                    f"{len(members)} devices advertised keys; the round needs at least "
                    f"{max(MIN_COHORT, p.threshold + 1)} (threshold {p.threshold} + 1)"
                )
            )
        self._graph = neighbours(members, self._graph_seed, p.degree)
        self._binding = crypto.round_binding(
            self.round_id, p.to_list(), self.server_key, self._graph_seed, members
        )
        self.state = ServerState.SHARE_KEYS
        return {
            i: ShareKeysRequest(
                self.round_id,
                i,
                self._graph_seed,
                tuple(members),
                {j: self._keys[j] for j in sorted(self._graph[i])},
            )
            for i in members
        }

    def close_share_keys(self) -> dict[int, MaskedInputRequest]:
        """End round 1: fix U2 and forward to each member its neighbours' encrypted shares.

        A device with fewer than `threshold` neighbours in U2 would abort, and its own secrets
        could not be recovered: it is left out, and so on until every member of U2 has enough.
        """
        self._expect(ServerState.SHARE_KEYS, "close of SHARE_KEYS")
        u2 = set(self._shares)
        while True:
            short = {i for i in u2 if len(self._graph[i] & u2) < self.params.threshold}
            if not short:
                break
            u2 -= short
        if len(u2) < MIN_COHORT:
            self._fail(
                DropoutError(
                    f"{len(self._shares)} devices shared keys, {len(u2)} with at least "
                    f"{self.params.threshold} sharing neighbours; the round needs {MIN_COHORT}"
                )
            )
        self._u2 = frozenset(u2)
        self._forwarded = {i: frozenset(self._graph[i] & u2) for i in u2}
        self.state = ServerState.MASKED_INPUT
        return {
            i: MaskedInputRequest(
                self.round_id, i, {j: self._shares[j].shares[i] for j in sorted(senders)}
            )
            for i, senders in self._forwarded.items()
        }

    def close_masked_input(self) -> dict[int, UnmaskRequest]:
        """End round 2: fix U3 (inputs received) and ask each of them for shares."""
        self._expect(ServerState.MASKED_INPUT, "close of MASKED_INPUT")
        active = tuple(sorted(self._inputs))
        dropped = tuple(sorted(self._u2 - set(self._inputs)))
        if len(active) < max(MIN_COHORT, self.params.threshold):
            self._fail(
                DropoutError(
                    f"{len(active)} masked inputs arrived; the round needs at least "
                    f"{max(MIN_COHORT, self.params.threshold)}"
                )
            )
        self.state = ServerState.UNMASK
        return {i: UnmaskRequest(self.round_id, i, active, dropped) for i in active}

    def _reconstruct(self, owner: int, kind: str, check: Callable[[bytes], bool]) -> bytes:
        """Rebuild `owner`'s seed or mask key from the revealed shares and `check` it.

        The first t shares (by index) are tried first. If the result fails its check (a
        device sent a wrong share), up to `_MAX_SUBSET_TRIES` random t-subsets of all the
        shares are tried: with m shares of which one is bad, a random subset avoids it with
        probability (m - t)/m, so one bad share costs a few tries, not C(m, t).
        """
        table = "seed_shares" if kind == "seed" else "key_shares"
        shares = sorted(
            getattr(r, table)[owner] for r in self._responses.values() if owner in getattr(r, table)
        )
        t = self.params.threshold
        if len(shares) < t:
            self._fail(
                DropoutError(
                    f"only {len(shares)} shares of device {owner}'s {kind} arrived, the "
                    f"threshold is {t}: too many of its neighbours dropped out"
                )
            )
        secret = crypto.combine_secret(shares[:t])
        if check(secret):
            return secret
        rng = random.Random(owner)  # not secret: only picks which shares to combine
        for _ in range(_MAX_SUBSET_TRIES if len(shares) > t else 0):
            secret = crypto.combine_secret(sorted(rng.sample(shares, t)))
            if check(secret):
                log.warning("device %d's %s: a revealed share was wrong; recovered", owner, kind)
                return secret
        self._fail(
            ReconstructionError(
                f"device {owner}'s {kind} does not match its commitment with any tried subset "
                f"of the {len(shares)} revealed shares: a neighbour sent wrong shares"
            )
        )
        raise AssertionError("unreachable")  # _fail raises

    def close_unmask(self) -> AggregateResult:
        """End round 3: reconstruct survivors' seeds and drop-outs' mask keys; return the sum."""
        self._expect(ServerState.UNMASK, "close of UNMASK")
        p = self.params
        count = p.vector_len + 1
        active = sorted(self._inputs)
        dropped = sorted(self._u2 - set(self._inputs))
        total = self._total.copy()  # Σ of the masked inputs of U3 (see _on_masked_input)
        for i in active:
            commitment = self._shares[i].commitment

            def seed_ok(b: bytes, c: bytes = commitment) -> bool:
                return crypto.seed_commitment(b, self._binding) == c

            seed = self._reconstruct(i, "seed", seed_ok)
            total -= crypto.prg_words(crypto.self_mask_key(seed, self._binding), count)
        for j in dropped:
            # Only survivors that received j's shares masked with j (see close_share_keys).
            partners = [i for i in active if j in self._forwarded[i]]
            if not partners:
                continue
            advertised = self._keys[j][0]

            def key_ok(b: bytes, a: bytes = advertised) -> bool:
                return crypto.public_bytes(crypto.private_from_bytes(b)) == a

            raw = self._reconstruct(j, "mask key", key_ok)
            sk = crypto.private_from_bytes(raw)
            for i in partners:
                words = crypto.prg_words(
                    crypto.pairwise_mask_key(sk, self._keys[i][0], self._binding), count
                )
                if mask_sign(i, j) > 0:
                    total -= words
                else:
                    total += words
        total[:-1] &= np.uint32((1 << p.ring_bits) - 1)
        sum_y, weight = quantize.decode_sum(total, len(active), p)
        # The one clear check of the inputs the server has: honest weights are in [0, W] (all
        # W under DP), so their sum is in [0, s·W]. A sum outside means a device masked a
        # weight outside its range (to scale the mean); the round is refused, not published.
        most = len(active) * p.weight_cap
        if not 0 < weight <= most or (p.dp and weight != most):
            self.state = ServerState.FAILED
            raise ProtocolViolationError(
                f"the masked weights of {len(active)} devices sum to {weight}, outside "
                f"{'exactly ' + str(most) if p.dp else f'(0, {most}]'}: a device sent a weight "
                "outside its range; the round is not published"
            )
        self.state = ServerState.DONE
        not_in = sorted(set(self._keys) - set(active))
        log.info(
            "secagg round %s: summed %d devices, %d dropped",
            self.round_id.hex(),
            len(active),
            len(not_in),
        )
        return AggregateResult(sum_y, weight, tuple(active), tuple(not_in), p)
