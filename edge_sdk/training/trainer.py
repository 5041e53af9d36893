"""LoRA / QLoRA fine-tuning: plain functions, `setup -> fit -> evaluate -> export`.

- Only adapter parameters train (AdamW), with linear warmup and cosine decay
  (`edge_sdk.training.schedule`), gradient accumulation and clipping.
- One loop (`Trainer`) for every method; what is trained on and how the loss is computed is
  an `Objective`'s: SFT here (the mean cross-entropy over scored tokens of an optimizer step,
  all its micro-batches together, so accumulation does not change what is optimized), DPO and
  IPO in `edge_sdk.training.dpo` (`TrainConfig(method="dpo")`).
- Deterministic: the adapter init is a seeded numpy draw (independent of device and of which
  modules are adapted), the data order is a pure function of (seed, epoch), and dropout draws
  from torch's generator, seeded here and saved in checkpoints. A resumed run reproduces an
  uninterrupted one bit for bit on the same machine.

Library use (the federated client): load the model once, then
`fit(model, dataset, TrainConfig(..., lora=LoraConfig(freeze_a=True)), init_adapter=global_adapter)`
returns the new adapter as numpy arrays plus metrics. The CLI uses `run()`, which adds loading,
checkpoints and export of both adapter formats.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from edge_sdk._docfields import document_fields
from edge_sdk.adapters.seeded import frozen_a_matrix
from edge_sdk.choices import PRECISIONS, Precision
from edge_sdk.models.config import model_config
from edge_sdk.models.naming import parse_hf_module
from edge_sdk.training.adamw import AdapterAdamW
from edge_sdk.training.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from edge_sdk.training.data import IGNORE_INDEX, Batch, DataConfig, Dataset, build_dataset, describe
from edge_sdk.training.errors import CheckpointError, TrainingError
from edge_sdk.training.lora import (
    LoraConfig,
    load_lora_state_dict,
    lora_modules,
    lora_parameters,
    lora_state_dict,
)
from edge_sdk.training.methods import (
    DEFAULT_BETA,
    DEFAULT_DPO_LOSS,
    DEFAULT_METHOD,
    DEFAULT_REFERENCE,
    DEFAULT_SFT_WEIGHT,
    DPO_LOSSES,
    DPO_REFERENCES,
    MAX_SFT_WEIGHT,
    TRAIN_METHODS,
    DpoLoss,
    DpoReference,
    TrainMethod,
)
from edge_sdk.training.schedule import lr_at
from edge_sdk.validators import (
    is_finite,
    is_positive_finite,
    require_non_negative_ints,
    require_positive_ints,
)

if TYPE_CHECKING:
    from edge_sdk.training.preferences import PreferenceDataset

logger = logging.getLogger(__name__)


_DPO_FIELDS = ("beta", "dpo_loss", "reference", "sft_weight")


@document_fields
@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run."""

    steps: int = 200
    """Optimizer steps."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter: rank, alpha, dropout, targets, layers, freeze_a (`LoraConfig`)."""
    method: TrainMethod = DEFAULT_METHOD
    """sft (examples) or dpo (preference pairs)."""
    beta: float = DEFAULT_BETA
    """DPO/IPO beta: how far the policy may move from the reference (dpo only)."""
    dpo_loss: DpoLoss = DEFAULT_DPO_LOSS
    """sigmoid (DPO) or ipo (IPO) (dpo only)."""
    reference: DpoReference = DEFAULT_REFERENCE
    """DPO reference policy: base (adapter disabled) or start (the starting adapter) (dpo only)."""
    sft_weight: float = DEFAULT_SFT_WEIGHT
    """RPO alpha: weight of the chosen answer's per-token NLL added to the DPO loss (dpo only;
    0: plain DPO)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    batch_size: int = 1
    """Sequences per micro-batch (dpo: pairs, each a chosen and a rejected sequence)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate."""
    warmup: int = 10
    """Linear warmup steps (capped at `steps`)."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio at the last step."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter."""
    max_grad_norm: float | None = 1.0
    """Clip the adapter gradient's global norm; None disables clipping."""
    seed: int = 0
    """Seeds the adapter init, data split and order, and dropout."""
    val_fraction: float = 0.1
    """Share of examples held out for evaluation."""
    eval_every: int = 0
    """Evaluate every N steps (0: only before and after training)."""
    eval_batches: int = 0
    """Cap on validation batches per evaluation (0: the whole split)."""
    checkpoint_every: int = 50
    """Write a checkpoint every N steps (0: never; `run()` only)."""
    precision: Precision = "nf4"
    """Frozen base precision: nf4 (QLoRA), bf16 or fp32."""
    gradient_checkpointing: bool = False
    """Recompute block activations in backward (less memory, about 30% slower)."""

    def __post_init__(self) -> None:
        require_positive_ints(self, "steps", "seq_len", "batch_size", "grad_accum")
        require_non_negative_ints(
            self, "warmup", "eval_every", "eval_batches", "checkpoint_every", "seed"
        )
        if not isinstance(self.lora, LoraConfig):
            raise ValueError(f"`lora` should be a LoraConfig, got {type(self.lora).__name__}")  # noqa: TRY004
        for name in ("lr", "beta"):
            if not is_positive_finite(getattr(self, name)):
                raise ValueError(
                    f"`{name}` should be a positive number, got {getattr(self, name)!r}"
                )
        sw = self.sft_weight
        if not (is_finite(sw) and 0.0 <= sw <= MAX_SFT_WEIGHT):
            raise ValueError(
                f"`sft_weight` should be a finite number in [0, {MAX_SFT_WEIGHT:g}], got {sw!r}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"`min_lr_ratio` should be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"`weight_decay` should be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"`max_grad_norm` should be positive or None, got {self.max_grad_norm!r}"
            )
        for name, choices in (
            ("precision", PRECISIONS),
            ("method", TRAIN_METHODS),
            ("dpo_loss", DPO_LOSSES),
            ("reference", DPO_REFERENCES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"`{name}` should be one of {choices}, got {getattr(self, name)!r}"
                )
        DataConfig(seq_len=self.seq_len, val_fraction=self.val_fraction, seed=self.seed)

    def data_config(self, skip_bad: bool = False) -> DataConfig:
        return DataConfig(
            seq_len=self.seq_len, val_fraction=self.val_fraction, seed=self.seed, skip_bad=skip_bad
        )

    def trajectory_fields(self) -> dict[str, Any]:
        """The fields that change the optimization path (not how often we look at it).

        Flat, as before `lora` was a `LoraConfig` of its own, and without the DPO fields for
        SFT: an SFT checkpoint written before keeps its fingerprint and still resumes.
        """
        skip = {"eval_every", "eval_batches", "checkpoint_every", "lora", "method", *_DPO_FIELDS}
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }
        lora = dataclasses.asdict(self.lora)
        if lora.pop("layers") is not None:
            lora["layers"] = self.lora.layers
        out.update(lora)
        if self.method != "sft":
            out.update(method=self.method, **{k: getattr(self, k) for k in _DPO_FIELDS})
            if self.sft_weight == 0.0:
                # Plain DPO: a checkpoint written before the field existed keeps resuming.
                del out["sft_weight"]
        return out


