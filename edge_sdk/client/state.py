"""The client's state directory: everything that must survive a crash or a Ctrl-C.

    <state dir>/
      client.lock        advisory lock: one client per state directory
      token.json         client id + bearer token from /v1/join, and the coordinator's
                         certificate pin (trust on first use) (0600, never logged)
      encoder.npz        codec error-feedback residual and delta reference (UpdateEncoder.save)
      encoder.next.npz   the residual after the pending update; becomes encoder.npz once
                         pending.json is written (its commit point)
      pending.bin/.json  an encoded update that was built but not yet acknowledged, with its id
      global.bin/.json   the last global adapter received (wire bytes), its version, ETag, sha256
      adapters/          GGUF LoRA files of global versions, for the local runtime
      train/             checkpoint.pt of the round in progress and round.json (its base version)
      progress.json      rounds this client settled for the task, the last base version and
                         the id of the last settled update
      outbox.jsonl       the outbox ledger (`edge_sdk.client.ledger`)

Every file is written to a temporary name, fsync'ed, renamed (atomic on POSIX) and its
directory fsync'ed, so a kill or a power cut leaves the old version or the new one, never a
torn file. A file that is nevertheless unreadable (disk corruption, a hand edit) is set aside
as `<name>.corrupt-<UTC time>` with a warning and the client carries on without it: a corrupt
file never stops every later start.

Order of the writes of one round, and what a kill at each point leaves (the crash points
named in quotes are where `$FEDLM_CRASH_AT` kills the process, see `crash_point`):

    start_round            train/base.bin, train/round.json           "round_started"
    training               train/checkpoint.pt every few steps        (resumed from it)
    save_pending           pending.bin, encoder.next.npz, pending.json "update_committed"
                           then encoder.next.npz -> encoder.npz       "update_saved"
    finish_round           train/* deleted (round.json first)         "round_finished"
    push                   the coordinator acknowledges               "update_acked"
    settle                 progress.json (count, base, update id)     "progress_saved"
                           then pending.* deleted                     "settled"
    save_global            global.bin, then global.json (its sha256)  "global_body_saved"

A restart resends a pending update byte for byte (the coordinator answers 409 duplicate if it
has it); progress.json names the last settled update, so a pending update that was already
counted is only cleared, never counted twice; and the base version of the last settled update
is never trained from again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing_extensions import Self

from edge_sdk.client.errors import StateError
from edge_sdk.client.ledger import LEDGER_NAME, Ledger
from edge_sdk.env import CRASH_ENV
from edge_sdk.wire import UpdateEncoder

log = logging.getLogger(__name__)

_PRIVATE = 0o600
_KEEP_CORRUPT = 3
"""Set-aside copies kept per file name (older ones are deleted)."""

"""Crash injection for the kill-at-every-step tests (tests/client/test_crash_points.py)."""


def crash_point(name: str) -> None:
    """A documented crash-injection point: SIGKILL this process here if `$FEDLM_CRASH_AT` is `name`.

    The points are listed in the module docstring. Anyone who can set this process's
    environment can kill it anyway, so the hook grants nothing; unset, it costs one lookup.
    """
    if os.environ.get(CRASH_ENV) == name:
        log.warning("crash injection: killing this process at %r", name)
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(directory: Path) -> None:
    """Make renames and deletions in `directory` durable (POSIX: fsync the directory itself)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` via a fsync'ed temporary file and a rename; the file gets `mode`.

    The directory is fsync'ed after the rename: without it a power cut can lose the rename
    (the new name may point to nothing, or to the old file, after a reboot).
    """
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
    fsync_dir(path.parent)


def set_aside(path: Path, why: str) -> Path | None:
    """Rename an unusable state file to `<name>.corrupt-<UTC time>` (kept for inspection), log it.

    Returns the new path, or None when the file was already gone. Only the newest
    `_KEEP_CORRUPT` set-aside copies of one name are kept.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    try:
        os.replace(path, dest)
    except FileNotFoundError:
        return None
    fsync_dir(path.parent)
    log.warning("%s: %s; set aside as %s, carrying on without it", path, why, dest.name)
    for old in sorted(path.parent.glob(f"{path.name}.corrupt-*"))[:-_KEEP_CORRUPT]:
        old.unlink(missing_ok=True)
    return dest


def _unlink(*paths: Path) -> None:
    """Delete files and make the deletion durable (one directory fsync per directory)."""
    dirs = set()
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        dirs.add(path.parent)
    for directory in dirs:
        fsync_dir(directory)


@dataclass(frozen=True)
class Progress:
    """How far this client got in a task (progress.json)."""

    rounds: int = 0
    """Updates of this client that the coordinator accepted (or already had)."""
    last_base: int = -1
    """Global version the last settled update was trained from (-1: none yet)."""
    last_update: str | None = None
    """Id of the last settled update: a pending update with this id was already counted."""


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

    def open(self) -> Self:
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
        self.recover()
        return self

    def recover(self) -> None:
        """Finish or undo what a kill interrupted (call with the lock held; `open` does).

        - `encoder.next.npz` becomes `encoder.npz` if its pending update was committed
          (pending.json readable), else it is dropped: the update it belongs to was never
          recorded, and the round that made it is resumed and encoded again.
        - Temporary files of interrupted atomic writes are deleted.
        """
        nxt = self.dir / "encoder.next.npz"
        if nxt.exists():
            if self.pending() is not None:
                os.replace(nxt, self.dir / "encoder.npz")
                fsync_dir(self.dir)
                log.info("recovered the codec residual of the pending update")
            else:
                _unlink(nxt)
        for directory in (self.dir, self.train_dir):
            if directory.is_dir():
                stale = [p for p in directory.glob("*.tmp") if p.is_file()]
                if stale:
                    _unlink(*stale)

    def close(self) -> None:
        """Release the lock; safe to call twice."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------------

    def _read_json(self, name: str) -> dict[str, Any] | None:
        """The JSON object in `name`; None when absent, or corrupt (then it is set aside)."""
        path = self.dir / name
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:  # permissions, I/O error: not ours to rename away
            raise StateError(
                f"{path}: unreadable ({exc.strerror}); check its permissions"
            ) from None
        try:
            obj = json.loads(raw.decode("utf-8"))
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            set_aside(path, f"not valid JSON ({exc})")
            return None
        if not isinstance(obj, dict):
            set_aside(path, f"expected a JSON object, got {type(obj).__name__}")
            return None
        return obj

    def _write_json(self, name: str, obj: dict[str, Any], mode: int = 0o644) -> None:
        atomic_write(
            self.dir / name, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), mode
        )

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
        """The persisted encoder if it uses `codec`, else a fresh one (residual of another codec
        is useless).

        A damaged file (empty, truncated zip, bad arrays) is set aside: losing the residual
        costs one round of error feedback, while failing here would stop every start.
        """
        path = self.dir / "encoder.npz"
        if path.exists():
            try:
                encoder = UpdateEncoder.load(path)
            except Exception as exc:  # noqa: BLE001 - np.load raises EOFError, BadZipFile, ValueError, ...
                set_aside(
                    path,
                    f"unreadable codec state ({type(exc).__name__}: "
                    f"{exc}); the residual restarts at 0",
                )
            else:
                if str(encoder.codec) == codec:
                    return encoder
                log.info("codec changed from %s to %s; residual dropped", encoder.codec, codec)
        return UpdateEncoder(codec)

    def save_encoder(self, encoder: UpdateEncoder) -> None:
        encoder.save(self.dir / "encoder.npz")  # fsyncs the file and the directory

    # -- pending update ---------------------------------------------------------------------

    def pending(self) -> PendingUpdate | None:
        """The committed, unacknowledged update; a damaged one is set aside (it cannot be sent)."""
        meta = self._read_json("pending.json")
        body_path = self.dir / "pending.bin"
        if meta is None:
            _unlink(body_path)  # a body without its record was never committed (or is cleared)
            return None
        try:
            body = body_path.read_bytes()
        except FileNotFoundError:
            body = None
        try:
            if body is None or hashlib.sha256(body).hexdigest() != meta.get("sha256"):
                raise ValueError("its body is missing or does not match the recorded sha256")
            return PendingUpdate(
                str(meta["update_id"]), int(meta["base_version"]), str(meta["task_id"]), body
            )
        except (KeyError, TypeError, ValueError) as exc:
            why = (
                str(exc)
                if isinstance(exc, ValueError)
                else f"bad record ({type(exc).__name__}: {exc})"
            )
            set_aside(self.dir / "pending.json", f"pending update unusable: {why}")
            if body is not None:
                set_aside(body_path, "body of an unusable pending update")
            return None

    def save_pending(self, pending: PendingUpdate, encoder: UpdateEncoder | None = None) -> None:
        """Commit an encoded update (and the codec residual after it) before anything is sent.

        Body first, then the residual as encoder.next.npz, then the record that makes both
        count (pending.json, the commit point), then the residual takes its place. A kill
        before the record leaves neither; after it, `recover` finishes the residual's move.
        """
        atomic_write(self.dir / "pending.bin", pending.body, _PRIVATE)
        if encoder is not None:
            encoder.save(self.dir / "encoder.next.npz")
        self._write_json(
            "pending.json",
            {"update_id": pending.update_id, "base_version": pending.base_version,
             "task_id": pending.task_id, "sha256": hashlib.sha256(pending.body).hexdigest(),
             "bytes": len(pending.body)},
            mode=_PRIVATE,
        )  # fmt: skip
        crash_point("update_committed")
        if encoder is not None:
            os.replace(self.dir / "encoder.next.npz", self.dir / "encoder.npz")
            fsync_dir(self.dir)

    def clear_pending(self) -> None:
        # The record first: without it a leftover body is ignored (and overwritten next time).
        _unlink(self.dir / "pending.json")
        _unlink(self.dir / "pending.bin")

    # -- global adapter ---------------------------------------------------------------------

    def global_adapter(self, task_id: str | None = None) -> tuple[bytes, int, str] | None:
        """(wire bytes, version, ETag) of the last global adapter received (of `task_id`, if given).

        A record that does not match its body (a kill between the two writes, corruption) is
        set aside with the body; the adapter is simply fetched again.
        """
        meta = self._read_json("global.json")
        path = self.dir / "global.bin"
        if meta is None:
            _unlink(path)  # a body without its record: fetched again
            return None
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            body = None
        try:
            if body is None or hashlib.sha256(body).hexdigest() != meta["sha256"]:
                raise ValueError("its body is missing or does not match the recorded sha256")
            version, etag, owner = int(meta["version"]), str(meta["etag"]), str(meta["task_id"])
        except (KeyError, TypeError, ValueError) as exc:
            self.set_aside_global(f"saved global adapter unusable ({type(exc).__name__}: {exc})")
            return None
        if task_id is not None and owner != task_id:
            return None
        return body, version, etag

    def save_global(self, body: bytes, version: int, etag: str, task_id: str) -> None:
        atomic_write(self.dir / "global.bin", body)
        crash_point("global_body_saved")
        self._write_json(
            "global.json",
            {
                "version": version,
                "etag": etag,
                "task_id": task_id,
                "sha256": hashlib.sha256(body).hexdigest(),
            },
        )

    def set_aside_global(self, why: str) -> None:
        """Move the saved global adapter out of the way (it failed its checks or is damaged)."""
        set_aside(self.dir / "global.json", why)
        set_aside(self.dir / "global.bin", "body of the set-aside global adapter")

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
        try:
            return RoundMarker(
                str(obj["task_id"]), int(obj["base_version"]), int(obj["round"]), int(obj["seed"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            set_aside(
                self.train_dir / "round.json", f"bad round marker ({type(exc).__name__}: {exc})"
            )
            return None

    def base_body(self) -> bytes | None:
        path = self.train_dir / "base.bin"
        return path.read_bytes() if path.exists() else None

    def start_round(self, marker: RoundMarker, base_body: bytes) -> None:
        """Record the round's base adapter before training, and drop an older checkpoint."""
        _unlink(self.checkpoint_path)
        atomic_write(self.train_dir / "base.bin", base_body)
        self._write_json(
            "train/round.json",
            {"task_id": marker.task_id, "base_version": marker.base_version, "round": marker.round,
             "seed": marker.seed},
        )  # fmt: skip

    def finish_round(self) -> None:
        # The marker first: a kill part-way leaves no marker, so nothing resumes a finished round.
        _unlink(self.train_dir / "round.json")
        _unlink(self.checkpoint_path, self.train_dir / "base.bin")

    # -- progress ---------------------------------------------------------------------------

    def progress(self, task_id: str) -> Progress:
        """This client's progress in `task_id` (nothing yet for another task or a damaged file)."""
        obj = self._read_json("progress.json") or {}
        if obj.get("task_id") != task_id:
            return Progress()
        try:
            last = obj.get("last_update")
            return Progress(
                int(obj.get("rounds", 0)),
                int(obj.get("last_base", -1)),
                None if last is None else str(last),
            )
        except (TypeError, ValueError) as exc:
            set_aside(self.dir / "progress.json", f"bad progress record ({exc})")
            return Progress()

    def rounds_done(self, task_id: str) -> int:
        return self.progress(task_id).rounds

    def last_base(self, task_id: str) -> int:
        """The global version the last settled update was trained from (-1: none yet)."""
        return self.progress(task_id).last_base

    def set_progress(
        self, task_id: str, rounds: int, last_base: int, last_update: str | None = None
    ) -> None:
        self._write_json(
            "progress.json",
            {
                "task_id": task_id,
                "rounds": rounds,
                "last_base": last_base,
                "last_update": last_update,
            },
        )

    def settle(self, pending: PendingUpdate, counted: bool) -> Progress:
        """Record that the coordinator settled `pending`, then drop it: one step, crash-safe.

        Progress is written first and names the update, so a kill before the pending files
        are gone leaves an update that `pending()` still returns but that is known to be
        counted (its id is `last_update`): it is then cleared, not counted again.
        """
        before = self.progress(pending.task_id)
        if before.last_update == pending.update_id:
            self.clear_pending()
            return before
        after = Progress(before.rounds + int(counted), pending.base_version, pending.update_id)
        self.set_progress(pending.task_id, after.rounds, after.last_base, after.last_update)
        crash_point("progress_saved")
        self.clear_pending()
        crash_point("settled")
        return after
