"""The device's side of a round: a small state machine, one method per protocol phase.

    SETUP --advertise()--> ADVERTISED --share_keys()--> SHARED --masked_input()--> MASKED
          --unmask()--> DONE            (any protocol violation: --> ABORTED)

Each method takes the server's message for that phase and returns the device's answer. A
message for another phase raises `PhaseError` and changes nothing; a message that breaks the
protocol (wrong round, a neighbour set that is not the graph's, a share that does not decrypt,
a request for both kinds of share of one device) raises a `ProtocolViolationError` subclass
and aborts the session for good, wiping its secrets.
"""

from __future__ import annotations

import enum
import logging
import os

import msgpack
import numpy as np

from edge_sdk.secagg import crypto, quantize
from edge_sdk.secagg.errors import (
    ConsistencyError,
    DecryptionError,
    DropoutError,
    PhaseError,
    ProtocolViolationError,
)
from edge_sdk.secagg.graph import neighbours
from edge_sdk.secagg.messages import (
    AdvertiseKeys,
    MaskedInput,
    MaskedInputRequest,
    RoundSetup,
    ShareKeys,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskResponse,
)

log = logging.getLogger(__name__)


class DeviceState(enum.Enum):
    """Where a device is in its round."""

    SETUP = "SETUP"
    ADVERTISED = "ADVERTISED"
    SHARED = "SHARED"
    MASKED = "MASKED"
    DONE = "DONE"
    ABORTED = "ABORTED"


_NEXT_PHASE = {
    DeviceState.SETUP: "ADVERTISE",
    DeviceState.ADVERTISED: "SHARE_KEYS",
    DeviceState.SHARED: "MASKED_INPUT",
    DeviceState.MASKED: "UNMASK",
    DeviceState.DONE: "nothing (the round is done)",
    DeviceState.ABORTED: "nothing (the device left the round)",
}
"""The phase whose request a device in each state accepts next."""


def share_plaintext(sender: int, receiver: int, index: int, seed: bytes, key: bytes) -> bytes:
    """What one encrypted share carries (msgpack array; also parsed by `parse_share`)."""
    return msgpack.packb([sender, receiver, index, seed, key], use_bin_type=True)


def share_associated_data(binding: bytes, sender: int, receiver: int) -> bytes:
    """AEAD associated data of a share: the round binding and the direction of the pair."""
    return binding + sender.to_bytes(4, "big") + receiver.to_bytes(4, "big")


def mask_sign(i: int, j: int) -> int:
    """+1 if device i adds the mask it shares with j, -1 if it subtracts it (so pairs cancel)."""
    return 1 if i < j else -1


def input_tag_data(binding: bytes, device_id: int, payload: bytes) -> bytes:
    """What the masked-input tag authenticates."""
    return binding + device_id.to_bytes(4, "big") + payload


