"""The coordinator's state machine, without HTTP: enrollment, ingest, aggregation, status.

`Coordinator` is synchronous and thread-safe; the aiohttp layer calls it from worker threads
so that decoding, fsync and numpy never block the event loop.

Ingest of one update (`submit`):
  1. decode the wire bytes under `DecodeLimits` (bad bytes -> 400, nothing stored);
  2. check client id, model sha256, LoRA spec, tensor keys and shapes against the task and
     the model's layer shapes, and decode every tensor (NaN/Inf -> 422, nothing stored);
  3. under the state lock: the strategy admits it (stale, duplicate, round closed -> 409),
     then it is committed to storage; only then is it acknowledged.

Aggregation (`aggregate`) snapshots the pending updates, streams them one at a time from
storage through `coordinator.aggregator.aggregate`, and commits the new version and the
consumed updates in one transaction. Version 0 is the PEFT-style initial adapter (seeded A,
B = 0, so B·A = 0): clients fetch it and train from it like any other version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from coordinator.aggregator import (
    Contribution,
    ServerState,
    Tensors,
    aggregate,
    initial_adapter,
)
from coordinator.auth import device_name, generate_token, hash_token, tokens_equal
from coordinator.config import CoordinatorConfig
from coordinator.errors import (
    AuthError,
    BadRequestError,
    ConflictError,
    DuplicateUpdateError,
    ForbiddenError,
    StaleUpdateError,
    StorageError,
    UpdateRejectedError,
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

log = logging.getLogger(__name__)

_SERVER_STATE_BLOB = "server_state"
_RECENT = 20
_CLIENT_LIST = 200


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


@contextmanager
def _wire_errors_as_http() -> Iterator[None]:
    """Wire errors as API errors: unusable values are a rejected update, bad bytes a bad request."""
    try:
        yield
    # Well-formed bytes with unusable values: 422, which clients do not retry (a 5xx they would).
    except (NonFiniteError, ShapeMismatchError, OutOfRangeError, InvalidMetricsError) as exc:
        raise UpdateRejectedError(str(exc)[:500], code=ErrorMessage.from_exception(exc).code) from None
    except WireError as exc:
        raise BadRequestError(str(exc)[:500], code=ErrorMessage.from_exception(exc).code) from None

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
        self._aggregating = False
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
        self.last_aggregation: dict[str, Any] = dict(latest.stats)
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
        adapter = GlobalAdapter(
            version=version,
            lora=self.lora,
            tensors=tensors,
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
            codec=cfg.codec,
            local_steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            lr=cfg.lr,
            max_rounds=cfg.max_rounds,
            global_version=self.version,
            extra={
                "strategy": cfg.strategy.describe(),
                "max_client_rank": cfg.aggregation.max_client_rank,
            },
        )

    # -- clients ----------------------------------------------------------------------------

    def check_join_token(self, join_token: str) -> None:
        """`AuthError` unless `join_token` is the task's (constant time; cheap enough for the loop)."""
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
        update = self._decode(body)
        record = self._validate(client_id, update, len(body))
        with self._lock:
            self._check_open()
            self.config.strategy.admit(
                record, self.version, self._pending, self.config.aggregation.dp is not None
            )
            self.storage.add_update(record, body)  # durable when it returns
            self._pending.append(record)
            pending, version = len(self._pending), self.version
        log.debug("accepted %s from %s (base %d)", record.update_id, client_id, record.base_version)
        return {
            "update_id": record.update_id,
            "accepted": True,
            "version": version,
            "pending": pending,
        }

    def _check_open(self) -> None:
        if self.config.max_rounds is not None and self.version >= self.config.max_rounds:
            raise ConflictError(
                f"the task finished after {self.config.max_rounds} rounds", code="task_complete"
            )
        if self._aggregating and self.config.strategy.name == "fedavg":
            raise ConflictError(
                f"round {self.version} is closing; retry shortly", code="round_closed"
            )

    def _decode(self, body: bytes) -> AdapterUpdate:
        with _wire_errors_as_http():
            return AdapterUpdate.from_bytes(body, self._limits)

    def _validate(self, client_id: str, update: AdapterUpdate, size: int) -> UpdateRecord:
        cfg, agg = self.config, self.config.aggregation
        if update.client_id != client_id:
            raise ForbiddenError(
                f"update names client {update.client_id!r}, but the token is {client_id!r}'s"
            )
        if update.model_sha256 != cfg.model_sha256:
            raise UpdateRejectedError(
                f"update is for model {update.model_sha256[:16]}…, this task trains {cfg.model_sha256[:16]}…",
                code="wrong_model",
            )
        self._check_lora(update.lora)
        keys = set(update.tensors)
        if keys != self._expected_keys:
            missing = sorted(self._expected_keys - keys)[:3]
            extra = sorted(keys - self._expected_keys)[:3]
            raise UpdateRejectedError(
                f"tensor keys differ from the task's {agg.mode} adapter: missing {missing}, unexpected {extra}",
                code="wrong_tensors",
            )
        for key, tensor in update.tensors.items():
            expected = agg.expected_shape(key, cfg.shapes, update.lora.rank)
            if tuple(tensor.shape) != expected:
                raise UpdateRejectedError(
                    f"{key}: expected shape {expected}, got {tuple(tensor.shape)}",
                    code="wrong_shape",
                )
        if self.storage.has_update(update.update_id):
            raise DuplicateUpdateError(f"update {update.update_id!r} was already received")
        with self._lock:
            self._check_open()
            self.config.strategy.admit(
                self._record(client_id, update, size),
                self.version,
                self._pending,
                agg.dp is not None,
            )
        reference = (
            self.dense_version(update.base_version)
            if any(t.delta for t in update.tensors.values())
            else None
        )
        with _wire_errors_as_http():
            dense = update.dense_tensors(reference)
        for key, value in dense.items():
            if not np.isfinite(value).all():
                raise UpdateRejectedError(f"{key}: non-finite values", code="wire.non_finite")
        return self._record(client_id, update, size)

    def _check_lora(self, lora: LoraSpec) -> None:
        agg = self.config.aggregation
        if lora.mode != agg.mode:
            raise UpdateRejectedError(
                f"update uses LoRA mode {lora.mode!r}, the task {agg.mode!r}", code="lora_mismatch"
            )
        if tuple(sorted(lora.targets)) != tuple(sorted(self.config.targets)):
            raise UpdateRejectedError(
                f"update targets {list(lora.targets)}, the task {list(self.config.targets)}",
                code="lora_mismatch",
            )
        if agg.mode == "exact":
            if lora.rank > agg.max_client_rank:
                raise UpdateRejectedError(
                    f"rank {lora.rank} exceeds max_client_rank={agg.max_client_rank}",
                    code="lora_mismatch",
                )
        elif lora.rank != agg.rank or lora.alpha != agg.alpha:
            raise UpdateRejectedError(
                f"mode {agg.mode} needs rank {agg.rank} and alpha {agg.alpha}, got {lora.rank} and {lora.alpha}",
                code="lora_mismatch",
            )
        if agg.mode == "frozen-a" and lora.a_seed != agg.a_seed:
            raise UpdateRejectedError(
                f"frozen-a seed {lora.a_seed} != the task's {agg.a_seed}", code="lora_mismatch"
            )

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
            return not self._aggregating and self.config.strategy.due(
                self._pending, self.version, self.round_started_at, self._clock()
            )

    def aggregate(self) -> int | None:
        """Aggregate the pending updates if the strategy says so; the new version, or None."""
        strategy, agg = self.config.strategy, self.config.aggregation
        with self._lock:
            if self._aggregating or not strategy.due(
                self._pending, self.version, self.round_started_at, self._clock()
            ):
                return None
            self._aggregating = True
            snapshot, version, current = list(self._pending), self.version, self._current
        try:
            weights = {r.update_id: strategy.weight(r, version) for r in snapshot}
            used = [r for r in snapshot if weights[r.update_id] > 0 and r.num_examples > 0]
            used_ids = {r.update_id for r in used}
            dropped = [r.update_id for r in snapshot if r.update_id not in used_ids]
            if not used:
                self._finish([], dropped, None, None)
                return None
            started = time.perf_counter()
            unusable: list[str] = []
            try:
                outcome = aggregate(
                    agg, self.config.shapes, current, self._contributions(used, weights, unusable),
                    self.dense_version, self._server_state, self._rng,
                )  # fmt: skip
            except ValueError:
                if len(unusable) != len(used):
                    raise
                self._finish([], dropped + unusable, None, None)  # nothing decodable was left
                return None
            used = [r for r in used if r.update_id not in set(unusable)]
            dropped += unusable
            seconds = time.perf_counter() - started
            stats = {
                **outcome.stats,
                "version": version + 1,
                "seconds": round(seconds, 4),
                "strategy": strategy.name,
                "staleness_max": max(version - r.base_version for r in used),
                "dropped": len(dropped),
            }
            record = self._encode_global(version + 1, outcome.tensors, stats)
            self._finish([r.update_id for r in used], dropped, record, outcome.state)
            log.info("version %d from %d updates in %.2fs", version + 1, len(used), seconds)
            return version + 1
        finally:
            with self._lock:
                self._aggregating = False

    def _contributions(
        self, used: list[UpdateRecord], weights: dict[str, float], unusable: list[str]
    ) -> Iterator[Contribution]:
        """Decode stored updates one at a time (O(adapter) memory however many there are).

        Every update was validated at ingest, so a failure here means its delta reference is
        gone or the file was tampered with: that update is dropped (and listed in `unusable`)
        rather than blocking every future aggregation.
        """
        by_id = {r.update_id: r for r in used}
        for update_id, body in self.storage.iter_update_bodies([r.update_id for r in used]):
            record = by_id[update_id]
            try:
                update = AdapterUpdate.from_bytes(body, self._limits)
                delta = any(t.delta for t in update.tensors.values())
                tensors = update.dense_tensors(
                    self.dense_version(record.base_version) if delta else None
                )
            except (WireError, StaleUpdateError) as exc:
                log.warning("dropping stored update %s: %s", update_id, exc)
                unusable.append(update_id)
                continue
            yield Contribution(
                update_id=update_id,
                tensors=tensors,
                weight=weights[update_id],
                base_version=record.base_version,
                scale=update.lora.scaling,
            )

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
        from coordinator.privacy import epsilon_spent

        return epsilon_spent(dp.noise_multiplier, self._server_state.dp_aggregations, dp.delta)

    # -- status -----------------------------------------------------------------------------

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
            "aggregation": {
                "mode": agg.mode,
                "robust": agg.robust,
                "server_optimizer": "fedadam" if agg.fedadam else "sgd",
                "clip_norm": agg.clip_norm,
            },
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
