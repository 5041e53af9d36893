"""Training data: parse, tokenize with the model's vocabulary, mask, split, pack, batch.

Formats (one file may mix the JSONL kinds line by line):

- JSONL chat, `{"messages": [{"role": "user", "content": "..."}, ...]}`: rendered with the
  GGUF's chat template; loss on the assistant turns only (content and end-of-turn marker);
- JSONL instruction, `{"prompt": "...", "completion": "..."}`: rendered as one user/assistant
  exchange when the model has a chat template, else `prompt + completion + EOS`; loss on the
  completion only;
- JSONL text, `{"text": "..."}`, and plain text files (`.txt`, `.md` or any other suffix;
  paragraphs split on blank lines): loss on every token.

Files whose format is obvious from the suffix are read as that format, never as plain text:

- `.json`: one JSON array of the JSONL objects above (or one such object). A `.json` file
  that holds one object per line is JSONL under another name and is read as such;
- `.csv` / `.tsv`: a header row naming `prompt` and `completion` columns, or a `text` column;
  each later row is one example. Other columns are refused with the columns found.

Anything else that looks like JSON (a plain-text file whose first line is a JSONL object) is
refused with a hint to rename it, because training on JSON syntax is never what was meant.

Assistant spans are found on the rendered text: the template renders the conversation up to
assistant turn i with the generation prompt (P_i) and through turn i (F_i); the span is
[len(P_i), len(F_i)) of the full rendering. The whole rendering is tokenized once and span
boundaries are mapped to tokens by tokenizing the prefixes, so the prompt part is tokenized
exactly as inference tokenizes that prompt.

Examples are split into train/validation by a seeded shuffle, truncated to `seq_len` (plain
text is cut into `seq_len` chunks instead, so nothing is lost), and greedily packed into
sequences of exactly `seq_len` tokens without splitting an example. Labels follow the Hugging
Face convention (aligned with the inputs, -100 where unscored); the model shifts them.
Every packed sequence carries position ids that restart at 0 with each example; given them, the
model isolates the examples (each attends to itself only, at the positions inference gives it),
so an example trains in exactly the context it will be used in.
The order of training sequences is a pure function of (seed, epoch), so a resumed run only needs
to know how many sequences it has consumed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from edge_sdk.training.errors import DataFormatError, EmptyDatasetError, TokenizerError
from edge_sdk.training.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of unscored positions (PyTorch / Hugging Face convention)."""

JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
JSON_SUFFIXES = (".json",)
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_RECORD_KEYS = frozenset({"messages", "prompt", "completion", "text"})
_RECORD_HELP = (
    'one object per line: {"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}'
)
_ROLES = ("system", "user", "assistant", "tool")
_MAX_WARNINGS = 5


@dataclass(frozen=True)
class DataConfig:
    """How examples become training sequences."""

    seq_len: int = 256
    """Tokens per training sequence; longer examples are truncated (plain text: chunked)."""
    val_fraction: float = 0.1
    """Share of the examples held out for evaluation (at least one when there are two or more)."""
    seed: int = 0
    """Seeds the validation split, the packing order and the per-epoch sequence order."""
    skip_bad: bool = False
    """Skip and count malformed lines instead of failing on the first one."""

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"`seq_len` should be an integer >= 2, got {self.seq_len!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"`val_fraction` should be in [0, 1), got {self.val_fraction!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"`seed` should be an integer, got {self.seed!r}")  # noqa: TRY004


@dataclass
class Example:
    """One tokenized example."""

    input_ids: np.ndarray
    """(n,) int64 token ids."""
    loss_mask: np.ndarray
    """(n,) bool: True where the token is a training target."""
    source: str
    """`file:line` (or `file:paragraph N`) it came from, for messages."""


@dataclass
class DataStats:
    """What parsing and packing did; reported by the trainer."""

    files: int = 0
    examples: int = 0
    skipped_bad: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    """Examples with no scored token left after truncation."""
    formats: dict[str, int] = field(default_factory=dict)
    train_examples: int = 0
    val_examples: int = 0
    train_sequences: int = 0
    val_sequences: int = 0
    train_tokens: int = 0
    """Non-padding tokens in the training sequences."""
    train_target_tokens: int = 0
    """Scored tokens in the training sequences."""
    val_target_tokens: int = 0


# --------------------------------------------------------------------------- parsing


def _bad(where: str, why: str) -> DataFormatError:
    return DataFormatError(f"{where}: {why}")


