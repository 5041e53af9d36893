"""The model before and after training: load the frozen base with LoRA layers, check them
against the config, the seeded starting adapter, and the trained adapter as numpy arrays."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
import torch

from edge_sdk.adapters.seeded import frozen_a_matrix
from edge_sdk.models.naming import parse_hf_module
from edge_sdk.training.config import TrainConfig
from edge_sdk.training.lora import lora_modules, lora_state_dict, set_base_compute


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
    """The frozen base (in `config.precision`) with LoRA layers attached, computing in
    `config.resolved_compute`."""
    from edge_sdk.models.loader import load_model

    model = load_model(
        model_path,
        precision=config.precision,
        lora=config.lora,
        gradient_checkpointing=config.gradient_checkpointing,
        progress=progress,
    )
    set_base_compute(model, config.resolved_compute)
    return model


def check_lora_layers(model: torch.nn.Module, config: TrainConfig) -> None:
    """Refuse a model without LoRA layers, or whose rank or scale differ from `config.lora`."""
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


def adapter_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's LoRA tensors as numpy arrays (naming-convention keys)."""
    return {k: v.numpy() for k, v in lora_state_dict(model).items()}
