"""The coordinator's state machine, without HTTP: enrollment, ingest, aggregation, status.

`Coordinator` is synchronous and thread-safe; the aiohttp layer calls it from worker threads
so that decoding, fsync and numpy never block the event loop.

Ingest of one update (`stage`, or `submit` which waits for it):
  1. decode the wire bytes under `DecodeLimits` (bad bytes -> 400, nothing stored);
  2. check client id, model sha256, LoRA spec, tensor keys and shapes against the task and
     the model's layer shapes;
  3. under the state lock, once: the strategy admits its record (stale, duplicate, round
     closed -> 409) and the update reserves its place (its client's slot in the buffer);
  4. decode every tensor (NaN/Inf -> 422, the reservation is released, nothing stored) and
     measure its effect norm;
  5. queue it for the next group commit (`coordinator.group_commit`): it joins the pending
     updates, and is acknowledged, only after the transaction that stores it has committed.

Aggregation (`aggregate`) snapshots the pending updates and streams them from storage twice:
once to measure each update's effect norm (the adaptive clip's reference, and a finite check
before anything is mixed), then through `coordinator.next_version.aggregate`. An update that
cannot be aggregated is found and dropped (a log line naming it and its client, and
`on_drop`); the rest are aggregated, so no batch is retried forever. The new version and the
consumed and dropped updates are committed in one transaction. Version 0 is the PEFT-style
initial adapter (seeded A, B = 0, so B·A = 0): clients fetch it and train from it like any
other version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import secrets
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from coordinator.auth import device_name, generate_token, hash_token, tokens_equal
from coordinator.config import CoordinatorConfig
from coordinator.errors import (
    AuthError,
    BadRequestError,
    ConflictError,
    ContributionError,
    DuplicateUpdateError,
    ForbiddenError,
    StaleUpdateError,
    StorageError,
    UpdateRejectedError,
)
from coordinator.group_commit import GroupCommit, Staged
from coordinator.next_version import (
    ClipBound,
    Contribution,
    Outcome,
    ServerState,
    Tensors,
    aggregate,
    clip_bound,
    effect_norm,
    initial_adapter,
)
from coordinator.storage import GlobalRecord, Storage, UpdateRecord
from edge_sdk.wire import (
    AdapterUpdate,
    DecodeLimits,
    ErrorMessage,
    GlobalAdapter,
    InvalidMetricsError,
    LoraSpec,
    NonFiniteError,
    OutOfRangeError,
    ShapeMismatchError,
    TaskConfig,
    WireError,
)

if TYPE_CHECKING:
    from coordinator.secure import SecureAggregation
    from edge_sdk.wire import EncodedTensor

log = logging.getLogger(__name__)

_SERVER_STATE_BLOB = "server_state"
_RECENT = 20
_CLIENT_LIST = 200

# Failures of the machinery, not of an update: they propagate (the service retries later).
_INFRASTRUCTURE_ERRORS = (StorageError, sqlite3.Error, OSError, MemoryError)


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


@contextmanager
def _wire_errors_as_http() -> Iterator[None]:
    """Wire errors as API errors: unusable values are a rejected update, bad bytes a bad request."""
    try:
        yield
    # Well-formed bytes with unusable values: 422, which clients do not retry (a 5xx they would).
    except (NonFiniteError, ShapeMismatchError, OutOfRangeError, InvalidMetricsError) as exc:
        raise UpdateRejectedError(
            str(exc)[:500], code=ErrorMessage.from_exception(exc).code
        ) from None
    except WireError as exc:
        raise BadRequestError(str(exc)[:500], code=ErrorMessage.from_exception(exc).code) from None


class _Batch(NamedTuple):
    """What every aggregation attempt over a subset of one batch of pending updates shares."""

    weights: dict[str, float]
    """update id -> its weight from the strategy."""
    current: Tensors
    """The global adapter the batch aggregates onto."""
    norms: dict[str, float]
    """update id -> the norm of its effect (pass 1), for the clip bound of each attempt."""


class Coordinator:
    """Task state over a `Storage`; see the module docstring for the ingest contract."""

    def __init__(
        self,
        config: CoordinatorConfig,
        storage: Storage,
        clock: Callable[[], float] = time.time,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.config = config
        self.storage = storage
        self._clock = clock
        self._rng = rng if rng is not None else np.random.default_rng()
        self._lock = threading.RLock()
        self._settled = threading.Condition(self._lock)
        """Notified whenever reserved updates are stored or released (`_reserved` shrinks)."""
        self._reserved: dict[str, UpdateRecord] = {}
        """Admitted updates not yet stored (decoding, or queued for the next group commit):
        they hold their client's slot, and their ids count as seen."""
        self._commits = GroupCommit(storage, self._settle)
        self._aggregating = False
        self._waiting_logged: tuple[Any, ...] | None = None
        self.on_drop: Callable[[str], None] | None = None
        """Called with the reason of every update dropped at aggregation (the service counts
        them in `fedlm_updates_dropped_total`)."""
        self._token_cache: dict[str, str] = {}
        self._dense_cache: dict[int, Tensors] = {}
        self._expected_keys = frozenset(config.aggregation.update_keys(config.shapes))
        # Room for A and B of every layer whatever the mode, so a frozen-a client that also sends
        # A hears "unexpected lora_A", not a bare limit error; anything larger is refused early.
        self._limits = DecodeLimits(
            max_bytes=config.max_body_bytes, max_tensors=2 * len(config.shapes)
        )
        self.task_id = self._open_task()
        state = storage.strategy_state()
        self.round_started_at = float(state.get("round_started_at", self._clock()))
        self._server_state = ServerState.from_bytes(storage.get_blob(_SERVER_STATE_BLOB))
        latest = storage.latest_global()
        if latest is None:
            latest = self._publish_initial()
        assert latest.body is not None, "the newest global version always keeps its body"
        self._set_current(latest)
        self._pending = storage.pending_updates()
        # update id -> the effect norm measured at ingest (from the tensors decoded there), so
        # the clip's first pass need not decode the stored update again. In memory only: after
        # a restart the first pass decodes what it does not find here.
        self._norms: dict[str, float] = {}
        self._norm_cache: dict[tuple[Any, ...], tuple[np.ndarray, ...]] = {}
        self.last_aggregation: dict[str, Any] = dict(latest.stats)
        self.secure: SecureAggregation | None = None
        """Secure aggregation (`config.secure`): the protocol rounds that replace /v1/updates."""
        if config.secure:
            from coordinator.secure import SecureAggregation

            self.secure = SecureAggregation(self, clock)
        log.info(
            "task %s: version %d, %d pending updates, strategy %s, mode %s",
            self.task_id,
            self.version,
            len(self._pending),
            config.strategy.name,
            config.aggregation.mode,
        )

    # -- set-up -----------------------------------------------------------------------------

    @property
    def lora(self) -> LoraSpec:
        agg = self.config.aggregation
        return LoraSpec(agg.rank, agg.alpha, self.config.targets, agg.mode, agg.a_seed)

    def _task_identity(self) -> str:
        agg = self.config.aggregation
        return json.dumps(
            {
                "model": self.config.model_sha256,
                "targets": list(self.config.targets),
                "mode": agg.mode,
                "rank": agg.rank,
                "alpha": agg.alpha,
                "a_seed": agg.a_seed,
            },
            sort_keys=True,
        )

    def _open_task(self) -> str:
        """Create the task on a fresh database; refuse a database made for another task."""
        identity = self._task_identity()
        stored = self.storage.get_meta("task_identity")
        if stored is None:
            self.storage.set_meta("task_identity", identity)
            self.storage.set_meta("task_id", f"task-{secrets.token_hex(8)}")
        elif stored != identity:
            raise StorageError(
                f"{getattr(self.storage, 'path', 'the database')} holds a task for {stored}; "
                f"this coordinator runs {identity} (use another --db)"
            )
        task_id = self.storage.get_meta("task_id")
        assert task_id is not None
        return task_id

    def _publish_initial(self) -> GlobalRecord:
        tensors = initial_adapter(self.config.aggregation, self.config.shapes)
        record = self._encode_global(0, tensors, {"initial": True})
        self.storage.commit_aggregation(
            record, [], [], {"round_started_at": self.round_started_at, "version": 0}, {}, 0
        )
        return record

    def _encode_global(
        self, version: int, tensors: Tensors, metadata: dict[str, Any]
    ) -> GlobalRecord:
        # The coordinator's globals are dense; the field also takes encoded tensors.
        dense: dict[str, EncodedTensor | np.ndarray] = dict(tensors)
        adapter = GlobalAdapter(
            version=version,
            lora=self.lora,
            tensors=dense,
            metadata=metadata,
            codec=self.config.global_codec,
        )
        body = adapter.to_bytes()
        return GlobalRecord(version, self._clock(), etag_of(body), metadata, body)

    def _set_current(self, record: GlobalRecord) -> None:
        assert record.body is not None
        self.version = record.version
        self.etag = record.etag
        self.global_body = record.body
        # One tuple, swapped atomically: readers (GET /v1/adapter) never wait for the lock,
        # which an ingest thread may hold across an fsync.
        self._published = (record.body, record.etag, record.version)
        self._current = GlobalAdapter.from_bytes(record.body).dense_tensors()
        self._dense_cache[record.version] = self._current
        keep_from = record.version - self.config.strategy.keep_versions() + 1
        for old in [v for v in self._dense_cache if v < keep_from]:
            del self._dense_cache[old]

    def dense_version(self, version: int) -> Tensors:
        """The decoded global adapter of `version` (the reference of delta codecs)."""
        cached = self._dense_cache.get(version)
        if cached is not None:
            return cached
        body = self.storage.global_body(version)
        if body is None:
            raise StaleUpdateError(f"global version {version} is no longer kept; fetch /v1/adapter")
        dense = GlobalAdapter.from_bytes(body).dense_tensors()
        with self._lock:
            if version >= self.version - self.config.strategy.keep_versions() + 1:
                self._dense_cache[version] = dense
        return dense

    def task_config(self) -> TaskConfig:
        cfg = self.config
        return TaskConfig(
            task_id=self.task_id,
            model_sha256=cfg.model_sha256,
            lora=self.lora,
            codec=cfg.task_codec,
            local_steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            lr=cfg.lr,
            max_rounds=cfg.max_rounds,
            global_version=self.version,
            extra={
                "strategy": cfg.strategy.describe(),
                "max_client_rank": cfg.aggregation.max_client_rank,
                "clip": self.clip_policy(),
                "max_weight_examples": self.weight_cap,
                "method": cfg.method.to_extra(),
                **({"secure": self.secure.describe()} if self.secure is not None else {}),
            },
        )

    @property
    def weight_cap(self) -> int:
        """Most examples an update's weight counts (`AggregationConfig.max_weight_examples`,
        by default the task's local_steps × batch_size: what one local round trains on)."""
        agg = self.config.aggregation
        return agg.max_weight_examples or self.config.local_steps * self.config.batch_size

    def clip_policy(self) -> dict[str, Any]:
        """The per-update bound on an update's effect, as the task states it to devices."""
        agg = self.config.aggregation
        last = self.last_aggregation.get("clip")
        policy: dict[str, Any] = {
            "norm": "frobenius of s·B·A - base" if agg.mode == "exact" else "l2 of factor delta",
            "fixed": agg.dp.clip_norm if agg.dp is not None else agg.clip_norm,
            "multiplier": None if agg.dp is not None else agg.clip_multiplier,
            "reference": "lower median of the effect norms of the aggregated updates and the "
            f"last {agg.clip_history} before them",
            "last_bound": last.get("bound") if isinstance(last, dict) else None,
        }
        if agg.dp is not None:
            policy["source"] = "dp"
        elif agg.clip_multiplier is not None:
            policy["source"] = "adaptive" if agg.clip_norm is None else "adaptive, capped"
        else:
            policy["source"] = "fixed" if agg.clip_norm is not None else "off"
        return policy

    # -- clients ----------------------------------------------------------------------------

    def check_join_token(self, join_token: str) -> None:
        """`AuthError` unless `join_token` is the task's (constant time; cheap enough for the
        loop)."""
        if not tokens_equal(join_token, self.config.join_token):
            raise AuthError("invalid join token")

    def join(self, join_token: str, name: str) -> dict[str, str]:
        """Enroll a device; returns its client id and bearer token (shown once, stored hashed).

        The name is the device's own choice: it is made printable and cut to MAX_NAME_LEN
        before it is logged or stored (`coordinator.auth.device_name`).
        """
        self.check_join_token(join_token)
        name = device_name(name)
        client_id = f"c-{secrets.token_hex(8)}"
        token = generate_token()
        self.storage.add_client(client_id, name, hash_token(token))
        log.info("client %s (%s) joined", client_id, name)
        return {"client_id": client_id, "token": token, "task_id": self.task_id}

    def authenticate(self, token: str | None) -> str:
        """The client id of a bearer token; `AuthError` when missing or unknown."""
        if not token:
            raise AuthError("missing bearer token (POST /v1/join first)")
        digest = hash_token(token)
        client_id = self._token_cache.get(digest)
        if client_id is None:
            client_id = self.storage.client_for_token(digest)
            if client_id is None:
                raise AuthError("invalid bearer token")
            self._token_cache[digest] = client_id
        return client_id

    # -- ingest -----------------------------------------------------------------------------

    def submit(self, client_id: str, body: bytes) -> dict[str, Any]:
        """Validate, admit and durably store one update; returns the acknowledgement."""
        return self.stage(client_id, body).result()

    def stage(self, client_id: str, body: bytes) -> Future[dict[str, Any]]:
        """Validate and admit one update and queue it for the next group commit.

        Raises at once (nothing stored) when the update is refused; otherwise the future
        resolves to the acknowledgement after the transaction that stores it has committed
        (or to the storage error that kept it out). Call from a worker thread: this decodes."""
        if self.secure is not None:
            raise ConflictError(
                "this task uses secure aggregation: updates are summed through /v1/secagg/*, "
                "never sent in the clear (update the client)",
                code="secure_aggregation_required",
            )
        update = self._decode(body)
        self._check_update(client_id, update)
        if self.storage.has_update(update.update_id):
            raise DuplicateUpdateError(f"update {update.update_id!r} was already received")
        record = self._record(client_id, update, len(body))
        with self._lock:
            self._check_open()
            if record.update_id in self._reserved:
                raise DuplicateUpdateError(f"update {record.update_id!r} was already received")
            # The one admission: against the stored buffer and the updates on their way to it.
            self.config.strategy.admit(
                record, self.version, [*self._pending, *self._reserved.values()]
            )
            self._reserved[record.update_id] = record
        try:
            norm = self._dense_norm(update)
            item = Staged(record, body, norm)
            self._commits.put(item)
        except BaseException:
            self._release([record.update_id])
            raise
        return item.future

    def _settle(self, batch: Sequence[Staged], results: Sequence[BaseException | None]) -> None:
        """After a group commit (in its writer thread): the stored updates join the buffer,
        then every future resolves, so an acknowledgement always follows its fsync."""
        with self._lock:
            for item, error in zip(batch, results):
                del self._reserved[item.record.update_id]
                if error is None:
                    self._pending.append(item.record)
                    if item.norm is not None:
                        self._norms[item.record.update_id] = item.norm
            self._settled.notify_all()
            pending, version = len(self._pending), self.version
        for item, error in zip(batch, results):
            if error is not None:
                item.future.set_exception(error)
                continue
            log.debug(
                "accepted %s from %s (base %d)",
                item.record.update_id, item.record.client_id, item.record.base_version,
            )  # fmt: skip
            item.future.set_result(
                {
                    "update_id": item.record.update_id,
                    "accepted": True,
                    "version": version,
                    "pending": pending,
                }
            )

    def _release(self, update_ids: Sequence[str]) -> None:
        with self._lock:
            for update_id in update_ids:
                self._reserved.pop(update_id, None)
            self._settled.notify_all()

    def close(self) -> None:
        """Store what is queued for the group commit, then stop its writer (before the storage
        closes; idempotent)."""
        self._commits.close()

    def check_open(self) -> None:
        """`ConflictError` when the task is finished or a FedAvg round is closing."""
        self._check_open()

    @property
    def _closes_rounds(self) -> bool:
        """Whether the strategy admits nothing while its round is aggregated (FedAvg)."""
        return self.config.strategy.name == "fedavg"

    def _await_reserved(self, timeout_s: float = 60.0) -> None:
        """With the lock held and new admissions refused: wait until the updates admitted
        before are stored (or refused), so the round's snapshot holds every update it
        admitted, as when admission and storage were one step."""
        if not self._settled.wait_for(lambda: not self._reserved, timeout_s):
            log.warning(
                "%d admitted updates were not stored within %.0f s; they join the next round",
                len(self._reserved), timeout_s,
            )  # fmt: skip

    def _check_open(self) -> None:
        if self.config.max_rounds is not None and self.version >= self.config.max_rounds:
            raise ConflictError(
                f"the task finished after {self.config.max_rounds} rounds", code="task_complete"
            )
        if self._aggregating and self._closes_rounds:
            raise ConflictError(
                f"round {self.version} is closing; retry shortly", code="round_closed"
            )

    def _decode(self, body: bytes) -> AdapterUpdate:
        with _wire_errors_as_http():
            return AdapterUpdate.from_bytes(body, self._limits)

    def _check_update(self, client_id: str, update: AdapterUpdate) -> None:
        """Everything about an update that does not depend on the task's changing state."""
        cfg, agg = self.config, self.config.aggregation
        if update.client_id != client_id:
            raise ForbiddenError(
                f"update names client {update.client_id!r}, but the token is {client_id!r}'s"
            )
        if update.model_sha256 != cfg.model_sha256:
            raise UpdateRejectedError(
                f"update is for model {update.model_sha256[:16]}…, "
                f"this task trains {cfg.model_sha256[:16]}…",
                code="wrong_model",
            )
        self._check_lora(update.lora)
        keys = set(update.tensors)
        if keys != self._expected_keys:
            missing = sorted(self._expected_keys - keys)[:3]
            extra = sorted(keys - self._expected_keys)[:3]
            raise UpdateRejectedError(
                f"tensor keys differ from the task's {agg.mode} "
                f"adapter: missing {missing}, unexpected {extra}",
                code="wrong_tensors",
            )
        for key, tensor in update.tensors.items():
            expected = agg.expected_shape(key, cfg.shapes, update.lora.rank)
            if tuple(tensor.shape) != expected:
                raise UpdateRejectedError(
                    f"{key}: expected shape {expected}, got {tuple(tensor.shape)}",
                    code="wrong_shape",
                )

    def _dense_norm(self, update: AdapterUpdate) -> float | None:
        """Decode every tensor (raises on any non-finite value) and return the update's effect
        norm (None when it is not finite: the aggregation's first pass then drops it, as it
        would have without this measurement)."""
        reference = (
            self.dense_version(update.base_version)
            if any(t.delta for t in update.tensors.values())
            else None
        )
        with _wire_errors_as_http():
            dense = update.dense_tensors(reference)
        return self._effect_norm(update, dense)

    def _effect_norm(self, update: AdapterUpdate, dense: Tensors) -> float | None:
        if len(self._norm_cache) > 64:  # per (base version, layer shape): a handful at a time
            self._norm_cache.clear()
        item = Contribution(update.update_id, dense, 1.0, update.base_version, update.lora.scaling)
        try:
            return effect_norm(
                self.config.aggregation, self.config.shapes, item,
                self.dense_version(update.base_version), cache=self._norm_cache,
            )  # fmt: skip
        except ContributionError:
            return None

    def _check_lora(self, lora: LoraSpec) -> None:
        """Every field of the update's LoRA spec against the task, in every mode.

        Exact mode accepts other ranks (up to `max_client_rank`) with the task's alpha or the
        task's scale alpha / r; the other modes need the task's rank and alpha. A seed, when
        given, must be the task's (frozen-a requires it)."""
        agg = self.config.aggregation
        problem = None
        if lora.mode != agg.mode:
            problem = f"update uses LoRA mode {lora.mode!r}, the task {agg.mode!r}"
        elif tuple(sorted(lora.targets)) != tuple(sorted(self.config.targets)):
            problem = f"update targets {list(lora.targets)}, the task {list(self.config.targets)}"
        elif agg.mode == "exact" and lora.rank > agg.max_client_rank:
            problem = f"rank {lora.rank} exceeds max_client_rank={agg.max_client_rank}"
        elif agg.mode != "exact" and lora.rank != agg.rank:
            problem = f"mode {agg.mode} needs rank {agg.rank}, got {lora.rank}"
        elif lora.alpha != agg.alpha and not (
            agg.mode == "exact"
            and lora.rank != agg.rank
            and math.isclose(lora.scaling, agg.scale, rel_tol=1e-9)
        ):
            problem = (
                f"alpha {lora.alpha:g} (scale {lora.scaling:g}) differs from the task's "
                f"alpha {agg.alpha:g} (scale {agg.scale:g})"
            )
        elif lora.a_seed is not None and lora.a_seed != agg.a_seed:
            problem = f"a_seed {lora.a_seed} != the task's {agg.a_seed}"
        if problem is not None:
            raise UpdateRejectedError(problem, code="lora_mismatch")

    def _record(self, client_id: str, update: AdapterUpdate, size: int) -> UpdateRecord:
        return UpdateRecord(
            update_id=update.update_id,
            client_id=client_id,
            base_version=update.base_version,
            num_examples=update.num_examples,
            num_tokens=update.num_tokens,
            rank=update.lora.rank,
            received_at=self._clock(),
            size=size,
            metrics=dict(update.metrics),
        )

    # -- aggregation ------------------------------------------------------------------------

    def due(self) -> bool:
        with self._lock:
            if self._aggregating:
                return False
            due = self.config.strategy.due(
                self._pending, self.version, self.round_started_at, self._clock()
            )
        if not due:
            self._log_waiting()
        return due

    def _log_waiting(self) -> None:
        """Say what the next version waits for, once per change of what it waits for."""
        waiting = self.waiting()
        key = (waiting["version"], waiting["pending"], waiting["clients"])
        if key != self._waiting_logged:
            self._waiting_logged = key
            log.info("%s", waiting["message"])

    def aggregate(self) -> int | None:
        """Aggregate the pending updates if the strategy says so; the new version, or None.

        Updates that cannot be aggregated are dropped (see the module docstring); None when
        nothing usable was left.
        """
        strategy = self.config.strategy
        with self._lock:
            if self._aggregating or not strategy.due(
                self._pending, self.version, self.round_started_at, self._clock()
            ):
                return None
            self._aggregating = True
            if self._closes_rounds:
                self._await_reserved()
            snapshot, version, current = list(self._pending), self.version, self._current
        try:
            weights = {r.update_id: strategy.weight(r, version, self.weight_cap) for r in snapshot}
            # Weight 0: too stale for the strategy, or no examples; not an attack, logged at INFO.
            drops = {r.update_id: "zero_weight" for r in snapshot if weights[r.update_id] <= 0}
            used = [r for r in snapshot if weights[r.update_id] > 0]
            started = time.perf_counter()
            outcome, used = self._aggregate_isolating(used, weights, current, drops)
            self._report_drops(snapshot, drops, version)
            if outcome is None:
                self._finish([], list(drops), None, None)
                return None
            seconds = time.perf_counter() - started
            stats = {
                **outcome.stats,
                **self._version_stats(
                    version + 1, seconds, max(version - r.base_version for r in used), len(drops)
                ),
                "dropped_reasons": dict(Counter(drops.values())),
            }
            encoding = time.perf_counter()
            record = self._encode_global(version + 1, outcome.tensors, stats)
            committing = time.perf_counter()
            self._finish([r.update_id for r in used], list(drops), record, outcome.state)
            # In memory only (not in the published metadata): where the time after the math went.
            self.last_aggregation["seconds_encode"] = round(committing - encoding, 3)
            self.last_aggregation["seconds_commit"] = round(time.perf_counter() - committing, 3)
            log.info("version %d from %d updates in %.2fs", version + 1, len(used), seconds)
            return version + 1
        finally:
            with self._lock:
                self._aggregating = False

    def _version_stats(
        self, version: int, seconds: float, staleness_max: int, dropped: int
    ) -> dict[str, Any]:
        """What every published version's metadata says of how it was made."""
        return {
            "version": version,
            "seconds": round(seconds, 4),
            "strategy": self.config.strategy.name,
            "staleness_max": staleness_max,
            "max_weight_examples": self.weight_cap,
            "dropped": dropped,
        }

    def _aggregate_isolating(
        self,
        used: list[UpdateRecord],
        weights: dict[str, float],
        current: Tensors,
        drops: dict[str, str],
    ) -> tuple[Outcome | None, list[UpdateRecord]]:
        """Aggregate `used`; on failure find the update(s) at fault, drop them (into `drops`)
        and aggregate the rest. Returns the outcome (None: nothing usable) and what it used."""
        norms = self._measure(used, weights, drops)
        candidates = [r for r in used if r.update_id in norms]
        if not candidates:
            return None, []
        batch = _Batch(weights, current, norms)
        result = self._attempt(candidates, batch, drops)
        if isinstance(result, Outcome):
            return result, candidates
        log.error(
            "aggregating %d updates failed (%s: %s); looking for the update at fault",
            len(candidates), type(result).__name__, result,
        )  # fmt: skip
        culprits = self._isolate(candidates, batch, result)
        for update_id in culprits:
            drops[update_id] = "aggregation_failed"
        rest = [r for r in candidates if r.update_id not in culprits]
        if not rest:
            return None, []
        result = self._attempt(rest, batch, drops)
        if isinstance(result, Outcome):
            return result, rest
        log.error("aggregating the remaining %d updates failed too (%s)", len(rest), result)
        for record in rest:
            drops[record.update_id] = "aggregation_failed"
        return None, []

    def _measure(
        self, used: list[UpdateRecord], weights: dict[str, float], drops: dict[str, str]
    ) -> dict[str, float]:
        """Pass 1: each update's effect norm; an update whose effect is not finite is dropped
        here, before anything is mixed."""
        agg, norms = self.config.aggregation, {}
        for record in used:
            if record.update_id in self._norms:
                norms[record.update_id] = self._norms[record.update_id]
        missing = [r for r in used if r.update_id not in norms]
        items, unusable = self._contributions(missing, weights)
        for item in items:
            try:
                norms[item.update_id] = effect_norm(
                    agg, self.config.shapes, item, self.dense_version(item.base_version)
                )
            except ContributionError as exc:
                drops[item.update_id] = "non_finite_effect"
                log.debug("%s", exc)
            except Exception as exc:
                if isinstance(exc, _INFRASTRUCTURE_ERRORS):
                    raise
                drops[item.update_id] = "aggregation_failed"
                log.debug("effect of %s: %s: %s", item.update_id, type(exc).__name__, exc)
        drops.update(unusable)
        return norms

    def _attempt(
        self, records: list[UpdateRecord], batch: _Batch, drops: dict[str, str]
    ) -> Outcome | Exception:
        """Pass 2: one aggregation of `records` under the bound their norms give, with the
        updates found unusable on the way added to `drops` (update id -> reason); the error
        instead when it fails (infrastructure errors propagate: they are no update's fault)."""
        agg = self.config.aggregation
        try:
            clip: ClipBound = clip_bound(
                agg, [batch.norms[r.update_id] for r in records], self._server_state.norm_history
            )
            items, unusable = self._contributions(records, batch.weights)
            outcome = aggregate(
                agg, self.config.shapes, batch.current, items,
                self.dense_version, self._server_state, self._rng, clip=clip,
            )  # fmt: skip
        except Exception as exc:
            if isinstance(exc, _INFRASTRUCTURE_ERRORS):
                raise
            return exc
        drops.update(unusable)
        return outcome

    def _isolate(self, candidates: list[UpdateRecord], batch: _Batch, error: Exception) -> set[str]:
        """The update(s) at fault: the one an error names, else every update that fails alone,
        else the one whose removal lets the rest aggregate, else all of them."""
        if isinstance(error, ContributionError):
            return {error.update_id}

        def fails(records: list[UpdateRecord]) -> bool:
            return not isinstance(self._attempt(records, batch, drops={}), Outcome)

        alone = {r.update_id for r in candidates if fails([r])}
        if alone:
            return alone
        for record in candidates:
            rest = [r for r in candidates if r is not record]
            if rest and not fails(rest):
                return {record.update_id}
        return {r.update_id for r in candidates}

    def _report_drops(
        self, snapshot: list[UpdateRecord], drops: dict[str, str], version: int
    ) -> None:
        clients = {r.update_id: r.client_id for r in snapshot}
        for update_id, reason in drops.items():
            level = logging.INFO if reason == "zero_weight" else logging.WARNING
            log.log(
                level, "dropped update %s of client %s at version %d: %s",
                update_id, clients.get(update_id, "?"), version, reason,
            )  # fmt: skip
            if self.on_drop is not None:
                self.on_drop(reason)

    def _contributions(
        self, used: list[UpdateRecord], weights: dict[str, float]
    ) -> tuple[Iterator[Contribution], dict[str, str]]:
        """Decode stored updates one at a time (O(adapter) memory however many there are).

        Returns the stream of contributions and the updates it found unusable (update id ->
        reason; complete once the stream is exhausted). Every update was validated at ingest,
        so a failure here means its delta reference is gone, the file was tampered with, or it
        was stored under an older, laxer check (its LoRA spec is checked again): that update is
        left out and dropped rather than blocking every future aggregation.
        """
        unusable: dict[str, str] = {}

        def usable() -> Iterator[Contribution]:
            for done in self._decoded(used, weights):
                if isinstance(done, Contribution):
                    yield done
                else:
                    unusable[done[0]] = done[1]

        return usable(), unusable

    def _decoded(
        self, used: list[UpdateRecord], weights: dict[str, float]
    ) -> Iterator[Contribution | tuple[str, str]]:
        """Each stored update of `used`, decoded: a `Contribution`, or (update id, reason)."""
        by_id = {r.update_id: r for r in used}
        # The references, resolved here: the decoding thread never touches storage (a thread
        # that opened a connection would keep it until the storage closes).
        refs: dict[int, Tensors | Exception] = {}
        for version in {r.base_version for r in used}:
            try:
                refs[version] = self.dense_version(version)
            except StaleUpdateError as exc:
                refs[version] = exc

        def decode(update_id: str, body: bytes) -> Contribution | tuple[str, str]:
            record = by_id[update_id]
            try:
                update = AdapterUpdate.from_bytes(body, self._limits)
                self._check_lora(update.lora)
                delta = any(t.delta for t in update.tensors.values())
                reference = refs[record.base_version]
                if delta and isinstance(reference, Exception):
                    raise reference
                tensors = update.dense_tensors(reference if delta else None)  # type: ignore[arg-type]
            except (WireError, StaleUpdateError, UpdateRejectedError) as exc:
                log.debug("stored update %s is unusable: %s", update_id, exc)
                return update_id, (
                    "lora_mismatch" if isinstance(exc, UpdateRejectedError) else "undecodable"
                )
            return Contribution(
                update_id=update_id,
                tensors=tensors,
                weight=weights[update_id],
                base_version=record.base_version,
                scale=update.lora.scaling,
            )

        # Decode update k+1 in a worker while the caller folds update k (numpy releases the
        # GIL for most of both): two decoded updates in memory at most.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedlm-decode") as worker:
            ahead: Future[Contribution | tuple[str, str]] | None = None
            for update_id, body in self.storage.iter_update_bodies([r.update_id for r in used]):
                submitted = worker.submit(decode, update_id, body)
                if ahead is not None:
                    yield ahead.result()
                ahead = submitted
            if ahead is not None:
                yield ahead.result()

    def _finish(
        self,
        used: list[str],
        dropped: list[str],
        record: GlobalRecord | None,
        state: ServerState | None,
    ) -> None:
        now = self._clock()
        with self._lock:
            if record is None:  # nothing usable: just retire the dropped updates
                self.storage.drop_updates(dropped)
            else:
                keep_from = record.version - self.config.strategy.keep_versions() + 1
                assert state is not None
                self.storage.commit_aggregation(
                    record, used, dropped, {"round_started_at": now, "version": record.version},
                    {_SERVER_STATE_BLOB: state.to_bytes()}, keep_from,
                )  # fmt: skip
                self._server_state = state
                self.round_started_at = now
                self.last_aggregation = dict(record.stats)
                self._set_current(record)
            gone = set(used) | set(dropped)
            self._pending = [p for p in self._pending if p.update_id not in gone]
            for update_id in gone:
                self._norms.pop(update_id, None)

    def publish_secure_sum(
        self,
        base_version: int,
        tensors: Tensors,
        weight: float,
        stats: dict[str, Any],
        max_staleness: int = 0,
    ) -> int:
        """Publish the next version from a secure-aggregation sum (`coordinator.secure`).

        `tensors` is the cohort's weighted mean B (Σ wᵢ·Bᵢ / Σ wᵢ, from the masked weight
        coordinate): it enters aggregation as one update of weight Σ wᵢ, based on
        `base_version` (at most `max_staleness` versions old: fedbuff cohorts; the caller has
        applied the staleness weight). The coordinator's clip is off for it: it cannot clip
        what it cannot see, so devices clip themselves to the bound the task states
        (`TaskConfig.extra["secure"]["clip"]`).
        """
        with self._lock:
            if self._aggregating or not 0 <= self.version - base_version <= max_staleness:
                raise ConflictError(
                    f"version {self.version} is current; a secure sum for {base_version} is stale",
                    code="stale_update",
                )
            self._aggregating = True
            current, version = self._current, self.version
        try:
            started = time.perf_counter()
            contribution = Contribution(
                update_id=f"secagg-v{base_version}",
                tensors=tensors,
                weight=weight,
                base_version=base_version,
                scale=self.lora.scaling,
            )
            # Under --secure, DP is distributed: the devices' noise is already in the sum, so
            # the aggregate adds none (dp=None) and only the DP ledger counts one more release.
            dp = self.config.aggregation.dp
            outcome = aggregate(
                dataclasses.replace(self.config.aggregation, dp=None), self.config.shapes,
                current, [contribution], self.dense_version, self._server_state, self._rng,
                clip=ClipBound(None, "off"),
            )  # fmt: skip
            if dp is not None:
                outcome.state.dp_aggregations = self._server_state.dp_aggregations + 1
            seconds = time.perf_counter() - started
            stats = {
                **outcome.stats,
                **stats,
                **self._version_stats(version + 1, seconds, version - base_version, dropped=0),
            }
            if dp is not None and self.secure is not None:
                stats["dp_epsilon"] = self.secure.epsilon(outcome.state.dp_aggregations)
                stats["dp_delta"] = dp.delta
            record = self._encode_global(version + 1, outcome.tensors, stats)
            self._finish([], [], record, outcome.state)
            log.info("version %d from a secure sum (weight %g)", version + 1, weight)
            return version + 1
        finally:
            with self._lock:
                self._aggregating = False

    def current_adapter(self) -> tuple[bytes, str, int]:
        """(encoded GlobalAdapter, ETag, version) of the current version, read atomically."""
        return self._published

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def epsilon_spent(self) -> float:
        """Central DP ε spent so far at the configured δ (0.0 without DP)."""
        dp = self.config.aggregation.dp
        if dp is None:
            return 0.0
        if self.secure is not None:  # distributed DP: the Skellam accountant
            return self.secure.epsilon(self._server_state.dp_aggregations)
        from coordinator.privacy import epsilon_spent

        return epsilon_spent(dp.noise_multiplier, self._server_state.dp_aggregations, dp.delta)

    # -- status -----------------------------------------------------------------------------

    def waiting(self) -> dict[str, Any]:
        """What the next version waits for, with a one-line `message` (logged, and in status)."""
        with self._lock:
            pending, version = list(self._pending), self.version
            started, aggregating = self.round_started_at, self._aggregating
        strategy = self.config.strategy
        clients = self.storage.count_clients()
        out = strategy.waiting(pending, version, started, self._clock(), clients)
        out.update(version=version + 1, clients=clients, strategy=strategy.name)
        if self.config.max_rounds is not None and version >= self.config.max_rounds:
            out["message"] = f"the task finished after {self.config.max_rounds} rounds"
        elif aggregating or out["more"] == 0:
            out["message"] = f"version {version + 1} is being aggregated"
        return out

    def status(self, viewer: str | None = None) -> dict[str, Any]:
        """The task's state as `viewer` (a client id) may see it; None is the operator's view.

        A client sees its own recent updates (ids, metrics) and only counts of everyone
        else's; the operator also sees every client's recent updates and the enrolled devices.
        """
        with self._lock:
            pending = list(self._pending)
            version, started = self.version, self.round_started_at
        agg = self.config.aggregation
        out: dict[str, Any] = {
            "task_id": self.task_id,
            "model_sha256": self.config.model_sha256,
            "version": version,
            "round": version + 1,
            "round_started_at": started,
            "strategy": self.config.strategy.describe(),
            "lora": self.lora.to_obj(),
            "method": self.config.method.to_extra(),
            "aggregation": {
                "mode": agg.mode,
                "robust": agg.robust,
                "server_optimizer": "fedadam" if agg.fedadam else "sgd",
                "clip_norm": agg.clip_norm,
                "clip": self.clip_policy(),
                "max_weight_examples": self.weight_cap,
            },
            "waiting": self.waiting(),
            "pending": len(pending),
            "pending_clients": len({p.client_id for p in pending}),
            "clients": self.storage.count_clients(),
            "updates": self.storage.update_counts(),
            "last_aggregation": self.last_aggregation,
            "view": "operator" if viewer is None else "client",
            "recent_updates": self.storage.recent_metrics(_RECENT, client_id=viewer),
        }
        if viewer is None:
            out["client_list"] = self.storage.client_summaries(_CLIENT_LIST)
        else:
            out["client_id"] = viewer
        if agg.dp is not None:
            out["privacy"] = {
                "aggregations": self._server_state.dp_aggregations,
                "epsilon": self.epsilon_spent(),
                "delta": agg.dp.delta,
                "noise_multiplier": agg.dp.noise_multiplier,
                "clip_norm": agg.dp.clip_norm,
            }
        return out