def _check_text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, f"`{name}` should be a string, got {type(value).__name__}")
    if not value.strip():
        raise _bad(where, f"`{name}` is empty")
    return value


def parse_messages(messages: Any, where: str, name: str = "messages") -> list[dict[str, str]]:
    """A chat as plain {role, content} dicts; `DataFormatError` naming `where` when malformed."""
    if not isinstance(messages, list) or not messages:
        raise _bad(where, f"`{name}` should be a non-empty list")
    clean = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _bad(where, f"{name}[{j}] should be an object with `role` and `content`")
        if m["role"] not in _ROLES:
            raise _bad(where, f"{name}[{j}].role {m['role']!r} is not one of {', '.join(_ROLES)}")
        if not isinstance(m["content"], str):
            raise _bad(where, f"{name}[{j}].content should be a string")
        clean.append({"role": m["role"], "content": m["content"]})
    return clean


def _parse_record(record: Any, where: str) -> tuple[str, Any]:
    """(kind, payload) of one JSON line; `DataFormatError` naming `where` when malformed."""
    if not isinstance(record, dict):
        raise _bad(where, f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        clean = parse_messages(record["messages"], where)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in clean):
            raise _bad(where, "the conversation has no non-empty assistant message to learn from")
        return "chat", clean
    if "prompt" in record or "completion" in record:
        prompt = record.get("prompt")
        if not isinstance(prompt, str):
            raise _bad(where, "`prompt` should be a string")
        return "instruction", (prompt, _check_text(record.get("completion"), where, "completion"))
    if "text" in record:
        return "text", _check_text(record["text"], where, "text")
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise _bad(where, f"expected `messages`, `prompt`+`completion` or `text`; got keys: {keys}")


def _skip_or_raise(err: DataFormatError, stats: DataStats, skip_bad: bool) -> None:
    if not skip_bad:
        raise err
    stats.skipped_bad += 1
    if stats.skipped_bad <= _MAX_WARNINGS:
        logger.warning("skipping %s", err)


_T = TypeVar("_T")


def tokenize_or_skip(
    tokenize: Callable[[], _T], where: str, stats: DataStats, skip_bad: bool
) -> _T | None:
    """`tokenize()` of the record at `where`, or None where `skip_bad` skips it.

    A record the template cannot render is a bad line too (e.g. roles that do not alternate,
    for templates that insist): its `TokenizerError` becomes a `DataFormatError` naming `where`.
    """
    try:
        return tokenize()
    except (DataFormatError, TokenizerError) as exc:
        err = exc if isinstance(exc, DataFormatError) else _bad(where, str(exc))
        _skip_or_raise(err, stats, skip_bad)
        return None


