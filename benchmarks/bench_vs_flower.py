"""The whole federation against Flower (issue 15 part 1), and asynchrony with a slow client
(part 4).

**`--experiment flower`** runs the demo's federated task twice, back to back, on 127.0.0.1:

- **fedlm**: `fedlm coordinator` + N `fedlm join` processes, exactly as `fedlm demo` starts them
  (`edge_sdk.demo.network.NetworkFederation`: TLS + join code, FedBuff with K = N, exact LoRA
  aggregation, `delta+int4+zlib`, one torch thread per client). Two changes, both for
  measurement: each client is pointed at its own byte-counting TCP proxy with `--coordinator`
  instead of finding the coordinator by mDNS, and runs under `--join-probe` (below), which
  notes when its first local step starts.
- **Flower 1.42** (the newest `flwr` on PyPI here) in **deployment**: `flower-superlink` +
  N `flower-supernode` (subprocess isolation, insecure plain HTTP on loopback, runtime
  dependency installation off), the app in `benchmarks/flower_app` submitted with `flwr run`:
  FlowerTune-style clients (HF transformers + peft + bitsandbytes NF4, the model built in the
  train handler, `get_peft_model_state_dict` sent as an fp32 `ArrayRecord`), `FedAvg`,
  synchronous rounds. Each SuperNode reaches the SuperLink through its own byte-counting proxy.

Both arms: the same GGUF (SmolLM2-135M-Instruct Q4_1; HF loads it with `gguf_file=`), the same
partition files (sha256 in the report), rank, alpha, rounds, local steps, batch, sequence
length, constant lr, seed, the same version-0 adapter (the coordinator's seeded A, B = 0), the
same packed sequences (`edge_sdk.training.data.build_dataset`), AdamW with the same settings.
Every published global version is saved with its publication time and scored **after** both
runs by one `TeacherForcedEvaluator` (the demo's exact match), so evaluation costs neither arm.

Figures per arm: wall time from the first process start to the first version at or above
the target exact match (default: the lower of the two final scores, so both reach it), final
exact match at equal rounds, bytes per client up and down (at the proxy: TLS/HTTP framing
included), peak RSS per client (largest process and the node's processes together), CPU
seconds per round (all processes; sampled from /proc every 0.2 s), time from process start to
the first local step.

**`--experiment async`** (part 4): the fedlm federation with client 0 made `--slowdown` times
slower (after each local round it sleeps (slowdown - 1) x the round's training time), once
with `fedavg` (synchronous rounds of all N clients) and once with FedBuff for each K in
`--buffer-sizes` (default 2; K = N is the demo's own setting), each FedBuff run given
rounds x N / K versions so that every variant aggregates the same number of updates. Figures:
wall time to the target exact match, and the timeline of updates (client, base version,
arrival, the version it went into, staleness).

Run from the repository root (needs the `bench` extra; Flower needs its own venv, see
BENCHMARKS.md, given with `--flwr-bin`):

    .venv/bin/python benchmarks/bench_vs_flower.py --experiment flower \
        --flwr-bin /tmp/flwr-bench-venv/bin --out /tmp/vs-flower [--rounds 8]
    .venv/bin/python benchmarks/bench_vs_flower.py --experiment async --out /tmp/async
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLOWER_APP = ROOT / "benchmarks" / "flower_app"
PEFT_PREFIX = "base_model.model."
LOOPBACK = "127.0.0.1"
EXPERIMENTS = ("flower", "async")


# --- helpers (tests/benchmarks/test_bench_vs_flower.py) -----------------------------------------


def peft_key(key: str) -> str:
    """Our adapter key (`model.layers.0.self_attn.q_proj.lora_A`) -> PEFT's state-dict key."""
    if not key.endswith((".lora_A", ".lora_B")):
        raise ValueError(f"adapter key should end in .lora_A or .lora_B, got {key!r}")
    return f"{PEFT_PREFIX}{key}.weight"


