"""Group commit and segment-file bodies: batches are durable before any acknowledgement,
a duplicate in a batch is refused alone, spent segments are deleted, damaged bodies dropped."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from coordinator import storage as storage_module
from coordinator.errors import ConflictError, DuplicateUpdateError
from coordinator.state_machine import Coordinator
from coordinator.storage import GlobalRecord, SQLiteStorage, UpdateRecord
from coordinator.strategies import FedAvg, FedBuff
from tests.coordinator.helpers import JOIN_TOKEN, client_tensors, make_config, update_bytes


def _rec(uid: str, client: str = "c1") -> UpdateRecord:
    return UpdateRecord(uid, client, 0, 10, 100, 8, time.time(), 3, {"loss": 1.0})


def _stored_ids(db: Path) -> set[str]:
    """What a fresh connection (another process, after a crash) finds committed."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {r[0] for r in conn.execute("SELECT update_id FROM updates")}


def test_a_batch_is_one_transaction_and_a_duplicate_in_it_is_refused_alone(tmp_path: Path) -> None:
    with SQLiteStorage(tmp_path / "db.sqlite") as storage:
        storage.add_update(_rec("old"), b"old body")
        results = storage.add_updates(
            [(_rec("u1"), b"one"), (_rec("old", "c2"), b"again"), (_rec("u2", "c3"), b"two")]
        )
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], DuplicateUpdateError)
        assert [r.update_id for r in storage.pending_updates()] == ["old", "u1", "u2"]
        bodies = dict(storage.iter_update_bodies(["u2", "old", "u1"]))
        assert bodies == {"u2": b"two", "old": b"old body", "u1": b"one"}


def test_spent_segments_are_deleted_and_pending_bodies_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_module, "SEGMENT_BYTES", 4)  # a new segment for every update
    with SQLiteStorage(tmp_path / "db.sqlite") as storage:
        for uid in ("u1", "u2", "u3", "u4"):
            storage.add_update(_rec(uid), uid.encode() * 2)
        assert len(list(storage.bodies_dir.iterdir())) == 4
        storage.commit_aggregation(
            GlobalRecord(1, 1.0, '"e"', {}, b"g"), ["u1", "u3"], ["u4"], {"version": 1}, {}, 0
        )
        # u1's and u3's segments are spent; u4's is the current one (kept until the next).
        names = sorted(p.name for p in storage.bodies_dir.iterdir())
        assert names == ["seg-00000002", "seg-00000004"]
        assert dict(storage.iter_update_bodies(["u2"])) == {"u2": b"u2u2"}


def test_a_damaged_or_missing_body_is_read_as_empty_so_it_is_dropped(tmp_path: Path) -> None:
    with SQLiteStorage(tmp_path / "db.sqlite") as storage:
        storage.add_updates([(_rec("u1"), b"first body"), (_rec("u2"), b"second body")])
        segment = next(storage.bodies_dir.iterdir())
        data = bytearray(segment.read_bytes())
        data[2] ^= 0xFF  # inside u1's body
        segment.write_bytes(bytes(data))
        assert dict(storage.iter_update_bodies(["u1", "u2"])) == {
            "u1": b"",
            "u2": b"second body",
        }
        segment.unlink()
        assert dict(storage.iter_update_bodies(["u2"])) == {"u2": b""}


def test_a_version_1_database_is_migrated_and_its_inline_bodies_stay_readable(
    tmp_path: Path,
) -> None:
    db = tmp_path / "db.sqlite"
    with SQLiteStorage(db) as storage:
        storage.add_update(_rec("new"), b"in a segment")
    with sqlite3.connect(db) as conn:  # make it look like version 1: the body inline
        conn.execute(
            "UPDATE updates SET body = ?, segment = NULL WHERE update_id = 'new'", (b"inline",)
        )
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        conn.execute("ALTER TABLE updates DROP COLUMN body_crc")
        conn.execute("ALTER TABLE updates DROP COLUMN body_offset")
        conn.execute("ALTER TABLE updates DROP COLUMN segment")
    with SQLiteStorage(db) as storage:
        assert storage.get_meta("schema_version") == "2"
        storage.add_update(_rec("u2", "c2"), b"appended")
        assert dict(storage.iter_update_bodies(["new", "u2"])) == {
            "new": b"inline",
            "u2": b"appended",
        }


def test_concurrent_updates_share_commits_and_each_ack_follows_its_commit(tmp_path: Path) -> None:
    config = make_config(tmp_path, strategy=FedBuff(buffer_size=1000, max_staleness=4))
    storage = SQLiteStorage(config.db_path)
    coordinator = Coordinator(config, storage, rng=np.random.default_rng(0))
    rng = np.random.default_rng(1)
    clients = [coordinator.join(JOIN_TOKEN, f"d{i}")["client_id"] for i in range(24)]
    bodies = [update_bytes(c, client_tensors(rng, 8)) for c in clients]
    found_at_ack: dict[str, bool] = {}
    lock = threading.Lock()

    def check(future: Future) -> None:  # runs as the ack is given: it must be on disk already
        update_id = future.result()["update_id"]
        with lock:
            found_at_ack[update_id] = update_id in _stored_ids(config.db_path)

    try:
        with ThreadPoolExecutor(8) as pool:
            staged = list(pool.map(coordinator.stage, clients, bodies))
            for future in staged:
                future.add_done_callback(check)
            acks = [f.result(timeout=60) for f in staged]
        coordinator.close()
        assert len({a["update_id"] for a in acks}) == 24
        assert found_at_ack and all(found_at_ack.values()), found_at_ack
        assert coordinator.pending_count == 24
        assert 1 <= coordinator._commits.batches <= 24
        # A second update of the same id, or from a client whose update is on its way: refused.
        first = re.escape(repr(acks[0]["update_id"]))
        with pytest.raises(DuplicateUpdateError, match=f"update {first} was already received"):
            coordinator.submit(clients[0], bodies[0])
        with pytest.raises(ConflictError, match="already has an update"):
            coordinator.submit(clients[0], update_bytes(clients[0], client_tensors(rng, 8)))
    finally:
        storage.close()


def test_a_fedavg_round_waits_for_the_updates_it_admitted(tmp_path: Path) -> None:
    """An update admitted to round v but not yet committed when the round closes is in the
    round's snapshot (as when admission and storage were one step), not dropped as stale."""
    config = make_config(tmp_path, strategy=FedAvg(clients_per_round=2))
    storage = SQLiteStorage(config.db_path)
    coordinator = Coordinator(config, storage, rng=np.random.default_rng(0))
    rng = np.random.default_rng(2)
    a, b, c = (coordinator.join(JOIN_TOKEN, n)["client_id"] for n in ("a", "b", "c"))
    try:
        coordinator.submit(a, update_bytes(a, client_tensors(rng, 8)))
        coordinator.submit(b, update_bytes(b, client_tensors(rng, 8)))
        original = storage.add_updates

        def slow_add_updates(items):  # c's commit lands while the round is closing
            time.sleep(1.0)
            return original(items)

        storage.add_updates = slow_add_updates  # type: ignore[method-assign]
        late = coordinator.stage(c, update_bytes(c, client_tensors(rng, 8)))
        assert coordinator.pending_count == 2 and not late.done()
        assert coordinator.aggregate() == 1  # waited for c's commit before its snapshot
        assert late.result(timeout=30)["accepted"]
        assert storage.update_counts() == {"pending": 0, "aggregated": 3, "dropped": 0}
        assert coordinator.last_aggregation["dropped"] == 0
    finally:
        coordinator.close()
        storage.close()
