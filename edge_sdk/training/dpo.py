"""Preference tuning of the LoRA adapter: DPO and IPO on (prompt, chosen, rejected) pairs.

For a pair with answers y_w (chosen) and y_l (rejected) to prompt x, the policy π (the model
with the adapter) and a frozen reference π_ref, let

    h = [log π(y_w|x) - log π_ref(y_w|x)] - [log π(y_l|x) - log π_ref(y_l|x)]

where log π(y|x) is the SUM of the answer tokens' log-probabilities (prompt tokens are not
scored; `edge_sdk.training.preferences`). Then

- sigmoid (DPO, Rafailov et al. 2023, arXiv:2305.18290, eq. 7): loss = -log σ(β·h);
- ipo (IPO, Azar et al. 2023, arXiv:2310.12036, eq. 17): loss = (h - 1/(2β))².

With `sft_weight` α > 0 (RPO, Pang et al. 2024, arXiv:2404.19733; TRL's `rpo_alpha`) each pair
adds α · (-log π(y_w|x)) / |y_w|, the chosen answer's mean per-token negative log-likelihood:
DPO alone only ranks y_w above y_l (it can push both down), the NLL term keeps y_w likely, so
that greedy decoding actually produces the preferred answer.

The implicit rewards are r_w = β·(log π(y_w|x) - log π_ref(y_w|x)) and r_l likewise; we log
reward accuracy (the share of pairs with r_w > r_l), the reward margin mean(r_w - r_l), and the
mean chosen and rejected log-probs of the policy.

The reference is the same model, not a second copy: the base (every LoRA layer bypassed,
`reference="base"`) or the adapter the run started from (`reference="start"`, kept as a copy
of the LoRA tensors only). It is frozen, so its log-probs are computed once per pair, the first
time a step uses the pair (a short run over many pairs pays for what it uses), and cached; the
held-out pairs' before training. The cache is part of the checkpoint, so a resumed run
recomputes none of them. Reference passes run in eval mode under `no_grad` and draw no random
numbers, so the trajectory does not depend on when they ran.

The chosen and rejected answers of a micro-batch's pairs run as one (2B, T) batch. The
per-answer sums reuse the SFT loss kernel (`fused_linear_cross_entropy`, one call per row on
the row's answer positions), so the (T, vocab) logits are never materialised either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from edge_sdk.models.transformer import fused_linear_cross_entropy
from edge_sdk.training.data import IGNORE_INDEX
from edge_sdk.training.errors import CheckpointError
from edge_sdk.training.lora import (
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    set_lora_enabled,
)
from edge_sdk.training.methods import DPO_LOSSES, DPO_REFERENCES, DpoLoss, DpoReference
from edge_sdk.training.preferences import PairBatch, PreferenceDataset
from edge_sdk.training.trainer import (
    Evaluation,
    StepOutcome,
    TrainConfig,
    TrainResult,
    fit,
)

if TYPE_CHECKING:
    from edge_sdk.models.transformer import Transformer

logger = logging.getLogger(__name__)

__all__ = [
    "DPO_LOSSES",
    "DPO_REFERENCES",
    "DpoLoss",
    "DpoObjective",
    "DpoReference",
    "PreferenceLoss",
    "adapter_disabled",
    "fit_dpo",
    "preference_loss",
    "reference_logps",
    "sequence_logps",
]


@dataclass
class PreferenceLoss:
    """Per-pair loss and implicit rewards of a batch of B pairs."""

    losses: torch.Tensor
    """(B,) loss per pair (differentiable)."""
    chosen_rewards: torch.Tensor
    """(B,) β·(log π(y_w|x) - log π_ref(y_w|x)), detached."""
    rejected_rewards: torch.Tensor
    """(B,) β·(log π(y_l|x) - log π_ref(y_l|x)), detached."""


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss: DpoLoss = "sigmoid",
    sft_weight: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
) -> PreferenceLoss:
    """DPO or IPO loss of B pairs from their summed answer log-probs, each (B,).

    `sft_weight` > 0 adds sft_weight · (-policy_chosen / chosen_tokens) per pair (RPO);
    `chosen_tokens` (B,) counts each chosen answer's scored tokens and is then required.
    """
    if loss not in DPO_LOSSES:
        raise ValueError(f"`loss` should be one of {DPO_LOSSES}, got {loss!r}")
    if sft_weight and chosen_tokens is None:
        raise ValueError("`chosen_tokens` is needed when `sft_weight` > 0")
    chosen_ratio = policy_chosen - ref_chosen  # (B,) log π/π_ref of y_w
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    h = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    if sft_weight:
        assert chosen_tokens is not None
        n = chosen_tokens.to(policy_chosen.dtype).clamp(min=1)
        losses = losses + sft_weight * (-policy_chosen / n)
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Bypass every LoRA layer meanwhile (the model is then the base), restoring each layer's
    previous state afterwards, also on error."""
    previous = [(m, m.enabled) for _, m in lora_modules(model)]
    set_lora_enabled(model, False)
    try:
        yield
    finally:
        for m, enabled in previous:
            m.enabled = enabled


