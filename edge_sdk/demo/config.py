"""The demo's one configuration: task design, local schedule, federation, and presets.

The defaults were chosen by the in-process experiment recorded in BENCHMARKS.md ("Federated
demo (issue 7)"); `python -m edge_sdk.demo.simulate` reproduces it. With 4 clients owning one
rule family each (90/10 skew) and 16 local steps per client in total, 8 rounds x 2 steps
closed 102% of the base -> centralized exact-match gap (4 rounds x 4 steps: 85%, client drift).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edge_sdk.choices import (
    LORA_MODES,
    PRECISIONS,
    Compute,
    LoraMode,
    Precision,
    RobustAggregator,
)
from edge_sdk.demo.tasks import TaskConfig
from edge_sdk.method import DEFAULT_CODECS, MethodSpec
from edge_sdk.validators import (
    is_int_in,
    is_positive_finite,
    require_compute,
    require_positive_ints,
)

PREFERENCE_EVAL_PER_FAMILY = 32
"""Held-out prompts per family of the preference demo (4 families: 128 judged prompts)."""

PREFERENCE_SFT_WEIGHT = 2.0
"""The preference demo's RPO alpha, chosen by measurement (BENCHMARKS.md, "Federated DPO from
in-app feedback")."""


@dataclass(frozen=True)
class DemoConfig:
    """Everything `run_demo` needs besides where to write."""

    model: str = "smollm2-135m"
    """Base model name or GGUF path."""
    clients: int = 4
    """Federated clients (one data partition each)."""
    rounds: int = 8
    """Global versions to publish (synchronous-equivalent rounds)."""
    local_steps: int = 2
    """Optimizer steps per client per round."""
    batch_size: int = 2
    """Sequences per step (centralized uses clients x this: the federation's compute)."""
    seq_len: int = 64
    """Tokens per packed training sequence."""
    lr: float = 3e-3
    """Peak local learning rate (per round: short warmup, cosine decay)."""
    warmup: int = 1
    """Warmup steps of each local round."""
    rank: int = 8
    """LoRA rank on every attention and MLP projection."""
    alpha: float = 16.0
    """LoRA alpha."""
    mode: LoraMode = "exact"
    """Coordinator LoRA aggregation: exact, frozen-a or naive."""
    server_lr: float = 1.0
    """Server step on the averaged delta."""
    robust: RobustAggregator = "mean"
    """Coordinator statistic: mean (weighted), trimmed-mean or median (coordinate-wise; naive
    and frozen-a modes only)."""
    trim_ratio: float = 0.25
    """Fraction cut from each end per coordinate for trimmed-mean (0.25 of 4 clients: one)."""
    clip_multiplier: float | None = 2.0
    """The coordinator's adaptive clip c (its default); None turns clipping off."""
    codec: str = DEFAULT_CODECS["sft"]
    """Client update codec (the wire format's codec string); the preference preset uses dpo's."""
    families_per_client: int = 1
    """Task families each client owns."""
    train_per_client: int = 120
    """Training examples per client."""
    eval_per_family: int = 16
    """Held-out examples per family."""
    own_fraction: float = 0.9
    """Share of a client's data from its own families (non-IID skew)."""
    seed: int = 0
    """Seeds the data, the adapter init and every run."""
    precision: Precision = "nf4"
    """Frozen base precision of every torch run: nf4 (QLoRA), bf16 or fp32."""
    compute: Compute = "auto"
    """The NF4 base's matrix products in every torch run: auto, fp32 or bf16 (as `fedlm train
    --compute`)."""
    threads: int | None = None
    """torch threads of the in-process runs; None keeps torch's default (all cores). On a busy
    machine 1 is several times faster than 2 (measured: BENCHMARKS.md)."""
    greedy_eval: bool = True
    """Also score base and federated adapters by greedy decoding in llama.cpp."""
    secure: bool = False
    """Run the federation with secure aggregation (`fedlm coordinator --secure`, mode
    frozen-a, every client in each round's cohort); network federation only."""
    secure_clip: float = 0.01
    """--secure: devices clip each B-delta value to [-C, C]."""
    secure_grid_bits: int = 5
    """--secure: grid bits (ring = bits + ceil(log2 clients): 7 at 4 clients, 4.6x below fp32)."""
    method: str = "sft"
    """Local objective: sft (the rule examples) or dpo (preference pairs of the same prompts:
    `edge_sdk.demo.preference`)."""
    beta: float = 0.1
    """dpo: strength of the pull towards the reference (the base model)."""
    dpo_loss: str = "sigmoid"
    """dpo: sigmoid (DPO) or ipo."""
    sft_weight: float = 0.0
    """dpo: RPO alpha, the weight of the chosen answer's per-token NLL added to the loss."""

    def __post_init__(self) -> None:
        for name in (
            "clients",
            "rounds",
            "local_steps",
            "batch_size",
            "seq_len",
            "rank",
            "train_per_client",
            "eval_per_family",
            "families_per_client",
        ):
            require_positive_ints(self, name)
        if self.seq_len < 16:
            raise ValueError(f"`seq_len` should be >= 16, got {self.seq_len!r}")
        if self.threads is not None and not is_int_in(self.threads, 1):
            raise ValueError(
                f"`threads` should be a positive integer or None, got {self.threads!r}"
            )
        if self.warmup < 0:
            raise ValueError(f"`warmup` should be >= 0, got {self.warmup!r}")
        for name in ("lr", "alpha", "server_lr"):
            value = getattr(self, name)
            if not is_positive_finite(value):
                raise ValueError(f"`{name}` should be a positive number, got {value!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"`precision` should be nf4, bf16 or fp32, got {self.precision!r}")
        require_compute(self.compute, self.precision)
        if self.mode not in LORA_MODES:
            raise ValueError(f"`mode` should be exact, frozen-a or naive, got {self.mode!r}")
        MethodSpec(self.method, self.beta, self.dpo_loss, self.sft_weight)  # type: ignore[arg-type]
        if self.secure and self.mode != "frozen-a":
            raise ValueError(f"`mode` should be frozen-a with `secure`, got {self.mode!r}")
        from coordinator.next_version import AggregationConfig

        try:  # the coordinator's own checks (robust needs a factor mode, c >= 1, ...)
            AggregationConfig(
                mode=self.mode,
                rank=self.rank,
                alpha=self.alpha,
                robust=self.robust,
                trim_ratio=self.trim_ratio,
                clip_multiplier=self.clip_multiplier,
            )
        except ValueError as exc:
            raise ValueError(f"aggregation settings: {exc}") from None
        from edge_sdk.wire import parse_codec

        parse_codec(self.codec)
        self.task_config()  # validates the data fields together

    @property
    def total_local_steps(self) -> int:
        """Steps each client trains over the whole federation (= a local-only run's steps)."""
        return self.rounds * self.local_steps

    def task_config(self) -> TaskConfig:
        return TaskConfig(
            clients=self.clients,
            families_per_client=self.families_per_client,
            train_per_client=self.train_per_client,
            eval_per_family=self.eval_per_family,
            own_fraction=self.own_fraction,
            seed=self.seed,
        )

    def replace(self, **changes: object) -> DemoConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def full(cls) -> DemoConfig:
        """`fedlm demo`: the measured configuration (<= 10 minutes on 2 cores)."""
        return cls()

    @classmethod
    def preference(cls) -> DemoConfig:
        """`fedlm demo --method dpo`: the preference task's measured configuration.

        With the RPO term (sft_weight): plain DPO ranked the held-out pairs right (reward
        accuracy 100%) but changed almost no greedy answer; with int8 update deltas: int4 cost
        the federation several held-out prompts; judged on 128 held-out prompts, not 64: on 64,
        fp32 rounding alone (which GEMM library ran the products) moved the federated arm by
        3 wins, about 5 % of the gap (BENCHMARKS.md)."""
        return cls(
            method="dpo",
            sft_weight=PREFERENCE_SFT_WEIGHT,
            codec=DEFAULT_CODECS["dpo"],
            eval_per_family=PREFERENCE_EVAL_PER_FAMILY,
        )

    @classmethod
    def quick(cls) -> DemoConfig:
        """`fedlm demo --quick` (130 s measured on 2 idle cores; target 180 s): fewer rounds and
        examples."""
        return cls(rounds=3, train_per_client=60, eval_per_family=8, greedy_eval=False)
