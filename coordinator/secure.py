"""Secure aggregation on the coordinator: one `ServerRound` per FedAvg round, over REST.

With `CoordinatorConfig.secure` the coordinator never receives a device's update in the clear.
A device that trained from global version v runs the protocol of `edge_sdk.secagg` instead
of POST /v1/updates:

    POST /v1/secagg/setup         {"version": v}                      -> RoundSetup (FSAG bytes)
    POST /v1/secagg/advertise     AdvertiseKeys                       -> 202
    POST /v1/secagg/next          {"round_id": …, "phase": "share_keys"} -> ShareKeysRequest
    POST /v1/secagg/share_keys    ShareKeys                           -> 202
    POST /v1/secagg/next          {…, "phase": "masked_input"}        -> MaskedInputRequest
    POST /v1/secagg/masked_input  MaskedInput                         -> 202
    POST /v1/secagg/next          {…, "phase": "unmask"}              -> UnmaskRequest
    POST /v1/secagg/unmask        UnmaskResponse                      -> 202

The cohort: with `fedavg`, the round's participants, i.e. the first `clients_per_round`
devices that ask to join for the current version. With `fedbuff`, the first `buffer_size` (K)
devices that pulled the same global version v and ask to join for it (v at most
`max_staleness` versions old); several cohorts, of different versions or one after another of
the same version, may run at once. `cohort_size_of` says which. A phase closes when every
device asked has answered, or `secure_phase_s` after it opened (the advertise phase: after the first
device joined, once at least `min_cohort` devices advertised keys). A device that has not
answered by then is a drop-out, handled as the protocol specifies (`ServerRound.close_*`).
When the unmask phase closes, the reconstructed *sum* enters aggregation as one update: the
weighted mean B = Σ wᵢ·Bᵢ / Σ wᵢ, with Σ wᵢ recovered from the masked weight coordinate.
With `fedbuff` the cohort is one buffered update of the version it trained from: a cohort of
version v that closes when version v + s is current enters with its mean delta scaled by
FedBuff's staleness weight (1 + s)^-a (`FedBuff.staleness_exponent`), and one more than
`max_staleness` versions old is dropped.

What is stored: the masked vectors (table `secagg_masked_inputs` of the coordinator's
database, as received) and the published global adapter (the sum). What is logged: counts,
device ids and round ids. No unmasked individual update exists on the coordinator at any time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from coordinator.errors import BadRequestError, BusyError, ConflictError, ForbiddenError
from coordinator.lora_math import staleness_weight
from coordinator.strategies import FedBuff
from edge_sdk.secagg import (
    MIN_COHORT,
    AdvertiseKeys,
    MaskedInput,
    MessageError,
    PhaseError,
    ProtocolViolationError,
    ReplayError,
    SecAggError,
    SecAggLimits,
    SecAggParams,
    ServerRound,
    ServerState,
    ShareKeys,
    UnmaskResponse,
    decode_as,
    encode,
)
from edge_sdk.secagg import dp as secagg_dp
from edge_sdk.secagg.params import grid_bits_for

if TYPE_CHECKING:
    from coordinator.state_machine import Coordinator

log = logging.getLogger(__name__)

PHASES = ("advertise", "share_keys", "masked_input", "unmask")
"""The device-to-coordinator phases, in protocol order (`POST /v1/secagg/{phase}`)."""

MESSAGE_OF: dict[str, type[AdvertiseKeys | ShareKeys | MaskedInput | UnmaskResponse]] = {
    "advertise": AdvertiseKeys,
    "share_keys": ShareKeys,
    "masked_input": MaskedInput,
    "unmask": UnmaskResponse,
}

CONTROL_MAX_BYTES = 1024
"""Largest body of /v1/secagg/setup and /v1/secagg/next (a small msgpack map)."""

PROTOCOL_OVERHEAD_BYTES = 1 << 20
"""Room for the protocol's own fields on top of a packed masked vector (keys, shares, ids)."""


def cohort_size_of(config: Any) -> int:
    """Most devices in one cohort: FedAvg's `clients_per_round`, or FedBuff's `buffer_size` K
    (the first K devices that pull the same version)."""
    strategy = config.strategy
    return strategy.buffer_size if isinstance(strategy, FedBuff) else strategy.clients_per_round