def our_key(key: str) -> str:
    """`get_peft_model_state_dict` key -> our adapter key (inverse of `peft_key`)."""
    if not (key.startswith(PEFT_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight"))):
        raise ValueError(f"not a PEFT LoRA state-dict key: {key!r}")
    return key[len(PEFT_PREFIX) : -len(".weight")]


def file_digests(paths: Sequence[Path]) -> list[str]:
    """sha256 of each file: both arms must read byte-identical partitions."""
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def first_reaching(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """Seconds of the first (seconds, exact_match) point at or above `target`; None if none."""
    for seconds, em in sorted(curve):
        if em >= target - 1e-9:
            return seconds
    return None


def process_start_epoch(pid: int | str = "self") -> float:
    """Wall-clock time a process started (from /proc, so interpreter start counts)."""
    with open(f"/proc/{pid}/stat") as f:
        start_ticks = int(f.read().rpartition(")")[2].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")


class CountingProxy:
    """A TCP relay on 127.0.0.1 that counts the bytes of every connection in each direction.

    `up` is client -> server, `down` server -> client. The upstream port may be set after the
    proxy starts (`set_upstream`): connections made before that wait for it.
    """

    def __init__(self, upstream_port: int | None = None, connect_timeout_s: float = 300.0) -> None:
        self.up = 0
        self.down = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._upstream: int | None = None
        self._ready = threading.Event()
        self._timeout = connect_timeout_s
        self._server = socket.create_server((LOOPBACK, 0))
        self.port = int(self._server.getsockname()[1])
        self._closed = False
        if upstream_port is not None:
            self.set_upstream(upstream_port)
        threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True).start()

    def set_upstream(self, port: int) -> None:
        self._upstream = port
        self._ready.set()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if not self._ready.wait(self._timeout) or self._upstream is None:
            conn.close()
            return
        try:
            upstream = socket.create_connection((LOOPBACK, self._upstream), timeout=30)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self.connections += 1
        t = threading.Thread(target=self._pump, args=(upstream, conn, "down"), daemon=True)
        t.start()
        self._pump(conn, upstream, "up")
        t.join()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:  # counted before relaying: a reader never sees bytes uncounted
                    if direction == "up":
                        self.up += len(data)
                    else:
                        self.down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (dst, src):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()

    def close(self) -> None:
        self._closed = True
        self._server.close()


@dataclass
class _Proc:
    cpu_s: float = 0.0
    hwm_mb: float = 0.0
    cmd: str = ""


@dataclass
class GroupSampler:
    """Samples every process of the given process groups from /proc: CPU, RSS, peak RSS.

    A process's CPU is its last seen utime + stime (so a process that lives less than one
    interval between samples is missed by at most that interval); a group's `peak_sum_mb` is
    the largest sum of its processes' RSS seen at one sample.
    """

    interval_s: float = 0.2
    groups: dict[int, str] = field(default_factory=dict)
    """pgid -> label."""
    procs: dict[int, dict[int, _Proc]] = field(default_factory=dict)
    peak_sum_mb: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def add(self, pgid: int, label: str) -> None:
        self.groups[pgid] = label

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        stats: dict[int, list[str]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        stats[int(entry)] = f.read().rpartition(")")[2].split()
                except OSError:
                    continue
        sums: dict[int, float] = {}
        for pid, fields in stats.items():
            group = self._group_of(pid, stats)
            if group is None:
                continue
            rss = hwm = 0.0
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            rss = int(line.split()[1]) / 1024.0
                        elif line.startswith("VmHWM:"):
                            hwm = int(line.split()[1]) / 1024.0
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
            except OSError:
                continue
            rec = self.procs.setdefault(group, {}).setdefault(pid, _Proc())
            rec.cpu_s = max(rec.cpu_s, (int(fields[11]) + int(fields[12])) / tick)
            rec.hwm_mb = max(rec.hwm_mb, hwm)
            rec.cmd = cmd or rec.cmd
            sums[group] = sums.get(group, 0.0) + rss
        for group, total in sums.items():
            self.peak_sum_mb[group] = max(self.peak_sum_mb.get(group, 0.0), total)

    def _group_of(self, pid: int, stats: Mapping[int, list[str]]) -> int | None:
        """The tracked group of `pid`: its process group, or that of its nearest ancestor
        (a child that started its own session, as Flower's SuperExec does, stays counted)."""
        seen = 0
        while pid in stats and seen < 64:
            fields = stats[pid]
            if int(fields[2]) in self.groups:
                return int(fields[2])
            pid, seen = int(fields[1]), seen + 1
        return None

    def live_pids(self) -> list[int]:
        """Sampled processes still running the same command (not a reused pid)."""
        out = []
        for procs in self.procs.values():
            for pid, rec in procs.items():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
                except OSError:
                    continue
                if cmd and cmd == rec.cmd:
                    out.append(pid)
        return out

    def summary(self, pgid: int) -> dict[str, Any]:
        procs = self.procs.get(pgid, {})
        return {
            "label": self.groups.get(pgid, ""),
            "processes": len(procs),
            "cpu_s": round(sum(p.cpu_s for p in procs.values()), 2),
            "peak_rss_largest_mb": round(max((p.hwm_mb for p in procs.values()), default=0.0), 1),
            "peak_rss_node_mb": round(self.peak_sum_mb.get(pgid, 0.0), 1),
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- fedlm arm --------------------------------------------------------------------------------


def _join_probe(slowdown: float, marks_path: Path, argv: list[str]) -> int:
    """`fedlm join ARGV`, noting when each local round starts and ends (JSON lines in
    `marks_path`); with `slowdown` > 1, each round then sleeps (slowdown - 1) x its training
    time, as a device that many times slower would take."""
    from edge_sdk.training import trainer

    real_fit = trainer.fit
    started = process_start_epoch()

    def fit(*args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        result = real_fit(*args, **kwargs)
        trained = time.time()
        if slowdown > 1:
            time.sleep((slowdown - 1) * (trained - t0))
        with marks_path.open("a") as f:
            f.write(json.dumps({"process_start": started, "first_step": t0, "trained": trained,
                                "done": time.time()}) + "\n")  # fmt: skip
        return result

    trainer.fit = fit  # the client loop imports `fit` from the module at each round
    from edge_sdk.cli import main

    return main(argv)


def _replace_run(args: list[str], old: Sequence[str], new: Sequence[str]) -> list[str]:
    """`args` with the contiguous run `old` replaced by `new` (ValueError if absent)."""
    n = len(old)
    for i in range(len(args) - n + 1):
        if args[i : i + n] == list(old):
            return args[:i] + list(new) + args[i + n :]
    raise ValueError(f"{' '.join(old)!r} not found in the command")


def _drop_option(args: list[str], name: str) -> list[str]:
    i = args.index(name)
    return args[:i] + args[i + 2 :]


def fedlm_federation_class() -> type:
    from edge_sdk.demo.network import NetworkFederation, _strategy_flags

    @dataclass
    class BenchFederation(NetworkFederation):
        """`NetworkFederation` with each client behind a counting proxy and under the probe."""

        proxies: list[CountingProxy] = field(default_factory=list)
        sampler: GroupSampler | None = None
        strategy_flags: list[str] | None = None
        """Replaces the demo's strategy flags on the coordinator's command line."""
        slowdown: dict[int, float] = field(default_factory=dict)
        marks_dir: Path | None = None
        config: Any = None

        def _spawn(self, args, log_path, env, procs):  # type: ignore[no-untyped-def]
            args = list(args)
            argv = [sys.executable, "-m", "edge_sdk.cli"]
            label = args[0]
            if args[0] == "coordinator" and self.strategy_flags is not None:
                args = _replace_run(args, _strategy_flags(self.config), self.strategy_flags)
            if args[0] == "join":
                c = int(args[args.index("--name") + 1].rpartition("-")[2])
                label = f"client-{c}"
                for option in ("--coordinator-name", "--discovery-timeout", "--interface"):
                    args = _drop_option(args, option)
                args += ["--coordinator", f"https://{LOOPBACK}:{self.proxies[c].port}"]
                assert self.marks_dir is not None
                marks = self.marks_dir / f"client-{c}.jsonl"
                argv = [sys.executable, __file__, "--join-probe",
                        str(self.slowdown.get(c, 1.0)), str(marks), "--"]  # fmt: skip
            log = log_path.open("wb")
            proc = subprocess.Popen(
                [*argv, *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )  # fmt: skip
            procs.append((proc, log))
            self.pids.append(proc.pid)
            if self.sampler is not None:
                self.sampler.add(proc.pid, label)
            return proc

        def _wait_ready(self, proc, log_path):  # type: ignore[no-untyped-def]
            url = super()._wait_ready(proc, log_path)
            port = int(url.rstrip("/").rpartition(":")[2])
            for proxy in self.proxies:
                proxy.set_upstream(port)
            return url

    return BenchFederation


def run_fedlm(
    config: Any,
    client_paths: Sequence[Path],
    work: Path,
    *,
    strategy_flags: list[str] | None = None,
    slowdown: Mapping[int, float] | None = None,
) -> dict[str, Any]:
    """One fedlm federation; every version's adapter and publication time, and the figures."""
    work.mkdir(parents=True, exist_ok=True)
    proxies = [CountingProxy() for _ in range(config.clients)]
    sampler = GroupSampler()
    cls = fedlm_federation_class()
    fed = cls(work_dir=work, client_threads=1, proxies=proxies, sampler=sampler,
              strategy_flags=strategy_flags, slowdown=dict(slowdown or {}), marks_dir=work,
              config=config)  # fmt: skip
    for c in range(config.clients):
        (work / f"client-{c}.jsonl").unlink(missing_ok=True)
    versions: list[dict[str, Any]] = []

    def on_version(version: int, adapter: dict[str, np.ndarray]) -> None:
        versions.append({"version": version, "published": time.time(), "adapter": adapter})

    load_before = _load()
    sampler.start()
    t0 = time.time()
    try:
        record = fed.run(None, None, client_paths, config, on_version)
    finally:
        sampler.stop()
        for proxy in proxies:
            proxy.close()
    clients = []
    for c, pid in enumerate(fed.pids[1:]):
        marks = [json.loads(x) for x in (work / f"client-{c}.jsonl").read_text().splitlines()]
        clients.append({
            **sampler.summary(pid), "bytes_up": proxies[c].up, "bytes_down": proxies[c].down,
            "ledger_bytes_sent": record.bytes_sent[c], "fp32_bytes": record.fp32_bytes[c],
            "start_to_first_step_s": round(marks[0]["first_step"] - marks[0]["process_start"], 2),
            "rounds": [{k: round(v - t0, 2) for k, v in m.items()} for m in marks],
        })  # fmt: skip
    server = sampler.summary(fed.pids[0])
    return {
        "arm": "fedlm",
        "t0": t0,
        "wall_s": round(time.time() - t0, 1),
        "load_before": load_before,
        "load_after": _load(),
        "server": server,
        "clients": clients,
        "versions": versions,
        "timeline": _fedlm_timeline(work, t0),
    }


def _fedlm_timeline(work: Path, t0: float) -> list[dict[str, Any]]:
    """Every update the coordinator stored: client, base version, arrival (seconds after
    the first process start) and the version it went into (its staleness is that version
    - 1 - its base)."""
    import sqlite3

    db = work / "coordinator.sqlite"
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT c.name, u.base_version, u.received_at, u.status, u.aggregated_into "
            "FROM updates u JOIN clients c ON c.client_id = u.client_id ORDER BY u.seq"
        ).fetchall()
    except sqlite3.Error as exc:  # a schema this benchmark does not know
        return [{"error": str(exc)}]
    finally:
        con.close()
    return [
        {"client": name, "base_version": base, "received_s": round(received - t0, 2),
         "status": status, "version": into,
         "staleness": None if into is None else into - 1 - base}
        for name, base, received, status, into in rows
    ]  # fmt: skip


# --- Flower arm -------------------------------------------------------------------------------


def _flower_env(flwr_bin: Path, home: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{flwr_bin}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["HF_HUB_OFFLINE"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    return env


def run_flower(
    config: Any,
    client_paths: Sequence[Path],
    work: Path,
    flwr_bin: Path,
    initial: Mapping[str, np.ndarray],
    gguf: Path,
    *,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """One Flower deployment run (SuperLink + SuperNodes + `flwr run`)."""
    work.mkdir(parents=True, exist_ok=True)
    home = work / "flwr-home"
    home.mkdir(exist_ok=True)
    out = work / "versions"
    out.mkdir(exist_ok=True)
    for stale in [*out.glob("*"), *work.glob("node-*.jsonl")]:
        stale.unlink()
    init_path = work / "initial.npz"
    np.savez(init_path, **{peft_key(k): v.astype(np.float32) for k, v in initial.items()})
    port = _free_port()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "bench"\n\n'
        f'[superlink.bench]\naddress = "{LOOPBACK}:{port}"\ninsecure = true\n'
    )
    env = _flower_env(flwr_bin, home, 1)
    proxies = [CountingProxy(port) for _ in range(config.clients)]
    sampler = GroupSampler()
    procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
    starts: dict[int, float] = {}

    def spawn(cmd: list[str], name: str, label: str) -> subprocess.Popen[bytes]:
        log = (work / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)  # fmt: skip
        procs.append((proc, log))
        sampler.add(proc.pid, label)
        try:
            starts[proc.pid] = process_start_epoch(proc.pid)
        except OSError:
            starts[proc.pid] = time.time()
        return proc

    load_before = _load()
    sampler.start()
    t0 = time.time()
    nodes = []
    try:
        link = spawn([str(flwr_bin / "flower-superlink"), "--insecure", "--host", LOOPBACK,
                      "--port", str(port), "--disable-runtime-dependency-installation"],
                     "superlink", "superlink")  # fmt: skip
        for c, path in enumerate(client_paths):
            node_config = (f'partition-id={c} data-path="{path}" '
                           f'timings-path="{work / f"node-{c}.jsonl"}" threads=1')  # fmt: skip
            nodes.append(spawn([str(flwr_bin / "flower-supernode"), "--insecure",
                                "--superlink", f"{LOOPBACK}:{proxies[c].port}",
                                "--host", LOOPBACK, "--port", str(_free_port()),
                                "--node-config", node_config],
                               f"supernode-{c}", f"client-{c}"))  # fmt: skip
        _wait_port(port, link, work / "superlink.log", 120.0)
        run_config = " ".join([
            f"num-server-rounds={config.rounds}", f"local-steps={config.local_steps}",
            f"batch-size={config.batch_size}", f"seq-len={config.seq_len}", f"lr={config.lr}",
            f"rank={config.rank}", f"alpha={float(config.alpha)}", f"seed={config.seed}",
            f"num-clients={config.clients}", f'gguf="{gguf}"', f'initial-arrays="{init_path}"',
            f'out-dir="{out}"',
        ])  # fmt: skip
        submit = subprocess.run(
            [str(flwr_bin / "flwr"), "run", str(FLOWER_APP), "bench", "--run-config", run_config],
            check=False, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        (work / "flwr-run.log").write_text(submit.stdout + submit.stderr)
        if submit.returncode != 0:
            raise RuntimeError(f"flwr run failed: {(submit.stdout + submit.stderr)[-2000:]}")
        versions_file = out / "versions.jsonl"
        deadline = time.monotonic() + timeout_s
        while True:
            done = (
                versions_file.exists()
                and len(versions_file.read_text().splitlines()) >= config.rounds
            )
            if done:
                break
            if (out / "error.txt").exists():
                raise RuntimeError(f"the ServerApp failed: {(out / 'error.txt').read_text()}")
            for proc, _ in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a Flower process exited ({proc.args[0]}, code "
                                       f"{proc.returncode}); logs in {work}")  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError(f"Flower did not finish {config.rounds} rounds in {timeout_s} s")
            time.sleep(0.5)
        time.sleep(1.0)  # let the last ClientApp processes write their timings
    finally:
        sampler.stop()
        for proc, _ in procs:
            _signal_group(proc.pid, signal.SIGTERM)
        for proc, log in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            log.close()
        for pid in sampler.live_pids():  # Flower's own children that left our process groups
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for proxy in proxies:
            proxy.close()
    versions = []
    for line in (out / "versions.jsonl").read_text().splitlines():
        v = json.loads(line)
        with np.load(out / f"version-{v['version']}.npz") as z:
            adapter = {our_key(k): z[k] for k in z.files}
        versions.append({"version": v["version"], "published": v["published"], "adapter": adapter})
    clients = []
    for c, node in enumerate(nodes):
        calls = [json.loads(x) for x in (work / f"node-{c}.jsonl").read_text().splitlines()]
        calls.sort(key=lambda r: r["round"])
        summary = sampler.summary(node.pid)
        first = calls[0]["marks"]
        clients.append({
            **summary, "bytes_up": proxies[c].up, "bytes_down": proxies[c].down,
            # from the SuperNode's start (this node's first process) to the first local step
            "start_to_first_step_s": round(first["first_step"] - starts.get(node.pid, t0), 2),
            # Flower prestarts each single-use ClientApp process: from the message's arrival
            # in the handler to the first local step (imports, model build, data)
            "clientapp_handler_to_first_step_s": [
                round(r["marks"]["first_step"] - r["marks"]["handler"], 2) for r in calls],
            "clientapp_cpu_s": [round(r["cpu_s"], 2) for r in calls],
            "clientapp_peak_rss_mb": [round(r["peak_rss_mb"], 1) for r in calls],
            "rounds": [{k: round(v - t0, 2) for k, v in r["marks"].items()} for r in calls],
        })  # fmt: skip
    return {
        "arm": "flower",
        "t0": t0,
        "wall_s": round(max(v["published"] for v in versions) - t0, 1),
        "load_before": load_before,
        "load_after": _load(),
        "server": sampler.summary(link.pid),
        "clients": clients,
        "versions": versions,
    }


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"flower-superlink did not listen on {port} within {timeout_s} s")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --- scoring and the report -------------------------------------------------------------------


def score_versions(config: Any, held_out: Sequence[Any], arms: Sequence[dict[str, Any]]) -> None:
    """Exact match and eval loss of every version of every arm, with one evaluator (in place)."""
    from edge_sdk.demo.evaluate import TeacherForcedEvaluator
    from edge_sdk.demo.simulate import train_config
    from edge_sdk.models import resolve
    from edge_sdk.training.tokenizer import load_tokenizer
    from edge_sdk.training.trainer import load_for_training

    path = resolve(config.model)
    model = load_for_training(path, train_config(config, 1))
    evaluator = TeacherForcedEvaluator(model, load_tokenizer(path), held_out)
    for arm in arms:
        for v in arm["versions"]:
            s = evaluator.score(v.pop("adapter"))
            v["seconds"] = round(v["published"] - arm["t0"], 2)
            v["exact_match"] = s.exact_match
            v["eval_loss"] = s.eval_loss
            v["per_family"] = s.per_family


def summarize(arms: Sequence[dict[str, Any]], target: float | None) -> dict[str, Any]:
    finals = [a["versions"][-1]["exact_match"] for a in arms]
    goal = min(finals) if target is None else target
    rows = {}
    for arm in arms:
        rounds = max(1, len(arm["versions"]))
        cpu_clients = sum(c["cpu_s"] for c in arm["clients"])
        cpu_all = cpu_clients + arm["server"]["cpu_s"]
        n = len(arm["clients"])
        rows[arm["arm"]] = {
            "time_to_target_s": first_reaching(
                [(v["seconds"], v["exact_match"]) for v in arm["versions"]], goal
            ),
            "final_exact_match": arm["versions"][-1]["exact_match"],
            "final_eval_loss": arm["versions"][-1]["eval_loss"],
            "versions": len(arm["versions"]),
            "wall_s": arm["wall_s"],
            "bytes_up_per_client": sum(c["bytes_up"] for c in arm["clients"]) / n,
            "bytes_down_per_client": sum(c["bytes_down"] for c in arm["clients"]) / n,
            "peak_rss_client_largest_mb": max(c["peak_rss_largest_mb"] for c in arm["clients"]),
            "peak_rss_client_node_mb": max(c["peak_rss_node_mb"] for c in arm["clients"]),
            "cpu_s_per_round_all": round(cpu_all / rounds, 1),
            "cpu_s_per_round_per_client": round(cpu_clients / rounds / n, 1),
            "start_to_first_step_s": float(
                np.median([c["start_to_first_step_s"] for c in arm["clients"]])
            ),
            "load": [arm["load_before"], arm["load_after"]],
        }  # fmt: skip
    return {"target_exact_match": goal, "arms": rows}


def ratios(summary: dict[str, Any]) -> dict[str, float | None]:
    a, b = summary["arms"].get("fedlm"), summary["arms"].get("flower")
    if not (a and b):
        return {}

    def div(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None or y == 0 else round(x / y, 3)

    return {
        "speedup_to_target": div(b["time_to_target_s"], a["time_to_target_s"]),
        "bytes_up_fewer": div(b["bytes_up_per_client"], a["bytes_up_per_client"]),
        "bytes_total_fewer": div(
            b["bytes_up_per_client"] + b["bytes_down_per_client"],
            a["bytes_up_per_client"] + a["bytes_down_per_client"],
        ),
        "peak_rss_largest_ratio": div(
            a["peak_rss_client_largest_mb"], b["peak_rss_client_largest_mb"]
        ),
        "peak_rss_node_ratio": div(a["peak_rss_client_node_mb"], b["peak_rss_client_node_mb"]),
        "cpu_per_round_ratio": div(a["cpu_s_per_round_all"], b["cpu_s_per_round_all"]),
    }


# --- experiments ------------------------------------------------------------------------------


def _task(config: Any, out: Path) -> tuple[list[Path], list[Any]]:
    from edge_sdk.demo.tasks import generate, write_task_data

    data = generate(config.task_config())
    client_paths, _ = write_task_data(data, out / "data")
    return client_paths, list(data.eval)


def _initial(config: Any) -> dict[str, np.ndarray]:
    from coordinator.next_version import initial_adapter
    from coordinator.shapes import shapes_from_gguf
    from edge_sdk.demo.simulate import aggregation_config
    from edge_sdk.models import resolve
    from edge_sdk.models.naming import LORA_TARGETS

    shapes = shapes_from_gguf(resolve(config.model), LORA_TARGETS)
    return initial_adapter(aggregation_config(config), shapes)


def experiment_flower(args: argparse.Namespace, config: Any, out: Path) -> dict[str, Any]:
    from edge_sdk.models import resolve

    client_paths, held_out = _task(config, out)
    arms = []
    for name in args.arms:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: load {_load()}", flush=True)
        if name == "fedlm":
            arms.append(run_fedlm(config, client_paths, out / "fedlm"))
        else:
            arms.append(run_flower(config, client_paths, out / "flower", Path(args.flwr_bin),
                                   _initial(config), resolve(config.model)))  # fmt: skip
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {arms[-1]['wall_s']} s", flush=True)
    score_versions(config, held_out, arms)
    summary = summarize(arms, args.target)
    return {"partitions_sha256": file_digests(client_paths), "summary": summary,
            "ratios": ratios(summary), "arms": arms}  # fmt: skip


def experiment_async(args: argparse.Namespace, config: Any, out: Path) -> dict[str, Any]:
    n = config.clients
    client_paths, held_out = _task(config, out)
    slow = {0: args.slowdown}
    variants: list[tuple[str, Any, list[str]]] = [
        ("fedavg", config, ["--strategy", "fedavg", "--clients-per-round", str(n),
                            "--min-clients", str(n)]),
    ]  # fmt: skip
    for k in args.buffer_sizes:
        # K < N: a version needs only K updates, so K / N of the demo's updates per version;
        # more versions for the same number of client rounds.
        rounds = config.rounds * n // k
        variants.append((f"fedbuff-k{k}", config.replace(rounds=rounds),
                         ["--strategy", "fedbuff", "--buffer-size", str(k), "--min-updates",
                          str(k), "--max-staleness", str(args.max_staleness)]))  # fmt: skip
    arms = []
    for name, cfg, flags in variants:
        if args.arms and name not in args.arms:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name}: load {_load()}", flush=True)
        arm = run_fedlm(cfg, client_paths, out / name, strategy_flags=flags, slowdown=slow)
        arm["arm"] = name
        arms.append(arm)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {arm['wall_s']} s", flush=True)
    score_versions(config, held_out, arms)
    summary = summarize(arms, args.target)
    return {"slowdown": slow, "summary": summary, "arms": arms}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--join-probe":
        sep = argv.index("--")
        return _join_probe(float(argv[1]), Path(argv[2]), argv[sep + 1 :])
    from edge_sdk.demo.config import DemoConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", choices=EXPERIMENTS, default="flower")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--preset", choices=("full", "quick"), default="full")
    p.add_argument("--clients", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--arms", nargs="+", help="flower: fedlm flower; async: fedavg fedbuff-kK")
    p.add_argument("--flwr-bin", default="/tmp/flwr-bench-venv/bin",
                   help="bin/ of a venv with flwr 1.42 that can import torch, transformers, "
                   "peft")  # fmt: skip
    p.add_argument("--target", type=float, help="exact match to time (default: lower final)")
    p.add_argument("--slowdown", type=float, default=3.0, help="async: client 0's slowdown")
    p.add_argument("--buffer-sizes", type=int, nargs="+", default=[2])
    p.add_argument("--max-staleness", type=int, default=8)
    args = p.parse_args(argv)
    config = DemoConfig.full() if args.preset == "full" else DemoConfig.quick()
    if args.clients:
        config = config.replace(clients=args.clients)
    if args.rounds:
        config = config.replace(rounds=args.rounds)
    if args.arms is None and args.experiment == "flower":
        args.arms = ["fedlm", "flower"]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args.out.mkdir(parents=True, exist_ok=True)
    run = experiment_flower if args.experiment == "flower" else experiment_async
    report = run(args, config, args.out)
    report |= {"experiment": args.experiment, "config": dataclasses.asdict(config),
               "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(
        json.dumps(
            {k: report[k] for k in ("summary",) if k in report} | {"ratios": report.get("ratios")},
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