def _utf8(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")  # a BOM (Excel, Notepad) is not part of the data
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataFormatError(f"{path}:{line}: not valid UTF-8 text") from exc


def _looks_like_jsonl(text: str) -> bool:
    """Whether the first non-blank line is a JSON object with a JSONL record's keys."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    if not first.lstrip().startswith("{"):
        return False
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and bool(_RECORD_KEYS & set(record))


def _iter_json(
    path: Path, text: str, stats: DataStats, skip_bad: bool
) -> Iterator[tuple[str, Any, str]]:
    """A .json file: an array of JSONL records, one record, or JSONL under a .json name."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if _looks_like_jsonl(text):
            yield from _iter_jsonl(path, text.encode("utf-8"), stats, skip_bad)
            return
        raise DataFormatError(
            f"{path}: invalid JSON ({exc}); a .json data file holds one array of records, "
            f"or use .jsonl with {_RECORD_HELP}"
        ) from None
    if not isinstance(doc, (list, dict)):
        raise DataFormatError(
            f"{path}: expected a JSON array of records, got a JSON {type(doc).__name__}; "
            f"use a .jsonl file with {_RECORD_HELP}"
        )
    if isinstance(doc, dict) and not _RECORD_KEYS & set(doc):
        keys = ", ".join(sorted(map(str, doc))[:8]) or "none"
        raise DataFormatError(
            f"{path}: a JSON object with keys {keys} is not a list of training records; "
            f"pass a JSON array or a .jsonl file with {_RECORD_HELP}"
        )
    for i, record in enumerate(doc if isinstance(doc, list) else [doc]):
        where = f"{path}:[{i}]"
        try:
            kind, payload = _parse_record(record, where)
        except DataFormatError as err:
            _skip_or_raise(err, stats, skip_bad)
            continue
        yield kind, payload, where


def _iter_table(
    path: Path, text: str, delimiter: str, stats: DataStats, skip_bad: bool
) -> Iterator[tuple[str, Any, str]]:
    """A .csv/.tsv file with a header naming `prompt`+`completion` or `text` columns."""
    rows = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [h.strip().lower() for h in next(rows)]
    except StopIteration:
        return
    except csv.Error as exc:
        raise DataFormatError(f"{path}:1: not a readable {path.suffix} header ({exc})") from None
    if "prompt" in header and "completion" in header:
        cols: tuple[int, ...] = (header.index("prompt"), header.index("completion"))
        kind = "instruction"
    elif "text" in header:
        cols, kind = (header.index("text"),), "text"
    else:
        found = ", ".join(repr(h) for h in header[:8]) or "none"
        raise DataFormatError(
            f"{path}: a {path.suffix} data file needs a header row with `prompt` and "
            f"`completion` columns or a `text` column, got columns {found}; or convert it to "
            f"JSONL with {_RECORD_HELP}"
        )
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataFormatError(
                f"{path}:{rows.line_num}: not valid {path.suffix} ({exc})"
            ) from None
        where = f"{path}:{rows.line_num}"
        if not any(cell.strip() for cell in row):
            continue
        try:
            if len(row) < len(header):
                raise _bad(
                    where, f"expected {len(header)} columns as in the header, got {len(row)}"
                )
            if kind == "text":
                payload: Any = _check_text(row[cols[0]], where, "text")
            else:
                payload = _parse_record(
                    {"prompt": row[cols[0]], "completion": row[cols[1]]}, where
                )[1]
        except DataFormatError as err:
            _skip_or_raise(err, stats, skip_bad)
            continue
        yield kind, payload, where


def iter_records(path: Path, stats: DataStats, skip_bad: bool) -> Iterator[tuple[str, Any, str]]:
    """(kind, payload, where) for every record of one file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read ({exc.strerror})") from exc
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _iter_jsonl(path, raw, stats, skip_bad)
        return
    text = _utf8(raw, path)
    if suffix in JSON_SUFFIXES:
        yield from _iter_json(path, text, stats, skip_bad)
        return
    if suffix in TABLE_SUFFIXES:
        yield from _iter_table(path, text, TABLE_SUFFIXES[suffix], stats, skip_bad)
        return
    if _looks_like_jsonl(text):
        raise DataFormatError(
            f"{path}: holds JSON records but is not named .jsonl, so it would be trained on as "
            f"plain text; rename it to {path.with_suffix('.jsonl').name}"
        )
    # Paragraphs (blank-line separated) are the examples of a plain text file.
    for n, para in enumerate(p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()):
        yield "text", para.strip("\n"), f"{path}:paragraph {n + 1}"


def _iter_jsonl(
    path: Path,
    raw: bytes,
    stats: DataStats,
    skip_bad: bool,
    parse: Callable[[Any, str], tuple[str, Any]] = _parse_record,
) -> Iterator[tuple[str, Any, str]]:
    """(kind, payload, where) of every non-blank line, each parsed by `parse(record, where)`."""
    for lineno, line_bytes in enumerate(raw.splitlines(), start=1):
        where = f"{path}:{lineno}"
        if not line_bytes.strip():
            continue
        try:
            kind, payload = parse(json.loads(line_bytes.decode("utf-8")), where)
        except (UnicodeDecodeError, json.JSONDecodeError, DataFormatError) as exc:
            err = exc if isinstance(exc, DataFormatError) else _bad(where, f"invalid JSON ({exc})")
            _skip_or_raise(err, stats, skip_bad)
            continue
        yield kind, payload, where


# --------------------------------------------------------------------------- tokenization


def _assistant_spans(
    tok: Tokenizer, messages: list[dict[str, str]], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the [start, end) character spans of its assistant turns."""
    if not tok.has_chat_template:
        raise DataFormatError(
            f"{where}: chat records need the model's chat template, and this model has none; "
            "use prompt/completion or text records"
        )
    full = tok.render_chat(messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tok.render_chat(messages[:i], add_generation_prompt=True) if i else ""
        through = tok.render_chat(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(prefix)):
            raise DataFormatError(
                f"{where}: the chat template does not render this conversation incrementally, "
                "so assistant turns cannot be located"
            )
        if len(through) > len(prefix):
            spans.append((len(prefix), len(through)))
    return full, spans


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _tokenize_spans(
    tok: Tokenizer, text: str, spans: list[tuple[int, int]], *, add_bos: bool
) -> tuple[list[int], list[bool]]:
    """Tokenize `text` once and mark the tokens of the character `spans` as scored.

    The token index of a character boundary c is found by tokenizing text[:c] (what inference
    tokenizes as a prompt) and matching it against the whole: tokenizing pieces separately
    would differ (SentencePiece vocabularies prefix every call with a space). Where a token
    straddles a boundary, it belongs to the side that the common prefix gives it.
    """
    ids = tok.encode(text, add_bos=add_bos)
    cache: dict[int, int] = {
        0: 0 if not (add_bos and tok.bos_id is not None) else 1,
        len(text): len(ids),
    }

    def token_index(c: int) -> int:
        if c not in cache:
            cache[c] = _common_prefix(tok.encode(text[:c], add_bos=add_bos), ids)
        return cache[c]

    mask = [False] * len(ids)
    for start, end in spans:
        for t in range(token_index(start), token_index(end)):
            mask[t] = True
    return ids, mask


def tokenize_record(tok: Tokenizer, kind: str, payload: Any, where: str) -> list[Example]:
    """Token ids and loss mask of one record."""
    if kind == "instruction" and tok.has_chat_template:
        prompt, completion = payload
        kind, payload = (
            "chat",
            [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": completion},
            ],
        )
    if kind == "chat":
        # The template writes its own BOS when the model wants one (llama-cpp-python adds none).
        full, spans = _assistant_spans(tok, payload, where)
        ids, mask = _tokenize_spans(tok, full, spans, add_bos=False)
    elif kind == "instruction":
        prompt, completion = payload
        text = prompt + completion
        ids, mask = _tokenize_spans(tok, text, [(len(prompt), len(text))], add_bos=True)
        ids, mask = ids + [tok.eos_id], mask + [True]
    elif kind == "text":
        ids = tok.encode(payload, add_bos=True) + [tok.eos_id]
        # BOS is never a prediction target: nothing predicts the start of a document.
        mask = [
            not (i == 0 and tok.bos_id is not None and t == tok.bos_id) for i, t in enumerate(ids)
        ]
    else:  # pragma: no cover - _parse_record only yields the kinds above
        raise AssertionError(kind)
    return [Example(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool), where)]


def tokenize_completion(
    tok: Tokenizer, prompt: Sequence[Mapping[str, str]], completion: str, where: str
) -> Example:
    """Token ids of `prompt` + one assistant turn `completion`, scoring that turn only.

    The path of chat and instruction records: with a chat template the turn's span (content
    and end-of-turn marker) is scored and earlier assistant turns of `prompt` are not; without
    one, `prompt` must be a single user turn and this is the instruction record's
    `prompt + completion + EOS`.
    """
    messages = [dict(m) for m in prompt] + [{"role": "assistant", "content": completion}]
    if not tok.has_chat_template:
        if len(prompt) != 1 or prompt[0]["role"] != "user":
            raise _bad(
                where,
                "a multi-turn prompt needs the model's chat template, and this model has none; "
                "give the prompt as one string",
            )
        return tokenize_record(tok, "instruction", (prompt[0]["content"], completion), where)[0]
    # The answer's span, as `_assistant_spans` finds each turn's: [len(P), len(F)).
    full = tok.render_chat(messages, add_generation_prompt=False)
    prefix = tok.render_chat(messages[:-1], add_generation_prompt=True)
    if not full.startswith(prefix) or len(full) == len(prefix):
        raise _bad(
            where,
            "the chat template does not render the answer after the prompt, so its tokens "
            "cannot be located",
        )
    spans = [(len(prefix), len(full))]
    ids, mask = _tokenize_spans(tok, full, spans, add_bos=False)
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool), where)


