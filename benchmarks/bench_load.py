"""Coordinator under load: many enrolled devices posting real encoded updates at a steady rate.

`python -m coordinator` runs as a subprocess on 127.0.0.1 (HTTPS with its self-signed
certificate, pinned here by fingerprint, unless --insecure), FedBuff with buffer K. This process
enrolls D devices over POST /v1/join, then offers R updates/s for T seconds round-robin over the
devices: SmolLM2-135M-shaped adapters (r=8, 7 projections x 30 layers) encoded with the task's
codec (`delta+int4+zlib` by default), each POST a real update that the coordinator fully decodes,
validates and stores durably before its 202. A probe polls GET /healthz every 100 ms.

Reported: accepted updates/s, p50/p99 ack latency (from the moment a device's send is due, so
waiting for one of the C pooled connections counts; and from when its connection was free),
/healthz latency overall and while an aggregation runs (from the coordinator's log), the
coordinator's peak RSS (VmHWM), and acked updates lost: every update_id acknowledged with 202
is looked up in the coordinator's SQLite file after it stops, and must be there.

Update bodies: the tensors of a few distinct adapters are encoded once against version 0 (a
device-side encode costs ~0.15 s; 1,000 of them per minute would need more cores than the
coordinator). Each POST re-frames one of them with the device's client id, a fresh update id
and the latest version it saw, recompressing only the small header fields: the zlib stream is
the header fields' deflate blocks (full flush) followed by the tensors' pre-compressed blocks and
the Adler-32 of the whole body, which is a valid stream (the coordinator's decoder checks it).
The values of an update sent on a later base are therefore that version's adapter plus the
version-0 delta: finite, well-formed, of the real size and codec, but not a trained adapter.

One address may hold 32 open connections at the coordinator (coordinator/connections.py), so
the D simulated devices share C <= 24 pooled connections (+1 for the probe).

    python benchmarks/bench_load.py --devices 1000 --rate 60 --seconds 600   # the issue's run
    python benchmarks/bench_load.py --devices 50 --rate 10 --seconds 20      # CI-sized
"""

from __future__ import annotations

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse
import asyncio
import json
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_sdk.wire import CONTENT_TYPE, AdapterUpdate, GlobalAdapter, LoraSpec
from edge_sdk.wire._envelope import FLAG_DEFLATE, HEADER, MAGIC, PROTOCOL_VERSION
from edge_sdk.wire.messages import MessageKind

JOIN_TOKEN = "load-benchmark-join-token"
_VERSION_LINE = re.compile(r"version (\d+) from (\d+) updates in ([0-9.]+)s")


