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
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from edge_sdk.client.config import ClientConfig
from edge_sdk.client.controls import apply_memory_cap, apply_thread_cap, privatize
from edge_sdk.client.discovery import Offer, discover
from edge_sdk.client.errors import (
    AdapterRefusedError,
    AuthenticationError,
    ClientError,
    DiscoveryError,
    InsecureError,
    JoinCodeError,
    LicenceRefusedError,
    ModelMismatchError,
    ProtocolError,
    RequestRejectedError,
    StateError,
    TaskRefusedError,
    TlsPinError,
)
from edge_sdk.client.feedback import FeedbackStore, record_answer_feedback
from edge_sdk.client.joincode import JoinCode, normalize_fingerprint
from edge_sdk.client.reports import RoundReport, RunSummary
from edge_sdk.client.state import (
    ClientState,
    Credentials,
    PendingUpdate,
    RoundMarker,
    crash_point,
    set_aside,
)
from edge_sdk.client.task_policy import Shapes, adapter_bytes_cap, target_shapes
from edge_sdk.client.transport import StopRequested, Transport, tls_peer_fingerprint
from edge_sdk.env import JOIN_CODE_ENV, JOIN_TOKEN_ENV
from edge_sdk.errors import FedlmError
from edge_sdk.method import MethodSpec
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
from edge_sdk.wire import AdapterUpdate, GlobalAdapter, TaskConfig, WireError

if TYPE_CHECKING:
    import aiohttp
    import torch

    from edge_sdk.models.identity import ModelIdentity
    from edge_sdk.runtime import Answer, AnswerStream, EdgeModel
    from edge_sdk.training.data import Dataset
    from edge_sdk.training.trainer import TrainConfig

log = logging.getLogger(__name__)

M = TypeVar("M")


_CHECK_SEQ_LEN = 256
"""seq_len of the data check before enrollment (the coordinator's default)."""


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


class _Interrupted(Exception):
    """Raised from the training step callback when `stop()` was called."""


