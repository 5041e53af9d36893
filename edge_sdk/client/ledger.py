"""The outbox ledger: one JSON line per request that leaves the device, written before it is sent.

The file is `<state dir>/outbox.jsonl`. Each line is one request attempt (a retry is a new
line, because its bytes leave the device again):

    seq           1, 2, 3, ... in file order
    time          Unix time (seconds) when the request was about to be sent
    method, url   HTTP method and full URL (the destination)
    kind          join | task | adapter | update | status
    bytes         size of the request body (0 for a GET)
    sha256        sha256 of the body, hex (so a captured packet can be matched to its line)
    content_type  the body's media type, or null
    attempt       1 for the first try, 2... for retries of the same request
    detail        what the body says, without payload bytes: for an update, its id, base version,
                  codec, metrics, example counts and every tensor's name, shape and encoded size;
                  for a join, the device name (the join token is never written here)

Appends are fsync'ed before the request goes out, so after a crash the ledger still lists
everything that may have been sent. A torn last line (power loss mid-write) is skipped on
reading. The file is created 0600: URLs and device names are nobody else's business.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.wire import AdapterUpdate

log = logging.getLogger(__name__)

LEDGER_NAME = "outbox.jsonl"
KINDS = ("join", "task", "adapter", "update", "status")


@dataclass(frozen=True)
class LedgerEntry:
    """One request as it was about to leave the device (see the module docstring)."""

    seq: int
    time: float
    method: str
    url: str
    kind: str
    bytes: int
    sha256: str
    content_type: str | None = None
    attempt: int = 1
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any]) -> LedgerEntry:
        return cls(
            seq=int(obj["seq"]),
            time=float(obj["time"]),
            method=str(obj["method"]),
            url=str(obj["url"]),
            kind=str(obj["kind"]),
            bytes=int(obj["bytes"]),
            sha256=str(obj["sha256"]),
            content_type=obj.get("content_type"),
            attempt=int(obj.get("attempt", 1)),
            detail=dict(obj.get("detail") or {}),
        )


def describe_update(update: AdapterUpdate) -> dict[str, Any]:
    """Everything an update carries except the tensor payloads (names, shapes, sizes instead)."""
    return {
        "update_id": update.update_id,
        "client_id": update.client_id,
        "base_version": update.base_version,
        "model_sha256": update.model_sha256,
        "lora": update.lora.to_obj(),
        "codec": update.codec,
        "num_examples": update.num_examples,
        "num_tokens": update.num_tokens,
        "metrics": dict(update.metrics),
        "tensors": [
            {"name": name, "shape": list(t.shape), "encoded_bytes": t.nbytes}
            for name, t in sorted(update.tensors.items())
        ],
    }


class Ledger:
    """Append-only JSONL ledger of outgoing requests; safe to share between threads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seq: int | None = None

    def record(
        self,
        *,
        method: str,
        url: str,
        kind: str,
        body: bytes = b"",
        content_type: str | None = None,
        attempt: int = 1,
        detail: Mapping[str, Any] | None = None,
    ) -> LedgerEntry:
        """Append one line and fsync it; call this before the bytes are handed to the socket."""
        if kind not in KINDS:
            raise ValueError(f"`kind` should be one of {', '.join(KINDS)}, got {kind!r}")
        with self._lock:
            if self._seq is None:
                self._seq = max((e.seq for e in self.entries()), default=0)
            self._seq += 1
            entry = LedgerEntry(
                seq=self._seq,
                time=time.time(),
                method=method,
                url=url,
                kind=kind,
                bytes=len(body),
                sha256=hashlib.sha256(body).hexdigest(),
                content_type=content_type,
                attempt=attempt,
                detail=dict(detail or {}),
            )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (entry.to_json() + "\n").encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        log.debug("ledger #%d: %s %s (%d bytes)", entry.seq, method, url, entry.bytes)
        return entry

    def entries(self) -> list[LedgerEntry]:
        """Every readable line, in order (a torn or foreign line is skipped with a warning)."""
        if not self.path.exists():
            return []
        out: list[LedgerEntry] = []
        with self.path.open("r", encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    out.append(LedgerEntry.from_obj(json.loads(line)))
                except (ValueError, KeyError, TypeError):
                    log.warning("%s:%d: unreadable ledger line skipped", self.path, number)
        return out


def summarise(entries: Iterable[LedgerEntry]) -> dict[str, Any]:
    """Totals per kind and destination, and every tensor name that ever left in an update."""
    by_kind: dict[str, dict[str, int]] = {}
    destinations: dict[str, int] = {}
    tensors: dict[str, list[int]] = {}
    update_ids: set[str] = set()
    first = last = None
    count = total = 0
    for e in entries:
        count += 1
        total += e.bytes
        first = e.time if first is None else min(first, e.time)
        last = e.time if last is None else max(last, e.time)
        k = by_kind.setdefault(e.kind, {"requests": 0, "bytes": 0})
        k["requests"] += 1
        k["bytes"] += e.bytes
        origin = e.url.split("/v1/", 1)[0]
        destinations[origin] = destinations.get(origin, 0) + 1
        if e.kind == "update":
            if "update_id" in e.detail:
                update_ids.add(str(e.detail["update_id"]))
            for t in e.detail.get("tensors", []):
                tensors[str(t["name"])] = list(t["shape"])
    return {
        "requests": count,
        "bytes": total,
        "first": first,
        "last": last,
        "by_kind": by_kind,
        "destinations": destinations,
        "distinct_updates": len(update_ids),
        "tensor_names": sorted(tensors),
        "tensor_shapes": tensors,
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """Human-readable lines of a `summarise` result (for `fedlm ledger`)."""
    if not summary["requests"]:
        return "no request has left this device"
    when = (
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(summary['first']))} .. "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(summary['last']))}"
    )
    lines = [f"{summary['requests']} requests, {summary['bytes']} body bytes, {when}"]
    for kind, k in sorted(summary["by_kind"].items()):
        lines.append(f"  {kind:<8} {k['requests']:>6} requests {k['bytes']:>12} bytes")
    for dest, n in sorted(summary["destinations"].items()):
        lines.append(f"  to {dest}: {n} requests")
    names = summary["tensor_names"]
    if names:
        lines.append(
            f"  updates: {summary['distinct_updates']} distinct ids carrying only LoRA tensors "
            f"({len(names)} names, e.g. {names[0]}) and metrics"
        )
    return "\n".join(lines)
