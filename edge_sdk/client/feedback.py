"""What the app's users said about its answers: preference pairs and examples, kept on the device.

Two append-only JSONL files in `<state dir>/feedback/`, each in the format its trainer reads:

    preferences.jsonl   {"messages": [...prompt...], "chosen": "...", "rejected": "...",
                         "answer_id": "...", "kind": "...", "time": ...}     (DPO pairs)
    examples.jsonl      {"messages": [...prompt..., {"role": "assistant", "content": "..."}],
                         "answer_id": "...", "kind": "...", "time": ...}     (SFT examples)

What each kind of feedback becomes:

    chosen + rejected         a pair, and the chosen answer as an example
    accepted=True             the answer as an example (a thumbs up)
    accepted=False, edit=...  a pair (the edit over the answer), and the edit as an example
    regenerated=...           a pair (the new answer over the one the user regenerated)

Durability and privacy: the files are created 0600 (and re-chmodded 0600 on every open, so a
umask or an outside chmod does not widen them), opened with O_NOFOLLOW (a planted symlink does
not redirect the user's words), appended with O_APPEND in one write per record and fsync'ed
before `record_feedback` returns; the directory is fsync'ed when a file is created. A crash
mid-write leaves a torn last line: it is closed with a newline before the next append, and
readers skip it. The files never grow past `FeedbackLimits.max_bytes` (`FeedbackFullError`).
Nothing here talks to the network: only the trained adapter update leaves the device
(docs/security/preference-feedback.md).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_sdk.client.errors import ClientError
from edge_sdk.client.state import fsync_dir

log = logging.getLogger(__name__)

FEEDBACK_DIR = "feedback"
PAIRS_NAME = "preferences.jsonl"
EXAMPLES_NAME = "examples.jsonl"
_PRIVATE = 0o600
_ROLES = ("system", "user", "assistant", "tool")


class FeedbackError(ClientError):
    """Feedback that cannot be recorded (an unknown answer, an empty or identical edit)."""


class FeedbackFullError(FeedbackError):
    """The feedback files reached `FeedbackLimits.max_bytes`; nothing more is recorded."""


@dataclass(frozen=True)
class FeedbackLimits:
    """Bounds on what the feedback store keeps on the device."""

    max_bytes: int = 16 << 20
    """Most bytes of both files together (16 MiB: ~10k pairs of chat-sized answers)."""
    max_record_bytes: int = 256 << 10
    """Most bytes of one record (a prompt and its answers)."""

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_record_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1024:
                raise ValueError(f"`{name}` should be an integer >= 1024, got {value!r}")


@dataclass(frozen=True)
class FeedbackCounts:
    """How much feedback the device holds (complete records; torn or bad lines not counted)."""

    pairs: int
    examples: int
    bytes: int


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES or not isinstance(content, str):
            raise FeedbackError(
                f"prompt message {i} should be {{role: one of {', '.join(_ROLES)}, content: str}}, "
                f"got {dict(m)!r:.80}"
            )
        out.append({"role": role, "content": content})
    if not out or out[-1]["role"] not in ("user", "tool"):
        raise FeedbackError(
            "the prompt should end with a user turn (the one the answer replies to)"
        )
    return out


def _check_answer(text: object, name: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise FeedbackError(f"`{name}` should be a non-empty answer text, got {text!r:.60}")
    return text


class FeedbackStore:
    """The append-only feedback files of one state directory (thread-safe)."""

    def __init__(self, state_dir: str | os.PathLike[str], limits: FeedbackLimits | None = None):
        self.dir = Path(state_dir).expanduser() / FEEDBACK_DIR
        self.limits = limits or FeedbackLimits()
        self._lock = threading.Lock()

    @property
    def pairs_path(self) -> Path:
        return self.dir / PAIRS_NAME

    @property
    def examples_path(self) -> Path:
        return self.dir / EXAMPLES_NAME

    # -- writing ------------------------------------------------------------------------------

    def add_pair(
        self,
        messages: Sequence[Mapping[str, Any]],
        chosen: str,
        rejected: str,
        *,
        answer_id: str,
        kind: str,
    ) -> None:
        """Append one preference pair (and nothing else)."""
        prompt = _check_messages(messages)
        chosen, rejected = _check_answer(chosen, "chosen"), _check_answer(rejected, "rejected")
        if chosen.strip() == rejected.strip():
            raise FeedbackError(
                f"answer {answer_id}: the chosen answer equals the rejected one; no preference"
            )
        record = {"messages": prompt, "chosen": chosen, "rejected": rejected,
                  "answer_id": answer_id, "kind": kind, "time": round(time.time(), 3)}  # fmt: skip
        self._append(self.pairs_path, record)

    def add_example(
        self, messages: Sequence[Mapping[str, Any]], answer: str, *, answer_id: str, kind: str
    ) -> None:
        """Append one supervised example: the prompt and the answer the user wanted."""
        prompt = _check_messages(messages)
        answer = _check_answer(answer, "answer")
        record = {"messages": [*prompt, {"role": "assistant", "content": answer}],
                  "answer_id": answer_id, "kind": kind, "time": round(time.time(), 3)}  # fmt: skip
        self._append(self.examples_path, record)

    def _size(self) -> int:
        total = 0
        for path in (self.pairs_path, self.examples_path):
            try:
                total += path.lstat().st_size
            except FileNotFoundError:
                pass
        return total

    def _append(self, path: Path, record: Mapping[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        if len(line) > self.limits.max_record_bytes:
            raise FeedbackError(
                f"one feedback record is {len(line)} bytes, over the limit of "
                f"{self.limits.max_record_bytes} (FeedbackLimits.max_record_bytes); shorten it"
            )
        with self._lock:
            used = self._size()
            if used + len(line) + 1 > self.limits.max_bytes:
                raise FeedbackFullError(
                    f"{self.dir} holds {used} bytes of feedback, the limit is "
                    f"{self.limits.max_bytes} (FeedbackLimits.max_bytes): nothing more is "
                    "recorded until forget_feedback() clears it or the limit is raised"
                )
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            created = not path.exists()
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
            try:
                fd = os.open(path, flags, _PRIVATE)
            except OSError as exc:
                raise FeedbackError(
                    f"{path}: cannot open the feedback file ({exc.strerror}); a symlink "
                    "there is refused"
                ) from None
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise FeedbackError(f"{path}: not a regular file; move it away")
                os.fchmod(fd, _PRIVATE)
                if info.st_size and not self._ends_with_newline(fd, info.st_size):
                    line = b"\n" + line  # close a torn last line (a crash mid-write)
                written = os.write(fd, line)
                if written != len(line):  # a full disk: the partial line is a torn line
                    raise FeedbackError(f"{path}: short write ({written} of {len(line)} bytes)")
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.dir)

    @staticmethod
    def _ends_with_newline(fd: int, size: int) -> bool:
        return os.pread(fd, 1, size - 1) == b"\n"

    # -- reading ------------------------------------------------------------------------------

    def _records(self, path: Path) -> list[dict[str, Any]]:
        """The complete, well-formed records of `path` (torn and bad lines skipped, logged)."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return []
        out: list[dict[str, Any]] = []
        lines = raw.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        bad = 0
        for i, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                bad += 1
                continue
            if isinstance(record, dict):
                out.append(record)
            else:
                bad += 1
        if bad:
            log.warning("%s: skipped %d torn or malformed feedback lines", path, bad)
        return out

    def pair_records(self) -> list[dict[str, Any]]:
        return self._records(self.pairs_path)

    def example_records(self) -> list[dict[str, Any]]:
        return self._records(self.examples_path)

    def pairs(self) -> list[Any]:
        """The recorded pairs as `PreferencePair`s (training side; records that fail its
        checks are skipped with a warning, never trained on)."""
        from edge_sdk.training.errors import DataFormatError
        from edge_sdk.training.preferences import parse_pair

        out = []
        for i, record in enumerate(self.pair_records(), 1):
            try:
                out.append(parse_pair(record, f"{self.pairs_path}:record {i}"))
            except DataFormatError as exc:
                log.warning("skipping a feedback pair: %s", exc)
        return out

    def examples_snapshot(self, directory: Path) -> Path | None:
        """The recorded examples as a clean chat JSONL in `directory` (0600, rewritten each
        time: torn lines and the bookkeeping fields left out), or None when there are none."""
        records = self.example_records()
        if not records:
            return None
        from edge_sdk.client.state import atomic_write

        lines = [
            json.dumps({"messages": r.get("messages")}, ensure_ascii=False) + "\n" for r in records
        ]
        path = Path(directory) / "feedback-examples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, "".join(lines).encode(), mode=_PRIVATE)
        return path

    def counts(self) -> FeedbackCounts:
        with self._lock:
            return FeedbackCounts(
                len(self.pair_records()), len(self.example_records()), self._size()
            )

    def forget(self) -> None:
        """Delete all recorded feedback (the user's choice; durable)."""
        with self._lock:
            for path in (self.pairs_path, self.examples_path):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
            if self.dir.exists():
                fsync_dir(self.dir)


