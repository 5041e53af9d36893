"""`LocalTrainer`: the device's training for one round, on its own data and its app's feedback.

It checks the data before any request, builds the dataset of the task's method (files plus the
feedback so far), loads the trainable model once per task shape, and trains a round from the
global adapter in a worker thread: from a checkpoint when the round was interrupted and its base
is still acceptable, and until `stop()` at the next optimizer step otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk.client.config import ClientConfig
from edge_sdk.client.feedback import FeedbackStore
from edge_sdk.client.state import ClientState, RoundMarker, set_aside
from edge_sdk.client.stop_signal import StopSignal
from edge_sdk.method import MethodSpec
from edge_sdk.wire import GlobalAdapter, TaskConfig, WireError

if TYPE_CHECKING:
    import torch

    from edge_sdk.training.data import Dataset
    from edge_sdk.training.trainer import TrainConfig

# The federation loop's log lines keep the logger name they had before the loop was split.
log = logging.getLogger("edge_sdk.client.loop")

_CHECK_SEQ_LEN = 256
"""seq_len of the data check before enrollment (the coordinator's default)."""


class _Interrupted(Exception):
    """Raised from the training step callback when `stop()` was called."""


def round_seed(seed: int, client_id: str, round_no: int) -> int:
    """The seed of a round's data order: distinct per device and round, the same on a resume."""
    digest = hashlib.sha256(f"{seed}:{client_id}:{round_no}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class LocalTrainer:
    """Trains the rounds of one device (dataset and model kept between rounds)."""

    def __init__(
        self, config: ClientConfig, state: ClientState, feedback: FeedbackStore, stop: StopSignal
    ) -> None:
        self.config = config
        self.state = state
        self.feedback = feedback
        self.stop = stop
        self._dataset: Dataset | None = None
        self._model: torch.nn.Module | None = None
        self._model_key: tuple[Any, ...] | None = None
        self._data_key: tuple[Any, ...] | None = None

    def check_data(self, model_path: str) -> Dataset | None:
        """Read, tokenize and pack the local data of the model at `model_path` (no network).

        Packed at the coordinator's default seq_len (256); the task's round packs it again
        with the app's feedback. The preference files are read and checked too. None when the
        device has no data files (it learns only from its app's feedback).
        """
        from edge_sdk.training.data import DataConfig, build_dataset
        from edge_sdk.training.tokenizer import load_tokenizer

        if self.config.preferences:
            from edge_sdk.training.preferences import load_preferences

            load_preferences(list(self.config.preferences), skip_bad=self.config.skip_bad)
        if not self.config.data:
            return None
        if self._dataset is None:
            cfg = self.config
            self._dataset = build_dataset(
                list(cfg.data),
                load_tokenizer(model_path),
                DataConfig(
                    seq_len=_CHECK_SEQ_LEN,
                    val_fraction=cfg.val_fraction,
                    seed=cfg.seed,
                    skip_bad=cfg.skip_bad,
                ),
            )
        return self._dataset

    def train_config(self, task: TaskConfig, seed: int) -> TrainConfig:
        from edge_sdk.training.lora import LoraConfig
        from edge_sdk.training.trainer import TrainConfig

        lora = LoraConfig(
            rank=task.lora.rank, alpha=task.lora.alpha, targets=task.lora.targets,
            freeze_a=task.lora.mode == "frozen-a",
        )  # fmt: skip
        return TrainConfig(
            steps=task.local_steps, lora=lora, seq_len=task.seq_len, batch_size=task.batch_size,
            lr=task.lr, warmup=0, min_lr_ratio=1.0,  # constant lr: a round is a slice of one run
            seed=seed, eval_batches=self.config.eval_batches,
            checkpoint_every=self.config.checkpoint_every, precision=self.config.precision,
            compute=self.config.compute,
        )  # fmt: skip

    def missing_data(self, method: MethodSpec) -> str | None:
        """Why this device cannot train the task's method now (None: it can)."""
        counts = self.feedback.counts()
        if method.name == "dpo":
            if self.config.preferences or counts.pairs:
                return None
            return (
                "the task trains DPO and this device has no preference pairs yet (no "
                "ClientConfig.preferences files, and the app recorded no chosen/rejected, edit "
                "or regenerate feedback)"
            )
        if self.config.data or counts.examples:
            return None
        return (
            "the task trains SFT and this device has no examples (no data files, and the app "
            "recorded no accepted answer or edit)"
        )

    def prepare(self, model_path: str, task: TaskConfig) -> None:
        """Tokenize the data and load the trainable model once per task shape (worker thread).

        The data are the files of the task's method plus the app's feedback so far, so the
        dataset is built again whenever feedback was recorded since the last round.
        """
        from edge_sdk.training.data import DataConfig, build_dataset
        from edge_sdk.training.tokenizer import load_tokenizer
        from edge_sdk.training.trainer import load_for_training

        method = MethodSpec.from_extra(task.extra)  # checked against the policy in _federate
        counts = self.feedback.counts()
        key = (method.name, task.seq_len, counts)
        if self._dataset is None or self._data_key != key:
            cfg = self.config
            tokenizer = load_tokenizer(model_path)
            data_config = DataConfig(seq_len=task.seq_len, val_fraction=cfg.val_fraction,
                                     seed=cfg.seed, skip_bad=cfg.skip_bad)  # fmt: skip
            if method.name == "dpo":
                from edge_sdk.training.preferences import (
                    build_preference_dataset,
                    load_preferences,
                )

                pairs = load_preferences(list(cfg.preferences), skip_bad=cfg.skip_bad)
                pairs += self.feedback.pairs()
                self._dataset = build_preference_dataset(pairs, tokenizer, data_config)  # type: ignore[assignment]
            else:
                files = list(cfg.data)
                snapshot = self.feedback.examples_snapshot(self.state.train_dir)
                if snapshot is not None:
                    files.append(str(snapshot))
                self._dataset = build_dataset(files, tokenizer, data_config)
            self._data_key = key
            log.info(
                "training data: %s (the app's feedback: %d pairs, %d examples; "
                "kept on this device)",
                "preference pairs" if method.name == "dpo" else "examples",
                counts.pairs,
                counts.examples,
            )
        model_key = (task.lora.rank, task.lora.alpha, task.lora.targets, task.lora.mode)
        if self._model is None or self._model_key != model_key:
            self._model = load_for_training(model_path, self.train_config(task, 0))
            self._model_key = model_key

    def fit(
        self,
        model_path: str,
        task: TaskConfig,
        marker: RoundMarker,
        base: GlobalAdapter,
        resume: bool,
    ) -> tuple[dict[str, np.ndarray], Any, int] | None:
        """Train one round in this (worker) thread; None when interrupted by `stop()`.

        Returns (the adapter, the trainer's metrics, the step the round resumed from).
        """
        from edge_sdk.training.errors import CheckpointError
        from edge_sdk.training.trainer import fit

        self.prepare(model_path, task)
        assert self._dataset is not None and self._model is not None
        config = self.train_config(task, marker.seed)
        method = MethodSpec.from_extra(task.extra)
        if method.name == "dpo":  # the reference is the base model: the adapter disabled
            config = dataclasses.replace(
                config,
                method="dpo",
                beta=method.beta,
                dpo_loss=method.loss,
                sft_weight=method.sft_weight,
            )
        # Same packed sequences and split every round; the order differs per round.
        dataset = dataclasses.replace(self._dataset, seed=marker.seed)
        first_step: list[int] = []

        def on_step(record: dict[str, float]) -> None:
            if not first_step:
                first_step.append(int(record["step"]))
            if self.stop.is_set():
                raise _Interrupted

        kwargs: dict[str, Any] = {
            "init_adapter": base.dense_tensors(),
            "checkpoint_path": self.state.checkpoint_path,
            "base_id": f"{task.model_sha256}:{task.task_id}:{marker.base_version}",
            "on_step": on_step,
        }
        try:
            try:
                result = fit(self._model, dataset, config, resume=resume, **kwargs)
            except CheckpointError as exc:
                if not resume:
                    raise
                set_aside(
                    self.state.checkpoint_path,
                    f"cannot resume the round ({exc}); training it afresh",
                )
                first_step.clear()
                result = fit(self._model, dataset, config, resume=False, **kwargs)
        except _Interrupted:
            log.info("training interrupted; the last checkpoint is kept")
            return None
        resumed_from = first_step[0] - 1 if first_step else config.steps
        return result.adapter, result.metrics, resumed_from

    def resumable(
        self, task: TaskConfig, round_no: int, global_version: int
    ) -> tuple[RoundMarker, GlobalAdapter] | None:
        """The interrupted round on disk, if its base is still acceptable to the task's strategy
        (no older than the fedbuff staleness bound behind `global_version`)."""
        marker, body = self.state.round_marker(), self.state.base_body()
        if (
            marker is None
            or body is None
            or marker.task_id != task.task_id
            or marker.round != round_no
        ):
            return None
        if not self.state.checkpoint_path.exists():
            return None
        try:
            base = GlobalAdapter.from_bytes(body)
        except WireError as exc:
            set_aside(
                self.state.train_dir / "base.bin",
                f"undecodable round base ({exc}); the round starts afresh",
            )
            return None
        strategy = (
            task.extra.get("strategy", {}) if isinstance(task.extra.get("strategy"), dict) else {}
        )
        max_staleness = (
            int(strategy.get("max_staleness", 0)) if strategy.get("name") == "fedbuff" else 0
        )
        if global_version - base.version > max_staleness:
            log.info(
                "the interrupted round trained from version %d, now too old; starting afresh",
                base.version,
            )
            return None
        return marker, base