@dataclass
class EvalResult:
    loss: float
    """Mean cross-entropy per scored token (nats)."""
    perplexity: float
    tokens: int
    """Scored tokens evaluated."""


@dataclass
class TrainMetrics:
    """What a run did; `num_examples`/`num_tokens` are what a federated strategy weighs by."""

    num_examples: int
    """Training examples (records; dpo: pairs) available to the run."""
    num_tokens: int
    """Tokens processed in training (sft: batch * seq_len per micro-batch, padding included;
    dpo: the tokens of the chosen and rejected sequences, padding excluded)."""
    num_target_tokens: int
    """Scored tokens processed in training."""
    steps: int
    train_loss: float
    """Mean loss over the last min(10, steps) steps."""
    eval_loss_before: float | None
    eval_loss: float | None
    perplexity: float | None
    seconds: float
    """Wall time of the optimization (excluding model loading)."""
    tokens_per_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    """Per-step records: step, loss, lr, tokens/s, the method's own metrics (dpo: reward
    accuracy and margin, chosen and rejected log-probs), and eval loss where evaluated."""
    eval_metrics_before: dict[str, float] = field(default_factory=dict)
    """The method's own evaluation metrics before training (dpo: reward_accuracy, ...)."""
    eval_metrics: dict[str, float] = field(default_factory=dict)
    """The method's own evaluation metrics after training."""


