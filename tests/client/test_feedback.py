"""Feedback from the app: answer ids, the private append-only store, and the next round.

Real things only: a real tiny GGUF served by llama.cpp (`EdgeModel`), a real aiohttp
coordinator on 127.0.0.1, a real client, real files, a real killed process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from coordinator.server import Service
from coordinator.strategies import FedBuff
from edge_sdk.client import ClientState, FederatedClient, ProtocolError, TaskRefusedError
from edge_sdk.client.feedback import (
    FeedbackError,
    FeedbackFullError,
    FeedbackLimits,
    FeedbackStore,
)
from edge_sdk.client.task_policy import TaskPolicy
from edge_sdk.method import MethodSpec
from edge_sdk.wire import GlobalAdapter, WireError
from tests.client.helpers import client_config, coordinator_config, write_data
from tests.client.hostile import HostileCoordinator, tiny_task

pytestmark = pytest.mark.timeout(300)

PROMPT = [{"role": "user", "content": "hello world the"}]
SECRET = "qvzfeedbacksecretkx"
"""A string only the user's feedback contains; no byte on the wire may carry it."""


class _Capture:
    """Every request body a client's aiohttp session put on the wire."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.config = aiohttp.TraceConfig()
        self.config.on_request_start.append(self._start)
        self.config.on_request_chunk_sent.append(self._chunk)

    async def _start(self, *args: object) -> None:
        self.bodies.append(b"")

    async def _chunk(
        self, session: object, ctx: object, params: aiohttp.TraceRequestChunkSentParams
    ) -> None:
        self.bodies[-1] += params.chunk


# -- the store ------------------------------------------------------------------------------


def test_feedback_files_are_private_append_only_and_skip_a_torn_line(tmp_path: Path) -> None:
    old = os.umask(0)  # a permissive umask must not widen the files
    try:
        store = FeedbackStore(tmp_path)
        store.add_pair(PROMPT, "the a is", "of and to", answer_id="a1", kind="pair")
    finally:
        os.umask(old)
    path = store.pairs_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_bytes()
    os.chmod(path, 0o644)  # widened from outside: the next append narrows it again
    # A crash mid-write: half a record, no newline.
    with path.open("ab") as fh:
        fh.write(b'{"messages": [{"role": "us')
    store.add_pair(PROMPT, "in the a", "is of", answer_id="a2", kind="pair")
    after = path.read_bytes()
    assert after.startswith(first)  # append-only: what was there stays byte for byte
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [r["answer_id"] for r in store.pair_records()] == ["a1", "a2"]
    assert store.counts().pairs == 2
    # The records read back as the trainer's preference pairs.
    pytest.importorskip("edge_sdk.training.preferences")
    pairs = store.pairs()
    assert [p.chosen for p in pairs] == ["the a is", "in the a"]


def test_feedback_survives_a_killed_process(tmp_path: Path) -> None:
    """Each record is fsync'ed before record returns: a SIGKILL right after loses none."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from edge_sdk.client.feedback import FeedbackStore
        store = FeedbackStore({str(tmp_path)!r})
        for i in range(3):
            store.add_pair(
                {PROMPT!r}, f"chosen {{i}}", f"rejected {{i}}", answer_id=f"a{{i}}", kind="pair"
            )
        print("recorded", flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"recorded"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = FeedbackStore(tmp_path)
    assert [r["chosen"] for r in store.pair_records()] == ["chosen 0", "chosen 1", "chosen 2"]


def test_feedback_is_bounded_with_a_clear_error(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, FeedbackLimits(max_bytes=2048, max_record_bytes=1024))
    with pytest.raises(FeedbackError, match="max_record_bytes"):
        store.add_pair(PROMPT, "x" * 2000, "y", answer_id="big", kind="pair")
    with pytest.raises(FeedbackFullError) as caught:
        for i in range(100):
            store.add_pair(PROMPT, f"the {i}", f"a {i}", answer_id=f"a{i}", kind="pair")
    assert "FeedbackLimits.max_bytes" in str(caught.value) and "forget_feedback" in str(
        caught.value
    )
    assert store.pairs_path.stat().st_size <= 2048
    held = store.counts().pairs
    assert held > 0  # what fitted is kept
    store.forget()
    assert store.counts().pairs == 0


def test_a_planted_symlink_does_not_redirect_feedback(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path)
    store.dir.mkdir(parents=True)
    target = tmp_path / "elsewhere.jsonl"
    target.write_text("")
    store.pairs_path.symlink_to(target)
    with pytest.raises(FeedbackError, match="symlink"):
        store.add_pair(PROMPT, "a", "b", answer_id="x", kind="pair")
    assert target.read_text() == ""


def test_bad_feedback_is_refused_clearly(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path)
    with pytest.raises(FeedbackError, match="equals the rejected one"):
        store.add_pair(PROMPT, "same", " same ", answer_id="x", kind="pair")
    with pytest.raises(FeedbackError, match="`chosen` should be a non-empty"):
        store.add_pair(PROMPT, "  ", "b", answer_id="x", kind="pair")
    with pytest.raises(FeedbackError, match="end with a user turn"):
        store.add_pair([{"role": "assistant", "content": "hi"}], "a", "b", answer_id="x", kind="p")
    assert not store.pairs_path.exists()


# -- the app: answer ids and record_feedback ------------------------------------------------


def test_chat_answers_carry_ids_and_feedback_becomes_pairs_and_examples(
    tmp_path: Path, model: Path
) -> None:
    from edge_sdk.runtime import Answer, EdgeModel

    data = write_data(tmp_path / "data.jsonl")
    with EdgeModel(model, n_ctx=64, n_threads=1) as runtime:
        client = FederatedClient(client_config(tmp_path / "state", model, data), runtime=runtime)
        answer = runtime.chat(PROMPT, max_tokens=4)
        assert isinstance(answer, Answer) and isinstance(answer, str) and len(answer.id) == 32
        assert runtime.answer(answer.id).messages == tuple(PROMPT)
        again = runtime.chat(PROMPT, max_tokens=4, temperature=0.9, seed=3)
        stream = runtime.chat(PROMPT, max_tokens=4, stream=True)
        streamed = "".join(stream)
        assert runtime.answer(stream.id).text == streamed

        client.record_feedback(answer, accepted=False, edit=f"the {SECRET}")
        client.record_feedback(answer.id, accepted=True)
        client.record_feedback(stream, chosen=f"a {SECRET} is", rejected="of of of")
        if str(again).strip() != str(answer).strip():
            client.record_feedback(answer, regenerated=again)
        with pytest.raises(FeedbackError, match="a thumbs down alone makes no pair"):
            client.record_feedback(answer, accepted=False)
        with pytest.raises(FeedbackError, match="give one kind of feedback"):
            client.record_feedback(answer, accepted=True, chosen="x", rejected="y")
        with pytest.raises(FeedbackError, match="not among the last"):
            client.record_feedback("0" * 32, accepted=True)

    pairs = client.feedback.pair_records()
    examples = client.feedback.example_records()
    assert pairs[0] == {**pairs[0], "chosen": f"the {SECRET}", "rejected": str(answer),
                        "kind": "edit", "messages": PROMPT}  # fmt: skip
    assert pairs[1]["chosen"] == f"a {SECRET} is" and pairs[1]["rejected"] == "of of of"
    assert [e["kind"] for e in examples] == ["edit", "accepted", "pair"]
    assert examples[1]["messages"][-1] == {"role": "assistant", "content": str(answer)}


# -- the task's method on the device ---------------------------------------------------------

HOSTILE_METHODS: dict[str, tuple[Any, str]] = {
    "unknown method": ({"name": "rlhf-ppo"}, "method should be one of sft, dpo"),
    "beta nan": ({"name": "dpo", "beta": float("nan")}, "`beta` should be a finite number"),
    "beta huge": ({"name": "dpo", "beta": 1e6}, "`beta` should be a finite number in (0, 100]"),
    "beta above policy": ({"name": "dpo", "beta": 50.0}, "`extra.method.beta` = 50.0 exceeds"),
    "beta zero": ({"name": "dpo", "beta": 0}, "`beta` should be a finite number"),
    "beta bool": ({"name": "dpo", "beta": True}, "`beta` should be a finite number"),
    "loss": ({"name": "dpo", "loss": "hinge"}, "`loss` should be one of sigmoid, ipo"),
    "extra key": ({"name": "dpo", "lr_multiplier": 1e9}, "unknown keys ['lr_multiplier']"),
    "not a map": ("dpo", "`extra.method` should be a map"),
    "sft_weight huge": (
        {"name": "dpo", "sft_weight": 1e6},
        "`sft_weight` should be a finite number in [0, 100]",
    ),
    "sft_weight negative": ({"name": "dpo", "sft_weight": -1.0}, "`sft_weight` should be"),
    "sft_weight bool": ({"name": "dpo", "sft_weight": True}, "`sft_weight` should be"),
    "sft_weight above policy": (
        {"name": "dpo", "sft_weight": 50.0},
        "`extra.method.sft_weight` = 50.0 exceeds",
    ),
}


def test_task_policy_refuses_hostile_methods(model: Path) -> None:
    policy = TaskPolicy()
    for case, (method, expected) in HOSTILE_METHODS.items():
        if case == "beta nan":  # the wire decoder refuses it first (the network test below)
            with pytest.raises(WireError, match="extra.method.beta: expected a finite number"):
                tiny_task(model, extra={"method": method})
            continue
        task = tiny_task(model, extra={"method": method})
        with pytest.raises(TaskRefusedError) as caught:
            policy.check_task(task)
        assert expected.replace("method should", "`method` should") in str(caught.value) or (
            expected in str(caught.value)
        ), (case, str(caught.value))
    assert policy.check_method(tiny_task(model)) == MethodSpec()  # absent: sft
    spec = policy.check_method(tiny_task(model, extra={"method": {"name": "dpo", "beta": 0.5}}))
    assert (spec.name, spec.beta, spec.loss) == ("dpo", 0.5, "sigmoid")
    assert spec.sft_weight == 0.0 and "sft_weight" not in spec.to_extra()  # plain DPO as before
    rpo = MethodSpec("dpo", 0.5, "sigmoid", 2.0)
    assert rpo.to_extra()["sft_weight"] == 2.0
    assert policy.check_method(tiny_task(model, extra={"method": rpo.to_extra()})) == rpo
    with pytest.raises(TaskRefusedError, match="not among this client's methods"):
        TaskPolicy(methods=("sft",)).check_method(
            tiny_task(model, extra={"method": {"name": "dpo"}})
        )


@pytest.mark.parametrize("case", ["beta huge", "unknown method", "beta nan"])
def test_a_hostile_method_is_refused_before_any_training(
    tmp_path: Path, model: Path, case: str
) -> None:
    method, _ = HOSTILE_METHODS[case]
    data = write_data(tmp_path / "data.jsonl")
    obj = tiny_task(model).to_json_dict()
    obj["extra"]["method"] = method

    async def scenario() -> tuple[BaseException, HostileCoordinator]:
        async with HostileCoordinator(tiny_task(model)) as server:

            async def hostile_task(request: web.Request) -> web.StreamResponse:
                return web.json_response(obj)

            server.handlers["/v1/task"] = hostile_task
            client = FederatedClient(
                client_config(
                    tmp_path / "state", model, data, coordinator_url=server.url, insecure=True
                )
            )
            with pytest.raises((TaskRefusedError, ProtocolError)) as caught:
                await asyncio.wait_for(client.run_async(), timeout=60)
            return caught.value, server

    error, server = asyncio.run(scenario())
    assert "extra.method" in str(error), str(error)
    if case != "beta nan":  # NaN does not even decode: a ProtocolError from the wire checks
        assert isinstance(error, TaskRefusedError) and "refusing the task" in str(error)
    assert [e.kind for e in ClientState(tmp_path / "state").ledger.entries()] == ["join", "task"]
    assert server.requests["/v1/adapter"] == 0 and not server.updates


def test_the_coordinator_states_and_validates_the_method(tmp_path: Path, model: Path) -> None:
    from coordinator.state_machine import Coordinator
    from coordinator.storage import SQLiteStorage

    with pytest.raises(ValueError, match="`beta` should be a finite number"):
        MethodSpec("dpo", float("inf"))
    config = coordinator_config(tmp_path, model, method=MethodSpec("dpo", 0.25, "ipo"))
    storage = SQLiteStorage(config.db_path)
    with storage:
        coordinator = Coordinator(config, storage)
        task = coordinator.task_config()
        assert task.extra["method"] == {"name": "dpo", "beta": 0.25, "loss": "ipo"}
        assert MethodSpec.from_extra(task.extra) == MethodSpec("dpo", 0.25, "ipo")
        assert coordinator.status()["method"]["name"] == "dpo"


def test_fedlm_coordinator_refuses_a_bad_beta(tmp_path: Path, model: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [sys.executable, "-m", "edge_sdk.cli", "coordinator", "--model", str(model), "--db",
         str(tmp_path / "c.sqlite"), "--method", "dpo", "--beta", "nan", "--insecure",
         "--no-mdns", "--host", "127.0.0.1", "--port", "0"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "`beta` should be a finite number" in out.stderr


# -- the next round trains on the feedback ---------------------------------------------------


def _wait_for(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_feedback_recorded_in_the_app_reaches_the_next_round(
    tmp_path: Path, model: Path, method: str
) -> None:
    """A device without data for the task's method (sft: no data files; dpo: SFT data but no
    preference pairs) sits the round out with a clear status and sends nothing; once the user
    edits answers in the app, the next round trains on that feedback, the global adapter
    changes, and no byte on the wire carries the feedback."""
    from edge_sdk.runtime import EdgeModel

    capture = _Capture()
    runtime = EdgeModel(model, n_ctx=64, n_threads=1)
    result: dict[str, Any] = {}

    async def scenario(client_holder: list[FederatedClient]) -> None:
        config = coordinator_config(
            tmp_path, model, strategy=FedBuff(buffer_size=1), max_rounds=1, seq_len=128,
            method=MethodSpec(method, beta=0.5),
        )  # fmt: skip
        async with Service(config) as service:
            cfg = client_config(tmp_path / "state", model, write_data(tmp_path / "d.jsonl"),
                                service=service, val_fraction=0.0, eval_batches=0)  # fmt: skip
            if method == "sft":
                cfg = dataclasses.replace(cfg, data=())  # an app-only device: no data files
            client = FederatedClient(cfg, runtime=runtime, trace_configs=[capture.config])
            client_holder.append(client)
            result["summary"] = await asyncio.wait_for(client.run_async(), timeout=240)
            result["v0"] = GlobalAdapter.from_bytes(service.coordinator.storage.global_body(0))
            result["v1"] = GlobalAdapter.from_bytes(service.coordinator.storage.global_body(1))

    holder: list[FederatedClient] = []
    thread = threading.Thread(target=lambda: asyncio.run(scenario(holder)))
    thread.start()
    try:
        _wait_for(lambda: not thread.is_alive() or (holder and "sitting" in holder[0].status), 120)
        client = holder[0]
        assert ("no preference pairs" if method == "dpo" else "no examples") in client.status
        time.sleep(0.5)  # a few more polls: still nothing sent
        kinds = [e.kind for e in ClientState(tmp_path / "state").ledger.entries()]
        assert "update" not in kinds
        # The user edits the app's answer: that is the device's first training example.
        answer = runtime.chat(PROMPT, max_tokens=4)
        for i in range(3):
            client.record_feedback(answer, accepted=False, edit=f"{SECRET} the a is {i}")
    finally:
        thread.join(timeout=280)
        runtime.close()
    summary = result["summary"]
    assert summary.reason == "task_complete" and summary.global_version == 1
    [report] = summary.rounds
    assert report.outcome == "accepted"
    v0, v1 = result["v0"].dense_tensors(), result["v1"].dense_tensors()
    assert any(not np.array_equal(v0[k], v1[k]) for k in v0)  # the feedback moved the model
    # The ledger lists every request: only protocol traffic and the adapter update went out.
    entries = ClientState(tmp_path / "state").ledger.entries()
    assert {e.kind for e in entries} <= {"join", "task", "adapter", "update", "status"}
    [update] = [e for e in entries if e.kind == "update"]
    assert 1 <= update.detail["num_examples"] <= 3  # what the coordinator can count
    assert SECRET not in json.dumps([e.detail for e in entries])
    assert capture.bodies and not any(SECRET.encode() in body for body in capture.bodies)