def _resolve(
    runtime: Any, answer: Any, messages: Sequence[Mapping[str, Any]] | None
) -> tuple[str, list[dict[str, str]], str | None]:
    """(answer id, prompt, answer text or None) of an `Answer`, an `AnswerStream` or an id."""
    record = getattr(answer, "record", None)  # an Answer carries its record
    answer_id = str(getattr(answer, "id", answer))
    unknown = "no runtime is attached to this client"
    if record is None and runtime is not None and hasattr(runtime, "answer"):
        try:  # an id, or an AnswerStream once it was read to the end
            record = runtime.answer(answer_id)
        except KeyError as exc:
            unknown = str(exc.args[0])
    if record is not None:
        return answer_id, list(record.messages), record.text
    if messages is None:
        raise FeedbackError(f"answer {answer_id!r}: {unknown}; pass messages= (the prompt)")
    return answer_id, _check_messages(messages), None


def record_answer_feedback(
    store: FeedbackStore,
    runtime: Any,
    answer: Any,
    *,
    chosen: str | None = None,
    rejected: str | None = None,
    accepted: bool | None = None,
    edit: str | None = None,
    regenerated: Any = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
) -> FeedbackCounts:
    """Turn one piece of user feedback into pairs and examples (see the module docstring)."""
    answer_id, prompt, text = _resolve(runtime, answer, messages)
    kinds = (
        chosen is not None or rejected is not None,
        accepted is not None,
        regenerated is not None,
    )
    if sum(kinds) != 1 or (edit is not None and accepted is not False):
        raise FeedbackError(
            "give one kind of feedback: chosen= and rejected=, accepted=True, "
            "accepted=False with edit=, or regenerated="
        )
    if chosen is not None or rejected is not None:
        chosen = chosen if chosen is not None else text
        rejected = rejected if rejected is not None else text
        if chosen is None or rejected is None:
            raise FeedbackError(f"answer {answer_id}: give both chosen= and rejected=")
        store.add_pair(prompt, chosen, rejected, answer_id=answer_id, kind="pair")
        store.add_example(prompt, chosen, answer_id=answer_id, kind="pair")
    elif accepted is True:
        if text is None:
            raise FeedbackError(f"answer {answer_id}: its text is unknown; pass chosen=")
        store.add_example(prompt, text, answer_id=answer_id, kind="accepted")
    elif accepted is False:
        if edit is None:
            raise FeedbackError(
                f"answer {answer_id}: a thumbs down alone makes no pair; give the user's "
                "edit= or the regenerated= answer they kept"
            )
        if text is None:
            raise FeedbackError(
                f"answer {answer_id}: its text is unknown; pass chosen= and rejected="
            )
        store.add_pair(prompt, edit, text, answer_id=answer_id, kind="edit")
        store.add_example(prompt, edit, answer_id=answer_id, kind="edit")
    else:
        new_id, new_prompt, new_text = _resolve(runtime, regenerated, None)
        if new_prompt != prompt:
            raise FeedbackError(
                f"answer {new_id} does not regenerate answer {answer_id}: their prompts differ"
            )
        if text is None or new_text is None:
            raise FeedbackError(f"answers {answer_id}, {new_id}: their texts are unknown")
        store.add_pair(prompt, new_text, text, answer_id=answer_id, kind="regenerated")
    counts = store.counts()
    log.info("feedback on answer %s recorded on this device (%d pairs, %d examples held)",
             answer_id, counts.pairs, counts.examples)  # fmt: skip
    return counts
