"""The helpers of benchmarks/bench_vs_flower.py that its figures rest on (not the benchmark).

Byte counting at the proxy, the PEFT <-> fedlm key mapping (against a real PEFT model), the
partitions both arms read, the rewrite of the demo's coordinator and client command lines,
and the /proc sampler on a real child process.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "bench_vs_flower", ROOT / "benchmarks" / "bench_vs_flower.py"
)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_vs_flower"] = bench  # dataclasses resolve their module by name
_spec.loader.exec_module(bench)


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data + data)  # the reply is twice the request

    threading.Thread(target=serve, daemon=True).start()
    return server, int(server.getsockname()[1])


def test_proxy_counts_each_direction_and_waits_for_a_late_upstream() -> None:
    server, port = _echo_server()
    proxy = bench.CountingProxy()  # upstream not known yet, as before the coordinator listens
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        threading.Timer(0.3, proxy.set_upstream, args=(port,)).start()
        payload = b"x" * 100_000
        client.sendall(payload)
        got = b""
        while len(got) < 2 * len(payload):
            got += client.recv(65536)
        client.close()
        assert got == payload * 2
        assert proxy.up == len(payload)
        assert proxy.down == 2 * len(payload)
        assert proxy.connections == 1
    finally:
        proxy.close()
        server.close()


def test_peft_keys_map_to_ours_both_ways_on_a_real_peft_model() -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from edge_sdk.models import naming

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    model = peft.get_peft_model(
        transformers.LlamaForCausalLM(config),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(naming.LORA_TARGETS)),
    )
    state = peft.get_peft_model_state_dict(model)
    ours = {bench.our_key(k) for k in state}
    expected = {
        f"{naming.hf_module(layer, t)}.{half}"
        for layer in range(2)
        for t in naming.LORA_TARGETS
        for half in ("lora_A", "lora_B")
    }
    assert ours == expected
    assert {bench.peft_key(k) for k in ours} == set(state)
    with pytest.raises(ValueError, match="lora_A"):
        bench.peft_key("model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(ValueError, match="PEFT"):
        bench.our_key("model.layers.0.self_attn.q_proj.lora_A")


def test_both_arms_read_identical_partitions(tmp_path: Path) -> None:
    from edge_sdk.demo.config import DemoConfig

    config = DemoConfig.quick()
    first, held_out = bench._task(config, tmp_path / "a")
    again, _ = bench._task(config, tmp_path / "b")
    assert len(first) == config.clients
    assert bench.file_digests(first) == bench.file_digests(again)  # seeded: same bytes
    assert len(set(bench.file_digests(first))) == config.clients  # one partition each
    from edge_sdk.demo.tasks import read_examples

    train_prompts = {ex.prompt for p in first for ex in read_examples(p)}
    assert held_out and not {ex.prompt for ex in held_out} & train_prompts


def test_first_reaching_takes_the_earliest_version_at_the_target() -> None:
    curve = [(30.0, 0.5), (10.0, 0.2), (20.0, 0.6), (40.0, 0.7)]
    assert bench.first_reaching(curve, 0.6) == 20.0
    assert bench.first_reaching(curve, 0.71) is None
    assert bench.first_reaching(curve, 0.0) == 10.0


def test_command_rewrites_replace_exactly_the_demos_strategy_flags() -> None:
    from edge_sdk.demo.config import DemoConfig
    from edge_sdk.demo.network import _strategy_flags

    flags = _strategy_flags(DemoConfig())
    args = ["coordinator", "--model", "m", *flags, "--lora-mode", "exact"]
    new = ["--strategy", "fedavg", "--clients-per-round", "4"]
    assert bench._replace_run(args, flags, new) == [
        "coordinator", "--model", "m", *new, "--lora-mode", "exact",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not found"):
        bench._replace_run(["coordinator"], flags, new)
    assert bench._drop_option(["join", "--interface", "127.0.0.1", "--x"], "--interface") == [
        "join", "--x",
    ]  # fmt: skip


def test_sampler_sees_a_child_and_its_own_session_grandchild() -> None:
    burn = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import time; b = bytearray(80 << 20); t = time.process_time()\\n"
        "while time.process_time() - t < 0.6: pass'], start_new_session=True)\n"
        "child.wait()\n"
    )
    sampler = bench.GroupSampler(interval_s=0.05)
    proc = subprocess.Popen([sys.executable, "-c", burn], start_new_session=True)
    sampler.add(proc.pid, "parent")
    sampler.start()
    proc.wait(timeout=60)
    sampler.stop()
    summary = sampler.summary(proc.pid)
    assert summary["processes"] == 2  # the grandchild left the group but is still counted
    assert summary["cpu_s"] >= 0.4
    assert summary["peak_rss_largest_mb"] >= 80