@dataclass
class Template:
    """One encoded adapter, ready to be re-framed for any device and version."""

    fields: dict
    tensors_raw: bytes
    tensors_deflated: bytes  # raw deflate, final block, no history

    @classmethod
    def of(cls, update: AdapterUpdate) -> Template:
        obj = update.to_obj()
        tensors_raw = msgpack.packb(obj.pop("tensors"), use_bin_type=True)
        comp = zlib.compressobj(6, zlib.DEFLATED, -15)
        deflated = comp.compress(tensors_raw) + comp.flush(zlib.Z_FINISH)
        return cls(obj, tensors_raw, deflated)

    def body(self, client_id: str, update_id: str, base_version: int) -> bytes:
        fields = {
            **self.fields,
            "client_id": client_id,
            "update_id": update_id,
            "base_version": base_version,
        }
        packer = msgpack.Packer(use_bin_type=True)
        head = packer.pack_map_header(len(fields) + 1)
        for key, value in fields.items():
            head += packer.pack(key) + packer.pack(value)
        head += packer.pack("tensors")
        comp = zlib.compressobj(6, zlib.DEFLATED, -15)
        head_deflated = comp.compress(head) + comp.flush(zlib.Z_FULL_FLUSH)
        adler = zlib.adler32(self.tensors_raw, zlib.adler32(head))
        stream = b"\x78\x9c" + head_deflated + self.tensors_deflated + adler.to_bytes(4, "big")
        kind = int(MessageKind.ADAPTER_UPDATE)
        return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, FLAG_DEFLATE) + stream


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    fingerprint: str | None
    db: Path
    aggregations: list[tuple[float, float, int]] = field(default_factory=list)
    """(start, end, updates) of each aggregation, from the coordinator's log (monotonic)."""
    log_tail: list[str] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the coordinator process so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def write_bytes(self) -> int:
        """Bytes the coordinator process has caused to be written to storage so far."""
        for line in Path(f"/proc/{self.proc.pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
        return 0

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def start_server(
    model: Path, db: Path, buffer_size: int, codec: str, insecure: bool, timeout_s: float = 120
) -> Server:
    cmd = [
        sys.executable, "-m", "coordinator", "--model", str(model), "--host", "127.0.0.1",
        "--port", "0", "--db", str(db), "--no-mdns", "--join-token", JOIN_TOKEN,
        "--buffer-size", str(buffer_size), "--min-updates", str(buffer_size),
        "--codec", codec, "--rate", "1000", "--log-level", "info",
    ]  # fmt: skip
    if insecure:
        cmd.append("--insecure")
    code = Path(os.environ.get("FEDLM_LOAD_CODE") or ROOT)  # --code: the coordinator to load
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=code,
        env={**os.environ, "PYTHONPATH": str(code)},
    )  # fmt: skip
    assert proc.stdout is not None
    url, fingerprint = None, None
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        if line.startswith("fedlm coordinator http"):
            url = line.split()[2]
        elif line.startswith("TLS certificate sha256 fingerprint:"):
            fingerprint = line.split(":", 1)[1].strip()
        if url and (insecure or fingerprint):
            break
        if time.monotonic() > deadline:
            break
    if url is None:
        proc.kill()
        raise SystemExit("the coordinator exited or stalled before listening")
    server = Server(proc, url, fingerprint, db)

    def drain() -> None:  # keep reading the log: aggregation windows, and no full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            match = _VERSION_LINE.search(line)
            if match:
                end = time.monotonic()
                server.aggregations.append((end - float(match.group(3)), end, int(match.group(2))))
            server.log_tail = [*server.log_tail[-20:], line.rstrip()]

    threading.Thread(target=drain, daemon=True).start()
    return server


def enroll_in_storage(db: Path, count: int) -> list[tuple[str, str]]:
    import secrets

    from coordinator.auth import generate_token, hash_token
    from coordinator.storage import SQLiteStorage

    enrolled = []
    with SQLiteStorage(db) as storage:
        for i in range(count):
            client_id, token = f"c-{secrets.token_hex(8)}", generate_token()
            storage.add_client(client_id, f"sim-{i}", hash_token(token))
            enrolled.append((client_id, token))
    return enrolled


def make_templates(reference: dict[str, np.ndarray], sha: str, count: int) -> list[Template]:
    from edge_sdk.models.naming import LORA_TARGETS

    rng = np.random.default_rng(0)
    templates = []
    for _ in range(count):
        tensors = {
            k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in reference.items()
        }
        update = AdapterUpdate.build(
            client_id="template", base_version=0, model_sha256=sha,
            lora=LoraSpec(8, 16.0, LORA_TARGETS, "exact", 0), tensors=tensors,
            num_examples=int(rng.integers(10, 80)), codec=CODEC, reference=reference,
        )  # fmt: skip
        templates.append(Template.of(update))
    return templates


