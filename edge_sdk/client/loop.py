"""The federation loop of a device: `FederatedClient`.

    verify the local model (sha256, licence policy) -> find the coordinator (mDNS or a URL)
    -> join (token kept 0600) -> task -> resend an unacknowledged update, if any ->
    repeat: pull the global adapter (ETag) -> hot-swap it into the runtime -> train locally
            from it -> encode with the task's codec (residual kept on disk) -> push (same id
            on every resend) -> wait for the next version
    until the task ends, `max_rounds` updates were accepted, or `stop()` is called.

Crash safety: the round's base adapter and a training checkpoint are on disk while training
(a restart resumes the round from the checkpoint); an encoded update is on disk before the
first byte is sent and is deleted only when the coordinator acknowledged it, or answered that
it already has it (409 duplicate_update), so an update is never lost and never counted twice.
The order of the state writes, and the crash points the tests kill at, are in
`edge_sdk.client.state`.

A hostile or broken coordinator: the data is checked before any request; the task is held to
`TaskPolicy` bounds before anything is allocated; every answer is read with a size cap; a
global adapter is checked (spec, keys, shapes, finite, magnitude) before it is saved, written
as GGUF or swapped, and a refused one is logged while the previous one stays in service.

Threads: training runs in a worker thread (`asyncio.to_thread`); `stop()` may be called from
any thread or a signal handler. It interrupts training at the next optimizer step (the last
checkpoint stays) and any backoff wait.

The parts, each in its module: `ClientConfig` (config), finding the coordinator and its
certificate pin (coordinator_finder), credentials and the task (enrollment), the global adapter
pulled, checked and hot-swapped (global_follower), the local training of a round
(local_training), and the upload, plain (upload) or secure aggregation (secure_upload).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_sdk.client.config import ClientConfig
from edge_sdk.client.controls import apply_memory_cap, apply_thread_cap
from edge_sdk.client.coordinator_finder import CoordinatorFinder
from edge_sdk.client.enrollment import Enrollment
from edge_sdk.client.errors import LicenceRefusedError
from edge_sdk.client.feedback import FeedbackStore, record_answer_feedback
from edge_sdk.client.global_follower import GlobalAdapterFollower
from edge_sdk.client.local_training import LocalTrainer, round_seed
from edge_sdk.client.reports import RoundReport, RunSummary
from edge_sdk.client.secure_upload import SecureUpload
from edge_sdk.client.state import ClientState, Credentials, RoundMarker, crash_point
from edge_sdk.client.stop_signal import StopSignal
from edge_sdk.client.transport import StopRequested, Transport
from edge_sdk.client.upload import Uploader
from edge_sdk.wire import TaskConfig

if TYPE_CHECKING:
    import aiohttp

    from edge_sdk.models.identity import ModelIdentity
    from edge_sdk.runtime import Answer, AnswerStream, EdgeModel
    from edge_sdk.training.data import Dataset

__all__ = ["ClientConfig", "FederatedClient", "RoundReport", "RunSummary"]
"""`ClientConfig`, `RoundReport` and `RunSummary` are re-exported: they were defined here."""

log = logging.getLogger(__name__)


def _describe_wait(task: TaskConfig, version: int) -> str:
    """What a client waits for between rounds, from the strategy the task states."""
    raw = task.extra.get("strategy")
    strategy = raw if isinstance(raw, dict) else {}

    def num(key: str) -> str:  # only numbers reach the log: the coordinator wrote these
        value = strategy.get(key)
        return (
            f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"
        )

    if strategy.get("name") == "fedbuff":
        how = (
            f"the coordinator publishes when {num('buffer_size')} updates are buffered, or "
            f"{num('max_wait_s')} s after the first once {num('min_updates')} are in"
        )
    elif strategy.get("name") == "fedavg":
        how = (
            f"the round closes at {num('clients_per_round')} updates, or at its "
            f"{num('deadline_s')} s deadline with {num('min_clients')}"
        )
    else:
        how = "the coordinator's strategy decides when"
    return f"waiting for global version {version + 1}: {how}"


class FederatedClient:
    """A device in a federation. `run()` blocks; `await run_async()` inside an event loop.

    Args:
        config: see `ClientConfig`.
        runtime: an `EdgeModel` of the same base model; every new global adapter is hot-swapped
            into it, so the app's inference improves as the federation learns.
        schedule: called before each round; return False to wait (e.g. the device is busy or
            on battery). It is asked again every `config.schedule_poll_s` seconds.
        trace_configs: aiohttp trace configs for the HTTP session (inspection, tests).
    """

    def __init__(
        self,
        config: ClientConfig,
        *,
        runtime: EdgeModel | None = None,
        schedule: Callable[[], bool] | None = None,
        trace_configs: Sequence[aiohttp.TraceConfig] | None = None,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.schedule = schedule
        self.state = ClientState(config.state_dir)
        self._trace_configs = trace_configs
        self._stop = StopSignal()
        self._identity: ModelIdentity | None = None
        self.feedback = FeedbackStore(config.state_dir, config.feedback_limits)
        self._finder = CoordinatorFinder(config, self.state)
        self._enrollment = Enrollment(config, self.state, self._finder)
        self._follower = GlobalAdapterFollower(config, self.state)
        self._trainer = LocalTrainer(config, self.state, self.feedback, self._stop)
        secure = SecureUpload(config, self._stop, lambda: self._follower.current)
        self._upload = Uploader(config, self.state, self._stop, secure)
        self._advertised_model = ""
        """The model name of the coordinator's mDNS advert ("" when given as a URL)."""
        self.status = "idle"
        """What the client is doing now, in words (e.g. why it sits a round out)."""
        self.rounds: list[RoundReport] = []

    # -- control ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop after saving; safe from any thread or a signal handler."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def served_version(self) -> int:
        """The global version written for (and hot-swapped into) the runtime; -1 before any."""
        served = self._follower.served
        return served[0] if served is not None else -1

    def run(self) -> RunSummary:
        return asyncio.run(self.run_async())

    # -- feedback from the app --------------------------------------------------------------

    def record_feedback(
        self,
        answer: str | Answer | AnswerStream,
        *,
        chosen: str | None = None,
        rejected: str | None = None,
        accepted: bool | None = None,
        edit: str | None = None,
        regenerated: str | Answer | AnswerStream | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> Any:
        """Keep what the user said about an answer of the runtime, for the next rounds.

        `answer` is what `EdgeModel.chat` returned (or its `id`). One kind of feedback:
        `chosen=` and `rejected=` (a pair; either defaults to the answer itself),
        `accepted=True` (an example), `accepted=False, edit="..."` (the edit over the answer:
        a pair and an example), or `regenerated=` the answer the user regenerated it into
        (the new one over the old one). `messages` gives the prompt of an answer the runtime
        does not know (another backend, an earlier process).

        Stored append-only in `state_dir/feedback` (0600, fsync'ed; `FeedbackFullError` at
        `ClientConfig.feedback_limits`); it never leaves the device: the next round trains on
        it (SFT tasks: the examples, DPO tasks: the pairs) and only the adapter update is sent.
        Returns the `FeedbackCounts` held now. Safe from any thread while `run()` runs.
        """
        return record_answer_feedback(
            self.feedback, self.runtime, answer, chosen=chosen, rejected=rejected,
            accepted=accepted, edit=edit, regenerated=regenerated, messages=messages,
        )  # fmt: skip

    def forget_feedback(self) -> None:
        """Delete every feedback record kept on this device."""
        self.feedback.forget()

    # -- verification -----------------------------------------------------------------------

    def verify_model(self) -> ModelIdentity:
        """The local model's identity, if its licence class is allowed (no network involved)."""
        from edge_sdk.models.identity import inspect_model

        identity = inspect_model(self.config.model)
        if identity.licence_class in self.config.refuse_licences:
            raise LicenceRefusedError(
                f"{Path(identity.path).name}: licence {identity.licence or '(none)'} is of class "
                f"{identity.licence_class.value}, which this client's policy refuses "
                f"(refused: {', '.join(sorted(c.value for c in self.config.refuse_licences))})"
            )
        self._identity = identity
        return identity

    def check_data(self) -> Dataset | None:
        """Read, tokenize and pack the local data (no network): a bad file fails here, first.

        Packed at the coordinator's default seq_len (256); the task's round packs it again
        with the app's feedback. The preference files are read and checked too. None when the
        device has no data files (it learns only from its app's feedback).
        """
        identity = self._identity or self.verify_model()
        return self._trainer.check_data(identity.path)

    # -- the loop ---------------------------------------------------------------------------

    async def run_async(self) -> RunSummary:
        """Run until the task ends, `max_rounds` updates were accepted, or `stop()`."""
        cfg = self.config
        stop_event = self._stop.bind()
        apply_thread_cap(cfg.threads)
        apply_memory_cap(cfg.memory_limit_mb)
        identity = await asyncio.to_thread(self.verify_model)
        await asyncio.to_thread(self.check_data)  # a bad data file fails before any request
        with self.state:
            found = await self._finder.find(identity.sha256, Path(identity.path).name)
            url, fingerprint, source = found.url, found.pin, found.pin_source
            self._advertised_model = found.model_name
            if fingerprint is None:
                log.warning(
                    "coordinator %s over plain HTTP (--insecure): "
                    "tokens cross the LAN in clear text and "
                    "the coordinator is not authenticated",
                    url,
                )
            else:
                log.info(
                    "coordinator %s (TLS, certificate pinned %s…: %s)",
                    url,
                    fingerprint[:16],
                    source,
                )
            async with Transport(
                url,
                self.state.ledger,
                tls_fingerprint=fingerprint,
                pin_source=source,
                retry=cfg.retry,
                stop=stop_event,
                trace_configs=self._trace_configs,
            ) as transport:
                try:
                    return await self._federate(transport, identity)
                except StopRequested:
                    creds = self.state.credentials(url)
                    return self._summary(url, creds, "", "stopped")

    async def _task(
        self, transport: Transport, identity: ModelIdentity
    ) -> tuple[Credentials, TaskConfig]:
        creds, task, shapes = await self._enrollment.task(
            transport, identity, self._advertised_model
        )
        self._follower.attach(identity, shapes)
        return creds, task

    def _summary(
        self, url: str, creds: Credentials | None, task_id: str, reason: str
    ) -> RunSummary:
        served = self._follower.served
        return RunSummary(
            coordinator=url, task_id=task_id, client_id=creds.client_id if creds else "",
            reason=reason, rounds=list(self.rounds), global_version=self._follower.version,
            adapter_path=served[1] if served else None,
        )  # fmt: skip

    async def _federate(self, transport: Transport, identity: ModelIdentity) -> RunSummary:
        cfg, state = self.config, self.state
        creds, task = await self._task(transport, identity)
        method = cfg.task_policy.check_method(task)
        log.info(
            "task %s: %s, %s, %d local steps, codec %s",
            task.task_id,
            method.describe(),
            task.lora.mode,
            task.local_steps,
            task.codec,
        )
        stored = state.global_adapter(task.task_id)
        if stored is not None:
            if self._follower.load(stored[0], stored[2], task, "the saved copy") is not None:
                # Serve what we had before the restart, right away.
                await self._follower.swap(self.runtime)
            else:  # refused: never again at every start
                state.set_aside_global("the saved global adapter failed the client's checks")

        pending = state.pending()
        if pending is not None:
            # The round that built it is over (a new round starts only once it is settled):
            # never resume that round's checkpoint and train from its base a second time.
            state.finish_round()
            if pending.task_id == task.task_id:
                log.info("resending unacknowledged update %s", pending.update_id)
                outcome = await self._upload.push(transport, pending, task)
                if outcome == "task_complete":
                    return await self._finish(transport, creds, task, "task_complete")
            else:
                state.clear_pending()

        last_base = state.last_base(task.task_id)  # never train twice from one version
        waited_since = time.monotonic()
        next_wait_log = 0.0  # say what we wait for when a wait starts, then every 30 s
        while not self.stopping:
            done = state.rounds_done(task.task_id)
            if cfg.max_rounds is not None and done >= cfg.max_rounds:
                return await self._finish(transport, creds, task, "max_rounds", last_base)
            fresh = await self._follower.pull(transport, task)
            if fresh:
                await self._follower.swap(self.runtime)
                waited_since = time.monotonic()
                next_wait_log = 0.0
            if task.max_rounds is not None and self._follower.version >= task.max_rounds:
                return await self._finish(transport, creds, task, "task_complete")
            if self._follower.version <= last_base:
                retrain = (
                    cfg.retrain_after_s is not None
                    and time.monotonic() - waited_since >= cfg.retrain_after_s
                )
                if not retrain:
                    if time.monotonic() >= next_wait_log:
                        waited = time.monotonic() - waited_since
                        log.info(
                            "%s; waited %.0f s so far",
                            _describe_wait(task, self._follower.version),
                            waited,
                        )
                        next_wait_log = time.monotonic() + 30.0
                    await self._stop.sleep(cfg.poll_interval_s)
                    continue
            if self.schedule is not None and not self.schedule():
                log.info("schedule says not now; asking again in %.0f s", cfg.schedule_poll_s)
                await self._stop.sleep(cfg.schedule_poll_s)
                continue
            missing = self._trainer.missing_data(method)
            if missing is not None:
                # Nothing is sent: the coordinator only sees that no update came (its strategy's
                # deadline closes the round without us). Feedback may arrive meanwhile.
                status = f"sitting this round out: {missing}"
                if status != self.status:
                    log.warning(
                        "round %d (global version %d): %s",
                        done + 1,
                        self._follower.version,
                        missing,
                    )
                self.status = status
                await self._stop.sleep(cfg.poll_interval_s)
                continue
            self.status = f"training round {done + 1} ({method.describe()})"
            report = await self._round(transport, creds, task, done + 1)
            if report is None:
                break  # stopped during training; the checkpoint stays for the next start
            last_base = report.base_version
            waited_since = time.monotonic()
            self.status = f"round {report.round}: update {report.outcome}"
            if report.outcome == "task_complete":
                return await self._finish(transport, creds, task, "task_complete")
        return self._summary(transport.base_url, creds, task.task_id, "stopped")

    async def _finish(
        self,
        transport: Transport,
        creds: Credentials,
        task: TaskConfig,
        reason: str,
        last_base: int = -1,
    ) -> RunSummary:
        """Serve the newest adapter before returning (waiting a little for the one we fed)."""
        deadline = time.monotonic() + (self.config.final_wait_s if reason == "max_rounds" else 0.0)
        while not self.stopping:
            if await self._follower.pull(transport, task):
                await self._follower.swap(self.runtime)
            if self._follower.version > last_base or time.monotonic() >= deadline:
                break
            await self._stop.sleep(
                min(self.config.poll_interval_s, max(0.0, deadline - time.monotonic()))
            )
        log.info(
            "done (%s): %d rounds, serving global version %d",
            reason,
            len(self.rounds),
            self._follower.version,
        )
        return self._summary(transport.base_url, creds, task.task_id, reason)

    # -- one round --------------------------------------------------------------------------

    async def _round(
        self, transport: Transport, creds: Credentials, task: TaskConfig, round_no: int
    ) -> RoundReport | None:
        assert self._follower.current is not None
        started = time.perf_counter()
        resumable = self._trainer.resumable(task, round_no, self._follower.version)
        if resumable is not None:
            marker, base = resumable
            log.info(
                "round %d: resuming from the checkpoint (base version %d)", round_no, base.version
            )
        else:
            base = self._follower.current
            marker = RoundMarker(
                task.task_id,
                base.version,
                round_no,
                round_seed(self.config.seed, creds.client_id, round_no),
            )
            self.state.start_round(marker, base.to_bytes())
            crash_point("round_started")
            log.info(
                "round %d: training %d steps from global version %d",
                round_no,
                task.local_steps,
                base.version,
            )
        assert self._identity is not None
        trained = await asyncio.to_thread(
            self._trainer.fit, self._identity.path, task, marker, base, resumable is not None
        )
        if trained is None:
            return None
        adapter, metrics, resumed_from = trained
        pending = self._upload.encode(task, creds, base, adapter, metrics, marker)
        crash_point("update_saved")
        self.state.finish_round()
        crash_point("round_finished")
        outcome = await self._upload.push(transport, pending, task)
        report = RoundReport(
            round=round_no,
            base_version=base.version,
            update_id=pending.update_id,
            steps=metrics.steps,
            resumed_from_step=resumed_from,
            train_loss=float(metrics.train_loss),
            update_bytes=len(pending.body),
            outcome=outcome,
            seconds=time.perf_counter() - started,
        )
        self.rounds.append(report)
        return report