@dataclass
class TrainResult:
    adapter: dict[str, np.ndarray]
    """Naming-convention LoRA tensors, float32: A (r, in), B (out, r)."""
    metrics: TrainMetrics


# --------------------------------------------------------------------------- setup


def seeded_adapter(
    shapes: Mapping[str, tuple[int, int]], rank: int, seed: int
) -> dict[str, np.ndarray]:
    """Seeded LoRA init for module paths -> (out, in): A ~ U(±1/sqrt(in)) like PEFT, B = 0.

    A comes from `frozen_a_matrix`, keyed by the tensor name: the same bits as the
    coordinator's version 0 on any machine, whatever else is adapted.
    """
    out: dict[str, np.ndarray] = {}
    for path, (n_out, n_in) in shapes.items():
        parse_hf_module(path)  # only LoRA target paths
        out[f"{path}.lora_A"] = frozen_a_matrix(seed, (rank, n_in), f"{path}.lora_A")
        out[f"{path}.lora_B"] = np.zeros((n_out, rank), dtype=np.float32)
    return out


def adapter_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Module path -> (out, in) of every LoRA layer of `model`."""
    return {path: (m.out_features, m.in_features) for path, m in lora_modules(model)}


def load_for_training(
    model_path: str | os.PathLike[str], config: TrainConfig, *, progress: bool = False
) -> torch.nn.Module:
    """The frozen base (in `config.precision`) with LoRA layers attached."""
    from edge_sdk.models.loader import load_model

    return load_model(
        model_path,
        precision=config.precision,
        lora=config.lora,
        gradient_checkpointing=config.gradient_checkpointing,
        progress=progress,
    )


def _check_model(model: torch.nn.Module, config: TrainConfig) -> None:
    modules = dict(lora_modules(model))
    if not modules:
        raise ValueError("the model has no LoRA layers; load it with lora=config.lora")
    lora = config.lora
    for path, m in modules.items():
        if m.rank != lora.rank or not math.isclose(m.scale, lora.scale):
            raise ValueError(
                f"{path} has rank {m.rank}, scale {m.scale:g}; the config asks for rank "
                f"{lora.rank}, scale {lora.scale:g}"
            )


# --------------------------------------------------------------------------- evaluate


def _batch_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed loss of a packed batch, each example isolated from the others in its row."""
    return model(
        torch.from_numpy(batch.ids),
        torch.from_numpy(batch.labels),
        reduction="sum",
        position_ids=torch.from_numpy(batch.positions),
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, dataset: Dataset, *, batch_size: int = 4, max_batches: int = 0
) -> EvalResult | None:
    """Token-weighted mean loss and perplexity on the validation split (None when it is empty)."""
    if not len(dataset.val_ids):
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(dataset.val_batches(batch_size)):
            if max_batches and i >= max_batches:
                break
            n = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
            if n == 0:
                continue
            loss = _batch_loss(model, batch)
            total += float(loss)
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        return None
    mean = total / count
    return EvalResult(loss=mean, perplexity=math.exp(min(mean, 50.0)), tokens=count)


# --------------------------------------------------------------------------- fit


@dataclass
class _Progress:
    """tqdm bar with loss, tokens/s and ETA (tqdm's), or nothing."""

    total: int
    initial: int
    enabled: bool
    bar: Any = None

    def __post_init__(self) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                initial=self.initial,
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )

    def update(
        self, loss: float, tok_s: float, lr: float, extra: Mapping[str, str] | None = None
    ) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.2e}", **(extra or {}),
                refresh=False,
            )  # fmt: skip
            self.bar.update(1)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            logger.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fingerprint(config: TrainConfig, dataset: Dataset, base_id: str = "") -> str:
    """Digest of the config fields, the packed data and the base model id that fix a run."""
    h = hashlib.sha256()
    h.update(json.dumps(config.trajectory_fields(), sort_keys=True, default=list).encode())
    # The positions are part of it: a checkpoint from before packed examples were isolated
    # followed another trajectory and is not resumed as if it were this run.
    for packed in (dataset.train, dataset.val):
        for arr in (packed.ids, packed.labels, packed.positions):
            h.update(np.ascontiguousarray(arr).tobytes())
    h.update(base_id.encode())
    return h.hexdigest()