def _fit(example: Example, kind: str, seq_len: int, stats: DataStats) -> list[Example]:
    """Truncate (or, for plain text, chunk) an example to at most `seq_len` tokens."""
    n = len(example.input_ids)
    if n <= seq_len:
        return [example]
    if kind == "text":
        return [
            Example(
                example.input_ids[s : s + seq_len],
                example.loss_mask[s : s + seq_len],
                example.source,
            )
            for s in range(0, n, seq_len)
        ]
    stats.truncated += 1
    return [Example(example.input_ids[:seq_len], example.loss_mask[:seq_len], example.source)]


# --------------------------------------------------------------------------- packing


@dataclass
class Packed:
    """Packed sequences: ids, labels and positions, each (n, seq_len) int64."""

    ids: np.ndarray
    labels: np.ndarray
    """`IGNORE_INDEX` on padding and on each example's first token."""
    positions: np.ndarray
    """Position of each token in its own example (0 at every example's first token); padding
    continues the last example's positions, so it never forms an example of its own."""


def pack(examples: Sequence[Example], seq_len: int, pad_id: int) -> Packed:
    """Greedy packing into (n, seq_len) sequences, never splitting an example.

    Sequences are filled in the given order; an example that does not fit starts the next one.
    Padding has label `IGNORE_INDEX`. The first token of every example is unscored as well:
    its prediction would come from the end of the previous example (isolated or not, that says
    nothing about it).
    """
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    cur: list[tuple[np.ndarray, np.ndarray]] = []
    used = 0

    def flush() -> None:
        nonlocal used, cur
        if not cur:
            return
        ids = np.full(seq_len, pad_id, dtype=np.int64)
        labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
        positions = np.empty(seq_len, dtype=np.int64)
        ids[:used] = np.concatenate([i for i, _ in cur])
        labels[:used] = np.concatenate([lab for _, lab in cur])
        positions[:used] = np.concatenate([np.arange(len(i)) for i, _ in cur])
        last = len(cur[-1][0])
        positions[used:] = np.arange(last, last + seq_len - used)
        rows.append((ids, labels, positions))
        cur, used = [], 0

    for ex in examples:
        n = len(ex.input_ids)
        if n > seq_len:
            raise ValueError(f"{ex.source}: example of {n} tokens exceeds seq_len {seq_len}")
        if used + n > seq_len:
            flush()
        labels = np.where(ex.loss_mask, ex.input_ids, IGNORE_INDEX)
        labels[0] = IGNORE_INDEX
        cur.append((ex.input_ids, labels))
        used += n
    flush()
    if not rows:
        empty = np.zeros((0, seq_len), np.int64)
        return Packed(empty, empty.copy(), empty.copy())
    return Packed(*(np.stack(col) for col in zip(*rows)))


