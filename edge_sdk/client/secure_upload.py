"""`SecureUpload`: the push step when the task says `secure` (the device side of secure
aggregation): only masked bytes leave the device, and the ledger records them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from edge_sdk.client.config import ClientConfig
from edge_sdk.client.errors import ProtocolError, RequestRejectedError
from edge_sdk.client.state import PendingUpdate
from edge_sdk.client.stop_signal import StopSignal
from edge_sdk.client.transport import StopRequested, Transport
from edge_sdk.secagg import (
    MIN_COHORT,
    ConsistencyError,
    DeviceSession,
    MaskedInputRequest,
    Message,
    RoundSetup,
    SecAggError,
    SecAggLimits,
    SecAggParams,
    ShareKeysRequest,
    UnmaskRequest,
    decode_as,
)
from edge_sdk.secagg import encode as encode_secagg
from edge_sdk.wire import AdapterUpdate, GlobalAdapter, TaskConfig

# The federation loop's log lines keep the logger name they had before the loop was split.
log = logging.getLogger("edge_sdk.client.loop")

M = TypeVar("M")


class SecureUpload:
    """Runs the secure-aggregation rounds of one device's updates.

    `current_global` returns the global adapter served now: an update is masked only while its
    base version is that one.
    """

    def __init__(
        self,
        config: ClientConfig,
        stop: StopSignal,
        current_global: Callable[[], GlobalAdapter | None],
    ) -> None:
        self.config = config
        self.stop = stop
        self.current_global = current_global

    def plain_vector(
        self, pending: PendingUpdate, spec: Mapping[str, Any]
    ) -> tuple[np.ndarray, int] | None:
        """The plain update the protocol masks: B after training minus the base's B, in the
        task's key order; None when the base version is no longer the one served here."""
        current = self.current_global()
        if current is None or current.version != pending.base_version:
            return None
        update = AdapterUpdate.from_bytes(pending.body)
        base = current.dense_tensors()
        delta = any(t.delta for t in update.tensors.values())
        dense = update.dense_tensors(base if delta else None)
        keys = spec.get("keys")
        if (
            not isinstance(keys, list)
            or sorted(keys) != sorted(dense)
            or any(k not in base for k in keys)
        ):
            raise ProtocolError(
                "secure aggregation: the task's keys "
                f"{str(keys)[:80]} are not this update's tensors"
            )
        x = np.concatenate([(np.asarray(dense[k], np.float64) - base[k]).ravel() for k in keys])
        return x, int(update.num_examples)

    async def push(self, transport: Transport, pending: PendingUpdate, task: TaskConfig) -> str:
        """Run the device side of secure aggregation for a trained update instead of POST
        /v1/updates: only masked bytes leave the device (and the ledger records them).

        Outcomes: `accepted` (the masked input was taken: it is in the sum even if this device
        drops out afterwards), `stale` (trained from a version that is no longer open, the
        cohort closed, or the round failed before the input was taken), `task_complete`.
        A coordinator that breaks the protocol (asks for both shares of a device, sends
        parameters other than the task's, a bad graph or share) is refused: the session aborts,
        its secrets are wiped and `ProtocolError` stops the client.
        """
        spec = task.extra["secure"]
        if not isinstance(spec, Mapping):
            raise ProtocolError("secure aggregation: task extra `secure` is not a map")
        plain = self.plain_vector(pending, spec)
        if plain is None:
            log.info("update %s: stale (its base version is no longer current)", pending.update_id)
            return "stale"
        x, num_examples = plain
        phase_s = float(spec.get("phase_s", 30.0))
        masked_sent = False
        session: DeviceSession | None = None
        try:
            while True:
                try:
                    setup = decode_as(
                        await transport.secagg_setup(pending.base_version), RoundSetup
                    )
                    break
                except RequestRejectedError as exc:
                    if exc.code != "round_closed":
                        raise
                    await self.stop.sleep(self.config.poll_interval_s)
                    if self.stop.is_set():
                        raise StopRequested("stopped while waiting for a secure round") from None
            check_secure_params(setup.params, spec, x.size)
            session = DeviceSession(setup)
            rid = setup.round_id
            limit = setup.params.packed_len + (1 << 20)

            async def send(phase: str, message: Message) -> None:
                detail: dict[str, Any] = {"round_id": rid.hex()}
                if phase == "masked_input":  # what fp32 would have sent, for comparisons
                    detail.update(values=int(x.size), update_id=pending.update_id)
                await transport.secagg_send(phase, encode_secagg(message), detail)

            async def next_request(phase: str, cls: type[M]) -> M:
                give_up = time.monotonic() + 4 * phase_s + 30.0
                while time.monotonic() < give_up:
                    body = await transport.secagg_next(rid, phase, max_bytes=limit)
                    if body is not None:
                        return decode_as(body, cls, SecAggLimits(max_bytes=limit))
                    if self.stop.is_set():
                        raise StopRequested("stopped during a secure round")
                raise ProtocolError(f"secure aggregation: the {phase} phase never opened")

            await send("advertise", session.advertise())
            request1 = await next_request("share_keys", ShareKeysRequest)
            if len(request1.members) < int(spec["min_cohort"]):
                raise ConsistencyError(
                    f"the round has {len(request1.members)} members, fewer than the task's "
                    f"minimum cohort {spec['min_cohort']}"
                )
            await send("share_keys", session.share_keys(request1))
            request2 = await next_request("masked_input", MaskedInputRequest)
            masked = session.masked_input(request2, x, num_examples)
            await send("masked_input", masked)
            masked_sent = True
            log.info(
                "update %s: masked input sent (%d bytes, ring %d bits; fp32 would be %d)",
                pending.update_id, len(masked.payload), setup.params.ring_bits, 4 * x.size,
            )  # fmt: skip
            request3 = await next_request("unmask", UnmaskRequest)
            # A sum of two reveals each to the other; under distributed DP a sum of fewer than
            # the minimum cohort carries less noise than the task promised.
            least = int(spec["dp"]["min_summed"]) if setup.params.dp else MIN_COHORT
            if len(request3.active) < least:
                raise ConsistencyError(
                    f"only {len(request3.active)} masked inputs are in the sum; at least "
                    f"{least} are needed before this device reveals its shares"
                )
            await send("unmask", session.unmask(request3))
            return "accepted"
        except SecAggError as exc:
            if session is not None:
                session.abort()
            raise ProtocolError(f"secure aggregation refused: {exc}") from None
        except RequestRejectedError as exc:
            if exc.code == "task_complete":
                return "task_complete"
            if exc.status in (409, 410):
                # After the masked input was taken it is in the sum unless the round failed.
                outcome = "accepted" if masked_sent and exc.code != "round_failed" else "stale"
                log.info("update %s: secure round: %s (%s)", pending.update_id, outcome, exc.code)
                return outcome
            raise


