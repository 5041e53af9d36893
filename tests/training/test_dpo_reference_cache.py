"""The base model's reference log-probs are computed once per pair list and reused across runs
(a federated client's rounds): the cached values equal a fresh forward with the adapter off."""

from __future__ import annotations

from pathlib import Path

import torch

from edge_sdk.training.data import DataConfig
from edge_sdk.training.dpo import DpoObjective, reference_logps
from edge_sdk.training.lora import LoraConfig
from edge_sdk.training.preferences import PreferencePair, build_preference_dataset
from edge_sdk.training.tokenizer import load_tokenizer
from edge_sdk.training.trainer import TrainConfig, fit, load_for_training


def test_base_reference_is_cached_per_pair_list_and_stays_exact(tiny_gguf: Path) -> None:
    pairs = [
        PreferencePair(prompt=f"hello {i}", chosen=f"the a {i}", rejected=f"is of {i}")
        for i in range(4)
    ]
    tok = load_tokenizer(tiny_gguf)
    dataset = build_preference_dataset(pairs, tok, DataConfig(seq_len=128, val_fraction=0.0))
    config = TrainConfig(
        steps=2, lora=LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj")), seq_len=128,
        batch_size=2, lr=1e-2, warmup=0, val_fraction=0.0, checkpoint_every=0, precision="fp32",
        method="dpo", beta=0.5,
    )  # fmt: skip
    model = load_for_training(tiny_gguf, config)
    first = DpoObjective(dataset)
    first.prepare(model, config)
    fit(model, dataset, config)  # the adapter moves; the base does not
    again = DpoObjective(dataset)
    again.prepare(model, config)
    assert again.reference["train"] is first.reference["train"]  # reused, not recomputed
    fresh = reference_logps(model, dataset, "train", reference="base")
    torch.testing.assert_close(again.reference["train"], fresh)
    # Another pair list (new feedback): computed afresh.
    other = build_preference_dataset(pairs[:2], tok, DataConfig(seq_len=128, val_fraction=0.0))
    third = DpoObjective(other)
    third.prepare(model, config)
    assert third.reference["train"].shape == (2, 2)
    assert third.reference["train"] is not first.reference["train"]
    # The adapter's own reference ("start") is never taken from the cache.
    start = DpoObjective(dataset)
    start.prepare(model, TrainConfig(**{**config.__dict__, "reference": "start"}))
    assert start.reference["train"] is not first.reference["train"]