def sequence_logps(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(R,) sum of log p(labels[r, t] | ids[r, :t]) over each row's scored positions.

    ids, labels: (R, T) int64, labels `IGNORE_INDEX` where unscored (Hugging Face alignment:
    position t is scored on predicting labels[:, t]). Rows are independent sequences, right
    padded (padding is never scored, and causal attention keeps it out of the scored tokens).
    """
    tf = cast("Transformer", model)
    h = tf.hidden_states(ids)[:, :-1]  # (R, T-1, d)
    targets = labels[:, 1:]  # (R, T-1)
    weight = tf.output_projection  # the tied embedding stays in its GGUF blocks
    softcap = tf.config.final_logit_softcap
    out = []
    for r in range(ids.shape[0]):
        idx = (targets[r] != IGNORE_INDEX).nonzero().squeeze(1)
        # Only the answer's positions go through the (vocab-wide) output projection.
        nll = fused_linear_cross_entropy(
            h[r].index_select(0, idx), weight, targets[r].index_select(0, idx), softcap
        )
        out.append(-nll)
    return torch.stack(out)


def _chosen_tokens(batch: PairBatch) -> torch.Tensor:
    """(B,) scored tokens of each chosen answer (the RPO term's per-token normaliser)."""
    labels = torch.from_numpy(batch.labels[: batch.pairs, 1:])
    return (labels != IGNORE_INDEX).sum(dim=1)


def _batch_logps(model: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """((B,), (B,)) summed answer log-probs of the chosen and the rejected rows."""
    logps = sequence_logps(model, torch.from_numpy(batch.ids), torch.from_numpy(batch.labels))
    return logps[: batch.pairs], logps[batch.pairs :]


def _batch_loss(
    batch: PairBatch,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref: torch.Tensor,
    config: TrainConfig,
) -> PreferenceLoss:
    """The configured preference loss of one batch; `ref` is its (B, 2) reference log-probs."""
    return preference_loss(
        chosen,
        rejected,
        ref[:, 0],
        ref[:, 1],
        beta=config.beta,
        loss=config.dpo_loss,
        sft_weight=config.sft_weight,
        chosen_tokens=_chosen_tokens(batch),
    )


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    dataset: PreferenceDataset,
    split: str,
    *,
    reference: DpoReference = "base",
    batch_size: int = 4,
) -> torch.Tensor:
    """(N, 2) float32 reference log-probs (chosen, rejected) of every pair of `split`.

    "base" bypasses the adapter; "start" uses the model as it is (the starting adapter).
    Evaluated in eval mode (no dropout), so the result is a pure function of the weights.
    """
    if reference not in DPO_REFERENCES:
        raise ValueError(f"`reference` should be one of {DPO_REFERENCES}, got {reference!r}")
    n = len(dataset.train if split == "train" else dataset.val)
    out = torch.zeros((n, 2), dtype=torch.float32)
    was_training = model.training
    model.eval()
    ctx = adapter_disabled(model) if reference == "base" else contextlib.nullcontext()
    try:
        with ctx:
            for batch in dataset.batches(split, batch_size):
                chosen, rejected = _batch_logps(model, batch)
                idx = torch.from_numpy(batch.index)
                out[idx, 0], out[idx, 1] = chosen.float(), rejected.float()
    finally:
        model.train(was_training)
    return out


@dataclass
class _Totals:
    """Sums over pairs, for a step's or an evaluation's means."""

    pairs: int = 0
    loss: float = 0.0
    correct: int = 0
    margin: float = 0.0
    chosen: float = 0.0
    rejected: float = 0.0

    def add(self, out: PreferenceLoss, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self.pairs += len(out.losses)
        self.loss += float(out.losses.detach().sum())
        self.correct += int((out.chosen_rewards > out.rejected_rewards).sum())
        self.margin += float((out.chosen_rewards - out.rejected_rewards).sum())
        self.chosen += float(chosen.detach().sum())
        self.rejected += float(rejected.detach().sum())

    def metrics(self) -> dict[str, float]:
        n = max(self.pairs, 1)
        return {
            "reward_accuracy": self.correct / n,
            "reward_margin": self.margin / n,
            "chosen_logps": self.chosen / n,
            "rejected_logps": self.rejected / n,
        }


@contextlib.contextmanager
def _reference_policy(
    model: torch.nn.Module, reference: DpoReference, start: Mapping[str, torch.Tensor] | None
) -> Iterator[None]:
    """The model as the reference policy meanwhile, in eval mode: adapter off ("base"), or the
    starting adapter's tensors swapped in ("start"); the training state is restored exactly."""
    was_training = model.training
    model.eval()
    try:
        if reference == "base":
            with adapter_disabled(model):
                yield
        else:
            assert start is not None
            current = {k: v.clone() for k, v in lora_state_dict(model).items()}
            load_lora_state_dict(model, start, strict=True)
            try:
                yield
            finally:
                load_lora_state_dict(model, current, strict=True)
    finally:
        model.train(was_training)


class DpoObjective:
    """The DPO/IPO objective for `Trainer` (see the module docstring)."""

    def __init__(self, dataset: PreferenceDataset) -> None:
        self.dataset = dataset
        self.num_examples = len(dataset.train)
        self.reference = {
            split: torch.full((len(items), 2), float("nan"))
            for split, items in (("train", dataset.train), ("val", dataset.val))
        }
        """'train' (N, 2) and 'val' (M, 2) reference log-probs (chosen, rejected); NaN where
        not computed yet."""
        self.start_adapter: dict[str, torch.Tensor] | None = None
        """The LoRA tensors the run started from (reference="start" only)."""

    def fingerprint(self, config: TrainConfig, base_id: str) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(config.trajectory_fields(), sort_keys=True, default=list).encode())
        for split in (self.dataset.train, self.dataset.val):
            h.update(len(split).to_bytes(8, "little"))
            for pair in split:
                for ex in (pair.chosen, pair.rejected):
                    h.update(len(ex.input_ids).to_bytes(8, "little"))
                    h.update(np.ascontiguousarray(ex.input_ids).tobytes())
                    h.update(np.packbits(ex.loss_mask).tobytes())
        h.update(base_id.encode())
        return h.hexdigest()

    def prepare(self, model: torch.nn.Module, config: TrainConfig) -> None:
        if config.reference == "start":
            self.start_adapter = lora_state_dict(model)
        if self.dataset.val:
            self.reference["val"] = reference_logps(
                model,
                self.dataset,
                "val",
                reference=config.reference,
                batch_size=max(1, config.batch_size),
            )

    def consumed(self, config: TrainConfig) -> int:
        return config.batch_size * config.grad_accum

    def _reference_for(
        self, model: torch.nn.Module, batch: PairBatch, config: TrainConfig
    ) -> torch.Tensor:
        """(B, 2) cached reference log-probs of the batch's pairs, computing missing ones."""
        cache = self.reference["train"]
        idx = torch.from_numpy(batch.index)
        if torch.isnan(cache[idx]).any():
            with torch.no_grad(), _reference_policy(model, config.reference, self.start_adapter):
                chosen, rejected = _batch_logps(model, batch)
            fresh = torch.stack([chosen.float(), rejected.float()], dim=1)  # (B, 2)
            missing = torch.isnan(cache[idx]).any(dim=1)
            cache[idx[missing]] = fresh[missing]
        return cache[idx]

    def step(self, model: torch.nn.Module, position: int, config: TrainConfig) -> StepOutcome:
        micro = config.batch_size
        batches = [
            self.dataset.train_batch(position + k * micro, micro) for k in range(config.grad_accum)
        ]
        n_pairs = sum(b.pairs for b in batches)
        totals = _Totals()
        for batch in batches:
            ref = self._reference_for(model, batch, config)  # (B, 2)
            chosen, rejected = _batch_logps(model, batch)
            out = _batch_loss(batch, chosen, rejected, ref, config)
            # The step's mean over all its pairs, whatever the accumulation.
            (out.losses.sum() / n_pairs).backward()
            totals.add(out, chosen, rejected)
        return StepOutcome(
            loss=totals.loss / n_pairs,
            tokens=sum(b.real_tokens for b in batches),
            target_tokens=sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches),
            metrics=totals.metrics(),
        )

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, config: TrainConfig) -> Evaluation | None:
        """Mean loss, reward accuracy and margin, and log-probs on the held-out pairs."""
        if not self.dataset.val:
            return None
        was_training = model.training
        model.eval()
        totals = _Totals()
        try:
            for i, batch in enumerate(self.dataset.batches("val", max(1, config.batch_size))):
                if config.eval_batches and i >= config.eval_batches:
                    break
                chosen, rejected = _batch_logps(model, batch)
                ref = self.reference["val"][torch.from_numpy(batch.index)]
                out = _batch_loss(batch, chosen, rejected, ref, config)
                totals.add(out, chosen, rejected)
        finally:
            model.train(was_training)
        return Evaluation(loss=totals.loss / max(totals.pairs, 1), metrics=totals.metrics())

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"reference": {k: v.clone() for k, v in self.reference.items()}}
        if self.start_adapter is not None:
            state["start_adapter"] = self.start_adapter
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ref = state.get("reference")
        sizes = {"train": len(self.dataset.train), "val": len(self.dataset.val)}
        if not isinstance(ref, Mapping) or any(
            not isinstance(ref.get(k), torch.Tensor) or tuple(ref[k].shape) != (n, 2)
            for k, n in sizes.items()
        ):
            raise CheckpointError(
                "the checkpoint holds no reference log-probs for these pairs; "
                "start afresh in another output directory"
            )
        self.reference = {k: ref[k].float().clone() for k in sizes}
        start = state.get("start_adapter")
        self.start_adapter = dict(start) if isinstance(start, Mapping) else None


def fit_dpo(
    model: torch.nn.Module,
    dataset: PreferenceDataset,
    config: TrainConfig,
    **kwargs: Any,
) -> TrainResult:
    """`fit` for preference pairs: the same keywords (init_adapter, checkpoint_path, resume,
    base_id, progress, on_step) and result; `config.method` must be "dpo"."""
    if config.method != "dpo":
        raise ValueError(f"fit_dpo needs a config with method='dpo', got {config.method!r}")
    return fit(model, dataset, config, **kwargs)
