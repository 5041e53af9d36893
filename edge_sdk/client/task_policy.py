"""What a client accepts from a coordinator: task bounds, global adapter checks, response caps.

A coordinator is a possible adversary (or simply broken). Everything it sends that makes the
client allocate memory, spend compute or change the model it serves is checked here, in one
place, before it is used:

- `TaskPolicy.check_task`: every number of a `TaskConfig` against a stated bound (seq_len,
  local_steps, batch_size, tokens per step, rank, alpha/rank, lr, rounds, codec, targets,
  strategy settings, the method and its beta). The wire decoder only checks types and 64-bit
  ranges; a task with
  `seq_len = 2**40` decodes fine and would make the trainer try to allocate it.
- `TaskPolicy.check_global`: a global adapter must have the task's LoRA spec, exactly the
  tensor keys and shapes the base model's target layers imply, finite values, and a bounded
  magnitude, before it is saved, written to GGUF or hot-swapped.
- `adapter_bytes_cap`: the most bytes GET /v1/adapter can legitimately return for the task
  (fp32 A and B for every target layer, plus envelope slack); the transport aborts past it.

Magnitude bounds (why these numbers): a global adapter changes each target weight W (out, in)
by ΔW = s·B·A with s = alpha / rank. Trained LM weights have an RMS entry of about 0.02-0.1
(GPT-2/llama initialise at std 0.02 and stay in that range), and LoRA fine-tunes move a layer
by a small fraction of ||W||. `max_delta_rms = 1.0` (||ΔW||_F ≤ 1.0·sqrt(out·in)) therefore
allows a delta 10-50x larger than the weight it modifies, far beyond any fine-tune, while it
refuses a take-over that would swamp the base model (and the 3e38 values that overflow to inf
in llama.cpp's fp16 paths). `max_abs_value = 1e3` bounds each factor entry: A starts at
~1/sqrt(in) and B at 0, and neither grows by orders of magnitude in training. ||ΔW||_F is
computed without forming ΔW: ||B·A||_F² = trace((BᵀB)(AAᵀ)), two r×r products.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_sdk.client.errors import AdapterRefusedError, TaskRefusedError
from edge_sdk.method import DPO_LOSSES, METHODS, MethodSpec
from edge_sdk.models.naming import LORA_TARGETS, hf_module, parse_gguf_stem
from edge_sdk.validators import is_int_in, is_positive_finite, require_positive_ints
from edge_sdk.wire import GlobalAdapter, TaskConfig, WireError
from edge_sdk.wire.codecs import parse_codec

Shapes = dict[str, tuple[int, int]]
"""HF module path (`model.layers.0.self_attn.q_proj`) -> (out_features, in_features)."""

_KIB = 1024
_MIB = 1024 * _KIB

SMALL_RESPONSE_BYTES = 512 * _KIB
"""Cap on a JSON answer (join, update acknowledgement, error bodies): they are under 1 KiB."""
TASK_RESPONSE_BYTES = 1 * _MIB
"""Cap on GET /v1/task: a TaskConfig is a few hundred bytes plus its free-form `extra`."""
STATUS_RESPONSE_BYTES = 4 * _MIB
"""Cap on GET /v1/status (per-client rows; the coordinator lists a few hundred at most)."""
ADAPTER_TENSOR_SLACK = 1 * _KIB
"""Per-tensor envelope in an adapter message: key (≤ 256 chars), shape, codec fields."""
ADAPTER_MESSAGE_SLACK = 1 * _MIB
"""Per-message envelope: header, LoRA spec, aggregation metadata."""


@dataclass(frozen=True)
class TaskPolicy:
    """Bounds a client holds a coordinator's task and global adapters to.

    The defaults fit on-device fine-tuning of models up to a few billion parameters; raise
    one deliberately (e.g. `max_seq_len` for long-context data) rather than trusting a task.
    """

    max_seq_len: int = 8192
    """Longest training sequence in tokens (activation memory grows with it)."""
    max_batch_size: int = 256
    """Most sequences per optimizer step."""
    max_tokens_per_step: int = 131072
    """Most tokens per optimizer step (batch_size · seq_len): bounds activation memory."""
    max_local_steps: int = 100_000
    """Most optimizer steps in one local round (bounds one round's compute)."""
    max_rank: int = 256
    """Highest LoRA rank (adapter memory and update size grow linearly with it)."""
    max_scaling: float = 64.0
    """Highest LoRA scaling alpha / rank (common choices are 0.5-4)."""
    max_lr: float = 1.0
    """Highest learning rate (LoRA uses 1e-5..1e-2; beyond 1 training only diverges)."""
    max_rounds: int = 2**31 - 1
    """Highest `max_rounds` and global version a task may state (kept as plain integers)."""
    max_staleness: int = 1_000_000
    """Highest `extra.strategy.max_staleness` (the resume logic reads it)."""
    max_abs_value: float = 1e3
    """Largest |entry| of a global adapter's A or B (see the module docstring)."""
    max_delta_rms: float = 1.0
    """Largest RMS entry of a layer's scaled delta s·B·A: ||ΔW||_F ≤ this · sqrt(out · in)."""
    methods: tuple[str, ...] = METHODS
    """Post-training methods this device runs for a coordinator (drop `dpo` to never train on
    the app's feedback pairs)."""
    max_beta: float = 5.0
    """Highest DPO beta (papers and TRL use 0.01-0.5; a huge beta turns the loss into a step
    function of the margin, whose gradients are zero or explode)."""
    max_sft_weight: float = 10.0
    """Highest DPO `sft_weight` (RPO alpha; the paper and TRL use 1): a huge one makes the
    round plain SFT on the feedback's chosen answers."""

    def __post_init__(self) -> None:
        for name in (
            "max_seq_len", "max_batch_size", "max_tokens_per_step", "max_local_steps",
            "max_rank", "max_rounds", "max_staleness",
        ):  # fmt: skip
            require_positive_ints(self, name)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not isinstance(self.methods, tuple):
            raise ValueError(
                f"`methods` should be a tuple of {', '.join(METHODS)}, got {self.methods!r}"
            )
        for name in ("max_scaling", "max_lr", "max_abs_value", "max_delta_rms", "max_beta",
                     "max_sft_weight"):  # fmt: skip
            value = getattr(self, name)
            if not is_positive_finite(value):
                raise ValueError(f"`{name}` should be a finite positive number, got {value!r}")

    # -- the task ---------------------------------------------------------------------------

    def check_task(self, task: TaskConfig) -> None:
        """Raise `TaskRefusedError` naming the first field of `task` that exceeds a bound."""

        def refuse(name: str, value: object, bound: str) -> TaskRefusedError:
            return TaskRefusedError(
                f"task {task.task_id}: `{name}` = {value!r} exceeds this client's bound ({bound}); "
                "refusing the task (raise TaskPolicy if the coordinator is trusted)"
            )

        def at_most(name: str, value: float, bound: float) -> None:
            if not value <= bound:
                raise refuse(name, value, f"at most {bound:g}")

        at_most("seq_len", task.seq_len, self.max_seq_len)
        if task.seq_len < 2:
            raise refuse("seq_len", task.seq_len, "at least 2 (an input and a target token)")
        at_most("batch_size", task.batch_size, self.max_batch_size)
        at_most("batch_size * seq_len", task.batch_size * task.seq_len, self.max_tokens_per_step)
        at_most("local_steps", task.local_steps, self.max_local_steps)
        at_most("lora.rank", task.lora.rank, self.max_rank)
        at_most("lora.alpha / lora.rank", task.lora.scaling, self.max_scaling)
        at_most("lr", task.lr, self.max_lr)
        if task.max_rounds is not None:
            at_most("max_rounds", task.max_rounds, self.max_rounds)
        at_most("global_version", task.global_version, self.max_rounds)
        unknown = [t for t in task.lora.targets if t not in LORA_TARGETS]
        if unknown:
            raise refuse("lora.targets", unknown, f"names among {', '.join(LORA_TARGETS)}")
        try:
            parse_codec(task.codec)
        except (WireError, ValueError) as exc:
            raise refuse("codec", task.codec, f"a codec this client implements: {exc}") from None
        strategy = task.extra.get("strategy")
        if strategy is not None:
            if not isinstance(strategy, dict):
                raise refuse("extra.strategy", type(strategy).__name__, "a map")
            staleness = strategy.get("max_staleness", 0)
            if not is_int_in(staleness, 0):
                raise refuse("extra.strategy.max_staleness", staleness, "an integer >= 0")
            at_most("extra.strategy.max_staleness", staleness, self.max_staleness)
        self.check_method(task)

    def check_method(self, task: TaskConfig) -> MethodSpec:
        """The task's method (`extra.method`), if this device runs it within its bounds."""
        raw = task.extra.get("method")
        try:
            spec = MethodSpec.from_extra(task.extra)
        except ValueError as exc:
            shown = raw if not isinstance(raw, dict) else {k: raw[k] for k in list(raw)[:4]}
            raise TaskRefusedError(
                f"task {task.task_id}: `extra.method` = {str(shown)[:120]} is not a method this "
                f"client runs ({exc}); refusing the task"
            ) from None
        if spec.name not in self.methods:
            raise TaskRefusedError(
                f"task {task.task_id}: method {spec.name!r} is not among this client's methods "
                f"({', '.join(self.methods)}); refusing the task (TaskPolicy.methods)"
            )
        if spec.name == "dpo":
            if not spec.beta <= self.max_beta:
                raise TaskRefusedError(
                    f"task {task.task_id}: `extra.method.beta` = {spec.beta!r} exceeds this "
                    f"client's bound (at most {self.max_beta:g}); refusing the task (raise "
                    "TaskPolicy.max_beta if the coordinator is trusted)"
                )
            if not spec.sft_weight <= self.max_sft_weight:
                raise TaskRefusedError(
                    f"task {task.task_id}: `extra.method.sft_weight` = {spec.sft_weight!r} "
                    f"exceeds this client's bound (at most {self.max_sft_weight:g}); refusing "
                    "the task (raise TaskPolicy.max_sft_weight if the coordinator is trusted)"
                )
            assert spec.loss in DPO_LOSSES
        return spec

    # -- the global adapter -----------------------------------------------------------------

    def check_global(self, adapter: GlobalAdapter, task: TaskConfig, shapes: Shapes) -> None:
        """Raise `AdapterRefusedError` unless `adapter` is safe to save, write and serve.

        `shapes` are the base model's target layers (`target_shapes`). Shapes are checked on
        the encoded tensors, before anything is decoded.
        """
        where = f"global adapter version {adapter.version}"
        if adapter.version > self.max_rounds:
            raise AdapterRefusedError(f"{where}: version exceeds {self.max_rounds}")
        if adapter.lora != task.lora:
            raise AdapterRefusedError(
                f"{where}: LoRA spec {adapter.lora.to_obj()} "
                f"differs from the task's {task.lora.to_obj()}"
            )
        rank = task.lora.rank
        expected: dict[str, tuple[int, int]] = {}
        for module, (out_dim, in_dim) in shapes.items():
            expected[f"{module}.lora_A"] = (rank, in_dim)
            expected[f"{module}.lora_B"] = (out_dim, rank)
        keys = set(adapter.tensors)
        if keys != set(expected):
            missing, extra = sorted(set(expected) - keys)[:3], sorted(keys - set(expected))[:3]
            raise AdapterRefusedError(
                f"{where}: tensor keys differ from the base model's target layers "
                f"(missing {missing}, unexpected {extra})"
            )
        for key, want in expected.items():
            got = tuple(adapter.tensors[key].shape)
            if got != want:
                raise AdapterRefusedError(
                    f"{where}: {key} has shape {got}, the base model implies {want}"
                )
        dense = adapter.dense_tensors()
        scaling = task.lora.scaling
        for module, (out_dim, in_dim) in shapes.items():
            a, b = dense[f"{module}.lora_A"], dense[f"{module}.lora_B"]
            for name, t in ((f"{module}.lora_A", a), (f"{module}.lora_B", b)):
                if not np.isfinite(t).all():
                    raise AdapterRefusedError(f"{where}: {name} holds NaN or inf")
                peak = float(np.abs(t).max(initial=0.0))
                if peak > self.max_abs_value:
                    raise AdapterRefusedError(
                        f"{where}: {name} has an entry of magnitude {peak:.3g}, above the bound "
                        f"{self.max_abs_value:g}"
                    )
            norm = scaling * delta_frobenius(a, b)
            bound = self.max_delta_rms * math.sqrt(out_dim * in_dim)
            if not norm <= bound:
                raise AdapterRefusedError(
                    f"{where}: {module} changes its weight by ||s·B·A||_F = {norm:.3g}, above the "
                    f"bound {bound:.3g} (RMS {self.max_delta_rms:g} per entry)"
                )


def delta_frobenius(a: np.ndarray, b: np.ndarray) -> float:
    """||B·A||_F for A (r, in) and B (out, r), via r×r Gram matrices (no (out, in) product)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    value = float(np.trace((b64.T @ b64) @ (a64 @ a64.T)))  # (r, r) @ (r, r)
    return math.sqrt(max(value, 0.0))


def target_shapes(tensor_shapes: Mapping[str, tuple[int, ...]], targets: tuple[str, ...]) -> Shapes:
    """(out, in) of every target linear layer, from a base model's GGUF tensor directory.

    `tensor_shapes` maps GGUF names to numpy-order shapes (`BaseModelInfo.tensor_shapes`).
    """
    found: dict[tuple[int, int], tuple[str, tuple[int, int]]] = {}
    for name, shape in tensor_shapes.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        try:
            layer, target = parse_gguf_stem(name[: -len(".weight")])
        except ValueError:
            continue
        if target in targets:
            out_dim, in_dim = int(shape[0]), int(shape[1])
            found[(layer, LORA_TARGETS.index(target))] = (
                hf_module(layer, target),
                (out_dim, in_dim),
            )
    return dict(found[key] for key in sorted(found))


def adapter_bytes_cap(shapes: Shapes, rank: int) -> int:
    """Most bytes a GET /v1/adapter answer may have: fp32 A (r, in) and B (out, r) per layer,
    plus per-tensor and per-message envelope slack. (A global codec with absmax blocks under
    4 elements would be larger than fp32; no coordinator uses one.)"""
    values = sum(4 * rank * (out_dim + in_dim) for out_dim, in_dim in shapes.values())
    return values + 2 * len(shapes) * ADAPTER_TENSOR_SLACK + ADAPTER_MESSAGE_SLACK
