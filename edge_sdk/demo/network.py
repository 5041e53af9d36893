"""`NetworkFederation`: the demo's federated arm as real processes on 127.0.0.1.

    fedlm coordinator (port 0, mDNS on 127.0.0.1 only, fedbuff with K = clients, the demo's
                       LoRA mode, codec and schedule, max-rounds = config.rounds)
    N x fedlm join    (no --coordinator: each finds the coordinator by mDNS, browsing on
                       127.0.0.1 only; its own data partition and state directory)
    this process      (an observer: joins once with the same join token, polls /v1/status and
                       fetches /v1/adapter for every new global version)

The coordinator serves TLS, as by default. Its certificate is made here, before it starts
(`coordinator.tls.ensure_self_signed` in the directory the coordinator would use), so that the
join code (token + certificate fingerprint) is known while the clients start alongside it.
The join token reaches the coordinator through $FEDLM_JOIN_TOKEN and the join code reaches
the clients through $FEDLM_JOIN_CODE, so neither appears on a command line. Bytes sent are
read back from each client's outbox ledger (what actually left the device, retries included).
Every process runs in its own process group and is terminated (SIGTERM, then SIGKILL after a
grace period) on exit, error or Ctrl-C.

Differences from `InProcessFederation`, both from what `fedlm join` trains: a client's round uses
a constant learning rate without warmup (the coordinator's task has no warmup or schedule
field), and its data keeps the client's own validation split.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from typing_extensions import Self

from edge_sdk.demo.config import DemoConfig
from edge_sdk.demo.errors import FederationError
from edge_sdk.demo.federation import FederationRecord, OnVersion, Tensors
from edge_sdk.demo.live import Progress
from edge_sdk.env import JOIN_CODE_ENV, JOIN_TOKEN_ENV
from edge_sdk.errors import FedlmError
from edge_sdk.validators import is_int_in, is_positive_finite

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_READY = re.compile(r"fedlm coordinator (https?://\S+)")
_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ClientProgress:
    """What one client's outbox ledger says so far."""

    updates: int = 0
    """Distinct updates sent."""
    bytes_sent: int = 0
    """Bytes of every update request body, retries included."""
    fp32_bytes: int = 0
    """The same updates' A and B tensors in fp32 (what plain federated LoRA would send)."""
    tokens: int = 0
    loss: dict[int, float] = field(default_factory=dict)
    """Training loss of the update built on each base version."""


def _strategy_flags(config: DemoConfig) -> list[str]:
    """Every version waits for every client: a full FedBuff buffer, or (--secure) a FedAvg
    round whose cohort is every client."""
    if config.secure:
        return ["--secure", "--strategy", "fedavg", "--clients-per-round", str(config.clients),
                "--min-clients", str(config.clients), "--min-cohort", str(config.clients),
                "--secure-clip", str(config.secure_clip),
                "--secure-grid-bits", str(config.secure_grid_bits),
                # A phase waits for the slowest client's training; a short one would fail rounds.
                "--secure-phase", "300"]  # fmt: skip
    return [
        "--strategy",
        "fedbuff",
        "--buffer-size",
        str(config.clients),
        "--min-updates",
        str(config.clients),
        "--max-staleness",
        str(config.rounds),
    ]


def read_client_ledger(state_dir: Path) -> ClientProgress:
    """Tally the update requests in `state_dir/outbox.jsonl` (an absent ledger: nothing sent)."""
    from edge_sdk.client.ledger import LEDGER_NAME, Ledger

    out = ClientProgress()
    path = state_dir / LEDGER_NAME
    if not path.exists():
        return out
    seen: set[str] = set()
    for entry in Ledger(path).entries():
        if entry.kind != "update":
            continue
        out.bytes_sent += entry.bytes
        if "secagg" in entry.detail:  # --secure: every protocol message counts as update bytes
            if entry.detail["secagg"] == "masked_input" and entry.attempt == 1:
                out.updates += 1
                out.fp32_bytes += 4 * int(entry.detail.get("values", 0))
            continue
        update_id = str(entry.detail.get("update_id", ""))
        if update_id in seen:  # a resend of the same update: its bytes count, its content once
            continue
        seen.add(update_id)
        out.updates += 1
        out.tokens += int(entry.detail.get("num_tokens", 0))
        out.fp32_bytes += sum(4 * math.prod(t["shape"]) for t in entry.detail.get("tensors", []))
        loss = entry.detail.get("metrics", {}).get("train_loss")
        if loss is not None:
            out.loss[int(entry.detail.get("base_version", -1))] = float(loss)
    return out