class DeviceSession:
    """One device in one round. Not thread-safe; one instance per round."""

    def __init__(self, setup: RoundSetup, *, rng: np.random.Generator | None = None) -> None:
        self.round_id = setup.round_id
        self.device_id = setup.device_id
        self.params = setup.params
        self.server_key = setup.server_key
        self.state = DeviceState.SETUP
        # The stochastic rounding needs fresh randomness (not a security primitive: it only has
        # to be unbiased), seeded from the OS unless a test passes its own generator.
        self._rng = (
            rng if rng is not None else np.random.default_rng(int.from_bytes(os.urandom(16), "big"))
        )
        self._mask_sk = crypto.new_private_key()
        self._enc_sk = crypto.new_private_key()
        self._seed = os.urandom(crypto.KEY_LEN)
        self._binding = b""
        self._neighbour_keys: dict[int, tuple[bytes, bytes]] = {}
        self._held: dict[int, tuple[int, bytes, bytes]] = {}
        """Shares this device holds: owner id -> (index, seed share, mask-key share)."""
        self._graph: dict[int, frozenset[int]] = {}

    # --- guards ------------------------------------------------------------------------------

    def _expect(self, state: DeviceState, got: str) -> None:
        if self.state is not state:
            raise PhaseError(
                f"device {self.device_id}: expected {_NEXT_PHASE[self.state]}, got {got}"
            )

    def _check_addressed(self, round_id: bytes, device_id: int) -> None:
        if round_id != self.round_id or device_id != self.device_id:
            self._violation(
                ProtocolViolationError(
                    f"device {self.device_id}: message for round {round_id.hex()} device "
                    f"{device_id}, but this is round {self.round_id.hex()}"
                )
            )

    def _violation(self, error: Exception) -> None:
        self.abort()
        raise error

    def abort(self) -> None:
        """Leave the round for good and forget every secret of it."""
        self.state = DeviceState.ABORTED
        self._seed = b""
        self._held.clear()
        log.info("secagg device %d left round %s", self.device_id, self.round_id.hex())

    # --- phases ------------------------------------------------------------------------------

    def advertise(self) -> AdvertiseKeys:
        """Round 0: the device's two fresh public keys."""
        self._expect(DeviceState.SETUP, "ADVERTISE")
        self.state = DeviceState.ADVERTISED
        return AdvertiseKeys(
            self.round_id,
            self.device_id,
            crypto.public_bytes(self._mask_sk),
            crypto.public_bytes(self._enc_sk),
        )

    def share_keys(self, request: ShareKeysRequest) -> ShareKeys:
        """Round 1: Shamir-share the self-mask seed and the mask key, one encrypted share per
        neighbour, after checking that the neighbours are the graph's."""
        self._expect(DeviceState.ADVERTISED, "SHARE_KEYS")
        self._check_addressed(request.round_id, request.device_id)
        p = self.params
        members = list(request.members)
        if (
            self.device_id not in members
            or len(members) > p.cohort_size
            or len(set(members)) != len(members)
        ):
            self._violation(
                ProtocolViolationError(
                    f"device {self.device_id}: member list of {len(members)} ids does not "
                    f"include this device, repeats an id or exceeds the cohort size "
                    f"{p.cohort_size}"
                )
            )
        self._graph = neighbours(members, request.graph_seed, p.degree)
        mine = self._graph[self.device_id]
        if set(request.keys) != mine:
            self._violation(
                ProtocolViolationError(
                    f"device {self.device_id}: the server sent keys of {sorted(request.keys)}, "
                    f"but the graph's neighbours are {sorted(mine)}"
                )
            )
        own = {crypto.public_bytes(self._mask_sk), crypto.public_bytes(self._enc_sk)}
        all_keys = [k for pair in request.keys.values() for k in pair]
        if len(set(all_keys)) != len(all_keys) or own & set(all_keys):
            self._violation(
                ProtocolViolationError(f"device {self.device_id}: neighbour keys are reused")
            )
        if len(mine) < p.threshold:
            self._violation(
                DropoutError(
                    f"device {self.device_id}: {len(mine)} neighbours advertised keys, fewer "
                    f"than the threshold {p.threshold}"
                )
            )
        self._binding = crypto.round_binding(
            self.round_id, p.to_list(), self.server_key, request.graph_seed, members
        )
        self._neighbour_keys = dict(request.keys)
        order = sorted(mine)
        seed_shares = crypto.split_secret(self._seed, p.threshold, len(order))
        key_shares = crypto.split_secret(
            crypto.private_bytes(self._mask_sk), p.threshold, len(order)
        )
        ciphertexts: dict[int, bytes] = {}
        for j, (index, seed_share), (_, key_share) in zip(order, seed_shares, key_shares):
            key = crypto.share_key(self._enc_sk, request.keys[j][1], self._binding)
            plain = share_plaintext(self.device_id, j, index, seed_share, key_share)
            ciphertexts[j] = crypto.encrypt(
                key, plain, share_associated_data(self._binding, self.device_id, j)
            )
        self.state = DeviceState.SHARED
        commitment = crypto.seed_commitment(self._seed, self._binding)
        return ShareKeys(self.round_id, self.device_id, commitment, ciphertexts)

    def _open_share(self, sender: int, blob: bytes) -> tuple[int, bytes, bytes]:
        key = crypto.share_key(self._enc_sk, self._neighbour_keys[sender][1], self._binding)
        plain = crypto.decrypt(
            key, blob, share_associated_data(self._binding, sender, self.device_id)
        )
        fields = msgpack.unpackb(plain, raw=False, max_str_len=0, max_array_len=5)
        s, r, index, seed_share, key_share = fields
        if s != sender or r != self.device_id:
            raise DecryptionError(
                f"device {self.device_id}: share from {sender} names sender {s} receiver {r}"
            )
        # The owner numbered its shares 1..k in the sorted order of its own neighbours.
        expected_index = sorted(self._graph[sender]).index(self.device_id) + 1
        lengths_ok = all(
            isinstance(x, bytes) and len(x) == crypto.SHARE_LEN for x in (seed_share, key_share)
        )
        if index != expected_index or not lengths_ok:
            raise DecryptionError(f"device {self.device_id}: share from {sender} is malformed")
        return index, seed_share, key_share

    def masked_input(
        self, request: MaskedInputRequest, update: np.ndarray, num_examples: int
    ) -> MaskedInput:
        """Round 2: decrypt the neighbours' shares, then send the update masked with the
        self-mask and one pairwise mask per neighbour that shared keys.

        `update` is the plain float vector (N,); `num_examples` its weight, capped here at
        `params.weight_cap` (the weight travels masked, inside the vector).
        """
        self._expect(DeviceState.SHARED, "MASKED_INPUT")
        self._check_addressed(request.round_id, request.device_id)
        p = self.params
        unknown = set(request.shares) - set(self._neighbour_keys)
        if unknown:
            self._violation(
                ProtocolViolationError(
                    f"device {self.device_id}: shares from non-neighbours {sorted(unknown)}"
                )
            )
        if len(request.shares) < p.threshold:
            self._violation(
                DropoutError(
                    f"device {self.device_id}: {len(request.shares)} neighbours shared keys, "
                    f"fewer than the threshold {p.threshold}"
                )
            )
        held: dict[int, tuple[int, bytes, bytes]] = {}
        for sender, blob in request.shares.items():
            try:
                held[sender] = self._open_share(sender, blob)
            except (DecryptionError, ValueError, TypeError, msgpack.UnpackException) as exc:
                self._violation(
                    DecryptionError(f"device {self.device_id}: share from {sender}: {exc}")
                )
        weight = quantize.capped_weight(num_examples, p)
        if p.dp:  # DP bounds one device's effect: every device counts the same, as central DP
            weight = p.weight_cap
        # (N + 1,) uint32; under DP with this device's share of the noise (os.urandom-seeded)
        ring = quantize.encode(update, weight, p, self._rng)
        count = p.vector_len + 1
        ring += crypto.prg_words(crypto.self_mask_key(self._seed, self._binding), count)
        for j in sorted(held):
            key = crypto.pairwise_mask_key(self._mask_sk, self._neighbour_keys[j][0], self._binding)
            if mask_sign(self.device_id, j) > 0:
                ring += crypto.prg_words(key, count)
            else:
                ring -= crypto.prg_words(key, count)
        ring[:-1] &= np.uint32((1 << p.ring_bits) - 1)
        payload = quantize.pack(ring, p)
        tag = crypto.mac(
            crypto.input_mac_key(self._enc_sk, self.server_key, self._binding),
            input_tag_data(self._binding, self.device_id, payload),
        )
        self._held = held
        self.state = DeviceState.MASKED
        return MaskedInput(self.round_id, self.device_id, payload, tag)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Round 3: reveal seed shares of survivors and mask-key shares of drop-outs, once.

        The consistency check: a device that is named both active and dropped, or a second
        unmask request, is refused: with both shares of one device the server could remove
        every mask from that device's input.
        """
        if self.state is DeviceState.DONE:
            self._violation(
                ConsistencyError(
                    f"device {self.device_id}: already answered an unmask request; refusing "
                    "a second one (it could ask for the other kind of share)"
                )
            )
        self._expect(DeviceState.MASKED, "UNMASK")
        self._check_addressed(request.round_id, request.device_id)
        both = set(request.active) & set(request.dropped)
        if both:
            self._violation(
                ConsistencyError(
                    f"device {self.device_id}: the server asked for both the seed share and "
                    f"the mask-key share of devices {sorted(both)}; refusing"
                )
            )
        if self.device_id not in request.active:
            self._violation(
                ProtocolViolationError(
                    f"device {self.device_id}: not listed as active in its own unmask request"
                )
            )
        if len(request.active) < self.params.threshold:
            self._violation(
                DropoutError(
                    f"device {self.device_id}: {len(request.active)} devices survived, fewer "
                    f"than the threshold {self.params.threshold}"
                )
            )
        seeds = {j: (self._held[j][0], self._held[j][1]) for j in request.active if j in self._held}
        keys = {j: (self._held[j][0], self._held[j][2]) for j in request.dropped if j in self._held}
        self.state = DeviceState.DONE
        self._held.clear()
        self._seed = b""
        return UnmaskResponse(self.round_id, self.device_id, seeds, keys)