def cohort_flag_of(config: Any) -> str:
    """The CLI flag that sets `cohort_size_of(config)` (for error messages)."""
    return "--buffer-size" if isinstance(config.strategy, FedBuff) else "--clients-per-round"


def secagg_params(config: Any, vector_len: int, weight_cap: int) -> SecAggParams:
    """The round parameters a coordinator config implies (`config`: a `CoordinatorConfig`).

    With `aggregation.dp` the DP is distributed (`edge_sdk.secagg.dp`): devices clip their
    update's L2 norm to `dp.clip_norm` and add Skellam noise calibrated so that a sum of the
    minimum cohort carries noise of std `dp.noise_multiplier` × the L2 sensitivity.
    """
    cohort = cohort_size_of(config)
    params = SecAggParams(
        cohort_size=cohort,
        vector_len=vector_len,
        clip=config.secure_clip,
        grid_bits=config.secure_grid_bits or grid_bits_for(cohort),
        weight_cap=weight_cap,
    )
    dp_config = config.aggregation.dp
    if dp_config is None:
        return params
    probe = dataclasses.replace(params, l2_clip=dp_config.clip_norm, noise_mu=1.0)
    mu = secagg_dp.noise_mu_for(dp_config.noise_multiplier, probe, min_cohort_of(config, params))
    return dataclasses.replace(probe, noise_mu=mu)


def min_cohort_of(config: Any, params: SecAggParams) -> int:
    """The smallest cohort a round accepts: the configured one, never below what the protocol
    needs (3 devices, and threshold + 1 that advertise keys) nor the strategy's own floor
    (FedAvg's `min_clients`, FedBuff's `min_updates`)."""
    strategy = config.strategy
    floor = strategy.min_updates if isinstance(strategy, FedBuff) else strategy.min_clients
    return max(config.min_cohort, MIN_COHORT, params.threshold + 1, floor)


@dataclass
class _Round:
    """One cohort: the protocol's server state plus who is who and what each device is asked."""

    version: int
    server: ServerRound
    opened_at: float
    devices: dict[str, int] = field(default_factory=dict)
    """client id -> device id (1..n). Kept in memory only, never sent or stored."""
    setups: dict[int, bytes] = field(default_factory=dict)
    phase: int = 0
    """Index in PHASES of the phase whose messages the round accepts now."""
    phase_opened_at: float = 0.0
    expected: set[int] = field(default_factory=set)
    answered: set[int] = field(default_factory=set)
    requests: dict[int, bytes] = field(default_factory=dict)
    """The encoded request of the open phase, per device asked (phase >= 1)."""
    received: dict[tuple[str, int], bytes] = field(default_factory=dict)
    """(phase, device id) -> sha256 of the accepted message: a retried send (its answer was
    lost) is acknowledged again, without being applied twice."""
    failed: str | None = None
    done: bool = False


