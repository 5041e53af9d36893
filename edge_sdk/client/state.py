"""The client's state directory: everything that must survive a crash or a Ctrl-C.

    <state dir>/
      client.lock        advisory lock: one client per state directory
      token.json         client id + bearer token from /v1/join, and the coordinator's
                         certificate pin (trust on first use) (0600, never logged)
      encoder.npz        codec error-feedback residual and delta reference (UpdateEncoder.save)
      pending.bin/.json  an encoded update that was built but not yet acknowledged, with its id
      global.bin/.json   the last global adapter received (wire bytes), its version and ETag
      adapters/          GGUF LoRA files of global versions, for the local runtime
      train/             checkpoint.pt of the round in progress and round.json (its base version)
      progress.json      rounds this client finished for the task
      outbox.jsonl       the outbox ledger (`edge_sdk.client.ledger`)

Every file is written to a temporary name and renamed (atomic on POSIX), so a kill leaves the
old version or the new one, never a torn file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_sdk.client.errors import StateError
from edge_sdk.client.ledger import LEDGER_NAME, Ledger
from edge_sdk.wire import UpdateEncoder

log = logging.getLogger(__name__)

_PRIVATE = 0o600


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` via a fsync'ed temporary file and a rename; the file gets `mode`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # before any byte is written: a token is never world-readable
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Credentials:
    """What /v1/join returned, tied to the coordinator and task it came from."""

    coordinator: str
    """Base URL the client joined (the token is valid there only)."""
    client_id: str
    token: str
    task_id: str
    name: str
    tls_fingerprint: str | None = None
    """SHA-256 of the certificate the client enrolled with (the pin, checked on every
    connection); None for a plain-HTTP coordinator (`--insecure`)."""

    def __repr__(self) -> str:  # keep the bearer token out of logs and tracebacks
        return (
            f"Credentials(coordinator={self.coordinator!r}, client_id={self.client_id!r}, "
            f"task_id={self.task_id!r}, tls_fingerprint={self.tls_fingerprint!r})"
        )


@dataclass(frozen=True)
class PendingUpdate:
    """An encoded update waiting for its acknowledgement; resent byte for byte (same id)."""

    update_id: str
    base_version: int
    task_id: str
    body: bytes


@dataclass(frozen=True)
class RoundMarker:
    """Which round the training checkpoint belongs to, so a resume trains from the same base."""

    task_id: str
    base_version: int
    round: int
    seed: int


class ClientState:
    """Typed access to one state directory; `open()` takes the directory's lock."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory).expanduser()
        self.ledger = Ledger(self.dir / LEDGER_NAME)
        self._lock_fd: int | None = None

    # -- lifetime ---------------------------------------------------------------------------

    def open(self) -> ClientState:
        """Create the directory (0700) and lock it; `StateError` if another client holds it."""
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if self._lock_fd is not None:
            return self
        fd = os.open(self.dir / "client.lock", os.O_RDWR | os.O_CREAT, _PRIVATE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateError(f"{self.dir} is in use by another fedlm client") from None
        self._lock_fd = fd
        return self

    def close(self) -> None:
        """Release the lock; safe to call twice."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> ClientState:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------------

    def _read_json(self, name: str) -> dict[str, Any] | None:
        path = self.dir / name
        if not path.exists():
            return None
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StateError(f"{path}: unreadable ({exc}); delete it to start afresh") from None
        if not isinstance(obj, dict):
            raise StateError(f"{path}: expected a JSON object")
        return obj

    def _write_json(self, name: str, obj: dict[str, Any], mode: int = 0o644) -> None:
        atomic_write(self.dir / name, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), mode)

    # -- credentials ------------------------------------------------------------------------

    @property
    def token_path(self) -> Path:
        return self.dir / "token.json"

    def credentials(self, coordinator: str | None = None) -> Credentials | None:
        """The stored credentials, or None (also when they were issued at another URL)."""
        obj = self._read_json("token.json")
        if obj is None:
            return None
        try:
            pin = obj.get("tls_fingerprint")
            creds = Credentials(
                str(obj["coordinator"]), str(obj["client_id"]), str(obj["token"]),
                str(obj["task_id"]), str(obj.get("name", "")), str(pin) if pin else None,
            )  # fmt: skip
        except KeyError as exc:
            raise StateError(f"{self.token_path}: missing {exc}") from None
        if coordinator is not None and creds.coordinator.rstrip("/") != coordinator.rstrip("/"):
            return None
        return creds

    def save_credentials(self, creds: Credentials) -> None:
        self._write_json(
            "token.json",
            {"coordinator": creds.coordinator, "client_id": creds.client_id, "token": creds.token,
             "task_id": creds.task_id, "name": creds.name,
             "tls_fingerprint": creds.tls_fingerprint},
            mode=_PRIVATE,
        )  # fmt: skip

    def forget_credentials(self) -> None:
        self.token_path.unlink(missing_ok=True)

    # -- codec state ------------------------------------------------------------------------

    def load_encoder(self, codec: str) -> UpdateEncoder:
        """The persisted encoder if it uses `codec`, else a fresh one (residual of another codec is useless)."""
        path = self.dir / "encoder.npz"
        if path.exists():
            try:
                encoder = UpdateEncoder.load(path)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("%s unreadable (%s); starting with an empty residual", path, exc)
            else:
                if str(encoder.codec) == codec:
                    return encoder
                log.info("codec changed from %s to %s; residual dropped", encoder.codec, codec)
        return UpdateEncoder(codec)

    def save_encoder(self, encoder: UpdateEncoder) -> None:
        encoder.save(self.dir / "encoder.npz")

    # -- pending update ---------------------------------------------------------------------

    def pending(self) -> PendingUpdate | None:
        meta = self._read_json("pending.json")
        body_path = self.dir / "pending.bin"
        if meta is None or not body_path.exists():
            return None
        body = body_path.read_bytes()
        if hashlib.sha256(body).hexdigest() != meta.get("sha256"):
            log.warning("pending update body does not match its record; dropped")
            self.clear_pending()
            return None
        return PendingUpdate(str(meta["update_id"]), int(meta["base_version"]), str(meta["task_id"]), body)

    def save_pending(self, pending: PendingUpdate) -> None:
        # Body first, then the record that makes it count: a crash in between leaves no pending.
        atomic_write(self.dir / "pending.bin", pending.body, _PRIVATE)
        self._write_json(
            "pending.json",
            {"update_id": pending.update_id, "base_version": pending.base_version,
             "task_id": pending.task_id, "sha256": hashlib.sha256(pending.body).hexdigest(),
             "bytes": len(pending.body)},
            mode=_PRIVATE,
        )  # fmt: skip

    def clear_pending(self) -> None:
        (self.dir / "pending.json").unlink(missing_ok=True)
        (self.dir / "pending.bin").unlink(missing_ok=True)

    # -- global adapter ---------------------------------------------------------------------

    def global_adapter(self) -> tuple[bytes, int, str] | None:
        """(wire bytes, version, ETag) of the last global adapter received."""
        meta = self._read_json("global.json")
        path = self.dir / "global.bin"
        if meta is None or not path.exists():
            return None
        return path.read_bytes(), int(meta["version"]), str(meta["etag"])

    def save_global(self, body: bytes, version: int, etag: str, task_id: str) -> None:
        atomic_write(self.dir / "global.bin", body)
        self._write_json("global.json", {"version": version, "etag": etag, "task_id": task_id})

    def adapter_gguf_path(self, version: int) -> Path:
        return self.dir / "adapters" / f"global-v{version:06d}.gguf"

    def prune_adapters(self, keep: Path) -> None:
        """Delete GGUF files of older versions (the runtime has the newest one open)."""
        for path in (self.dir / "adapters").glob("global-v*.gguf"):
            if path != keep:
                path.unlink(missing_ok=True)

    # -- training checkpoint ----------------------------------------------------------------

    @property
    def train_dir(self) -> Path:
        return self.dir / "train"

    @property
    def checkpoint_path(self) -> Path:
        return self.train_dir / "checkpoint.pt"

    def round_marker(self) -> RoundMarker | None:
        obj = self._read_json("train/round.json")
        if obj is None:
            return None
        return RoundMarker(str(obj["task_id"]), int(obj["base_version"]), int(obj["round"]), int(obj["seed"]))

    def base_body(self) -> bytes | None:
        path = self.train_dir / "base.bin"
        return path.read_bytes() if path.exists() else None

    def start_round(self, marker: RoundMarker, base_body: bytes) -> None:
        """Record the round's base adapter before training, and drop an older checkpoint."""
        self.checkpoint_path.unlink(missing_ok=True)
        atomic_write(self.train_dir / "base.bin", base_body)
        self._write_json(
            "train/round.json",
            {"task_id": marker.task_id, "base_version": marker.base_version, "round": marker.round,
             "seed": marker.seed},
        )  # fmt: skip

    def finish_round(self) -> None:
        for name in ("checkpoint.pt", "round.json", "base.bin"):
            (self.train_dir / name).unlink(missing_ok=True)

    # -- progress ---------------------------------------------------------------------------

    def rounds_done(self, task_id: str) -> int:
        obj = self._read_json("progress.json") or {}
        return int(obj.get("rounds", 0)) if obj.get("task_id") == task_id else 0

    def last_base(self, task_id: str) -> int:
        """The global version the last settled update was trained from (-1: none yet)."""
        obj = self._read_json("progress.json") or {}
        return int(obj.get("last_base", -1)) if obj.get("task_id") == task_id else -1

    def set_progress(self, task_id: str, rounds: int, last_base: int) -> None:
        self._write_json("progress.json", {"task_id": task_id, "rounds": rounds, "last_base": last_base})
