"""Group commit: accepted updates reach the disk in batches, one transaction (one fsync) each.

An update's 202 means "durably stored" (`coordinator.storage`). With one transaction per
update, every acknowledgement waited for its own fsync of the SQLite WAL, and the fsyncs ran
one after another (the coordinator's state lock was held across each): on the development
machine's disk an fsync takes 30-90 ms, which capped ingest at ~12 updates/s whatever the CPU.

Here the ingest threads queue a checked update and go on decoding the next one; one writer
thread takes everything queued, stores it in one transaction (`Storage.add_updates`) and only
then settles each update's future: the acknowledgement is still sent after the fsync that
covers it, never before. While one batch is being written the next one queues, so batches
grow with the load and cost nothing when it is light (a lone update is written at once; no
timer holds it back).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import BusyError
from coordinator.storage import Storage, UpdateRecord

log = logging.getLogger(__name__)

MAX_BATCH = 64
"""Most updates in one transaction."""
MAX_BATCH_BYTES = 64 * 1024 * 1024
"""Most body bytes in one transaction (a batch always takes at least one update)."""


@dataclass
class Staged:
    """One checked, admitted update waiting for its batch's commit."""

    record: UpdateRecord
    body: bytes
    norm: float | None
    """The effect norm measured at ingest (None: not finite, see `Coordinator._stage`)."""
    future: Future[dict[str, Any]] = field(default_factory=Future)
    """Resolves to the acknowledgement once durable, or to the error that kept it out."""

    def __post_init__(self) -> None:
        # Running from the start: a caller that gives up (a client that disconnects) cannot
        # cancel it, so the writer always settles it and the state stays consistent.
        self.future.set_running_or_notify_cancel()


Settle = Callable[[Sequence[Staged], Sequence[BaseException | None]], None]
"""Called in the writer thread after each batch with one result per update (None = durable);
it must resolve every future (what it leaves unresolved is failed with its exception)."""


class GroupCommit:
    """The writer thread and its queue; `put` never blocks on the disk.

    The writer starts with the first update and lives until `close` (a daemon thread): it
    holds its own SQLite connection, which a thread started per burst would leak, one each."""

    def __init__(
        self,
        storage: Storage,
        settle: Settle,
        *,
        max_batch: int = MAX_BATCH,
        max_batch_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"`max_batch` should be >= 1, got {max_batch}")
        self._storage = storage
        self._settle = settle
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._cond = threading.Condition()
        self._queue: list[Staged] = []
        self._writer: threading.Thread | None = None
        self._closed = False
        self.batches = 0
        """Transactions committed so far (for tests and the benchmark's log)."""

    def put(self, item: Staged) -> None:
        """Queue `item` for the next batch; its future settles after that batch's commit."""
        with self._cond:
            if self._closed:
                raise BusyError("the coordinator is shutting down; retry shortly", 5.0)
            self._queue.append(item)
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="fedlm-commit", daemon=True)
                self._writer.start()
            self._cond.notify()

    def close(self, timeout_s: float = 60.0) -> None:
        """Write what is queued, then stop the writer (idempotent)."""
        with self._cond:
            self._closed = True
            writer = self._writer
            self._cond.notify_all()
        if writer is not None:
            writer.join(timeout_s)

    def _take(self) -> list[Staged] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    self._writer = None
                    return None
                self._cond.wait()
            batch: list[Staged] = []
            size = 0
            while self._queue and len(batch) < self._max_batch:
                nxt = len(self._queue[0].body)
                if batch and size + nxt > self._max_batch_bytes:
                    break
                batch.append(self._queue.pop(0))
                size += nxt
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            results: list[BaseException | None]
            try:
                results = list(self._storage.add_updates([(s.record, s.body) for s in batch]))
            except Exception as exc:  # the disk or the database: nothing of the batch is stored
                log.exception("storing %d updates failed", len(batch))
                results = [exc] * len(batch)
            else:
                self.batches += 1
            try:
                self._settle(batch, results)
            except Exception as exc:
                log.exception("settling a batch of %d updates failed", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