@dataclass
class Evaluation:
    """One evaluation on the validation split."""

    loss: float
    perplexity: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """The method's own metrics by name (recorded in the history as `eval_<name>`)."""

    def describe(self) -> str:
        parts = [f"loss {self.loss:.4f}"]
        if self.perplexity is not None:
            parts.append(f"perplexity {self.perplexity:.2f}")
        parts += [f"{k.replace('_', ' ')} {v:.4f}" for k, v in self.metrics.items()]
        return ", ".join(parts)


@dataclass
class StepOutcome:
    """What one optimizer step's forward and backward passes did (gradients are accumulated)."""

    loss: float
    """The step's mean loss (per scored token for sft, per pair for dpo)."""
    tokens: int
    target_tokens: int
    metrics: dict[str, float] = field(default_factory=dict)
    """The method's own per-step metrics, recorded in the history."""


class Objective(Protocol):
    """What a training method adds to the shared loop: data, loss, evaluation, extra state."""

    num_examples: int

    def fingerprint(self, config: TrainConfig, base_id: str) -> str:
        """Digest of everything that fixes the run's trajectory (see `fingerprint`)."""
        ...

    def prepare(self, model: torch.nn.Module, config: TrainConfig) -> None:
        """Called once on a fresh run, after the starting adapter is loaded (dpo: reference
        log-probs); a resumed run gets `load_state_dict` instead."""
        ...

    def step(self, model: torch.nn.Module, position: int, config: TrainConfig) -> StepOutcome:
        """Forward and backward (accumulating gradients) over one step's micro-batches,
        starting at training item `position`; `consumed(config)` items are used."""
        ...

    def consumed(self, config: TrainConfig) -> int:
        """Training items (sequences, pairs) one optimizer step uses."""
        ...

    def evaluate(self, model: torch.nn.Module, config: TrainConfig) -> Evaluation | None: ...

    def state_dict(self) -> dict[str, Any]:
        """Extra checkpoint content (tensors and plain containers only)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class _SupervisedObjective:
    """Mean cross-entropy over the scored tokens of a step's packed sequences."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.num_examples = dataset.stats.train_examples

    def fingerprint(self, config: TrainConfig, base_id: str) -> str:
        return fingerprint(config, self.dataset, base_id)

    def prepare(self, model: torch.nn.Module, config: TrainConfig) -> None:
        pass

    def consumed(self, config: TrainConfig) -> int:
        return config.batch_size * config.grad_accum

    def step(self, model: torch.nn.Module, position: int, config: TrainConfig) -> StepOutcome:
        micro = config.batch_size
        batches = [
            self.dataset.train_batch(position + k * micro, micro) for k in range(config.grad_accum)
        ]
        # One normalizer for the whole step, so accumulation does not change what is optimized.
        n_scored = sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        loss_sum = 0.0
        for batch in batches:
            loss = _batch_loss(model, batch)
            (loss / max(n_scored, 1)).backward()
            loss_sum += float(loss.detach())
        return StepOutcome(
            loss=loss_sum / max(n_scored, 1),
            tokens=sum(b.ids.size for b in batches),
            target_tokens=n_scored,
        )

    def evaluate(self, model: torch.nn.Module, config: TrainConfig) -> Evaluation | None:
        ev = evaluate(
            model,
            self.dataset,
            batch_size=max(1, config.batch_size),
            max_batches=config.eval_batches,
        )
        return Evaluation(ev.loss, ev.perplexity) if ev else None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


@dataclass
class RunState:
    """Where a run is: everything besides the adapter, optimizer and RNG that a checkpoint
    must hold for a resumed run to continue as if never stopped."""

    step: int = 0
    """Optimizer steps done."""
    position: int = 0
    """Training items (sequences, or pairs) consumed: with the seed, the whole data state."""
    tokens: int = 0
    target_tokens: int = 0
    elapsed: float = 0.0
    """Seconds spent in optimizer steps so far."""
    history: list[dict[str, float]] = field(default_factory=list)
    eval_before: Evaluation | None = None

    def to_checkpoint(self) -> dict[str, Any]:
        ev = self.eval_before
        return {
            "step": self.step,
            "position": self.position,
            "tokens": self.tokens,
            "target_tokens": self.target_tokens,
            "elapsed": self.elapsed,
            "history": self.history,
            "eval_before": ev.loss if ev else None,
            "eval_metrics_before": dict(ev.metrics) if ev else {},
        }

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any]) -> RunState:
        loss = state.get("eval_before")
        ev = None
        if loss is not None:
            ev = Evaluation(float(loss), metrics=dict(state.get("eval_metrics_before") or {}))
        return cls(
            step=int(state["step"]),
            position=int(state["position"]),
            tokens=int(state["tokens"]),
            target_tokens=int(state.get("target_tokens", 0)),
            elapsed=float(state["elapsed"]),
            history=list(state["history"]),
            eval_before=ev,
        )


