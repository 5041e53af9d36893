"""Corrupt state files are set aside and recovered from; writes are durable (fsync) and ordered."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from coordinator.server import Service
from coordinator.strategies import FedBuff
from edge_sdk.client import ClientState, FederatedClient
from edge_sdk.client.state import PendingUpdate, RoundMarker, atomic_write
from edge_sdk.wire import AdapterUpdate, LoraSpec, UpdateEncoder
from tests.client.helpers import client_config, coordinator_config, write_data

pytestmark = pytest.mark.timeout(240)

KEY = "model.layers.0.self_attn.q_proj.lora_B"


def _corrupt(directory: Path, name: str) -> list[Path]:
    return sorted(directory.glob(f"{name}.corrupt-*"))


def _update(update_id: str) -> AdapterUpdate:
    return AdapterUpdate.build(
        client_id="c-1", base_version=2, model_sha256="0" * 64, lora=LoraSpec(4, 8.0, ("q_proj",)),
        tensors={KEY: np.ones((8, 4), np.float32)}, num_examples=3, num_tokens=30,
        update_id=update_id,
    )  # fmt: skip


def _saved_encoder(state: ClientState) -> Path:
    encoder = state.load_encoder("topk:0.25+fp16")
    encoder.encode({KEY: np.arange(16, dtype=np.float32).reshape(4, 4)})
    state.save_encoder(encoder)
    return state.dir / "encoder.npz"


@pytest.mark.parametrize("damage", ["empty", "truncated_zip", "garbage"])
def test_a_damaged_encoder_is_set_aside_and_a_fresh_one_used(tmp_path: Path, damage: str) -> None:
    with ClientState(tmp_path) as state:
        path = _saved_encoder(state)
        raw = path.read_bytes()
        path.write_bytes(
            {"empty": b"", "truncated_zip": raw[: len(raw) // 2], "garbage": b"\x00" * 100}[damage]
        )
        encoder = state.load_encoder("topk:0.25+fp16")
        assert isinstance(encoder, UpdateEncoder) and not encoder.residual
        assert not path.exists() and len(_corrupt(tmp_path, "encoder.npz")) == 1
        state.save_encoder(encoder)  # and the next save works again
        assert state.load_encoder("topk:0.25+fp16").codec == encoder.codec


def test_a_damaged_token_file_is_set_aside(tmp_path: Path) -> None:
    with ClientState(tmp_path) as state:
        state.token_path.write_text('{"coordinator": "http://x", "client_id":')  # torn by hand
        assert state.credentials() is None  # the client enrolls again (with its join token)
        assert not state.token_path.exists() and len(_corrupt(tmp_path, "token.json")) == 1
        state.token_path.write_text("[1, 2]")
        assert state.credentials() is None and len(_corrupt(tmp_path, "token.json")) == 2


@pytest.mark.parametrize(
    "damage", ["record_garbage", "record_missing_key", "body_mismatch", "body_missing"]
)
def test_a_damaged_pending_update_is_set_aside(tmp_path: Path, damage: str) -> None:
    with ClientState(tmp_path) as state:
        body = _update("u-1").to_bytes()
        state.save_pending(PendingUpdate("u-1", 2, "task-1", body))
        record = tmp_path / "pending.json"
        if damage == "record_garbage":
            record.write_bytes(b"\xff\xfe not json")
        elif damage == "record_missing_key":
            obj = json.loads(record.read_text())
            del obj["update_id"]
            record.write_text(json.dumps(obj))
        elif damage == "body_mismatch":
            (tmp_path / "pending.bin").write_bytes(body[:-1])
        else:
            (tmp_path / "pending.bin").unlink()
        assert state.pending() is None
        assert not record.exists() and len(_corrupt(tmp_path, "pending.json")) == 1
        assert not (tmp_path / "pending.bin").exists()
        if damage in ("record_missing_key", "body_mismatch"):
            assert len(_corrupt(tmp_path, "pending.bin")) == 1  # kept for inspection, never sent
        assert state.pending() is None  # and stays quiet afterwards


@pytest.mark.parametrize("damage", ["record_garbage", "body_mismatch", "record_without_sha"])
def test_a_damaged_saved_global_is_set_aside(tmp_path: Path, damage: str) -> None:
    with ClientState(tmp_path) as state:
        state.save_global(b"adapter-bytes", 5, '"e5"', "task-1")
        assert state.global_adapter("task-1") == (b"adapter-bytes", 5, '"e5"')
        assert state.global_adapter("task-2") is None  # another task's adapter is not used
        if damage == "record_garbage":
            (tmp_path / "global.json").write_text("")
        elif damage == "body_mismatch":
            (tmp_path / "global.bin").write_bytes(b"adapter-byteZ")  # a kill between the two writes
        else:  # written by an older client
            (tmp_path / "global.json").write_text(
                json.dumps({"version": 5, "etag": "x", "task_id": "task-1"})
            )
        assert state.global_adapter("task-1") is None
        assert not (tmp_path / "global.bin").exists() and not (tmp_path / "global.json").exists()
        assert len(_corrupt(tmp_path, "global.json")) == 1


def test_a_damaged_round_marker_and_progress_are_set_aside(tmp_path: Path) -> None:
    with ClientState(tmp_path) as state:
        state.start_round(RoundMarker("task-1", 3, 2, 1234), b"base")
        (state.train_dir / "round.json").write_text(
            json.dumps({"task_id": "task-1", "round": "two"})
        )
        assert state.round_marker() is None and len(_corrupt(state.train_dir, "round.json")) == 1
        state.set_progress("task-1", 4, 3, "u-4")
        (tmp_path / "progress.json").write_text(json.dumps({"task_id": "task-1", "rounds": "many"}))
        assert state.rounds_done("task-1") == 0 and len(_corrupt(tmp_path, "progress.json")) == 1


def test_only_the_newest_set_aside_copies_are_kept(tmp_path: Path) -> None:
    with ClientState(tmp_path) as state:
        for _ in range(6):
            state.token_path.write_text("garbage")
            assert state.credentials() is None
        assert len(_corrupt(tmp_path, "token.json")) == 3


def test_recover_finishes_or_undoes_an_interrupted_commit(tmp_path: Path) -> None:
    state = ClientState(tmp_path).open()
    body = _update("u-1").to_bytes()
    encoder = UpdateEncoder("topk:0.25+fp16")
    encoder.encode({KEY: np.arange(16, dtype=np.float32).reshape(4, 4)})
    # A kill after pending.json (the commit point) but before the residual took its place:
    state.save_pending(PendingUpdate("u-1", 2, "task-1", body))
    encoder.save(tmp_path / "encoder.next.npz")
    (tmp_path / "token.json.abc.tmp").write_bytes(b"half a write")
    state.close()
    state = ClientState(tmp_path).open()
    assert (
        not (tmp_path / "encoder.next.npz").exists()
        and not (tmp_path / "token.json.abc.tmp").exists()
    )
    np.testing.assert_array_equal(
        state.load_encoder("topk:0.25+fp16").residual[KEY], encoder.residual[KEY]
    )
    # A kill before pending.json: the residual of an update that was never recorded is dropped.
    state.clear_pending()
    (tmp_path / "encoder.npz").unlink()
    encoder.save(tmp_path / "encoder.next.npz")
    state.close()
    state = ClientState(tmp_path).open()
    assert not (tmp_path / "encoder.next.npz").exists() and not (tmp_path / "encoder.npz").exists()
    state.close()


def test_settle_records_progress_before_dropping_the_update_and_never_counts_twice(
    tmp_path: Path,
) -> None:
    with ClientState(tmp_path) as state:
        body = _update("u-1").to_bytes()
        pending = PendingUpdate("u-1", 2, "task-1", body)
        state.save_pending(pending)
        # As if killed between the two steps of settle: progress names the update, pending stays.
        state.set_progress("task-1", 1, 2, "u-1")
        again = state.pending()
        assert again is not None and again.update_id == "u-1"
        progress = state.settle(again, counted=True)
        assert progress.rounds == 1 and state.pending() is None  # cleared, not counted twice
        state.save_pending(PendingUpdate("u-2", 3, "task-1", body))
        progress = state.settle(state.pending(), counted=True)  # type: ignore[arg-type]
        assert (progress.rounds, progress.last_base, progress.last_update) == (2, 3, "u-2")


def test_writes_fsync_the_file_and_then_the_directory_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src: object, dst: object) -> None:
        events.append(("replace", Path(str(dst)).name))
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "a.json", b"{}")
    assert events == [("fsync", "file"), ("replace", "a.json"), ("fsync", "dir")]
    events.clear()
    UpdateEncoder("fp16").save(tmp_path / "encoder.npz")
    assert events == [("fsync", "file"), ("replace", "encoder.npz"), ("fsync", "dir")]


def test_a_client_starts_and_trains_over_every_kind_of_damaged_state(
    tmp_path: Path, model: Path
) -> None:
    """One real round, then every state file damaged at once; the next start recovers from all."""
    data = write_data(tmp_path / "data.jsonl")
    state_dir = tmp_path / "state"

    async def scenario() -> tuple:
        config = coordinator_config(
            tmp_path, model, strategy=FedBuff(buffer_size=1), codec="delta+topk:0.5+fp16"
        )
        async with Service(config) as service:
            cfg = client_config(
                state_dir, model, data, service=service, max_rounds=1, final_wait_s=5
            )
            first = await asyncio.wait_for(FederatedClient(cfg).run_async(), timeout=120)
            state = ClientState(state_dir)
            assert (state_dir / "encoder.npz").exists() and (state_dir / "global.bin").exists()
            (state_dir / "encoder.npz").write_bytes((state_dir / "encoder.npz").read_bytes()[:100])
            state.token_path.write_text("{")
            (state_dir / "global.json").write_text("not json")
            (state_dir / "pending.json").write_text('{"update_id": 1}')
            # An interrupted round 2 whose checkpoint is damaged.
            state.start_round(
                RoundMarker(first.task_id, first.global_version, 2, 99),
                (state_dir / "global.bin").read_bytes(),
            )
            state.checkpoint_path.write_bytes(b"PK\x03\x04 not a checkpoint")
            cfg2 = client_config(
                state_dir, model, data, service=service, max_rounds=2, final_wait_s=5
            )
            second = await asyncio.wait_for(FederatedClient(cfg2).run_async(), timeout=120)
        return first, second

    first, second = asyncio.run(scenario())
    assert [r.outcome for r in first.rounds] == ["accepted"]
    assert second.reason == "max_rounds" and [r.outcome for r in second.rounds] == ["accepted"]
    assert second.rounds[0].round == 2 and second.rounds[0].resumed_from_step == 0
    assert second.global_version == 2
    for name in ("encoder.npz", "token.json", "global.json", "pending.json"):
        assert len(_corrupt(state_dir, name)) == 1, name
    assert len(_corrupt(state_dir / "train", "checkpoint.pt")) == 1
    assert (state_dir / "token.json").exists()  # enrolled again with the join token
