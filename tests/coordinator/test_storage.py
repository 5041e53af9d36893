"""SQLite storage: durability contract, duplicates, atomic aggregation commits, reopen."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from coordinator.errors import DuplicateUpdateError, StorageError
from coordinator.storage import GlobalRecord, SQLiteStorage, UpdateRecord


def _rec(uid: str, client: str = "c1", base: int = 0) -> UpdateRecord:
    return UpdateRecord(uid, client, base, 12, 340, 8, 1.5, 3, {"loss": 1.25})


def test_updates_round_trip_and_duplicates_are_refused(tmp_path: Path) -> None:
    with SQLiteStorage(tmp_path / "db.sqlite") as storage:
        storage.add_update(_rec("u1"), b"one")
        storage.add_update(_rec("u2", "c2"), b"two")
        with pytest.raises(DuplicateUpdateError, match="u1"):
            storage.add_update(_rec("u1"), b"other bytes")
        assert [r.update_id for r in storage.pending_updates()] == ["u1", "u2"]
        assert storage.pending_updates()[0] == _rec("u1")
        assert dict(storage.iter_update_bodies(["u2", "u1"])) == {"u2": b"two", "u1": b"one"}
        assert storage.has_update("u1") and not storage.has_update("u3")


def test_wal_and_full_sync_are_on(tmp_path: Path) -> None:
    with SQLiteStorage(tmp_path / "db.sqlite") as storage:
        conn = storage._conn()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_commit_aggregation_is_atomic_and_keeps_ids_for_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with SQLiteStorage(path) as storage:
        storage.commit_aggregation(
            GlobalRecord(0, 1.0, '"e0"', {}, b"g0"), [], [], {"version": 0}, {}, 0
        )
        for uid in ("u1", "u2", "u3"):
            storage.add_update(_rec(uid), uid.encode())
        storage.commit_aggregation(
            GlobalRecord(1, 2.0, '"e1"', {"updates": 2}, b"g1"),
            ["u1", "u2"],
            ["u3"],
            {"version": 1},
            {"server_state": b"blob"},
            keep_global_bodies_from=1,
        )
        # A second commit of the same version fails and changes nothing.
        storage.add_update(_rec("u4"), b"u4")
        with pytest.raises(
            sqlite3.IntegrityError, match=r"UNIQUE constraint failed: globals\.version"
        ):
            storage.commit_aggregation(
                GlobalRecord(1, 3.0, '"x"', {}, b"x"), ["u4"], [], {"version": 9}, {}, 0
            )
    with SQLiteStorage(path) as storage:
        latest = storage.latest_global()
        assert (
            latest is not None
            and latest.version == 1
            and latest.body == b"g1"
            and latest.stats == {"updates": 2}
        )
        assert storage.global_body(0) is None  # pruned: older than keep_global_bodies_from
        assert [r.update_id for r in storage.pending_updates()] == ["u4"]
        assert storage.update_counts() == {"pending": 1, "aggregated": 2, "dropped": 1}
        assert storage.strategy_state() == {"version": 1}
        assert storage.get_blob("server_state") == b"blob"
        with pytest.raises(DuplicateUpdateError, match="'u1' was already received"):
            storage.add_update(_rec("u1"), b"again")  # aggregated long ago, still a duplicate


def test_clients_and_meta(tmp_path: Path) -> None:
    with SQLiteStorage(tmp_path / "db.sqlite") as storage:
        storage.add_client("c1", "laptop", "h" * 64)
        assert storage.client_for_token("h" * 64) == "c1"
        assert storage.client_for_token("x" * 64) is None
        assert storage.count_clients() == 1
        storage.set_meta("task_id", "t1")
        storage.set_meta("task_id", "t2")
        assert storage.get_meta("task_id") == "t2"


def test_concurrent_writers_from_threads(tmp_path: Path) -> None:
    with SQLiteStorage(tmp_path / "db.sqlite") as storage:

        def work(k: int) -> None:
            for j in range(20):
                storage.add_update(_rec(f"t{k}-{j}", f"c{k}"), b"x" * 100)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(storage.pending_updates()) == 80


def test_refuses_files_that_are_not_its_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match="not a usable coordinator database"):
        SQLiteStorage(junk)
    path = tmp_path / "db.sqlite"
    with SQLiteStorage(path) as storage:
        storage.set_meta("schema_version", "999")
    with pytest.raises(StorageError, match="schema version 999"):
        SQLiteStorage(path)


def test_close_twice_is_safe_and_use_after_close_fails(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "db.sqlite")
    storage.close()
    storage.close()
    with pytest.raises(StorageError, match="closed"):
        storage.pending_updates()