def check_secure_params(params: SecAggParams, spec: Mapping[str, Any], length: int) -> None:
    """The round's parameters must be the ones the task stated (a coordinator may not widen
    the clip, shrink the cohort or change the grid between the task and the round)."""
    raw_dp = spec.get("dp")
    dp: Mapping[str, Any] = raw_dp if isinstance(raw_dp, Mapping) else {}
    stated = {
        "vector_len": length,
        "clip": spec.get("clip"),
        "grid_bits": spec.get("grid_bits"),
        "weight_cap": spec.get("weight_cap"),
        # Distributed DP: the round may not lower the noise or widen the L2 bound the task set.
        "l2_clip": dp.get("l2_clip", 0.0),
        "noise_mu": dp.get("noise_mu", 0.0),
    }
    got = {"vector_len": params.vector_len, "clip": params.clip, "grid_bits": params.grid_bits,
           "weight_cap": params.weight_cap, "l2_clip": params.l2_clip,
           "noise_mu": params.noise_mu}  # fmt: skip
    min_cohort = spec.get("min_cohort")
    if (
        got != stated
        or not isinstance(min_cohort, int)
        or params.cohort_size < max(MIN_COHORT, min_cohort)
    ):
        raise ConsistencyError(
            f"the round's parameters {got} (cohort {params.cohort_size}) are not the task's "
            f"{stated} (minimum cohort {min_cohort})"
        )
