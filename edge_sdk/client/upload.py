"""`Uploader`: a trained adapter becomes a wire update, on disk before it is sent, then sent
until the coordinator settles it (the same update id on every resend).

With the task's `secure` extra the push is the device side of secure aggregation
(`edge_sdk.client.secure_upload`); otherwise a plain POST /v1/updates.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from edge_sdk.client.config import ClientConfig
from edge_sdk.client.controls import privatize
from edge_sdk.client.errors import RequestRejectedError
from edge_sdk.client.secure_upload import SecureUpload
from edge_sdk.client.state import ClientState, Credentials, PendingUpdate, RoundMarker, crash_point
from edge_sdk.client.stop_signal import StopSignal
from edge_sdk.client.transport import StopRequested, Transport
from edge_sdk.wire import AdapterUpdate, GlobalAdapter, TaskConfig

# The federation loop's log lines keep the logger name they had before the loop was split.
log = logging.getLogger("edge_sdk.client.loop")


class Uploader:
    """Encodes and sends the updates of one device."""

    def __init__(
        self, config: ClientConfig, state: ClientState, stop: StopSignal, secure: SecureUpload
    ) -> None:
        self.config = config
        self.state = state
        self.stop = stop
        self.secure = secure

    def encode(
        self,
        task: TaskConfig,
        creds: Credentials,
        base: GlobalAdapter,
        adapter: Mapping[str, np.ndarray],
        metrics: Any,
        marker: RoundMarker,
    ) -> PendingUpdate:
        """The wire update of a trained adapter; on disk (pending) before anything is sent."""
        base_dense = base.dense_tensors()
        # The coordinator wants the whole adapter after training: B only when A is frozen.
        keys = sorted(k for k in adapter if task.lora.mode != "frozen-a" or k.endswith(".lora_B"))
        tensors = {k: np.asarray(adapter[k], np.float32) for k in keys}
        if self.config.local_dp is not None:
            rng = np.random.default_rng([marker.seed, 0xD9])
            tensors, _ = privatize(tensors, base_dense, self.config.local_dp, rng)
        encoder = self.state.load_encoder(task.codec)
        encoder.set_reference(base_dense)
        report = {"train_loss": float(metrics.train_loss)}
        if metrics.eval_loss is not None:
            report["eval_loss"] = float(metrics.eval_loss)
        update = AdapterUpdate.build(
            client_id=creds.client_id, base_version=base.version, model_sha256=task.model_sha256,
            lora=task.lora, tensors=tensors, num_examples=int(metrics.num_examples),
            num_tokens=int(metrics.num_tokens), metrics=report, encoder=encoder,
            update_id=f"{creds.client_id}-r{marker.round}-{uuid.uuid4().hex[:12]}",
        )  # fmt: skip
        pending = PendingUpdate(update.update_id, base.version, task.task_id, update.to_bytes())
        # One commit (pending.json) for the update and the residual after it: a crash now
        # resends it rather than losing it, and the residual matches what was sent.
        self.state.save_pending(pending, encoder)
        return pending

    async def push(self, transport: Transport, pending: PendingUpdate, task: TaskConfig) -> str:
        """Send a pending update until it is settled; returns the outcome.

        `accepted` (202) and `duplicate` (the coordinator already has this id) count as
        delivered; `stale`, `refused` drop it; `task_complete` ends the run. Settling writes
        the progress (naming the update) before the pending files go (`ClientState.settle`).
        """
        if self.state.progress(task.task_id).last_update == pending.update_id:
            log.info(
                "update %s was settled before the restart; dropping its copy", pending.update_id
            )
            self.state.clear_pending()
            return "accepted"
        if task.extra.get("secure") is not None:
            outcome = await self.secure.push(transport, pending, task)
            crash_point("update_acked")
            self.state.settle(pending, counted=outcome == "accepted")
            return outcome
        while True:
            try:
                ack = await transport.push(pending.body)
            except RequestRejectedError as exc:
                if exc.code == "duplicate_update":
                    outcome = "duplicate"
                elif exc.code == "round_closed":  # FedAvg is aggregating: send again shortly
                    log.info("round closing; resending %s shortly", pending.update_id)
                    await self.stop.sleep(self.config.poll_interval_s)
                    if self.stop.is_set():
                        raise StopRequested("stopped while waiting to resend") from None
                    continue
                elif exc.code == "task_complete":
                    outcome = "task_complete"
                elif exc.status == 409:  # stale_update, already_submitted: trained for nothing
                    outcome = "stale"
                else:
                    self.state.clear_pending()
                    raise
                log.info("update %s: %s (%s)", pending.update_id, outcome, exc.code)
            else:
                outcome = "accepted"
                log.info("update %s accepted (pending %s)", pending.update_id, ack.get("pending"))
            crash_point("update_acked")
            self.state.settle(pending, counted=outcome in ("accepted", "duplicate"))
            return outcome