class SecureAggregation:
    """The coordinator's side of secure aggregation; thread-safe (one lock)."""

    def __init__(self, coordinator: Coordinator, clock: Callable[[], float] = time.time) -> None:
        cfg = coordinator.config
        self._coordinator = coordinator
        self._clock = clock
        self._lock = threading.RLock()
        current = coordinator.dense_version(coordinator.version)
        self.keys = tuple(sorted(cfg.aggregation.update_keys(cfg.shapes)))
        self.shapes = {k: tuple(current[k].shape) for k in self.keys}
        self.vector_len = sum(math.prod(s) for s in self.shapes.values())
        self.params = secagg_params(cfg, self.vector_len, coordinator.weight_cap)
        self.min_cohort = min_cohort_of(cfg, self.params)
        self.phase_s = cfg.secure_phase_s
        self.limits = SecAggLimits(max_bytes=self.params.packed_len + PROTOCOL_OVERHEAD_BYTES)
        self._rounds: list[_Round] = []
        """Cohorts not yet done or failed (one with fedavg; with fedbuff one per version that
        devices pulled, and a new one of a version once the previous one stopped taking
        devices)."""
        self._of_client: dict[str, _Round] = {}
        """client id -> the cohort it joined last (kept after the round ends, so that late
        calls get 410 rather than 403)."""
        self.completed = 0
        self.dropped_stale = 0
        """fedbuff cohorts whose sum came back more than max_staleness versions late."""
        self._db: sqlite3.Connection | None = sqlite3.connect(
            str(cfg.db_path), timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS secagg_masked_inputs (round_id TEXT, version INTEGER, "
            "device_id INTEGER, payload BLOB, received_at REAL, PRIMARY KEY (round_id, device_id))"
        )

    def close(self) -> None:
        """Close the database connection (at shutdown; later phase messages get 503)."""
        with self._lock:
            db, self._db = self._db, None
        if db is not None:
            db.close()

    def describe(self) -> dict[str, Any]:
        """What the task states to devices (TaskConfig extra `secure`)."""
        p = self.params
        return {
            "protocol": "secagg+ (Bonawitz et al. 2017; Bell et al. 2020)",
            "strategy": self._coordinator.config.strategy.name,
            "cohort": (
                "the first cohort_size devices that pull the same version; its sum is one "
                "buffered update, its mean delta scaled by (1 + staleness)^-staleness_exponent"
                if self._fedbuff
                else "the round's participants (the first cohort_size that join)"
            ),
            "min_cohort": self.min_cohort,
            "cohort_size": p.cohort_size,
            "vector_len": p.vector_len,
            "keys": list(self.keys),
            "update": "lora_B after training minus lora_B of the base version, per key in order",
            "clip": float(p.clip),
            "grid_bits": p.grid_bits,
            "ring_bits": p.ring_bits,
            "weight_cap": p.weight_cap,
            "degree": p.degree,
            "threshold": p.threshold,
            "phase_s": self.phase_s,
            **({"dp": self._describe_dp()} if p.dp else {}),
        }

    def _describe_dp(self) -> dict[str, Any]:
        p, dp_config = self.params, self._coordinator.config.aggregation.dp
        assert dp_config is not None
        return {
            "mechanism": "distributed Skellam (Agarwal et al. 2021): each device adds "
            "Skellam(noise_mu, noise_mu) per grid value after clipping its L2 norm to l2_clip",
            "l2_clip": p.l2_clip,
            "noise_mu": p.noise_mu,
            "noise_multiplier": dp_config.noise_multiplier,
            "l2_sensitivity_grid_steps": secagg_dp.l2_sensitivity(p),
            "min_summed": self.min_cohort,
            "delta": dp_config.delta,
        }

    def epsilon(self, aggregations: int) -> float:
        """ε after `aggregations` published sums (each of at least `min_cohort` devices)."""
        dp_config = self._coordinator.config.aggregation.dp
        if dp_config is None:
            return 0.0
        return secagg_dp.epsilon_spent(self.params, self.min_cohort, aggregations, dp_config.delta)

    # -- requests ---------------------------------------------------------------------------

    @property
    def _fedbuff(self) -> bool:
        return isinstance(self._coordinator.config.strategy, FedBuff)

    @property
    def _max_staleness(self) -> int:
        """How many versions old a cohort's base may be: 0 under fedavg."""
        strategy = self._coordinator.config.strategy
        return strategy.max_staleness if isinstance(strategy, FedBuff) else 0

    def _check_version(self, version: int) -> None:
        """fedavg: only the current version; fedbuff: at most max_staleness versions old."""
        current = self._coordinator.version
        oldest = current - self._max_staleness
        if not oldest <= version <= current:
            what = (
                f"versions {oldest}..{current} are open"
                if self._fedbuff
                else f"round {current} is open"
            )
            raise ConflictError(
                f"{what}; this device trained from version {version} "
                "(fetch /v1/adapter and train again)",
                code="stale_update",
            )

    def setup(self, client_id: str, version: int) -> bytes:
        """Join a cohort of `version`; returns the encoded `RoundSetup`."""
        with self._lock:
            self._check_version(version)
            self._coordinator.check_open()
            mine = self._of_client.get(client_id)
            if mine is not None and mine.version == version and mine in self._rounds:
                device_id = mine.devices[client_id]  # a retried setup: the same answer
                return mine.setups[device_id]
            r = next(
                (
                    r
                    for r in self._rounds
                    if r.version == version
                    and r.phase == 0
                    and len(r.devices) < self.params.cohort_size
                ),
                None,
            )
            if r is None:
                if not self._fedbuff and any(x.version == version for x in self._rounds):
                    raise ConflictError(
                        f"the cohort of round {version} is closed; wait for version {version + 1}",
                        code="cohort_closed",
                    )
                r = _Round(version, ServerRound(self.params), self._clock())
                self._rounds.append(r)
                log.info("secagg round %s opened for version %d", r.server.round_id.hex(), version)
            device_id = len(r.devices) + 1
            body = encode(r.server.setup(device_id))
            r.devices[client_id] = device_id
            r.setups[device_id] = body
            self._of_client[client_id] = r
            if len(r.devices) == 1:
                r.phase_opened_at = self._clock()
            return body

    def _device(self, client_id: str) -> tuple[_Round, int]:
        r = self._of_client.get(client_id)
        if r is None:
            raise ForbiddenError(f"client {client_id} is not in an open secure-aggregation cohort")
        return r, r.devices[client_id]

    def receive(self, client_id: str, phase: str, body: bytes) -> None:
        """One device message of `phase` (see the module doc); errors map to HTTP statuses."""
        try:
            message = decode_as(body, MESSAGE_OF[phase], self.limits)
        except MessageError as exc:
            raise BadRequestError(
                f"not a {phase} message: {exc}", code="bad_secagg_message"
            ) from None
        with self._lock:
            r, device_id = self._device(client_id)
            if message.device_id != device_id:
                raise ForbiddenError(
                    f"client {client_id} is device {device_id}, not {message.device_id}"
                )
            if r.failed is not None:
                raise BadRequestError(f"round failed: {r.failed}", code="round_failed", status=410)
            if self._db is None:
                raise BusyError("the coordinator is shutting down; retry", 2.0)
            digest = hashlib.sha256(body).digest()
            if r.received.get((phase, device_id)) == digest:
                return  # the same bytes again: a retry whose acknowledgement was lost
            try:
                r.server.receive(message)
            except PhaseError as exc:
                raise ConflictError(str(exc), code="phase_closed") from None
            except ReplayError as exc:
                raise BadRequestError(str(exc), code="replay_refused") from None
            except ProtocolViolationError as exc:
                raise BadRequestError(str(exc), code="protocol_violation") from None
            if isinstance(message, MaskedInput):
                self._db.execute(
                    "INSERT OR REPLACE INTO secagg_masked_inputs VALUES (?, ?, ?, ?, ?)",
                    (r.server.round_id.hex(), r.version, device_id, message.payload, self._clock()),
                )
            r.received[(phase, device_id)] = digest
            r.answered.add(device_id)
            self._maybe_close(r)

    def next_request(self, client_id: str, round_id: bytes, phase: str) -> bytes | None:
        """The encoded request of `phase` for this device; None while that phase is not open.

        410 when the round failed, or the phase passed without this device (a drop-out).
        """
        with self._lock:
            r, device_id = self._device(client_id)
            if round_id != r.server.round_id:
                raise BadRequestError("that round is over", code="round_gone", status=410)
            if r.failed is not None:
                raise BadRequestError(f"round failed: {r.failed}", code="round_failed", status=410)
            wanted = PHASES.index(phase)
            if wanted > r.phase:
                return None
            if wanted == r.phase and device_id in r.requests:
                return r.requests[device_id]
            raise BadRequestError(
                f"device {device_id} is not in the {phase} phase of this round (it closed "
                "without this device, which counts as a drop-out)",
                code="dropped",
                status=410,
            )

    # -- phases -----------------------------------------------------------------------------

    def tick(self) -> None:
        """Close a phase whose deadline passed (called every tick by the service)."""
        with self._lock:
            for r in list(self._rounds):
                self._maybe_close(r)

    def _maybe_close(self, r: _Round) -> None:
        if not r.devices:
            return
        self._close_phase(r)
        if (r.failed is not None or r.done) and r in self._rounds:
            self._rounds.remove(r)

    def _close_phase(self, r: _Round) -> None:
        if r.failed is not None or r.done:
            return
        now = self._clock()
        late = now >= r.phase_opened_at + self.phase_s
        if r.phase == 0:
            everyone = len(r.answered) == self.params.cohort_size
            if not (everyone or (late and len(r.answered) >= self.min_cohort)):
                if now >= r.phase_opened_at + 3 * self.phase_s:
                    r.failed = (
                        f"{len(r.answered)} devices advertised keys in {3 * self.phase_s:.0f} s; "
                        f"the minimum cohort is {self.min_cohort}"
                    )
                    log.warning("secagg round %s: %s", r.server.round_id.hex(), r.failed)
                return
        elif not (r.answered >= r.expected or late):
            return
        try:
            if r.phase == 0:
                requests: dict[int, Any] = r.server.close_advertise()
            elif r.phase == 1:
                requests = r.server.close_share_keys()
            elif r.phase == 2:
                requests = r.server.close_masked_input()
            else:
                self._finish(r)
                return
        except SecAggError as exc:
            r.failed = str(exc)
            log.warning("secagg round %s failed: %s", r.server.round_id.hex(), exc)
            return
        dropped = sorted(set(r.devices.values()) - set(requests))
        r.phase += 1
        r.phase_opened_at = now
        r.requests = {i: encode(m) for i, m in requests.items()}
        r.expected, r.answered = set(requests), set()
        log.info(
            "secagg round %s: %s open for %d devices (%d left out so far)",
            r.server.round_id.hex(), PHASES[r.phase], len(requests), len(dropped),
        )  # fmt: skip

    def _finish(self, r: _Round) -> None:
        started = time.perf_counter()
        try:
            result = r.server.close_unmask()
        except SecAggError as exc:
            r.failed = str(exc)
            log.warning("secagg round %s failed: %s", r.server.round_id.hex(), exc)
            return
        if self.params.dp and len(result.survivors) < self.min_cohort:
            # The noise is calibrated for min_cohort shares; fewer would publish less noise.
            r.failed = (
                f"distributed DP: {len(result.survivors)} inputs summed, fewer than the "
                f"{self.min_cohort} the noise is calibrated for; not published"
            )
            log.warning("secagg round %s failed: %s", r.server.round_id.hex(), r.failed)
            return
        r.done = True
        reconstruct_s = time.perf_counter() - started
        strategy = self._coordinator.config.strategy
        staleness = self._coordinator.version - r.version
        scale = 1.0
        if isinstance(strategy, FedBuff):
            if staleness > strategy.max_staleness:
                self.dropped_stale += 1
                log.warning(
                    "secagg round %s: the sum of version %d came back %d versions late "
                    "(max_staleness %d); dropped",
                    r.server.round_id.hex(), r.version, staleness, strategy.max_staleness,
                )  # fmt: skip
                return
            # FedBuff's staleness weight, on the cohort: its sum is one buffered update.
            scale = staleness_weight(staleness, strategy.staleness_exponent)
        base = self._coordinator.dense_version(r.version)
        mean = result.mean * scale
        tensors: dict[str, np.ndarray] = {}
        offset = 0
        for key in self.keys:
            size = math.prod(self.shapes[key])
            delta = mean[offset : offset + size].reshape(self.shapes[key])
            tensors[key] = (np.asarray(base[key], np.float64) + delta).astype(np.float32)
            offset += size
        stats = {
            "secure": {
                "round_id": r.server.round_id.hex(),
                "cohort": len(r.devices),
                "survivors": len(result.survivors),
                "dropped": len(result.dropped),
                "total_weight": result.total_weight,
                "ring_bits": self.params.ring_bits,
                "masked_bytes_per_device": self.params.packed_len,
                "reconstruct_s": round(reconstruct_s, 4),
                "round_s": round(self._clock() - r.opened_at, 3),
                "base_version": r.version,
                "staleness": staleness,
                "staleness_scale": round(scale, 6),
            }
        }

        self._coordinator.publish_secure_sum(
            r.version,
            tensors,
            float(result.total_weight),
            stats,
            max_staleness=self._max_staleness,
        )
        self.completed += 1


def decode_control(body: bytes, fields: tuple[str, ...]) -> dict[str, Any]:
    """The small msgpack map of /v1/secagg/setup and /next, with exactly the named fields."""
    try:
        obj = msgpack.unpackb(
            body, raw=False, max_bin_len=64, max_str_len=64, max_array_len=0, max_map_len=4
        )
    except (ValueError, TypeError, msgpack.UnpackException):  # msgpack's several errors
        raise BadRequestError("expected a msgpack map", code="bad_secagg_message") from None
    if not isinstance(obj, dict) or set(obj) != set(fields):
        raise BadRequestError(
            f"expected a msgpack map with exactly {', '.join(fields)}", code="bad_secagg_message"
        )
    return obj


__all__ = [
    "CONTROL_MAX_BYTES",
    "PHASES",
    "SecureAggregation",
    "ServerState",
    "cohort_flag_of",
    "cohort_size_of",
    "decode_control",
    "min_cohort_of",
    "secagg_params",
]