class Trainer:
    """One training run of the model's LoRA layers: the loop every method shares.

    `fit()` goes through its stages in order: load the starting adapter and build the
    optimizer, restore a checkpoint or prepare a fresh run, evaluate before training, run the
    optimizer steps (checkpointing every `config.checkpoint_every`), evaluate, and write the
    last checkpoint. What is trained on, and how the loss is computed, is the `Objective`'s.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        objective: Objective,
        config: TrainConfig,
        *,
        checkpoint_path: str | os.PathLike[str] | None = None,
        base_id: str = "",
        progress: bool = False,
        on_step: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        _check_model(model, config)
        self.model, self.objective, self.config = model, objective, config
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.base_id, self.progress, self.on_step = base_id, progress, on_step
        self.state = RunState()
        self.params: list[torch.nn.Parameter] = []
        self.optimizer: AdapterAdamW | None = None
        self.digest = ""

    # -- stages -----------------------------------------------------------------------------

    def fit(
        self, *, init_adapter: Mapping[str, np.ndarray] | None = None, resume: bool = False
    ) -> TrainResult:
        self._load_start(init_adapter)
        self.digest = self.objective.fingerprint(self.config, self.base_id)
        if resume:
            self._restore()
        else:
            self.objective.prepare(self.model, self.config)
        if self.state.step > self.config.steps:
            raise CheckpointError(
                f"checkpoint is at step {self.state.step}, past the configured "
                f"{self.config.steps} steps"
            )
        if self.state.step == 0 and self.state.eval_before is None:
            self.state.eval_before = self.objective.evaluate(self.model, self.config)
            if self.state.eval_before:
                logger.info("eval before training: %s", self.state.eval_before.describe())
        self._loop()
        return self._finish()

    def _load_start(self, init_adapter: Mapping[str, np.ndarray] | None) -> None:
        """The seeded adapter (or `init_adapter` where given), trainable params, AdamW."""
        config = self.config
        torch.manual_seed(config.seed)
        start = seeded_adapter(adapter_shapes(self.model), config.lora.rank, config.seed)
        if init_adapter is not None:
            start.update({k: np.asarray(v, dtype=np.float32) for k, v in init_adapter.items()})
        load_lora_state_dict(self.model, start, strict=True)
        for _, m in lora_modules(self.model):
            m.lora_A.requires_grad_(not config.lora.freeze_a)
            m.lora_B.requires_grad_(True)
        self.params = lora_parameters(self.model)
        # Not torch.optim.AdamW: same arithmetic and state dict, without importing torch._dynamo.
        self.optimizer = AdapterAdamW(
            self.params,
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=(0.9, 0.999),
            eps=1e-8,
        )

    def _restore(self) -> None:
        if self.checkpoint_path is None:
            raise ValueError("resume=True needs a checkpoint_path")
        assert self.optimizer is not None
        saved = load_checkpoint(self.checkpoint_path, fingerprint=self.digest)
        load_lora_state_dict(self.model, saved["adapter"], strict=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"])
        self.objective.load_state_dict(saved.get("objective") or {})
        self.state = RunState.from_checkpoint(saved)
        logger.info(
            "resumed from %s at step %d/%d",
            self.checkpoint_path,
            self.state.step,
            self.config.steps,
        )

    def _checkpoint(self) -> None:
        if self.checkpoint_path is None:
            return
        assert self.optimizer is not None
        extra = self.objective.state_dict()
        save_checkpoint(
            self.checkpoint_path,
            {
                "fingerprint": self.digest,
                **self.state.to_checkpoint(),
                "adapter": {k: torch.from_numpy(v) for k, v in _adapter_numpy(self.model).items()},
                "optimizer": self.optimizer.state_dict(),
                "rng": rng_state(),
                **({"objective": extra} if extra else {}),
            },
        )

    def _loop(self) -> None:
        config, state = self.config, self.state
        bar = _Progress(config.steps, state.step, self.progress)
        self.model.train()
        try:
            while state.step < config.steps:
                record = self._step()
                if (
                    config.eval_every
                    and state.step % config.eval_every == 0
                    and state.step < config.steps
                ):
                    ev = self.objective.evaluate(self.model, config)
                    if ev:
                        record.update(_eval_record(ev))
                        bar.note(f"step {state.step}: eval {ev.describe()}")
                state.history.append(record)
                extra = {k: f"{v:.3g}" for k, v in record.items() if k in _BAR_METRICS}
                bar.update(
                    record["loss"], state.tokens / state.elapsed if state.elapsed else 0.0,
                    record["lr"], extra,
                )  # fmt: skip
                if self.on_step is not None:
                    self.on_step(record)
                if (
                    config.checkpoint_every
                    and state.step % config.checkpoint_every == 0
                    and state.step < config.steps
                ):
                    self._checkpoint()
        finally:
            bar.close()

    def _step(self) -> dict[str, float]:
        """One optimizer step; returns its history record."""
        config, state = self.config, self.state
        assert self.optimizer is not None
        t0 = time.perf_counter()
        lr = lr_at(
            state.step,
            base_lr=config.lr,
            warmup=config.warmup,
            total=config.steps,
            min_ratio=config.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        out = self.objective.step(self.model, state.position, config)
        if not math.isfinite(out.loss):
            raise TrainingError(
                f"loss became {out.loss} at step {state.step + 1}; try a lower --lr"
            )
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
        self.optimizer.step()
        state.step += 1
        state.position += self.objective.consumed(config)
        state.tokens += out.tokens
        state.target_tokens += out.target_tokens
        dt = time.perf_counter() - t0
        state.elapsed += dt
        return {
            "step": state.step,
            "loss": out.loss,
            "lr": lr,
            "tokens_per_s": out.tokens / dt,
            **out.metrics,
        }

    def _finish(self) -> TrainResult:
        state = self.state
        self.model.eval()
        final = self.objective.evaluate(self.model, self.config)
        if final is not None and state.history:
            state.history[-1].update(_eval_record(final))
        self._checkpoint()
        recent = [h["loss"] for h in state.history[-10:]]
        before = state.eval_before
        metrics = TrainMetrics(
            num_examples=self.objective.num_examples,
            num_tokens=state.tokens,
            num_target_tokens=state.target_tokens,
            steps=state.step,
            train_loss=float(np.mean(recent)) if recent else float("nan"),
            eval_loss_before=before.loss if before else None,
            eval_loss=final.loss if final else None,
            perplexity=final.perplexity if final else None,
            seconds=state.elapsed,
            tokens_per_s=state.tokens / state.elapsed if state.elapsed else 0.0,
            history=state.history,
            eval_metrics_before=dict(before.metrics) if before else {},
            eval_metrics=dict(final.metrics) if final else {},
        )
        return TrainResult(adapter=_adapter_numpy(self.model), metrics=metrics)


_BAR_METRICS = ("reward_accuracy", "reward_margin")


def _eval_record(ev: Evaluation) -> dict[str, float]:
    return {"eval_loss": ev.loss, **{f"eval_{k}": v for k, v in ev.metrics.items()}}


def fit(
    model: torch.nn.Module,
    dataset: Dataset | PreferenceDataset,
    config: TrainConfig,
    *,
    init_adapter: Mapping[str, np.ndarray] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    base_id: str = "",
    progress: bool = False,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train the model's LoRA layers on `dataset` and return the adapter and metrics.

    `config.method` says how: "sft" takes a `Dataset` (packed examples), "dpo" a
    `PreferenceDataset` (pairs; see `edge_sdk.training.dpo`).
    `init_adapter` (e.g. the federation's global adapter) replaces the seeded init for the
    modules it covers; with `config.lora.freeze_a` only B trains.
    With `checkpoint_path`, a checkpoint is written every `config.checkpoint_every` steps and at
    the end; `resume=True` continues from it (refused when `fingerprint` differs).
    """
    objective: Objective
    if config.method == "dpo":
        from edge_sdk.training.dpo import DpoObjective
        from edge_sdk.training.preferences import PreferenceDataset

        if not isinstance(dataset, PreferenceDataset):
            raise TypeError(
                f"method 'dpo' trains on a PreferenceDataset, got {type(dataset).__name__}"
            )
        objective = DpoObjective(dataset)
    else:
        if not isinstance(dataset, Dataset):
            raise TypeError(f"method 'sft' trains on a Dataset, got {type(dataset).__name__}")
        objective = _SupervisedObjective(dataset)
    trainer = Trainer(
        model,
        objective,
        config,
        checkpoint_path=checkpoint_path,
        base_id=base_id,
        progress=progress,
        on_step=on_step,
    )
    return trainer.fit(init_adapter=init_adapter, resume=resume)


