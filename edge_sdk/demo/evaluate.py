"""Held-out evaluation of an adapter: eval loss and exact match, two ways.

- **Teacher-forced (torch, one forward pass)**: each held-out example is rendered and tokenized
  exactly as the trainer does (`edge_sdk.training.data.tokenize_record`), the QLoRA model runs
  once over the batch, and at every answer position we take the cross-entropy (the trainer's
  eval loss: mean nats per answer token) and the argmax. The example is an exact match when the
  argmax equals the target at every answer token up to and including the end-of-turn token:
  precisely the condition under which greedy decoding reproduces the answer. One forward per
  example instead of one per generated token makes this the fast path for the baselines and
  the per-version curve.
- **Greedy through llama.cpp** (`GreedyEvaluator`): what a user sees. The adapter is written as
  GGUF and hot-swapped into one `EdgeModel`, and the answer is decoded greedily and compared as
  a string. It covers the export and the runtime's own quantization (Q4_1 base, not NF4), and
  is used for the federated adapter and the base in the report.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from edge_sdk.demo.tasks import Example, normalize, score

if TYPE_CHECKING:  # torch and llama.cpp load lazily
    import torch
    from typing_extensions import Self

    from edge_sdk.models.transformer import Transformer
    from edge_sdk.training.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_STOP = ("<|im_end|>", "<|endoftext|>")
END_OF_TURN = "<|im_end|>"


@dataclass
class EvalScores:
    """One model's scores on the held-out set."""

    eval_loss: float | None
    """Mean cross-entropy per answer token (nats); None when not measured."""
    exact_match: float
    """Share of held-out examples answered exactly."""
    per_family: dict[str, float] = field(default_factory=dict)
    """Exact match per task family."""
    method: str = "teacher-forced"
    """`teacher-forced` (torch argmax) or `greedy-llama.cpp`."""
    seconds: float = 0.0
    """Wall time of this evaluation."""

    def as_dict(self) -> dict[str, object]:
        return {
            "eval_loss": self.eval_loss,
            "exact_match": self.exact_match,
            "per_family": dict(self.per_family),
            "method": self.method,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _Batch:
    ids: np.ndarray
    """(B, T) int64, right-padded."""
    targets: np.ndarray
    """(B, T) int64: the token each position must predict, -1 where unscored."""
    judged: np.ndarray
    """(B, T) bool: scored positions up to and including the end-of-turn token."""
    rows: list[int]
    """Index into the example list of each row."""


class TeacherForcedEvaluator:
    """Eval loss and exact match of adapters in the torch QLoRA model, one forward per example."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        examples: Sequence[Example],
        *,
        batch_size: int = 16,
    ) -> None:
        from edge_sdk.training.data import tokenize_record

        if not examples:
            raise ValueError("`examples` should hold at least one held-out example")
        if batch_size < 1:
            raise ValueError(f"`batch_size` should be a positive integer, got {batch_size!r}")
        self.model = cast("Transformer", model)
        self.examples = list(examples)
        eot = tokenizer.encode(END_OF_TURN, add_bos=False)
        eot_id = eot[0] if len(eot) == 1 else tokenizer.eos_id
        encoded = []
        for i, ex in enumerate(self.examples):
            (tok,) = tokenize_record(tokenizer, "chat", ex.messages(), f"eval:{i}")
            encoded.append((tok.input_ids, tok.loss_mask))
        pad = tokenizer.eos_id
        # Sort by length so batches pad little; `rows` maps back.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        self.batches: list[_Batch] = []
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            T = max(len(encoded[i][0]) for i in rows)
            ids = np.full((len(rows), T), pad, np.int64)
            targets = np.full((len(rows), T), -1, np.int64)
            judged = np.zeros((len(rows), T), bool)
            for r, i in enumerate(rows):
                tokens, mask = encoded[i]
                n = len(tokens)
                ids[r, :n] = tokens
                # Position t predicts token t+1; scored when token t+1 is an answer token.
                scored = np.flatnonzero(mask[1:])
                targets[r, scored] = tokens[scored + 1]
                ends = scored[tokens[scored + 1] == eot_id]
                last = ends[0] if len(ends) else scored[-1]
                judged[r, scored[scored <= last]] = True
            self.batches.append(_Batch(ids, targets, judged, rows))
        self.tokens = int(sum(int((b.targets >= 0).sum()) for b in self.batches))

    def score(self, adapter: Mapping[str, np.ndarray] | None) -> EvalScores:
        """Scores with `adapter` loaded into the LoRA layers (None: the bare base model)."""
        import torch

        from edge_sdk.models.transformer import output_logits
        from edge_sdk.training.lora import load_lora_state_dict, set_lora_enabled

        t0 = time.perf_counter()
        if adapter is None:
            set_lora_enabled(self.model, False)
        else:
            load_lora_state_dict(self.model, adapter, strict=True)
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        correct = np.zeros(len(self.examples), bool)
        try:
            with torch.no_grad():
                for b in self.batches:
                    h = self.model.hidden_states(torch.from_numpy(b.ids))  # (B, T, d)
                    pos = torch.from_numpy(b.targets >= 0)
                    # (n, V); the tied embedding is read in vocabulary chunks from its blocks
                    logits = output_logits(h[pos], self.model.output_projection)
                    cap = self.model.config.final_logit_softcap
                    if cap:
                        logits = cap * torch.tanh(logits / cap)
                    tgt = torch.from_numpy(b.targets[b.targets >= 0])
                    total += float(torch.nn.functional.cross_entropy(logits, tgt, reduction="sum"))
                    count += len(tgt)
                    hit = np.zeros(b.ids.shape, bool)
                    hit[b.targets >= 0] = (logits.argmax(-1) == tgt).numpy()
                    ok = np.all(hit | ~b.judged, axis=1)  # (B,)
                    correct[b.rows] = ok
        finally:
            set_lora_enabled(self.model, True)
            self.model.train(was_training)
        em, per_family = _tally(correct, self.examples)
        return EvalScores(
            eval_loss=total / max(count, 1),
            exact_match=em,
            per_family=per_family,
            method="teacher-forced",
            seconds=time.perf_counter() - t0,
        )


def _tally(correct: np.ndarray, examples: Sequence[Example]) -> tuple[float, dict[str, float]]:
    per: dict[str, list[bool]] = {}
    for ok, ex in zip(correct, examples):
        per.setdefault(ex.family, []).append(bool(ok))
    return float(np.mean(correct)), {f: float(np.mean(v)) for f, v in sorted(per.items())}


class GreedyEvaluator:
    """Exact match by greedy decoding in llama.cpp, adapters hot-swapped into one `EdgeModel`."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        examples: Sequence[Example],
        *,
        n_threads: int | None = None,
    ) -> None:
        from edge_sdk.runtime import EdgeModel

        if not examples:
            raise ValueError("`examples` should hold at least one held-out example")
        self.examples = list(examples)
        self.runtime = EdgeModel(Path(model_path), n_ctx=512, n_threads=n_threads)
        # The longest answer plus a margin: a wrong answer is cut off, not waited for.
        self.max_tokens = (
            max(len(self.runtime.tokenize(e.answer, add_bos=False)) for e in self.examples) + 4
        )

    def predictions(self, adapter_gguf: str | os.PathLike[str] | None) -> list[str]:
        """Greedy answers to every held-out prompt, `adapter_gguf` served (None: the base)."""
        if adapter_gguf is None:
            self.runtime.remove_adapter(wait=60.0)
        else:
            self.runtime.load_adapter(adapter_gguf, wait=60.0)
        return [
            normalize(
                str(
                    self.runtime.chat(
                        ex.messages(with_answer=False), max_tokens=self.max_tokens, stop=_STOP
                    )
                )
            )
            for ex in self.examples
        ]

    def score(self, adapter_gguf: str | os.PathLike[str] | None) -> EvalScores:
        t0 = time.perf_counter()
        em, per_family = score(self.predictions(adapter_gguf), self.examples)
        return EvalScores(
            eval_loss=None,
            exact_match=em,
            per_family=per_family,
            method="greedy-llama.cpp",
            seconds=time.perf_counter() - t0,
        )

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["END_OF_TURN", "EvalScores", "GreedyEvaluator", "TeacherForcedEvaluator"]
