"""Outbox ledger and state directory: append-before-send records, summaries, 0600 secrets, locks."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.client import ClientState, Ledger, StateError, format_summary, summarise
from edge_sdk.client.ledger import describe_update
from edge_sdk.client.state import Credentials, PendingUpdate, RoundMarker
from edge_sdk.wire import AdapterUpdate, LoraSpec, UpdateEncoder


def _update(update_id: str = "u-1") -> AdapterUpdate:
    rng = np.random.default_rng(0)
    tensors = {
        "model.layers.0.self_attn.q_proj.lora_A": rng.normal(size=(4, 16)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.lora_B": rng.normal(size=(8, 4)).astype(np.float32),
    }
    return AdapterUpdate.build(
        client_id="c-1",
        base_version=2,
        model_sha256="ab" * 32,
        lora=LoraSpec(4, 8.0, ("q_proj",)),
        tensors=tensors,
        num_examples=10,
        metrics={"train_loss": 1.25},
        codec="fp16",
        update_id=update_id,
    )


def test_ledger_records_size_hash_and_update_tensors(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "outbox.jsonl")
    update = _update()
    body = update.to_bytes()
    ledger.record(method="GET", url="http://127.0.0.1:1/v1/task", kind="task")
    entry = ledger.record(
        method="POST",
        url="http://127.0.0.1:1/v1/updates",
        kind="update",
        body=body,
        content_type="application/x-fedlm+msgpack",
        detail=describe_update(update),
    )
    assert entry.seq == 2 and entry.bytes == len(body)
    import hashlib

    assert entry.sha256 == hashlib.sha256(body).hexdigest()
    assert stat.S_IMODE((tmp_path / "outbox.jsonl").stat().st_mode) == 0o600
    # A new Ledger object continues the sequence (the client restarted).
    again = Ledger(tmp_path / "outbox.jsonl").record(
        method="GET", url="http://127.0.0.1:1/v1/adapter", kind="adapter"
    )
    assert again.seq == 3
    entries = Ledger(tmp_path / "outbox.jsonl").entries()
    assert [e.kind for e in entries] == ["task", "update", "adapter"]
    tensors = entries[1].detail["tensors"]
    assert [t["name"] for t in tensors] == sorted(update.tensors)
    assert tensors[0]["shape"] == [4, 16] and tensors[1]["shape"] == [8, 4]
    assert entries[1].detail["metrics"] == {"train_loss": 1.25}

    summary = summarise(entries)
    assert summary["requests"] == 3 and summary["bytes"] == len(body)
    assert summary["by_kind"]["update"] == {"requests": 1, "bytes": len(body)}
    assert summary["destinations"] == {"http://127.0.0.1:1": 3}
    assert summary["distinct_updates"] == 1
    text = format_summary(summary)
    assert "3 requests" in text and "update" in text


def test_ledger_skips_a_torn_last_line_and_rejects_unknown_kinds(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "outbox.jsonl")
    ledger.record(method="GET", url="http://127.0.0.1:1/v1/task", kind="task")
    with (tmp_path / "outbox.jsonl").open("a") as fh:
        fh.write('{"seq": 2, "time": 1.0, "meth')  # power loss mid-write
    assert len(ledger.entries()) == 1
    with pytest.raises(ValueError, match="kind"):
        ledger.record(method="GET", url="http://x/v1/y", kind="telemetry")
    assert format_summary(summarise([])) == "no request has left this device"


def test_token_file_is_0600_and_bound_to_its_coordinator(tmp_path: Path) -> None:
    with ClientState(tmp_path / "state") as state:
        creds = Credentials("http://127.0.0.1:9", "c-1", "secret-token", "task-1", "dev")
        state.save_credentials(creds)
        assert stat.S_IMODE(state.token_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(state.dir.stat().st_mode) == 0o700
        assert state.credentials("http://127.0.0.1:9/") == creds
        assert state.credentials("http://127.0.0.1:10") is None  # another coordinator
        assert "secret-token" not in repr(creds)
        state.forget_credentials()
        assert state.credentials() is None


def test_state_directory_is_locked_against_a_second_client(tmp_path: Path) -> None:
    with ClientState(tmp_path / "state"), pytest.raises(StateError, match="in use"):
        ClientState(tmp_path / "state").open()
    ClientState(tmp_path / "state").open().close()  # released


def test_pending_update_round_trip_and_corruption(tmp_path: Path) -> None:
    state = ClientState(tmp_path).open()
    body = _update("u-77").to_bytes()
    state.save_pending(PendingUpdate("u-77", 2, "task-1", body))
    assert stat.S_IMODE((tmp_path / "pending.bin").stat().st_mode) == 0o600
    again = ClientState(tmp_path).pending()
    assert again is not None and again.update_id == "u-77" and again.body == body
    (tmp_path / "pending.bin").write_bytes(body[:-1])  # torn body: dropped, not sent
    assert state.pending() is None and not (tmp_path / "pending.json").exists()
    state.close()


def test_encoder_residual_persists_and_resets_on_codec_change(tmp_path: Path) -> None:
    state = ClientState(tmp_path).open()
    encoder = state.load_encoder("topk:0.25+fp16")
    x = {"model.layers.0.self_attn.q_proj.lora_B": np.arange(16, dtype=np.float32).reshape(4, 4)}
    encoder.encode(x)
    assert encoder.residual  # top-k left something behind
    state.save_encoder(encoder)
    loaded = state.load_encoder("topk:0.25+fp16")
    np.testing.assert_array_equal(
        loaded.residual["model.layers.0.self_attn.q_proj.lora_B"],
        encoder.residual["model.layers.0.self_attn.q_proj.lora_B"],
    )
    assert (
        isinstance(state.load_encoder("fp16"), UpdateEncoder)
        and not state.load_encoder("fp16").residual
    )
    state.close()


def test_round_marker_progress_and_adapter_pruning(tmp_path: Path) -> None:
    state = ClientState(tmp_path).open()
    state.start_round(RoundMarker("task-1", 3, 2, 1234), b"base-bytes")
    assert state.round_marker() == RoundMarker("task-1", 3, 2, 1234)
    assert state.base_body() == b"base-bytes"
    state.finish_round()
    assert state.round_marker() is None and state.base_body() is None
    state.set_progress("task-1", 4, 3)
    assert state.rounds_done("task-1") == 4 and state.last_base("task-1") == 3
    assert state.rounds_done("task-2") == 0 and state.last_base("task-2") == -1
    for v in (1, 2):
        state.adapter_gguf_path(v).parent.mkdir(exist_ok=True)
        state.adapter_gguf_path(v).write_bytes(b"x")
    state.prune_adapters(keep=state.adapter_gguf_path(2))
    assert not state.adapter_gguf_path(1).exists() and state.adapter_gguf_path(2).exists()
    (tmp_path / "progress.json").write_text("{not json")
    # A damaged file is set aside (kept for inspection), never left to fail every start.
    assert state.rounds_done("task-1") == 0
    assert not (tmp_path / "progress.json").exists()
    assert len(list(tmp_path.glob("progress.json.corrupt-*"))) == 1
    state.save_global(b"adapter-bytes", 5, '"etag5"', "task-1")
    assert state.global_adapter() == (b"adapter-bytes", 5, '"etag5"')
    assert json.loads((tmp_path / "global.json").read_text())["task_id"] == "task-1"
    state.close()