def _adapter_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in lora_state_dict(model).items()}


# --------------------------------------------------------------------------- the CLI's run


@dataclass
class RunOutput:
    """Where `run()` put things, and what it measured."""

    out_dir: Path
    peft_dir: Path
    gguf_path: Path
    metrics_path: Path
    result: TrainResult
    data_summary: str


def run(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    config: TrainConfig,
    *,
    resume: bool = False,
    skip_bad: bool = False,
    progress: bool = False,
    model_name: str | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_data: Callable[[str], None] | None = None,
    init_adapter: Mapping[str, np.ndarray] | None = None,
) -> RunOutput:
    """`fedlm train`: resolve, tokenize, load, fit with checkpoints, export both adapter formats.

    `config.method` "sft" reads examples (`edge_sdk.training.data`), "dpo" preference pairs
    (`edge_sdk.training.preferences`). `init_adapter` starts from an adapter (naming-convention
    tensors) instead of the seeded init: e.g. DPO after SFT, with `config.reference="start"`.

    `out_dir` receives `adapter_model.safetensors` + `adapter_config.json` (PEFT),
    `adapter.gguf` (llama.cpp), `metrics.json` and `checkpoint.pt`. `on_data` receives the
    one-line data summary as soon as the data is read, before the model loads.
    """
    from edge_sdk.adapters.export import export_adapter
    from edge_sdk.adapters.gguf_lora import BaseModelInfo
    from edge_sdk.models import resolve
    from edge_sdk.models.identity import model_sha256
    from edge_sdk.training.tokenizer import load_tokenizer

    model_path = resolve(model)
    out = Path(out_dir)
    ckpt = out / CHECKPOINT_NAME
    if ckpt.exists() and not resume:
        raise CheckpointError(
            f"{out} already holds a training checkpoint; pass --resume to continue that run, "
            "or choose another --out"
        )
    if resume and not ckpt.exists():
        raise CheckpointError(f"{ckpt}: no checkpoint to resume from")
    tokenizer = load_tokenizer(model_path)
    dataset: Dataset | PreferenceDataset
    if config.method == "dpo":
        from edge_sdk.training.preferences import build_preference_dataset, describe_pairs

        dataset = build_preference_dataset(data, tokenizer, config.data_config(skip_bad))
        summary = describe_pairs(dataset.stats)
    else:
        dataset = build_dataset(data, tokenizer, config.data_config(skip_bad))
        summary = describe(dataset.stats)
    # llama.cpp's vocabulary (~25 MB for SmolLM2) is not needed past packing (issue 16).
    del tokenizer
    logger.info("data: %s", summary)
    if on_data is not None:
        on_data(summary)
    # The file's sha256 (cached by the identity module) names the base in the checkpoint
    # fingerprint and in both adapter files.
    base_sha = model_sha256(model_path)
    torch_model = load_for_training(model_path, config, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    result = fit(
        torch_model,
        dataset,
        config,
        init_adapter=init_adapter,
        checkpoint_path=ckpt,
        resume=resume,
        base_id=base_sha,
        progress=progress,
        on_step=on_step,
    )
    info = BaseModelInfo.from_gguf(model_path, sha256=base_sha)
    paths = export_adapter(
        out,
        result.adapter,
        rank=config.lora.rank,
        alpha=config.lora.alpha,
        dropout=config.lora.dropout,
        base=info,
        base_model_name=model_name or str(model),
        n_layer=model_config(torch_model).n_layer,
    )
    metrics_path = out / "metrics.json"
    doc = {
        "model": str(model),
        "model_path": str(model_path),
        "model_sha256": base_sha,
        "config": dataclasses.asdict(config),
        "data": dataclasses.asdict(dataset.stats),
        "metrics": dataclasses.asdict(result.metrics),
    }
    tmp = metrics_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=list) + "\n")
    os.replace(tmp, metrics_path)
    return RunOutput(out, paths.peft_dir, paths.gguf_path, metrics_path, result, summary)