def _round_seed(seed: int, client_id: str, round_no: int) -> int:
    digest = hashlib.sha256(f"{seed}:{client_id}:{round_no}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


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
        self._stop_flag = threading.Event()
        self._stop_async: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._identity: ModelIdentity | None = None
        self._dataset: Dataset | None = None
        self._model: torch.nn.Module | None = None
        self._model_key: tuple[Any, ...] | None = None
        self._served: tuple[int, Path] | None = None
        self._global: GlobalAdapter | None = None
        self._global_version = -1
        self._etag: str | None = None
        self._offer_model_name = ""
        self._shapes: Shapes | None = None
        self._refused_etag: str | None = None
        self._data_key: tuple[Any, ...] | None = None
        self.feedback = FeedbackStore(config.state_dir, config.feedback_limits)
        self.status = "idle"
        """What the client is doing now, in words (e.g. why it sits a round out)."""
        self.rounds: list[RoundReport] = []

    # -- control ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop after saving; safe from any thread or a signal handler."""
        self._stop_flag.set()
        loop, event = self._loop, self._stop_async
        if loop is not None and event is not None and not loop.is_closed():
            loop.call_soon_threadsafe(event.set)

    @property
    def stopping(self) -> bool:
        return self._stop_flag.is_set()

    @property
    def served_version(self) -> int:
        """The global version written for (and hot-swapped into) the runtime; -1 before any."""
        return self._served[0] if self._served is not None else -1

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

    async def _sleep(self, seconds: float) -> None:
        assert self._stop_async is not None
        try:
            await asyncio.wait_for(self._stop_async.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

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
        from edge_sdk.training.data import DataConfig, build_dataset
        from edge_sdk.training.tokenizer import load_tokenizer

        identity = self._identity or self.verify_model()
        if self.config.preferences:
            from edge_sdk.training.preferences import load_preferences

            load_preferences(list(self.config.preferences), skip_bad=self.config.skip_bad)
        if not self.config.data:
            return None
        if self._dataset is None:
            cfg = self.config
            self._dataset = build_dataset(
                list(cfg.data),
                load_tokenizer(identity.path),
                DataConfig(
                    seq_len=_CHECK_SEQ_LEN,
                    val_fraction=cfg.val_fraction,
                    seed=cfg.seed,
                    skip_bad=cfg.skip_bad,
                ),
            )
        return self._dataset

    def _join_code(self) -> JoinCode | None:
        text = self.config.join_code or os.environ.get(JOIN_CODE_ENV)
        if not text:
            return None
        try:
            return JoinCode.decode(text)
        except JoinCodeError as exc:
            raise JoinCodeError(f"${JOIN_CODE_ENV}: {exc}") from None

    def _pin(self) -> tuple[str | None, str]:
        """(the certificate pin, where it came from): join code > tls_fingerprint > stored."""
        code = self._join_code()
        if code is not None:
            return code.fingerprint, "the pin from the join code"
        if self.config.tls_fingerprint is not None:
            return self.config.tls_fingerprint, "the pin given as --tls-fingerprint"
        stored = self.state.credentials()
        if stored is not None and stored.tls_fingerprint:
            try:
                pin = normalize_fingerprint(stored.tls_fingerprint)
            except ValueError:
                raise StateError(
                    f"{self.state.token_path}: the stored pin is "
                    "damaged; enroll again with the join code"
                ) from None
            return pin, f"the pin stored at enrollment in {self.state.token_path}"
        return None, ""

    def _no_pin_error(self) -> InsecureError:
        if self.config.join_token or os.environ.get(JOIN_TOKEN_ENV):
            return InsecureError(
                f"a join token alone (--join-token / ${JOIN_TOKEN_ENV}) "
                "cannot tell the coordinator from an "
                "impostor on the LAN, so it is not sent: give "
                "the join code that `fedlm coordinator` prints "
                f"(--join-code or ${JOIN_CODE_ENV}), or add "
                "--tls-fingerprint HEX, or, for a plain-HTTP "
                "coordinator, --insecure"
            )
        return InsecureError(
            "not enrolled and no coordinator to trust yet: "
            "give the join code that `fedlm coordinator` "
            f"prints (--join-code or ${JOIN_CODE_ENV})"
        )

    async def _find_coordinator(self, sha256: str) -> tuple[str, str | None, str]:
        """(base URL, certificate pin or None for plain HTTP, where the pin came from)."""
        cfg = self.config
        pin, source = self._pin()
        if cfg.coordinator_url is not None:
            url = cfg.coordinator_url.rstrip("/")
            if url.startswith("http://"):
                return url, None, ""  # ClientConfig allows it only with `insecure`
            if pin is None:
                raise self._no_pin_error()
            return url, pin, source
        if pin is None and not cfg.insecure:
            raise self._no_pin_error()
        local_name = Path(self._identity.path).name if self._identity is not None else ""
        seen: list[str] = []
        # Two passes: the first ends at the first advert that can be ours; if none of the
        # candidates then presents the pinned certificate (a copycat advert answered first),
        # the second browses for the whole timeout and checks every candidate it finds.
        for early_stop in (True, False) if pin is not None else (True,):
            report = await discover(
                sha256,
                name=cfg.coordinator_name,
                pin=pin,
                insecure=cfg.insecure,
                local_model_name=local_name,
                timeout_s=cfg.discovery_timeout_s,
                interfaces=cfg.discovery_interfaces,
                early_stop=early_stop,
            )
            if report.chosen is None:
                raise DiscoveryError(
                    "; ".join(report.explain()) + " (--coordinator URL skips discovery)"
                )
            self._offer_model_name = report.chosen.model_name
            if pin is None:
                return report.chosen.url, None, ""
            found = await self._verified(report.accepted, pin, seen)
            if found is not None:
                self._offer_model_name = found.model_name
                return found.url, pin, source
        assert pin is not None
        raise TlsPinError(
            f"no advertised coordinator presents the pinned certificate {pin[:16]}… ({source}): "
            + "; ".join(seen)
            + ". If the coordinator was reinstalled, re-enroll with its new join code"
        )

    async def _verified(self, offers: Sequence[Offer], pin: str, seen: list[str]) -> Offer | None:
        """The first offer whose live certificate is the pinned one (a bare TLS handshake each:
        the adverts are unauthenticated, and nothing is sent to them); the others go to `seen`."""
        for offer in offers:
            try:
                got = await tls_peer_fingerprint(offer.url, self.config.retry.connect_timeout_s)
            except (OSError, asyncio.TimeoutError, ValueError) as exc:
                seen.append(f"{offer.describe()}: cannot connect ({type(exc).__name__})")
                log.warning("skipping %s", seen[-1])
                continue
            if got == pin:
                log.info("%s presents the pinned certificate %s…", offer.url, pin[:16])
                return offer
            seen.append(
                f"{offer.describe()}: presents certificate {got[:16]}…, not the pinned {pin[:16]}…"
            )
            log.warning("skipping %s (a fake advert, or a new certificate)", seen[-1])
        return None

    # -- the loop ---------------------------------------------------------------------------

    async def run_async(self) -> RunSummary:
        """Run until the task ends, `max_rounds` updates were accepted, or `stop()`."""
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self._stop_async = asyncio.Event()
        if self._stop_flag.is_set():
            self._stop_async.set()
        apply_thread_cap(cfg.threads)
        apply_memory_cap(cfg.memory_limit_mb)
        identity = await asyncio.to_thread(self.verify_model)
        await asyncio.to_thread(self.check_data)  # a bad data file fails before any request
        with self.state:
            url, fingerprint, source = await self._find_coordinator(identity.sha256)
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
                stop=self._stop_async,
                trace_configs=self._trace_configs,
            ) as transport:
                try:
                    return await self._federate(transport, identity)
                except StopRequested:
                    creds = self.state.credentials(url)
                    return self._summary(url, creds, "", "stopped")

    async def _credentials(self, transport: Transport) -> Credentials:
        """The stored credentials if they belong to this coordinator, else enroll (join)."""
        pin = transport.tls_fingerprint
        stored = self.state.credentials()
        if stored is not None:
            if pin is not None:
                ours = stored.tls_fingerprint is not None and stored.tls_fingerprint.lower() == pin
            else:
                ours = (
                    stored.tls_fingerprint is None
                    and stored.coordinator.rstrip("/") == transport.base_url
                )
            if ours:
                if stored.coordinator.rstrip("/") != transport.base_url:
                    # The same certificate at a new address (DHCP): the pin says it is the same
                    # coordinator, so the credentials follow it.
                    stored = dataclasses.replace(stored, coordinator=transport.base_url)
                    self.state.save_credentials(stored)
                transport.token = stored.token
                return stored
        code = self._join_code()
        if code is not None and pin == code.fingerprint:
            token = code.token
        else:
            token = self.config.join_token or os.environ.get(JOIN_TOKEN_ENV) or ""
            if not token:
                raise ClientError(
                    f"not enrolled at {transport.base_url}: give "
                    "the join code that `fedlm coordinator` "
                    f"prints (--join-code or ${JOIN_CODE_ENV})"
                )
            if pin is None and not self.config.insecure:
                raise self._no_pin_error()
        transport.token = None
        joined = await transport.join(token, self.config.name)
        creds = Credentials(
            transport.base_url,
            joined["client_id"],
            joined["token"],
            joined["task_id"],
            self.config.name,
            pin,
        )
        self.state.save_credentials(creds)
        transport.token = creds.token
        if pin is not None:
            log.info("joined %s as %s; its certificate %s… is pinned in %s", transport.base_url,
                     creds.client_id, pin[:16], self.state.token_path)  # fmt: skip
        else:
            log.info(
                "joined %s as %s (plain HTTP, nothing pinned)", transport.base_url, creds.client_id
            )
        return creds

    async def _task(self, transport: Transport) -> tuple[Credentials, TaskConfig]:
        creds = await self._credentials(transport)
        try:
            task = await transport.task()
        except AuthenticationError:
            # The coordinator forgot us (new database): enroll again if we can.
            log.warning("the coordinator refused the stored token; joining again")
            self.state.forget_credentials()
            creds = await self._credentials(transport)
            task = await transport.task()
        assert self._identity is not None
        if task.model_sha256 != self._identity.sha256:
            theirs = f"{self._offer_model_name!r} " if self._offer_model_name else ""
            raise ModelMismatchError(
                f"the task {task.task_id} trains model "
                f"{theirs}({task.model_sha256[:16]}…), the local model "
                f"{Path(self._identity.path).name!r} ({self._identity.name or 'unnamed'}) is "
                f"{self._identity.sha256[:16]}…; refusing to train"
            )
        self.config.task_policy.check_task(task)  # before anything is sized by the task
        self._shapes = await asyncio.to_thread(self._target_shapes, task)
        return creds, task

    def _target_shapes(self, task: TaskConfig) -> Shapes:
        """(out, in) of the base model's layers the task adapts; every target must exist."""
        from edge_sdk.adapters.gguf_lora import BaseModelInfo

        assert self._identity is not None
        base = BaseModelInfo.from_gguf(self._identity.path, sha256=self._identity.sha256)
        shapes = target_shapes(base.tensor_shapes, task.lora.targets)
        found = {module.rsplit(".", 1)[-1] for module in shapes}
        missing = [t for t in task.lora.targets if t not in found]
        if missing:
            raise TaskRefusedError(
                f"task {task.task_id}: `lora.targets` {missing} name layers the base model "
                f"{Path(self._identity.path).name} does not have; refusing the task"
            )
        return shapes

    def _summary(
        self, url: str, creds: Credentials | None, task_id: str, reason: str
    ) -> RunSummary:
        return RunSummary(
            coordinator=url, task_id=task_id, client_id=creds.client_id if creds else "",
            reason=reason, rounds=list(self.rounds), global_version=self._global_version,
            adapter_path=self._served[1] if self._served else None,
        )  # fmt: skip

    async def _federate(self, transport: Transport, identity: ModelIdentity) -> RunSummary:
        cfg, state = self.config, self.state
        creds, task = await self._task(transport)
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
            if self._load_global(stored[0], stored[2], task, "the saved copy") is not None:
                await self._swap()  # serve what we had before the restart, right away
            else:  # refused: never again at every start
                state.set_aside_global("the saved global adapter failed the client's checks")

        pending = state.pending()
        if pending is not None:
            # The round that built it is over (a new round starts only once it is settled):
            # never resume that round's checkpoint and train from its base a second time.
            state.finish_round()
            if pending.task_id == task.task_id:
                log.info("resending unacknowledged update %s", pending.update_id)
                outcome = await self._push(transport, pending, task)
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
            fresh = await self._pull(transport, task)
            if fresh:
                await self._swap()
                waited_since = time.monotonic()
                next_wait_log = 0.0
            if task.max_rounds is not None and self._global_version >= task.max_rounds:
                return await self._finish(transport, creds, task, "task_complete")
            if self._global_version <= last_base:
                retrain = (
                    cfg.retrain_after_s is not None
                    and time.monotonic() - waited_since >= cfg.retrain_after_s
                )
                if not retrain:
                    if time.monotonic() >= next_wait_log:
                        waited = time.monotonic() - waited_since
                        log.info(
                            "%s; waited %.0f s so far",
                            _describe_wait(task, self._global_version),
                            waited,
                        )
                        next_wait_log = time.monotonic() + 30.0
                    await self._sleep(cfg.poll_interval_s)
                    continue
            if self.schedule is not None and not self.schedule():
                log.info("schedule says not now; asking again in %.0f s", cfg.schedule_poll_s)
                await self._sleep(cfg.schedule_poll_s)
                continue
            missing = self._missing_data(method)
            if missing is not None:
                # Nothing is sent: the coordinator only sees that no update came (its strategy's
                # deadline closes the round without us). Feedback may arrive meanwhile.
                status = f"sitting this round out: {missing}"
                if status != self.status:
                    log.warning(
                        "round %d (global version %d): %s", done + 1, self._global_version, missing
                    )
                self.status = status
                await self._sleep(cfg.poll_interval_s)
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
            if await self._pull(transport, task):
                await self._swap()
            if self._global_version > last_base or time.monotonic() >= deadline:
                break
            await self._sleep(
                min(self.config.poll_interval_s, max(0.0, deadline - time.monotonic()))
            )
        log.info(
            "done (%s): %d rounds, serving global version %d",
            reason,
            len(self.rounds),
            self._global_version,
        )
        return self._summary(transport.base_url, creds, task.task_id, reason)

    # -- global adapter ---------------------------------------------------------------------

    def _load_global(
        self, body: bytes, etag: str, task: TaskConfig, source: str
    ) -> GlobalAdapter | None:
        """Decode and check a global adapter; on success it becomes current, else None (logged)."""
        assert self._shapes is not None
        try:
            adapter = GlobalAdapter.from_bytes(body)
            self.config.task_policy.check_global(adapter, task, self._shapes)
        except (WireError, AdapterRefusedError) as exc:
            keep = f"version {self._global_version}" if self._global is not None else "no adapter"
            log.warning("refused a global adapter from %s: %s; keeping %s", source, exc, keep)
            return None
        self._global, self._global_version, self._etag = adapter, adapter.version, etag
        return adapter

    async def _pull(self, transport: Transport, task: TaskConfig) -> bool:
        """Fetch the global adapter if it changed; True when a newer version arrived.

        A refused adapter's ETag is sent as If-None-Match from then on, so the coordinator
        answers 304 until it publishes another version: one download and one log line per
        bad version, not one per poll.
        """
        assert self._shapes is not None
        cap = adapter_bytes_cap(self._shapes, task.lora.rank)
        resp = await transport.adapter(self._refused_etag or self._etag, max_bytes=cap)
        if resp.body is None:
            return False
        previous = self._global_version
        if self._load_global(resp.body, resp.etag, task, transport.base_url) is None:
            self._refused_etag = resp.etag or None
            return False
        self._refused_etag = None
        self.state.save_global(resp.body, self._global_version, resp.etag, task.task_id)
        if self._global_version != previous:
            log.info("global adapter version %d", self._global_version)
        return self._global_version > previous

    async def _swap(self) -> None:
        """Write the current global adapter as GGUF LoRA and hot-swap it into the runtime."""
        adapter = self._global
        if adapter is None or (self._served is not None and self._served[0] == adapter.version):
            return
        from edge_sdk.adapters.gguf_lora import BaseModelInfo, write_gguf_lora
        from edge_sdk.errors import RuntimeBusyError

        assert self._identity is not None
        path = self.state.adapter_gguf_path(adapter.version)
        try:
            base = BaseModelInfo.from_gguf(self._identity.path, sha256=self._identity.sha256)
            await asyncio.to_thread(
                write_gguf_lora, path, adapter.dense_tensors(), alpha=adapter.lora.alpha, base=base
            )
        except (FedlmError, ValueError, OSError) as exc:  # AdapterMismatchError is a FedlmError
            log.warning(
                "cannot write global version %d as GGUF (%s); the runtime keeps what it serves",
                adapter.version,
                exc,
            )
            return
        if self.runtime is not None:
            try:
                await asyncio.to_thread(
                    self.runtime.load_adapter, path, wait=self.config.swap_wait_s
                )
            except RuntimeBusyError as exc:
                log.info("hot-swap postponed: %s", exc)
                return
            except (FedlmError, ValueError, OSError) as exc:
                log.warning("the runtime refused global version %d (%s); it keeps what it serves",
                            adapter.version, exc)  # fmt: skip
                return
            log.info("runtime now serves global version %d", adapter.version)
        self._served = (adapter.version, path)
        self.state.prune_adapters(keep=path)

    # -- one round --------------------------------------------------------------------------

    def _train_config(self, task: TaskConfig, seed: int) -> TrainConfig:
        from edge_sdk.training.lora import LoraConfig
        from edge_sdk.training.trainer import TrainConfig

        lora = LoraConfig(
            rank=task.lora.rank, alpha=task.lora.alpha, targets=task.lora.targets,
            freeze_a=task.lora.mode == "frozen-a",
        )  # fmt: skip
        return TrainConfig(
            steps=task.local_steps, lora=lora, seq_len=task.seq_len, batch_size=task.batch_size,
            lr=task.lr, warmup=0, min_lr_ratio=1.0,  # constant lr: a round is a slice of one run
            seed=seed, eval_batches=self.config.eval_batches,
            checkpoint_every=self.config.checkpoint_every, precision=self.config.precision,
        )  # fmt: skip

    def _missing_data(self, method: MethodSpec) -> str | None:
        """Why this device cannot train the task's method now (None: it can)."""
        counts = self.feedback.counts()
        if method.name == "dpo":
            if self.config.preferences or counts.pairs:
                return None
            return (
                "the task trains DPO and this device has no preference pairs yet (no "
                "ClientConfig.preferences files, and the app recorded no chosen/rejected, edit "
                "or regenerate feedback)"
            )
        if self.config.data or counts.examples:
            return None
        return (
            "the task trains SFT and this device has no examples (no data files, and the app "
            "recorded no accepted answer or edit)"
        )

    def _prepare(self, task: TaskConfig) -> None:
        """Tokenize the data and load the trainable model once per task shape (worker thread).

        The data are the files of the task's method plus the app's feedback so far, so the
        dataset is built again whenever feedback was recorded since the last round.
        """
        from edge_sdk.training.data import DataConfig, build_dataset
        from edge_sdk.training.tokenizer import load_tokenizer
        from edge_sdk.training.trainer import load_for_training

        assert self._identity is not None
        method = MethodSpec.from_extra(task.extra)  # checked against the policy in _federate
        counts = self.feedback.counts()
        key = (method.name, task.seq_len, counts)
        if self._dataset is None or self._data_key != key:
            cfg = self.config
            tokenizer = load_tokenizer(self._identity.path)
            data_config = DataConfig(seq_len=task.seq_len, val_fraction=cfg.val_fraction,
                                     seed=cfg.seed, skip_bad=cfg.skip_bad)  # fmt: skip
            if method.name == "dpo":
                from edge_sdk.training.preferences import (
                    build_preference_dataset,
                    load_preferences,
                )

                pairs = load_preferences(list(cfg.preferences), skip_bad=cfg.skip_bad)
                pairs += self.feedback.pairs()
                self._dataset = build_preference_dataset(pairs, tokenizer, data_config)  # type: ignore[assignment]
            else:
                files = list(cfg.data)
                snapshot = self.feedback.examples_snapshot(self.state.train_dir)
                if snapshot is not None:
                    files.append(str(snapshot))
                self._dataset = build_dataset(files, tokenizer, data_config)
            self._data_key = key
            log.info(
                "training data: %s (the app's feedback: %d pairs, %d examples; "
                "kept on this device)",
                "preference pairs" if method.name == "dpo" else "examples",
                counts.pairs,
                counts.examples,
            )
        model_key = (task.lora.rank, task.lora.alpha, task.lora.targets, task.lora.mode)
        if self._model is None or self._model_key != model_key:
            self._model = load_for_training(self._identity.path, self._train_config(task, 0))
            self._model_key = model_key

    def _fit(
        self, task: TaskConfig, marker: RoundMarker, base: GlobalAdapter, resume: bool
    ) -> tuple[dict[str, np.ndarray], Any, int] | None:
        """Train one round in this (worker) thread; None when interrupted by `stop()`."""
        from edge_sdk.training.errors import CheckpointError
        from edge_sdk.training.trainer import fit

        self._prepare(task)
        assert self._dataset is not None and self._model is not None
        config = self._train_config(task, marker.seed)
        method = MethodSpec.from_extra(task.extra)
        if method.name == "dpo":  # the reference is the base model: the adapter disabled
            config = dataclasses.replace(
                config,
                method="dpo",
                beta=method.beta,
                dpo_loss=method.loss,
                sft_weight=method.sft_weight,
            )
        # Same packed sequences and split every round; the order differs per round.
        dataset = dataclasses.replace(self._dataset, seed=marker.seed)
        first_step: list[int] = []

        def on_step(record: dict[str, float]) -> None:
            if not first_step:
                first_step.append(int(record["step"]))
            if self._stop_flag.is_set():
                raise _Interrupted

        kwargs: dict[str, Any] = {
            "init_adapter": base.dense_tensors(),
            "checkpoint_path": self.state.checkpoint_path,
            "base_id": f"{task.model_sha256}:{task.task_id}:{marker.base_version}",
            "on_step": on_step,
        }
        try:
            try:
                result = fit(self._model, dataset, config, resume=resume, **kwargs)
            except CheckpointError as exc:
                if not resume:
                    raise
                set_aside(
                    self.state.checkpoint_path,
                    f"cannot resume the round ({exc}); training it afresh",
                )
                first_step.clear()
                result = fit(self._model, dataset, config, resume=False, **kwargs)
        except _Interrupted:
            log.info("training interrupted; the last checkpoint is kept")
            return None
        resumed_from = first_step[0] - 1 if first_step else config.steps
        return result.adapter, result.metrics, resumed_from

    def _resumable(
        self, task: TaskConfig, round_no: int
    ) -> tuple[RoundMarker, GlobalAdapter] | None:
        """The interrupted round on disk, if its base is still acceptable to the task's strategy."""
        marker, body = self.state.round_marker(), self.state.base_body()
        if (
            marker is None
            or body is None
            or marker.task_id != task.task_id
            or marker.round != round_no
        ):
            return None
        if not self.state.checkpoint_path.exists():
            return None
        try:
            base = GlobalAdapter.from_bytes(body)
        except WireError as exc:
            set_aside(
                self.state.train_dir / "base.bin",
                f"undecodable round base ({exc}); the round starts afresh",
            )
            return None
        strategy = (
            task.extra.get("strategy", {}) if isinstance(task.extra.get("strategy"), dict) else {}
        )
        max_staleness = (
            int(strategy.get("max_staleness", 0)) if strategy.get("name") == "fedbuff" else 0
        )
        if self._global_version - base.version > max_staleness:
            log.info(
                "the interrupted round trained from version %d, now too old; starting afresh",
                base.version,
            )
            return None
        return marker, base

    async def _round(
        self, transport: Transport, creds: Credentials, task: TaskConfig, round_no: int
    ) -> RoundReport | None:
        assert self._global is not None
        started = time.perf_counter()
        resumable = self._resumable(task, round_no)
        if resumable is not None:
            marker, base = resumable
            log.info(
                "round %d: resuming from the checkpoint (base version %d)", round_no, base.version
            )
        else:
            base = self._global
            marker = RoundMarker(
                task.task_id,
                base.version,
                round_no,
                _round_seed(self.config.seed, creds.client_id, round_no),
            )
            self.state.start_round(marker, base.to_bytes())
            crash_point("round_started")
            log.info(
                "round %d: training %d steps from global version %d",
                round_no,
                task.local_steps,
                base.version,
            )
        trained = await asyncio.to_thread(self._fit, task, marker, base, resumable is not None)
        if trained is None:
            return None
        adapter, metrics, resumed_from = trained
        pending = self._encode(task, creds, base, adapter, metrics, marker)
        crash_point("update_saved")
        self.state.finish_round()
        crash_point("round_finished")
        outcome = await self._push(transport, pending, task)
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

    def _encode(
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

    async def _push(self, transport: Transport, pending: PendingUpdate, task: TaskConfig) -> str:
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
            outcome = await self._secure_push(transport, pending, task)
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
                    await self._sleep(self.config.poll_interval_s)
                    if self.stopping:
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

    # -- secure aggregation: the push step when the task says `secure` ------------------------

    def _secure_vector(
        self, pending: PendingUpdate, spec: Mapping[str, Any]
    ) -> tuple[np.ndarray, int] | None:
        """The plain update the protocol masks: B after training minus the base's B, in the
        task's key order; None when the base version is no longer the one served here."""
        if self._global is None or self._global.version != pending.base_version:
            return None
        update = AdapterUpdate.from_bytes(pending.body)
        base = self._global.dense_tensors()
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

    async def _secure_push(
        self, transport: Transport, pending: PendingUpdate, task: TaskConfig
    ) -> str:
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
        plain = self._secure_vector(pending, spec)
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
                    await self._sleep(self.config.poll_interval_s)
                    if self.stopping:
                        raise StopRequested("stopped while waiting for a secure round") from None
            _check_secure_params(setup.params, spec, x.size)
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
                    if self.stopping:
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


def _check_secure_params(params: SecAggParams, spec: Mapping[str, Any], length: int) -> None:
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
