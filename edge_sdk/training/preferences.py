"""Preference data for DPO: pairs of answers to one prompt, the chosen one and the rejected one.

Format: JSONL, one pair per line (`.jsonl`, `.jsonlines`, `.ndjson`):

    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "Let me think. 2+2 is 4."}
    {"messages": [{"role": "user", "content": "..."}], "chosen": "...", "rejected": "..."}

- The prompt is `prompt` (a string: one user turn, or a list of messages) or `messages` (a
  list of messages); it ends with a user (or tool) turn;
- `chosen` and `rejected` are assistant turns: a string, an `{"role": "assistant", "content":
  ...}` object, or a list holding one such object (TRL's conversational format).

Errors name the file and line (`DataFormatError`), through the SFT loader's machinery
(`edge_sdk.training.data`): a missing field, an empty answer, and a chosen answer equal to the
rejected one are refused, or skipped and counted with `skip_bad`.

Tokenization is the SFT path's (`data.tokenize_completion`): prompt + answer are rendered with
the GGUF's chat template and tokenized by llama.cpp, and only the answer's tokens (its content
and end-of-turn marker) are scored, so the log-probability of an answer given its prompt is the
sum over exactly the tokens inference would generate.

A `PreferenceDataset` holds the tokenized pairs, split into train and validation by the same
seeded split as SFT data, and hands out `PairBatch`es: chosen and rejected sequences of the
pairs in one (2B, T) batch, chosen first. The order of training pairs is a pure function of
(seed, epoch), as for SFT sequences.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.training.data import (
    IGNORE_INDEX,
    JSONL_SUFFIXES,
    DataConfig,
    DataStats,
    Example,
    _bad,
    _iter_jsonl,
    _split,
    describe_losses,
    parse_messages,
    stream_indexes,
    tokenize_completion,
    tokenize_or_skip,
)
from edge_sdk.training.errors import DataFormatError, EmptyDatasetError
from edge_sdk.training.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PAIR_HELP = '{"prompt" or "messages": ..., "chosen": "...", "rejected": "..."} per line'
_PROMPT_END_ROLES = ("user", "tool")


@dataclass(frozen=True)
class PreferencePair:
    """One prompt and two assistant answers to it: the one the user chose, and the other."""

    prompt: tuple[Mapping[str, str], ...]
    """The conversation before the answer ({role, content} messages), ending with a user turn."""
    chosen: str
    """The preferred assistant answer."""
    rejected: str
    """The assistant answer that lost against `chosen`."""
    source: str = "pair"
    """Where the pair came from (`file:line`, or an app's answer id), for messages."""

    def __post_init__(self) -> None:
        if isinstance(self.prompt, str):
            object.__setattr__(self, "prompt", ({"role": "user", "content": self.prompt},))
        object.__setattr__(self, "prompt", tuple(self.prompt))
        try:
            _check_pair(self.prompt, self.chosen, self.rejected, self.source)
        except DataFormatError as exc:
            raise ValueError(str(exc)) from None

    def to_record(self) -> dict[str, Any]:
        """The pair as one JSONL record (what `load_preferences` reads back)."""
        return {
            "messages": [dict(m) for m in self.prompt],
            "chosen": self.chosen,
            "rejected": self.rejected,
        }


# --------------------------------------------------------------------------- parsing


def _answer(record: Mapping[str, Any], name: str, where: str) -> str:
    """The text of the assistant turn `record[name]` (string, message, or [message])."""
    if name not in record:
        raise _bad(where, f"missing field `{name}`; expected {PAIR_HELP}")
    value = record[name]
    if isinstance(value, list):
        if len(value) != 1:
            raise _bad(where, f"`{name}` should be one assistant turn, got a list of {len(value)}")
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant" or not isinstance(value.get("content"), str):
            raise _bad(
                where,
                f"`{name}` should be an assistant turn with string content, got {value!r:.80}",
            )
        value = value["content"]
    if not isinstance(value, str):
        raise _bad(where, f"`{name}` should be a string, got {type(value).__name__}")
    return value


def _check_pair(
    prompt: Sequence[Mapping[str, str]], chosen: Any, rejected: Any, where: str
) -> None:
    """`DataFormatError` naming `where` unless the pair can teach a preference."""
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise _bad(where, f"`{name}` should be a string, got {type(value).__name__}")
        if not value.strip():
            raise _bad(where, f"`{name}` is empty")
    if chosen == rejected:
        raise _bad(
            where, "`chosen` and `rejected` are the same answer; a pair needs two different answers"
        )
    if not prompt:
        raise _bad(where, "the prompt is empty; give `prompt` or `messages`")
    last = prompt[-1].get("role")
    if last not in _PROMPT_END_ROLES:
        raise _bad(where, f"the prompt should end with a user turn, not with a {last!r} turn")


def parse_pair(record: Any, where: str) -> PreferencePair:
    """One JSONL record as a pair; `DataFormatError` naming `where` when it is not one."""
    if not isinstance(record, dict):
        raise _bad(where, f"expected a JSON object, got {type(record).__name__}")
    if "prompt" in record and "messages" in record:
        raise _bad(where, "give the prompt as `prompt` or as `messages`, not both")
    if "messages" in record:
        prompt = parse_messages(record["messages"], where)
    elif "prompt" in record:
        value = record["prompt"]
        if isinstance(value, str):
            prompt = [{"role": "user", "content": value}]
        elif isinstance(value, list):
            prompt = parse_messages(value, where, "prompt")
        else:
            raise _bad(
                where, f"`prompt` should be a string or a list of messages, got {value!r:.40}"
            )
    else:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise _bad(where, f"missing field `prompt` (or `messages`); got keys: {keys}")
    chosen, rejected = _answer(record, "chosen", where), _answer(record, "rejected", where)
    _check_pair(prompt, chosen, rejected, where)
    return PreferencePair(tuple(prompt), chosen, rejected, where)


def _parse_line(record: Any, where: str) -> tuple[str, Any]:
    return "pair", parse_pair(record, where)


def _paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    return [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]


def load_preferences(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    skip_bad: bool = False,
    stats: DataStats | None = None,
) -> list[PreferencePair]:
    """The pairs of the JSONL file(s) at `paths`, in file order.

    A malformed line raises `DataFormatError` naming `file:line`; with `skip_bad` it is skipped
    and counted in `stats.skipped_bad` (the first few are logged).
    """
    stats = stats if stats is not None else DataStats()
    pairs: list[PreferencePair] = []
    for path in _paths(paths):
        stats.files += 1
        if path.is_dir():
            raise DataFormatError(f"{path}: is a directory; pass preference data files")
        if path.suffix.lower() not in JSONL_SUFFIXES:
            raise DataFormatError(
                f"{path}: preference data is JSONL with {PAIR_HELP}; name the file .jsonl"
            )
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DataFormatError(f"{path}: cannot read ({exc.strerror})") from exc
        for _, pair, _ in _iter_jsonl(path, raw, stats, skip_bad, parse=_parse_line):
            pairs.append(pair)
    return pairs


# --------------------------------------------------------------------------- tokenization


@dataclass
class TokenizedPair:
    """Both answers of one pair, each as prompt + answer tokens with the answer scored."""

    chosen: Example
    rejected: Example
    source: str


def tokenize_pair(tok: Tokenizer, pair: PreferencePair) -> TokenizedPair:
    """Tokens of prompt + chosen and prompt + rejected; only the answers' tokens are scored."""
    chosen = tokenize_completion(tok, pair.prompt, pair.chosen, pair.source)
    rejected = tokenize_completion(tok, pair.prompt, pair.rejected, pair.source)
    if np.array_equal(chosen.input_ids, rejected.input_ids):
        raise _bad(pair.source, "`chosen` and `rejected` render to the same tokens")
    return TokenizedPair(chosen, rejected, pair.source)


def _truncate(ex: Example, seq_len: int) -> Example:
    return Example(ex.input_ids[:seq_len], ex.loss_mask[:seq_len], ex.source)


@dataclass
class PairBatch:
    """B pairs in one batch: rows 0..B-1 are the chosen answers, rows B..2B-1 the rejected."""

    ids: np.ndarray
    """(2B, T) int64 token ids, right-padded to the longest row."""
    labels: np.ndarray
    """(2B, T) int64: the token where it is an answer token, `IGNORE_INDEX` elsewhere."""
    index: np.ndarray
    """(B,) int64: the pairs' indexes in their split (they key the reference log-probs)."""
    lengths: np.ndarray
    """(2B,) int64: unpadded length of each row."""

    @property
    def pairs(self) -> int:
        return len(self.index)

    @property
    def real_tokens(self) -> int:
        """Tokens of the sequences, padding excluded."""
        return int(self.lengths.sum())


def _collate(pairs: Sequence[TokenizedPair], index: np.ndarray, pad_id: int) -> PairBatch:
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    T = max(len(r.input_ids) for r in rows)
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    labels = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = r.input_ids
        labels[i, :n] = np.where(r.loss_mask, r.input_ids, IGNORE_INDEX)
        labels[i, 0] = IGNORE_INDEX  # nothing predicts the first token
    lengths = np.asarray([len(r.input_ids) for r in rows], dtype=np.int64)
    return PairBatch(ids, labels, np.asarray(index, dtype=np.int64), lengths)


@dataclass
class PreferenceDataset:
    """Tokenized pairs split into train and validation, ready to batch."""

    train: list[TokenizedPair]
    val: list[TokenizedPair]
    """May be empty (then there is no held-out evaluation)."""
    seed: int
    pad_id: int
    stats: DataStats

    def train_batch(self, position: int, batch_size: int) -> PairBatch:
        """The `batch_size` training pairs after `position` have been consumed (see
        `data.stream_indexes`: the order is a pure function of (seed, epoch))."""
        idx = stream_indexes(self.seed, len(self.train), position, batch_size)
        return _collate([self.train[i] for i in idx], idx, self.pad_id)

    def batches(self, split: str, batch_size: int) -> Iterator[PairBatch]:
        """All pairs of `split` ('train' or 'val') in fixed order, `batch_size` at a time."""
        items = self.train if split == "train" else self.val
        for s in range(0, len(items), batch_size):
            idx = np.arange(s, min(s + batch_size, len(items)))
            yield _collate(items[s : s + batch_size], idx, self.pad_id)


def build_preference_dataset(
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Iterable[PreferencePair],
    tokenizer: Tokenizer,
    config: DataConfig | None = None,
) -> PreferenceDataset:
    """Load (from JSONL paths) or take (`PreferencePair`s) pairs, tokenize, truncate and split.

    A pair longer than `config.seq_len` keeps its first `seq_len` tokens; one with no answer
    token left (a prompt that long) is dropped and counted in `stats.dropped_no_target`.
    """
    config = config or DataConfig()
    stats = DataStats()
    items = list(data) if not isinstance(data, (str, os.PathLike)) else [data]
    if items and all(isinstance(p, PreferencePair) for p in items):
        pairs: list[PreferencePair] = items  # type: ignore[assignment]
    elif any(isinstance(p, PreferencePair) for p in items):
        raise TypeError("pass either data file paths or PreferencePair objects, not a mix")
    else:
        if not items:
            raise EmptyDatasetError("no preference data given")
        pairs = load_preferences(items, skip_bad=config.skip_bad, stats=stats)  # type: ignore[arg-type]
    tokenized: list[TokenizedPair] = []
    for pair in pairs:
        tp = tokenize_or_skip(
            partial(tokenize_pair, tokenizer, pair), pair.source, stats, config.skip_bad
        )
        if tp is None:
            continue
        if max(len(tp.chosen.input_ids), len(tp.rejected.input_ids)) > config.seq_len:
            stats.truncated += 1
            tp = TokenizedPair(
                _truncate(tp.chosen, config.seq_len),
                _truncate(tp.rejected, config.seq_len),
                tp.source,
            )
        if not (tp.chosen.loss_mask[1:].any() and tp.rejected.loss_mask[1:].any()):
            stats.dropped_no_target += 1
            continue
        tokenized.append(tp)
    stats.formats = {"pair": len(tokenized)} if tokenized else {}
    stats.examples = len(tokenized)
    if not tokenized:
        detail = f" ({stats.skipped_bad} malformed lines skipped)" if stats.skipped_bad else ""
        raise EmptyDatasetError(f"no usable preference pairs{detail}")
    if stats.truncated:
        logger.warning(
            "%d pairs were longer than seq_len=%d and were truncated",
            stats.truncated,
            config.seq_len,
        )
    train_idx, val_idx = _split(len(tokenized), config.val_fraction, config.seed)
    train = [tokenized[i] for i in train_idx]
    val = [tokenized[i] for i in val_idx]
    stats.train_examples, stats.val_examples = len(train), len(val)
    stats.train_sequences, stats.val_sequences = 2 * len(train), 2 * len(val)
    stats.train_tokens = sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in train)
    stats.train_target_tokens = sum(
        int(p.chosen.loss_mask[1:].sum() + p.rejected.loss_mask[1:].sum()) for p in train
    )
    stats.val_target_tokens = sum(
        int(p.chosen.loss_mask[1:].sum() + p.rejected.loss_mask[1:].sum()) for p in val
    )
    return PreferenceDataset(train, val, config.seed, tokenizer.eos_id, stats)


def describe_pairs(stats: DataStats) -> str:
    """One line for logs and the CLI."""
    parts = [
        f"{stats.examples} preference pairs",
        f"{stats.train_examples} train / {stats.val_examples} val",
        f"{stats.train_target_tokens} train answer tokens",
        *describe_losses(stats, "no answer token within seq_len"),
    ]
    return "; ".join(parts)


def write_preferences(path: str | os.PathLike[str], pairs: Iterable[PreferencePair]) -> Path:
    """Write `pairs` as JSONL (one `to_record()` per line) that `load_preferences` reads back."""
    dest = Path(path)
    with dest.open("w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair.to_record(), ensure_ascii=False) + "\n")
    return dest
