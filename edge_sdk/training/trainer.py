"""LoRA / QLoRA fine-tuning: plain functions, `setup -> fit -> evaluate -> export`.

- Only adapter parameters train (AdamW), with linear warmup and cosine decay
  (`edge_sdk.training.schedule`), gradient accumulation and clipping.
- The loss is the mean cross-entropy over scored tokens of an optimizer step (all its
  micro-batches together), so accumulation does not change what is optimized.
- Deterministic: the adapter init is a seeded numpy draw (independent of device and of which
  modules are adapted), the data order is a pure function of (seed, epoch), and dropout draws
  from torch's generator, seeded here and saved in checkpoints. A resumed run reproduces an
  uninterrupted one bit for bit on the same machine.

Library use (the federated client): load the model once, then
`fit(model, dataset, TrainConfig(..., freeze_a=True), init_adapter=global_adapter)` returns the new
adapter as numpy arrays plus metrics. The CLI uses `run()`, which adds loading, checkpoints
and export of both adapter formats.
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
from typing import Any

import numpy as np
import torch

from edge_sdk._docfields import document_fields
from edge_sdk.adapters.seeded import frozen_a_matrix
from edge_sdk.models.naming import LORA_TARGETS, parse_hf_module
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
from edge_sdk.training.schedule import lr_at

logger = logging.getLogger(__name__)

PRECISIONS = ("nf4", "bf16", "fp32")


@document_fields
@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run."""

    steps: int = 200
    """Optimizer steps."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha; the update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    targets: tuple[str, ...] = LORA_TARGETS
    """Adapted projections (default: every attention and MLP projection)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    batch_size: int = 1
    """Sequences per micro-batch."""
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
    precision: str = "nf4"
    """Frozen base precision: nf4 (QLoRA), bf16 or fp32."""
    gradient_checkpointing: bool = False
    """Recompute block activations in backward (less memory, about 30% slower)."""
    freeze_a: bool = False
    """Train B only, with A fixed at its (seeded or given) value."""

    def __post_init__(self) -> None:
        for name in ("steps", "rank", "seq_len", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` should be a positive integer, got {value!r}")
        for name in ("warmup", "eval_every", "eval_batches", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` should be a non-negative integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"`lr` should be a positive number, got {self.lr!r}")
        if not (
            isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ValueError(f"`alpha` should be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` should be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"`min_lr_ratio` should be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"`weight_decay` should be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"`max_grad_norm` should be positive or None, got {self.max_grad_norm!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"`precision` should be one of {PRECISIONS}, got {self.precision!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if not self.targets or unknown:
            raise ValueError(
                f"`targets` should be a non-empty subset of {list(LORA_TARGETS)}, got {list(self.targets)}"
            )
        DataConfig(seq_len=self.seq_len, val_fraction=self.val_fraction, seed=self.seed)

    def lora_config(self) -> LoraConfig:
        return LoraConfig(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            targets=self.targets,
            freeze_a=self.freeze_a,
        )

    def data_config(self, skip_bad: bool = False) -> DataConfig:
        return DataConfig(
            seq_len=self.seq_len, val_fraction=self.val_fraction, seed=self.seed, skip_bad=skip_bad
        )

    def trajectory_fields(self) -> dict[str, Any]:
        """The fields that change the optimization path (not how often we look at it)."""
        skip = {"eval_every", "eval_batches", "checkpoint_every"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


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
    """Training examples (records) available to the run."""
    num_tokens: int
    """Tokens processed in training (batch * seq_len per micro-batch, padding included)."""
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
    """Per-step records: step, loss, lr, tokens/s, and eval loss where evaluated."""


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
        lora=config.lora_config(),
        gradient_checkpointing=config.gradient_checkpointing,
        progress=progress,
    )


def _check_model(model: torch.nn.Module, config: TrainConfig) -> None:
    modules = dict(lora_modules(model))
    if not modules:
        raise ValueError("the model has no LoRA layers; load it with lora=config.lora_config()")
    for path, m in modules.items():
        if m.rank != config.rank or not math.isclose(m.scale, config.alpha / config.rank):
            raise ValueError(
                f"{path} has rank {m.rank}, scale {m.scale:g}; the config asks for rank "
                f"{config.rank}, scale {config.alpha / config.rank:g}"
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

    def update(self, loss: float, tok_s: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.2e}", refresh=False
            )
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


def fit(
    model: torch.nn.Module,
    dataset: Dataset,
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

    `init_adapter` (e.g. the federation's global adapter) replaces the seeded init for the
    modules it covers; with `config.freeze_a` only B trains.
    With `checkpoint_path`, a checkpoint is written every `config.checkpoint_every` steps and at
    the end; `resume=True` continues from it (refused when `fingerprint` differs).
    """
    _check_model(model, config)
    torch.manual_seed(config.seed)
    start = seeded_adapter(adapter_shapes(model), config.rank, config.seed)
    if init_adapter is not None:
        start.update({k: np.asarray(v, dtype=np.float32) for k, v in init_adapter.items()})
    load_lora_state_dict(model, start, strict=True)
    for _, m in lora_modules(model):
        m.lora_A.requires_grad_(not config.freeze_a)
        m.lora_B.requires_grad_(True)
    params = lora_parameters(model)
    # Not torch.optim.AdamW: same arithmetic and state dict, without importing torch._dynamo.
    optimizer = AdapterAdamW(
        params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999), eps=1e-8
    )

    digest = fingerprint(config, dataset, base_id)
    step = position = tokens = target_tokens = 0
    elapsed = 0.0
    history: list[dict[str, float]] = []
    eval_before: float | None = None
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if resume:
        if ckpt is None:
            raise ValueError("resume=True needs a checkpoint_path")
        state = load_checkpoint(ckpt, fingerprint=digest)
        load_lora_state_dict(model, state["adapter"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        step, position, tokens = int(state["step"]), int(state["position"]), int(state["tokens"])
        target_tokens = int(state.get("target_tokens", 0))
        elapsed, history = float(state["elapsed"]), list(state["history"])
        eval_before = state.get("eval_before")
        logger.info("resumed from %s at step %d/%d", ckpt, step, config.steps)
    if step > config.steps:
        raise CheckpointError(
            f"checkpoint is at step {step}, past the configured {config.steps} steps"
        )

    def checkpoint() -> None:
        if ckpt is None:
            return
        save_checkpoint(
            ckpt,
            {
                "fingerprint": digest,
                "step": step,
                "position": position,
                "tokens": tokens,
                "target_tokens": target_tokens,
                "elapsed": elapsed,
                "history": history,
                "eval_before": eval_before,
                "adapter": {k: torch.from_numpy(v) for k, v in _adapter_numpy(model).items()},
                "optimizer": optimizer.state_dict(),
                "rng": rng_state(),
            },
        )

    eval_bs = max(1, config.batch_size)
    if step == 0 and eval_before is None:
        ev = evaluate(model, dataset, batch_size=eval_bs, max_batches=config.eval_batches)
        eval_before = ev.loss if ev else None
        if ev:
            logger.info("eval before training: loss %.4f, perplexity %.2f", ev.loss, ev.perplexity)

    bar = _Progress(config.steps, step, progress)
    model.train()
    micro = config.batch_size
    try:
        while step < config.steps:
            t0 = time.perf_counter()
            lr = lr_at(
                step,
                base_lr=config.lr,
                warmup=config.warmup,
                total=config.steps,
                min_ratio=config.min_lr_ratio,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [
                dataset.train_batch(position + k * micro, micro) for k in range(config.grad_accum)
            ]
            n_scored = sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for batch in batches:
                loss = _batch_loss(model, batch)
                (loss / max(n_scored, 1)).backward()
                loss_sum += float(loss.detach())
            step_loss = loss_sum / max(n_scored, 1)
            if not math.isfinite(step_loss):
                raise TrainingError(f"loss became {step_loss} at step {step + 1}; try a lower --lr")
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            step += 1
            position += micro * config.grad_accum
            tokens += sum(b.ids.size for b in batches)
            target_tokens += n_scored
            dt = time.perf_counter() - t0
            elapsed += dt
            record = {
                "step": step,
                "loss": step_loss,
                "lr": lr,
                "tokens_per_s": sum(b.ids.size for b in batches) / dt,
            }
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                ev = evaluate(model, dataset, batch_size=eval_bs, max_batches=config.eval_batches)
                if ev:
                    record["eval_loss"] = ev.loss
                    bar.note(
                        f"step {step}: eval loss {ev.loss:.4f}, perplexity {ev.perplexity:.2f}"
                    )
            history.append(record)
            bar.update(step_loss, tokens / elapsed if elapsed else 0.0, lr)
            if on_step is not None:
                on_step(record)
            if (
                config.checkpoint_every
                and step % config.checkpoint_every == 0
                and step < config.steps
            ):
                checkpoint()
    finally:
        bar.close()
    model.eval()
    final = evaluate(model, dataset, batch_size=eval_bs, max_batches=config.eval_batches)
    if final is not None and history:
        history[-1]["eval_loss"] = final.loss
    checkpoint()
    recent = [h["loss"] for h in history[-10:]]
    metrics = TrainMetrics(
        num_examples=dataset.stats.train_examples,
        num_tokens=tokens,
        num_target_tokens=target_tokens,
        steps=step,
        train_loss=float(np.mean(recent)) if recent else float("nan"),
        eval_loss_before=eval_before,
        eval_loss=final.loss if final else None,
        perplexity=final.perplexity if final else None,
        seconds=elapsed,
        tokens_per_s=tokens / elapsed if elapsed else 0.0,
        history=history,
    )
    return TrainResult(adapter=_adapter_numpy(model), metrics=metrics)


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
) -> RunOutput:
    """`fedlm train`: resolve, tokenize, load, fit with checkpoints, export both adapter formats.

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
    dataset = build_dataset(data, tokenizer, config.data_config(skip_bad))
    summary = describe(dataset.stats)
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
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
        base=info,
        base_model_name=model_name or str(model),
        n_layer=torch_model.config.n_layer,
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
