"""Durable coordinator state behind a small interface, with SQLite (WAL) as the embedded default.

What is stored: the client registry (token hashes only), every accepted update as its raw wire
bytes until it is aggregated (its id is kept afterwards so that a retry is still a duplicate),
the global adapter versions (recent bodies), the strategy state as JSON, and opaque blobs for
server-optimizer state.

Update bodies (about 1 MB each) live outside the database, appended to segment files in
`<db>.bodies/`; the `updates` row holds the segment, offset, size and CRC-32. Inside SQLite a
body was written twice (to the WAL, then by the checkpoint) and freeing it after aggregation
walked its overflow pages (a minute for 1,000 updates); appended to a segment it is written
once, and a segment is deleted as a whole once none of its updates is pending.

Durability: `add_update` and `add_updates` (a batch: one segment fsync and one transaction,
so one WAL fsync, for many updates) return only after the bodies are fsynced and then the rows
committed with `synchronous=FULL`, so the service acknowledges an update only once it survives
`kill -9` or a power cut (a crash in between leaves unreferenced bytes in a segment, never a
row without its body). `commit_aggregation` writes the new version, consumes the aggregated
updates and saves the strategy state in one transaction: a crash leaves either the old round
(updates still pending) or the new one, never a mix.

A server database (PostgreSQL) would implement the same `Storage` protocol.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from typing_extensions import Self

from coordinator.errors import DuplicateUpdateError, StorageError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"""2: update bodies in segment files (`segment`, `body_offset`, `body_crc`); a version-1 file
is migrated in place (its inline bodies stay readable)."""

SEGMENT_BYTES = 64 * 1024 * 1024
"""A new segment file is started once the current one holds this many bytes."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    update_id TEXT NOT NULL UNIQUE,
    client_id TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    num_tokens INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    received_at REAL NOT NULL,
    size INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'aggregated', 'dropped')),
    aggregated_into INTEGER,
    body BLOB,
    segment INTEGER,
    body_offset INTEGER,
    body_crc INTEGER
);
CREATE INDEX IF NOT EXISTS updates_pending ON updates (status, seq);
CREATE INDEX IF NOT EXISTS updates_by_client ON updates (client_id, seq);
CREATE TABLE IF NOT EXISTS globals (
    version INTEGER PRIMARY KEY,
    created_at REAL NOT NULL,
    etag TEXT NOT NULL,
    stats TEXT NOT NULL,
    body BLOB
);
CREATE TABLE IF NOT EXISTS strategy_state (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS blobs (name TEXT PRIMARY KEY, data BLOB NOT NULL);
"""


@dataclass(frozen=True)
class UpdateRecord:
    """Metadata of one stored update (the body is fetched separately, one at a time)."""

    update_id: str
    client_id: str
    base_version: int
    num_examples: int
    num_tokens: int
    rank: int
    received_at: float
    size: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GlobalRecord:
    """One global adapter version."""

    version: int
    created_at: float
    etag: str
    stats: dict[str, Any]
    body: bytes | None


class Storage(Protocol):
    """What the coordinator needs from a database. Every write is durable when it returns."""

    def close(self) -> None: ...

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def add_client(self, client_id: str, name: str, token_hash: str) -> None: ...

    def client_for_token(self, token_hash: str) -> str | None: ...

    def count_clients(self) -> int: ...

    def add_update(self, record: UpdateRecord, body: bytes) -> None: ...

    def add_updates(
        self, items: Sequence[tuple[UpdateRecord, bytes]]
    ) -> list[DuplicateUpdateError | StorageError | None]: ...

    def has_update(self, update_id: str) -> bool: ...

    def pending_updates(self) -> list[UpdateRecord]: ...

    def iter_update_bodies(self, update_ids: Sequence[str]) -> Iterator[tuple[str, bytes]]: ...

    def latest_global(self) -> GlobalRecord | None: ...

    def global_body(self, version: int) -> bytes | None: ...

    def commit_aggregation(
        self,
        new_global: GlobalRecord,
        aggregated_ids: Sequence[str],
        dropped_ids: Sequence[str],
        strategy_state: Mapping[str, Any],
        blobs: Mapping[str, bytes],
        keep_global_bodies_from: int,
    ) -> None: ...

    def drop_updates(self, update_ids: Sequence[str]) -> None: ...

    def strategy_state(self) -> dict[str, Any]: ...

    def set_strategy_state(self, state: Mapping[str, Any]) -> None: ...

    def get_blob(self, name: str) -> bytes | None: ...

    def update_counts(self) -> dict[str, int]: ...

    def recent_metrics(self, limit: int, client_id: str | None = None) -> list[dict[str, Any]]: ...

    def client_summaries(self, limit: int) -> list[dict[str, Any]]: ...


class SQLiteStorage:
    """`Storage` on one SQLite file in WAL mode; safe to use from several threads.

    Each thread gets its own connection (sqlite3 connections must not be shared); writers are
    serialised by SQLite's lock with a busy timeout. Use as a context manager, or call
    `close()`; closing twice is safe.
    """

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self.bodies_dir = self.path.with_name(self.path.name + ".bodies")
        """Where the update bodies' segment files live (`seg-<n>`), beside the database."""
        self._append_lock = threading.Lock()
        self._segment: tuple[int, int, int] | None = None  # (number, fd, size) being appended
        try:
            self._conn().executescript(_SCHEMA)
            with self._write() as conn:
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),),
                    )
                elif row[0] == "1":  # additive: bodies may also live in segment files
                    for column in ("segment", "body_offset", "body_crc"):
                        conn.execute(f"ALTER TABLE updates ADD COLUMN {column} INTEGER")
                    conn.execute(
                        "UPDATE meta SET value = ? WHERE key = 'schema_version'",
                        (str(SCHEMA_VERSION),),
                    )
                elif row[0] != str(SCHEMA_VERSION):
                    raise StorageError(
                        f"{self.path}: schema version {row[0]}, this build reads {SCHEMA_VERSION}"
                    )
        except StorageError:
            self.close()
            raise
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StorageError(f"{self.path}: not a usable coordinator database ({exc})") from exc

    # -- connections ------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StorageError(f"{self.path}: storage is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # check_same_thread=False only so that close() may close every thread's connection;
            # in use, each connection stays with the thread that opened it.
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsynced at every commit, so a committed update survives power loss.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _write(self) -> _Transaction:
        return _Transaction(self._conn())

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
            self._closed = True
        for conn in connections:
            conn.close()
        with self._append_lock:
            segment, self._segment = self._segment, None
        if segment is not None:
            os.close(segment[1])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta -------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- clients ----------------------------------------------------------------------------

    def add_client(self, client_id: str, name: str, token_hash: str) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO clients (client_id, name, token_hash, created_at) VALUES (?, ?, ?, ?)",
                (client_id, name, token_hash, time.time()),
            )

    def client_for_token(self, token_hash: str) -> str | None:
        row = (
            self._conn()
            .execute("SELECT client_id FROM clients WHERE token_hash = ?", (token_hash,))
            .fetchone()
        )
        return None if row is None else str(row[0])

    def count_clients(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM clients").fetchone()[0])

    # -- updates ----------------------------------------------------------------------------

    _INSERT_UPDATE = (
        "INSERT INTO updates (update_id, client_id, base_version, num_examples, num_tokens, "
        "rank, received_at, size, metrics, status, segment, body_offset, body_crc) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)"
    )

    def add_update(self, record: UpdateRecord, body: bytes) -> None:
        """Store a pending update durably; `DuplicateUpdateError` if its id was ever seen."""
        error = self.add_updates([(record, body)])[0]
        if error is not None:
            raise error

    def add_updates(
        self, items: Sequence[tuple[UpdateRecord, bytes]]
    ) -> list[DuplicateUpdateError | StorageError | None]:
        """Store several pending updates: the bodies appended to a segment and fsynced once,
        then the rows in one transaction, so one WAL fsync for the whole batch (group commit).
        When it returns, every update whose entry in the returned list is None is durable; an
        entry that is an error (a duplicate id) names why that one was not stored, and does not
        affect the others.

        A failure of the machinery (disk full, I/O error) raises for the whole batch, of which
        no row was committed."""
        with self._append_lock:
            places = self._append([body for _, body in items])
            rows = [
                (
                    record.update_id, record.client_id, record.base_version, record.num_examples,
                    record.num_tokens, record.rank, record.received_at, len(body),
                    json.dumps(record.metrics), segment, offset, zlib.crc32(body),
                )
                for (record, body), (segment, offset) in zip(items, places)
            ]  # fmt: skip
            try:
                with self._write() as conn:
                    conn.executemany(self._INSERT_UPDATE, rows)
                return [None] * len(items)
            except sqlite3.IntegrityError:
                pass  # a duplicate id in the batch (all rolled back): insert the rows one by one
            results: list[DuplicateUpdateError | StorageError | None] = []
            for row in rows:
                try:
                    with self._write() as conn:
                        conn.execute(self._INSERT_UPDATE, row)
                    results.append(None)
                except sqlite3.IntegrityError as exc:
                    if "update_id" in str(exc):
                        results.append(
                            DuplicateUpdateError(f"update {row[0]!r} was already received")
                        )
                    else:
                        results.append(StorageError(f"cannot store update {row[0]!r}: {exc}"))
            return results

    def _append(self, bodies: Sequence[bytes]) -> list[tuple[int, int]]:
        """Append `bodies` to the current segment and fsync it; their (segment, offset)."""
        if self._closed:
            raise StorageError(f"{self.path}: storage is closed")
        if self._segment is None or self._segment[2] >= SEGMENT_BYTES:
            self._start_segment()
        assert self._segment is not None
        number, fd, size = self._segment
        places = []
        try:
            for body in bodies:
                places.append((number, size))
                view = memoryview(body)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                size += len(body)
            os.fsync(fd)
        except OSError as exc:
            # A partial append: start a fresh segment next time, so offsets stay exact.
            os.close(fd)
            self._segment = None
            raise StorageError(f"cannot store update bodies in {self.bodies_dir}: {exc}") from exc
        self._segment = (number, fd, size)
        return places

    def _start_segment(self) -> None:
        if self._segment is not None:
            os.close(self._segment[1])
            self._segment = None
        self.bodies_dir.mkdir(parents=True, exist_ok=True)
        numbers = [_segment_number(p.name) for p in self.bodies_dir.iterdir()]
        number = max([n for n in numbers if n is not None], default=0) + 1
        path = self.bodies_dir / f"seg-{number:08d}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        # The new name must survive a power cut too, before any row points into the file.
        dir_fd = os.open(self.bodies_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._segment = (number, fd, 0)

    def _delete_spent_segments(self) -> None:
        """Delete every segment but the current one that holds no pending update."""
        if not self.bodies_dir.is_dir():
            return
        # Under the append lock: every body appended so far has its row committed (or failed),
        # so a segment that no pending row names now is spent for good.
        with self._append_lock:
            live = {
                int(r[0])
                for r in self._conn().execute(
                    "SELECT DISTINCT segment FROM updates WHERE status = 'pending' "
                    "AND segment IS NOT NULL"
                )
            }
            current = self._segment[0] if self._segment is not None else None
            for path in self.bodies_dir.iterdir():
                number = _segment_number(path.name)
                if number is not None and number != current and number not in live:
                    path.unlink(missing_ok=True)

    def has_update(self, update_id: str) -> bool:
        row = (
            self._conn()
            .execute("SELECT 1 FROM updates WHERE update_id = ?", (update_id,))
            .fetchone()
        )
        return row is not None

    def pending_updates(self) -> list[UpdateRecord]:
        rows = (
            self._conn()
            .execute(
                "SELECT update_id, client_id, base_version, num_examples, num_tokens, rank, "
                "received_at, size, metrics FROM updates WHERE status = 'pending' ORDER BY seq"
            )
            .fetchall()
        )
        return [
            UpdateRecord(
                update_id=r[0],
                client_id=r[1],
                base_version=int(r[2]),
                num_examples=int(r[3]),
                num_tokens=int(r[4]),
                rank=int(r[5]),
                received_at=float(r[6]),
                size=int(r[7]),
                metrics=json.loads(r[8]),
            )
            for r in rows
        ]

    def iter_update_bodies(self, update_ids: Sequence[str]) -> Iterator[tuple[str, bytes]]:
        """Bodies one at a time, so that aggregation holds one update in memory, not all.

        A body whose segment bytes are missing or fail their CRC-32 (the files were damaged or
        tampered with) is logged and yielded empty: the decoder refuses it, so that update is
        dropped like any undecodable one instead of blocking every aggregation."""
        conn = self._conn()
        for update_id in update_ids:
            row = conn.execute(
                "SELECT body, segment, body_offset, size, body_crc FROM updates "
                "WHERE update_id = ?",
                (update_id,),
            ).fetchone()
            if row is None or (row[0] is None and row[1] is None):
                raise StorageError(f"update {update_id!r} has no stored body")
            if row[0] is not None:  # a body stored inline (schema version 1)
                yield update_id, bytes(row[0])
            else:
                yield update_id, self._read_segment(update_id, *row[1:])

    def _read_segment(
        self, update_id: str, segment: int, offset: int, size: int, crc: int
    ) -> bytes:
        path = self.bodies_dir / f"seg-{segment:08d}"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            log.error("the body of update %s is gone (%s is missing)", update_id, path)
            return b""
        try:
            body = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        if len(body) != size or zlib.crc32(body) != crc:
            log.error("the body of update %s in %s is damaged (size or CRC-32)", update_id, path)
            return b""
        return body

    def update_counts(self) -> dict[str, int]:
        rows = (
            self._conn().execute("SELECT status, COUNT(*) FROM updates GROUP BY status").fetchall()
        )
        counts = {"pending": 0, "aggregated": 0, "dropped": 0}
        counts.update({str(s): int(n) for s, n in rows})
        return counts

    def recent_metrics(self, limit: int, client_id: str | None = None) -> list[dict[str, Any]]:
        """The newest `limit` updates, of every client or only of `client_id`."""
        where, args = ("WHERE client_id = ? ", (client_id, limit)) if client_id else ("", (limit,))
        rows = (
            self._conn()
            .execute(
                "SELECT update_id, client_id, base_version, num_examples, received_at, metrics "
                f"FROM updates {where}ORDER BY seq DESC LIMIT ?",
                args,
            )
            .fetchall()
        )
        return [
            {
                "update_id": r[0],
                "client_id": r[1],
                "base_version": int(r[2]),
                "num_examples": int(r[3]),
                "received_at": float(r[4]),
                "metrics": json.loads(r[5]),
            }
            for r in rows
        ]

    def client_summaries(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` enrolled clients with their update counts (the operator's view)."""
        rows = (
            self._conn()
            .execute(
                "SELECT c.client_id, c.name, c.created_at, COUNT(u.seq), "
                "COALESCE(SUM(u.status = 'pending'), 0) "
                "FROM clients c LEFT JOIN updates u ON u.client_id = c.client_id "
                "GROUP BY c.client_id ORDER BY c.created_at DESC LIMIT ?",
                (limit,),
            )
            .fetchall()
        )
        return [
            {
                "client_id": r[0],
                "name": r[1],
                "joined_at": float(r[2]),
                "updates": int(r[3]),
                "pending": int(r[4]),
            }
            for r in rows
        ]

    # -- global adapters --------------------------------------------------------------------

    def latest_global(self) -> GlobalRecord | None:
        row = (
            self._conn()
            .execute(
                "SELECT version, created_at, etag, stats, body "
                "FROM globals ORDER BY version DESC LIMIT 1"
            )
            .fetchone()
        )
        if row is None:
            return None
        return GlobalRecord(
            int(row[0]), float(row[1]), row[2], json.loads(row[3]), row[4] and bytes(row[4])
        )

    def global_body(self, version: int) -> bytes | None:
        row = (
            self._conn()
            .execute("SELECT body FROM globals WHERE version = ?", (version,))
            .fetchone()
        )
        return None if row is None or row[0] is None else bytes(row[0])

    def commit_aggregation(
        self,
        new_global: GlobalRecord,
        aggregated_ids: Sequence[str],
        dropped_ids: Sequence[str],
        strategy_state: Mapping[str, Any],
        blobs: Mapping[str, bytes],
        keep_global_bodies_from: int,
    ) -> None:
        """Publish a version and consume its updates atomically (see the module docstring).

        Bodies of consumed updates and of global versions older than `keep_global_bodies_from`
        are dropped to bound the file; their rows stay for duplicate detection and history.
        """
        if new_global.body is None:
            raise ValueError("`new_global.body` must hold the encoded adapter")
        with self._write() as conn:
            conn.execute(
                "INSERT INTO globals (version, created_at, "
                "etag, stats, body) VALUES (?, ?, ?, ?, ?)",
                (
                    new_global.version,
                    new_global.created_at,
                    new_global.etag,
                    json.dumps(new_global.stats),
                    sqlite3.Binary(new_global.body),
                ),
            )
            for status, ids in (("aggregated", aggregated_ids), ("dropped", dropped_ids)):
                conn.executemany(
                    "UPDATE updates SET status = ?, aggregated_into = ?, body = NULL "
                    "WHERE update_id = ? AND status = 'pending'",
                    [(status, new_global.version, uid) for uid in ids],
                )
            conn.execute(
                "UPDATE globals SET body = NULL WHERE version < ? AND version <> ?",
                (keep_global_bodies_from, new_global.version),
            )
            self._put_state(conn, strategy_state)
            for name, data in blobs.items():
                conn.execute(
                    "INSERT INTO blobs (name, data) VALUES (?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET data = excluded.data",
                    (name, sqlite3.Binary(data)),
                )
        self._delete_spent_segments()

    def drop_updates(self, update_ids: Sequence[str]) -> None:
        """Retire pending updates that no aggregation will use (e.g. too stale)."""
        with self._write() as conn:
            conn.executemany(
                "UPDATE updates SET status = 'dropped', body = "
                "NULL WHERE update_id = ? AND status = 'pending'",
                [(uid,) for uid in update_ids],
            )
        self._delete_spent_segments()

    # -- strategy state and blobs -----------------------------------------------------------

    def strategy_state(self) -> dict[str, Any]:
        row = self._conn().execute("SELECT value FROM strategy_state WHERE id = 0").fetchone()
        return {} if row is None else dict(json.loads(row[0]))

    def set_strategy_state(self, state: Mapping[str, Any]) -> None:
        with self._write() as conn:
            self._put_state(conn, state)

    @staticmethod
    def _put_state(conn: sqlite3.Connection, state: Mapping[str, Any]) -> None:
        conn.execute(
            "INSERT INTO strategy_state (id, value) VALUES (0, ?) "
            "ON CONFLICT(id) DO UPDATE SET value = excluded.value",
            (json.dumps(dict(state)),),
        )

    def get_blob(self, name: str) -> bytes | None:
        row = self._conn().execute("SELECT data FROM blobs WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])


class _Transaction:
    """`BEGIN IMMEDIATE` … `COMMIT` (or `ROLLBACK` on error) on an autocommit connection.

    IMMEDIATE takes the write lock up front, so two writers never deadlock on lock upgrade.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._conn.execute("COMMIT")
        else:
            self._conn.execute("ROLLBACK")


def _segment_number(name: str) -> int | None:
    if name.startswith("seg-") and name[4:].isdigit():
        return int(name[4:])
    return None