# --------------------------------------------------------------------------- dataset


@dataclass
class Batch:
    """A batch of packed sequences, each field (B, seq_len) int64 (see `Packed`)."""

    ids: np.ndarray
    labels: np.ndarray
    positions: np.ndarray


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Permutation of n training items for one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def stream_indexes(seed: int, n: int, position: int, count: int) -> np.ndarray:
    """The `count` item indexes after `position` items have been consumed, across epochs.

    Item k of the stream is `epoch_order(seed, k // n, n)[k % n]`, so a resumed run only needs
    to know how many items it has consumed.
    """
    orders: dict[int, np.ndarray] = {}
    rows = []
    for k in range(position, position + count):
        epoch, offset = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(seed, epoch, n)
        rows.append(orders[epoch][offset])
    return np.asarray(rows, dtype=np.int64)


@dataclass
class Dataset:
    """Packed train and validation sequences, ready to batch."""

    train: Packed
    """N training sequences."""
    val: Packed
    """M validation sequences; M may be 0 (then there is no evaluation)."""
    seed: int
    stats: DataStats

    @property
    def seq_len(self) -> int:
        return int(self.train.ids.shape[1])

    @property
    def train_ids(self) -> np.ndarray:
        """(N, seq_len) int64."""
        return self.train.ids

    @property
    def train_labels(self) -> np.ndarray:
        """(N, seq_len) int64, `IGNORE_INDEX` where unscored."""
        return self.train.labels

    @property
    def val_ids(self) -> np.ndarray:
        """(M, seq_len) int64."""
        return self.val.ids

    @property
    def val_labels(self) -> np.ndarray:
        return self.val.labels

    def train_order(self, epoch: int) -> np.ndarray:
        """Permutation of the training sequences for one epoch: a pure function of (seed, epoch)."""
        return epoch_order(self.seed, epoch, len(self.train.ids))

    def train_batch(self, position: int, batch_size: int) -> Batch:
        """The `batch_size` sequences after `position` sequences have been consumed.

        Positions run across epochs: sequence k is `train_order(k // N)[k % N]`.
        """
        idx = stream_indexes(self.seed, len(self.train.ids), position, batch_size)
        return Batch(self.train.ids[idx], self.train.labels[idx], self.train.positions[idx])

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        """Validation sequences in fixed order, `batch_size` at a time."""
        v = self.val
        for s in range(0, len(v.ids), batch_size):
            yield Batch(
                v.ids[s : s + batch_size],
                v.labels[s : s + batch_size],
                v.positions[s : s + batch_size],
            )


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train indexes, val indexes) over n examples."""
    n_val = 0 if n < 2 or val_fraction == 0 else max(1, round(n * val_fraction))
    order = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def build_dataset(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    tokenizer: Tokenizer,
    config: DataConfig | None = None,
) -> Dataset:
    """Parse, tokenize, split and pack the files at `paths` (see the module docstring)."""
    config = config or DataConfig()
    path_list = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not path_list:
        raise EmptyDatasetError("no data files given")
    stats = DataStats(files=len(path_list))
    # Each record keeps its chunks together so the split never puts half a document in val.
    records: list[list[Example]] = []
    for path in path_list:
        if path.is_dir():
            raise DataFormatError(f"{path}: is a directory; pass data files")
        for kind, payload, where in iter_records(path, stats, config.skip_bad):
            examples = tokenize_or_skip(
                partial(tokenize_record, tokenizer, kind, payload, where),
                where,
                stats,
                config.skip_bad,
            )
            if examples is None:
                continue
            stats.formats[kind] = stats.formats.get(kind, 0) + 1
            chunks: list[Example] = []
            for ex in examples:
                chunks.extend(_fit(ex, kind, config.seq_len, stats))
            kept = [c for c in chunks if c.loss_mask[1:].any()]
            stats.dropped_no_target += len(chunks) - len(kept)
            if kept:
                records.append(kept)
    stats.examples = len(records)
    if not records:
        names = ", ".join(str(p) for p in path_list)
        detail = f" ({stats.skipped_bad} malformed lines skipped)" if stats.skipped_bad else ""
        raise EmptyDatasetError(f"no usable training examples in {names}{detail}")
    if stats.truncated:
        logger.warning(
            "%d examples were longer than seq_len=%d and were truncated",
            stats.truncated,
            config.seq_len,
        )

    train_idx, val_idx = _split(len(records), config.val_fraction, config.seed)
    stats.train_examples, stats.val_examples = len(train_idx), len(val_idx)
    rng = np.random.default_rng([config.seed, 1])
    # Pack in a seeded shuffled order so sequences mix sources; each record stays contiguous.
    train_ex = [ex for i in rng.permutation(train_idx) for ex in records[i]]
    val_ex = [ex for i in val_idx for ex in records[i]]
    pad = tokenizer.eos_id
    train = pack(train_ex, config.seq_len, pad)
    val = pack(val_ex, config.seq_len, pad)
    stats.train_sequences, stats.val_sequences = len(train.ids), len(val.ids)
    stats.train_tokens = int(sum(len(e.input_ids) for e in train_ex))
    stats.train_target_tokens = int((train.labels != IGNORE_INDEX).sum())
    stats.val_target_tokens = int((val.labels != IGNORE_INDEX).sum())
    if not len(val.ids) and config.val_fraction > 0:  # with 0 the caller asked for no split
        logger.warning(
            "no validation split (%d example(s)); eval loss will not be reported", len(records)
        )
    logger.info(
        "data: %d examples -> %d train / %d val sequences of %d tokens",
        len(records),
        len(train.ids),
        len(val.ids),
        config.seq_len,
    )
    return Dataset(train, val, config.seed, stats)


def describe(stats: DataStats) -> str:
    """One line for logs and the CLI."""
    formats = ", ".join(f"{n} {k}" for k, n in sorted(stats.formats.items()))
    parts = [
        f"{stats.examples} examples ({formats})",
        f"{stats.train_sequences} train / {stats.val_sequences} val sequences",
        f"{stats.train_target_tokens} train target tokens",
        *describe_losses(stats, "nothing to learn after truncation"),
    ]
    return "; ".join(parts)


def describe_losses(stats: DataStats, why_dropped: str) -> list[str]:
    """The parts of a data summary that count what did not reach training as read: malformed
    lines skipped, examples truncated, and those dropped (`why_dropped`)."""
    parts = []
    if stats.skipped_bad:
        parts.append(f"{stats.skipped_bad} malformed lines skipped")
    if stats.truncated:
        parts.append(f"{stats.truncated} truncated")
    if stats.dropped_no_target:
        parts.append(f"{stats.dropped_no_target} dropped ({why_dropped})")
    return parts


def as_mapping(stats: DataStats) -> Mapping[str, Any]:
    """Plain dict of the stats (for metrics.json)."""
    return dict(stats.__dict__)