CODEC = "delta+int4+zlib"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run_load(
    model: Path,
    devices: int,
    rate: float,
    seconds: float,
    buffer_size: int = 100,
    connections: int = 24,
    templates: int = 8,
    insecure: bool = False,
    workdir: Path | None = None,
) -> dict:
    """Run the whole benchmark once; returns the figures (see the module docstring)."""
    import aiohttp

    from edge_sdk.models.identity import model_sha256

    if connections > 30:
        raise ValueError(
            f"`connections` should be at most 30 (cap 32 per address), got {connections}"
        )
    with tempfile.TemporaryDirectory(prefix="fedlm-load-", dir=workdir) as tmp:
        db = Path(tmp) / "load.sqlite"
        server = start_server(model, db, buffer_size, CODEC, insecure)
        ssl: object = (
            False
            if insecure
            else aiohttp.Fingerprint(
                bytes.fromhex(server.fingerprint.replace(":", ""))  # type: ignore[union-attr]
            )
        )
        acked: list[str] = []
        statuses: dict[int, int] = {}
        samples: dict[int, str] = {}
        unsent: list[int] = []
        latency_due: list[float] = []
        latency_conn: list[float] = []
        health: list[tuple[float, float]] = []
        try:
            connector = aiohttp.TCPConnector(limit=connections, ssl=ssl)  # type: ignore[arg-type]
            probe_connector = aiohttp.TCPConnector(limit=1, ssl=ssl)  # type: ignore[arg-type]
            timeout = aiohttp.ClientTimeout(total=120)
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                aiohttp.ClientSession(connector=probe_connector, timeout=timeout) as probe,
            ):
                started = time.perf_counter()
                sem = asyncio.Semaphore(connections)

                async def join(i: int) -> tuple[str, str]:
                    async with (
                        sem,
                        session.post(
                            f"{server.url}/v1/join",
                            json={"join_token": JOIN_TOKEN, "name": f"d{i}"},
                        ) as resp,
                    ):
                        if resp.status != 200:
                            raise RuntimeError(f"join {i}: {resp.status} {await resp.text()}")
                        obj = await resp.json()
                        return obj["client_id"], obj["token"]

                # /v1/join admits 1 join/s per address (burst 10): 1,000 devices from one
                # address would take 17 minutes. The first few join over HTTP; the rest are
                # enrolled the way `Coordinator.join` does it, in the coordinator's database
                # (the running coordinator finds their tokens there on first use).
                over_http = min(devices, 8)
                enrolled = list(await asyncio.gather(*(join(i) for i in range(over_http))))
                enrolled += await asyncio.to_thread(enroll_in_storage, db, devices - over_http)
                join_seconds = time.perf_counter() - started
                headers0 = {"Authorization": f"Bearer {enrolled[0][1]}"}
                async with session.get(f"{server.url}/v1/adapter", headers=headers0) as resp:
                    reference = GlobalAdapter.from_bytes(await resp.read()).dense_tensors()
                sha = model_sha256(model)
                made = await asyncio.to_thread(make_templates, reference, sha, templates)
                # The re-framing must give exactly what the encoder gives: check one.
                check = AdapterUpdate.from_bytes(made[0].body("c-x", "u-x", 0))
                assert check.client_id == "c-x" and len(check.tensors) == len(reference)
                version = 0

                async def send(index: int, due: float) -> None:
                    nonlocal version
                    client_id, token = enrolled[index % devices]
                    update_id = uuid.uuid4().hex
                    headers = {"Authorization": f"Bearer {token}", "Content-Type": CONTENT_TYPE}
                    async with sem:
                        if time.perf_counter() > window_end:
                            unsent.append(index)  # still queued when the window closed
                            return
                        # Framed once a connection is free: a backlog of due sends holds no
                        # bodies (an overloaded coordinator would otherwise fill this memory).
                        body = made[index % len(made)].body(client_id, update_id, version)
                        t0 = time.perf_counter()
                        async with session.post(
                            f"{server.url}/v1/updates", data=body, headers=headers
                        ) as resp:
                            text = await resp.read()
                            statuses[resp.status] = statuses.get(resp.status, 0) + 1
                            if resp.status != 202 and resp.status not in samples:
                                samples[resp.status] = text[:300].decode(errors="replace")
                            done = time.perf_counter()
                            if resp.status == 202:
                                acked.append(update_id)
                                latency_due.append(done - due)
                                latency_conn.append(done - t0)
                                version = max(version, int(json.loads(text)["version"]))

                stop = asyncio.Event()

                async def probe_loop() -> None:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        async with probe.get(f"{server.url}/healthz") as resp:
                            await resp.read()
                        health.append((time.monotonic(), time.perf_counter() - t0))
                        await asyncio.sleep(0.1)

                prober = asyncio.create_task(probe_loop())
                tasks = []
                server_cpu0, server_written0 = server.cpu_seconds(), server.write_bytes()
                own_cpu0 = time.process_time()
                load_start = time.perf_counter()
                n = int(rate * seconds)
                # Sends still waiting for a connection 5 s after the last one was due are not
                # made: an overloaded coordinator shows as a low accepted rate, not a run that
                # never ends.
                window_end = load_start + seconds + 5.0
                for i in range(n):
                    due = load_start + i / rate
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(send(i, due)))
                results = await asyncio.gather(*tasks, return_exceptions=True)
                elapsed = time.perf_counter() - load_start
                server_cpu = server.cpu_seconds() - server_cpu0
                server_written = server.write_bytes() - server_written0
                own_cpu = time.process_time() - own_cpu0
                stop.set()
                await prober
                errors = [repr(r) for r in results if isinstance(r, BaseException)]
            peak = server.peak_rss_mb()
        finally:
            server.proc.terminate()
            try:
                server.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.proc.kill()
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            stored = {r[0]: r[1] for r in conn.execute("SELECT update_id, status FROM updates")}
        lost = [u for u in acked if u not in stored]
        in_agg = [
            lat
            for when, lat in health
            if any(start <= when <= end for start, end, _ in server.aggregations)
        ]
        all_health = [lat for _, lat in health]
        return {
            "devices": devices,
            "offered_rate": rate,
            "seconds": elapsed,
            "connections": connections,
            "buffer_size": buffer_size,
            "codec": CODEC,
            "tls": not insecure,
            "update_bytes": len(made[0].body("c-0000000000000000", uuid.uuid4().hex, 0)),
            "join_seconds": join_seconds,
            "offered": n,
            "not_sent_backlog": len(unsent),
            "accepted": len(acked),
            "accepted_per_s": len(acked) / elapsed,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "refusals": {str(k): v for k, v in samples.items()},
            "client_errors": errors[:5],
            "ack_p50_ms": 1000 * percentile(latency_due, 50),
            "ack_p99_ms": 1000 * percentile(latency_due, 99),
            "ack_on_connection_p50_ms": 1000 * percentile(latency_conn, 50),
            "ack_on_connection_p99_ms": 1000 * percentile(latency_conn, 99),
            "healthz_p50_ms": 1000 * percentile(all_health, 50),
            "healthz_max_ms": 1000 * max(all_health, default=float("nan")),
            "healthz_during_aggregation_p99_ms": 1000 * percentile(in_agg, 99),
            "healthz_during_aggregation_max_ms": 1000 * max(in_agg, default=float("nan")),
            "healthz_samples_during_aggregation": len(in_agg),
            "aggregations": len(server.aggregations),
            "aggregation_seconds": [round(end - start, 2) for start, end, _ in server.aggregations],
            "server_peak_rss_mb": peak,
            # CPU per accepted update, all threads: the coordinator's (ingest, TLS, HTTP and
            # aggregation together) and this load generator's (framing, TLS, HTTP); on a shared
            # machine these are steadier than the rate, and 2000 / their sum is the rate 2
            # otherwise idle cores could sustain.
            "server_cpu_ms_per_accepted": 1000 * server_cpu / max(1, len(acked)),
            "loadgen_cpu_ms_per_accepted": 1000 * own_cpu / max(1, len(acked)),
            "server_cpu_utilisation": server_cpu / elapsed,
            "server_disk_write_mb_per_accepted": server_written / 1e6 / max(1, len(acked)),
            "acked_lost": len(lost),
            "acked_dropped_at_aggregation": sum(stored.get(u) == "dropped" for u in acked),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=60.0, help="offered updates per second")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--buffer-size", type=int, default=100, help="FedBuff K")
    parser.add_argument("--connections", type=int, default=24, help="pooled client connections")
    parser.add_argument("--templates", type=int, default=8, help="distinct encoded adapters")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP instead of HTTPS")
    parser.add_argument(
        "--code", type=Path, help="run the coordinator of this checkout (e.g. before a change)"
    )
    args = parser.parse_args()
    if args.code:
        os.environ["FEDLM_LOAD_CODE"] = str(args.code.resolve())
    from edge_sdk.models import resolve

    result = asyncio.run(
        run_load(
            resolve("smollm2-135m"),
            args.devices,
            args.rate,
            args.seconds,
            args.buffer_size,
            args.connections,
            args.templates,
            args.insecure,
        )
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