class _Coordinator:
    """A tiny synchronous REST client for the observer (stdlib only; the calls are rare)."""

    def __init__(self, url: str, timeout_s: float, cafile: Path | None = None) -> None:
        import ssl

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.token = ""
        # The coordinator's own self-signed certificate is the only trusted one.
        self._context = ssl.create_default_context(cafile=str(cafile)) if cafile else None

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        req = urllib.request.Request(
            self.url + path, data=body, method=method, headers=headers or {}
        )
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=self.timeout_s, context=self._context) as resp:
            return resp.read(), dict(resp.headers)

    def join(self, join_token: str, name: str) -> None:
        body = json.dumps({"join_token": join_token, "name": name}).encode()
        raw, _ = self._request("POST", "/v1/join", body, {"Content-Type": "application/json"})
        self.token = str(json.loads(raw)["token"])

    def status(self) -> dict[str, Any]:
        raw, _ = self._request("GET", "/v1/status")
        return dict(json.loads(raw))

    def adapter(self) -> tuple[int, Tensors]:
        from edge_sdk.wire import GlobalAdapter

        raw, _ = self._request("GET", "/v1/adapter")
        message = GlobalAdapter.from_bytes(raw)
        return message.version, message.dense_tensors()


@dataclass
class NetworkFederation:
    """The federated arm as a coordinator process and `config.clients` `fedlm join` processes."""

    name: str = "network"
    work_dir: Path | None = None
    """Where the coordinator's database, client state directories and process logs go
    (None: a new temporary directory, kept after the run for inspection)."""
    client_threads: int = 1
    """Torch threads of each client process (they share the machine's cores)."""
    timeout_s: float = 1800.0
    """Bound on the whole federation, from the coordinator's start to the last version."""
    startup_timeout_s: float = 120.0
    """How long the coordinator may take to listen (it hashes the model first)."""
    discovery_timeout_s: float = 120.0
    """The longest a client browses mDNS for the demo's coordinator. Clients start alongside
    the coordinator and look for its instance name, so the browse ends as soon as the advert
    resolves (an unnamed browse would always last this long)."""
    poll_s: float = 0.5
    """Status polling interval of the observer."""
    grace_s: float = 10.0
    """Between SIGTERM and SIGKILL when stopping a process."""
    progress: Progress | None = None
    """`("federation", {version, rounds, updates, latest_loss, bytes_sent})` about each second."""
    pids: list[int] = field(default_factory=list)
    """Process ids started by the last `run` (all stopped when it returns)."""

    def __post_init__(self) -> None:
        if not is_int_in(self.client_threads, 1):
            raise ValueError(
                f"`client_threads` should be a positive integer, got {self.client_threads!r}"
            )
        for name in ("timeout_s", "startup_timeout_s", "discovery_timeout_s", "poll_s", "grace_s"):
            value = getattr(self, name)
            if not is_positive_finite(value):
                raise ValueError(f"`{name}` should be a positive number of seconds, got {value!r}")

    # -- processes --------------------------------------------------------------------------

    def _env(self, threads: int | None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(_REPO_ROOT) + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
        if threads is not None:  # BLAS/OpenMP pools sized before torch starts
            for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env[name] = str(threads)
        return env

    def _spawn(
        self,
        args: Sequence[str],
        log_path: Path,
        env: dict[str, str],
        procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]],
    ) -> subprocess.Popen[bytes]:
        log = log_path.open("wb")
        try:
            # Own session = own process group: a terminal's Ctrl-C reaches only this process,
            # which then stops the whole group (and anything the child started) in `_stop`.
            proc = subprocess.Popen(
                [sys.executable, "-m", "edge_sdk.cli", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        procs.append((proc, log))
        self.pids.append(proc.pid)
        logger.info("started pid %d: fedlm %s (log %s)", proc.pid, args[0], log_path)
        return proc

    def _stop(self, procs: Sequence[tuple[subprocess.Popen[bytes], IO[bytes]]]) -> None:
        """SIGTERM every process group, wait up to `grace_s`, then SIGKILL what is left."""
        for proc, _ in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for proc, _ in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning(
                    "pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, self.grace_s
                )
        for proc, log in procs:
            _signal_group(proc, signal.SIGKILL)  # also reaps grandchildren left in the group
            proc.wait()
            log.close()

    def _wait_ready(self, proc: subprocess.Popen[bytes], log_path: Path) -> str:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            match = _READY.search(log_path.read_text(errors="replace"))
            if match:
                return match.group(1)
            if proc.poll() is not None:
                raise FederationError(
                    f"the coordinator exited with code {proc.returncode}: {_tail(log_path)}"
                )
            time.sleep(0.1)
        raise FederationError(
            f"the coordinator did not listen within {self.startup_timeout_s:.0f} s: "
            f"{_tail(log_path)}"
        )

    # -- the federation ---------------------------------------------------------------------

    def run(
        self, client_paths: Sequence[Path], config: DemoConfig, on_version: OnVersion
    ) -> FederationRecord:
        """Federate over real processes; `on_version(v, adapter)` for every version v >= 1 seen."""
        if len(client_paths) != config.clients:
            raise ValueError(
                f"`client_paths` should have {config.clients} files (config.clients), "
                f"got {len(client_paths)}"
            )
        work = (
            Path(self.work_dir)
            if self.work_dir is not None
            else Path(tempfile.mkdtemp(prefix="fedlm-net-"))
        )
        work.mkdir(parents=True, exist_ok=True)
        db = work / "coordinator.sqlite"
        for stale in work.glob("coordinator.sqlite*"):  # a fresh task, not a resumed one
            if stale.is_file():  # (the certificate directory, <db>.tls, may be reused)
                stale.unlink()
        join_token = secrets.token_urlsafe(24)
        from coordinator.tls import ensure_self_signed, tls_directory
        from edge_sdk.client.joincode import make_join_code

        tls = ensure_self_signed(tls_directory(db))
        join_code = make_join_code(tls.fingerprint, join_token)
        instance = f"fedlm-demo-{secrets.token_hex(4)}"  # this run's coordinator among any others
        self.pids = []
        procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
        t0 = time.perf_counter()
        try:
            coordinator_log = work / "coordinator.log"
            coordinator = self._spawn(
                [
                    "coordinator",
                    "--model",
                    config.model,
                    "--host",
                    LOOPBACK,
                    "--port",
                    "0",
                    "--db",
                    str(db),
                    *_strategy_flags(config),
                    "--lora-mode",
                    config.mode,
                    "--rank",
                    str(config.rank),
                    "--alpha",
                    str(config.alpha),
                    "--a-seed",
                    str(config.seed),
                    "--server-lr",
                    str(config.server_lr),
                    "--codec",
                    config.codec,
                    "--local-steps",
                    str(config.local_steps),
                    "--batch-size",
                    str(config.batch_size),
                    "--seq-len",
                    str(config.seq_len),
                    "--lr",
                    str(config.lr),
                    "--max-rounds",
                    str(config.rounds),
                    "--mdns-interface",
                    LOOPBACK,
                    "--mdns-name",
                    instance,
                    "--rate",
                    "50",
                ],
                coordinator_log,
                self._env(None) | {JOIN_TOKEN_ENV: join_token},
                procs,
            )
            # Clients start at once, so their imports and model checks overlap the
            # coordinator's start-up; each then waits for the advert to appear.
            state_dirs = [work / f"client-{c}" for c in range(config.clients)]
            clients = []
            for c, (data, state_dir) in enumerate(zip(client_paths, state_dirs, strict=True)):
                # No --coordinator: the client must discover it by mDNS on the loopback interface.
                clients.append(
                    self._spawn(
                        [
                            "join",
                            config.model,
                            "--data",
                            str(data),
                            "--state-dir",
                            str(state_dir),
                            "--name",
                            f"demo-client-{c}",
                            "--threads",
                            str(self.client_threads),
                            "--max-rounds",
                            str(config.rounds),
                            "--precision",
                            config.precision,
                            "--compute",
                            config.compute,
                            "--seed",
                            str(config.seed),
                            # The demo scores a central held-out set: clients train on all their
                            # data
                            # (as the local-only baselines do) and look for new versions often.
                            "--val-fraction",
                            "0",
                            "--poll-interval",
                            str(self.poll_s),
                            "--coordinator-name",
                            instance,
                            "--discovery-timeout",
                            str(self.discovery_timeout_s),
                            "--interface",
                            LOOPBACK,
                        ],
                        work / f"client-{c}.log",
                        self._env(self.client_threads) | {JOIN_CODE_ENV: join_code},
                        procs,
                    )
                )
            url = self._wait_ready(coordinator, coordinator_log)
            logger.info("coordinator listening at %s (clients find it by mDNS)", url)
            api = _Coordinator(url, timeout_s=30.0, cafile=tls.cert_path)
            api.join(join_token, "demo-observer")
            v0, initial = api.adapter()
            if v0 != 0:  # a client would need to load, train and upload within the observer's join
                raise FederationError(f"the observer joined at global version {v0}, not 0")
            versions: list[Tensors] = [initial]
            _Observer(
                federation=self,
                api=api,
                coordinator=coordinator,
                clients=clients,
                state_dirs=state_dirs,
                work=work,
                config=config,
                on_version=on_version,
                deadline=time.monotonic() + self.timeout_s - (time.perf_counter() - t0),
                versions=versions,
                seen=v0,
            ).follow()
            ledgers = [read_client_ledger(d) for d in state_dirs]
        finally:
            self._stop(procs)
        client_loss = [
            [ledger.loss.get(v, float("nan")) for ledger in ledgers] for v in range(config.rounds)
        ]
        return FederationRecord(
            versions=versions,
            bytes_sent=[x.bytes_sent for x in ledgers],
            fp32_bytes=[x.fp32_bytes for x in ledgers],
            client_loss=client_loss,
            tokens=sum(x.tokens for x in ledgers),
            seconds=time.perf_counter() - t0,
        )

    def _report(self, version: int, config: DemoConfig, state_dirs: Sequence[Path]) -> None:
        if self.progress is None:
            return
        ledgers = [read_client_ledger(d) for d in state_dirs]
        self.progress("federation", {
            "version": version, "rounds": config.rounds, "updates": [x.updates for x in ledgers],
            "latest_loss": [x.loss[max(x.loss)] if x.loss else None for x in ledgers],
            "bytes_sent": [x.bytes_sent for x in ledgers],
        })  # fmt: skip


class _VersionWatcher:
    """A thread that fetches each newly published global version at once, so that a slow
    `on_version` (the demo scores every version) cannot make the observer miss one."""

    def __init__(self, api: _Coordinator, version: int, rounds: int, poll_s: float) -> None:
        self.api = api
        self.rounds = rounds
        self.poll_s = poll_s
        self.published = version
        """The coordinator's newest version, as the watcher last saw it."""
        self.found: queue.Queue[tuple[int, Tensors] | BaseException] = queue.Queue()
        """Each fetched (version, adapter), or the error that stopped the watcher."""
        self._last = version
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fedlm-demo-observer", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.api.timeout_s + self.poll_s)

    def _watch(self) -> None:
        try:
            while not self._stop.is_set() and self._last < self.rounds:
                self.published = int(self.api.status()["version"])
                if self.published > self._last:
                    got, tensors = self.api.adapter()
                    if got > self._last + 1:
                        logger.warning(
                            "versions %d..%d were replaced before the observer saw them",
                            self._last + 1,
                            got - 1,
                        )
                    self.found.put((got, tensors))
                    self._last = got
                self._stop.wait(self.poll_s)
        except (OSError, ValueError, KeyError, FedlmError) as exc:  # HTTP, JSON or wire
            self.found.put(exc)  # raised in the main thread


@dataclass
class _Observer:
    """Follows one demo federation until version `config.rounds` is published and every client
    has exited: hands each version to `on_version`, reports progress, and fails fast when the
    coordinator dies, every client exits early, or the deadline passes."""

    federation: NetworkFederation
    api: _Coordinator
    coordinator: subprocess.Popen[bytes]
    clients: Sequence[subprocess.Popen[bytes]]
    state_dirs: Sequence[Path]
    work: Path
    config: DemoConfig
    on_version: Callable[[int, Tensors], None]
    deadline: float
    """time.monotonic() past which the federation has failed."""
    versions: list[Tensors]
    """Every global version seen, from the initial one (appended to)."""
    seen: int = 0
    """The newest version handed to `on_version`."""
    all_exited_at: float | None = None
    """When the last client process was first seen exited (None: some still run)."""
    reported_at: float = 0.0

    def follow(self) -> None:
        poll_s = self.federation.poll_s
        with _VersionWatcher(self.api, self.seen, self.config.rounds, poll_s) as watcher:
            while True:
                try:
                    item = watcher.found.get(timeout=poll_s)
                except queue.Empty:
                    item = None
                if isinstance(item, BaseException):
                    raise FederationError(f"observing the coordinator failed: {item}") from item
                if item is not None:
                    self.seen = item[0]
                    self.versions.append(item[1])
                    self.on_version(self.seen, item[1])
                # The ledgers are small files: re-reading them each second keeps the live
                # view's per-client updates, loss and bytes current between versions.
                if item is not None or time.monotonic() - self.reported_at >= 1.0:
                    self.federation._report(self.seen, self.config, self.state_dirs)
                    self.reported_at = time.monotonic()
                if self._finished(watcher):
                    return

    def _finished(self, watcher: _VersionWatcher) -> bool:
        """True once the task is done; raises `FederationError` when it cannot be."""
        if self.coordinator.poll() is not None:
            raise FederationError(
                f"the coordinator exited with code {self.coordinator.returncode}: "
                f"{_tail(self.work / 'coordinator.log')}"
            )
        rounds = self.config.rounds
        running = [p for p in self.clients if p.poll() is None]
        if self.seen >= rounds and not running:
            return True
        if running:
            self.all_exited_at = None
        elif self.all_exited_at is None:
            self.all_exited_at = time.monotonic()
        elif (
            time.monotonic() - self.all_exited_at > 5.0 + 4 * self.federation.poll_s
            and watcher.published < rounds
            and watcher.found.empty()
        ):
            # No client is left to move the task on (the watcher had time to see a version
            # published just before the last one exited). When the clients finished the task,
            # the loop instead drains the versions still queued behind a slow `on_version`.
            raise FederationError(
                f"every client exited at global version {self.seen} of {rounds}: "
                + "; ".join(
                    f"client {c} (exit {p.returncode}): {_tail(self.work / f'client-{c}.log')}"
                    for c, p in enumerate(self.clients)
                )
            )
        if time.monotonic() > self.deadline:
            raise FederationError(
                f"the federation reached version {self.seen} of {rounds} "
                f"within {self.federation.timeout_s:.0f} s"
            )
        return False


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group id is the child's pid (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


__all__ = ["ClientProgress", "NetworkFederation", "read_client_ledger"]
