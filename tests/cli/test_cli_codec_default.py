"""The coordinator asks for the codec the demos prove for the task's method, and the CLI says
the same."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.shapes import shapes_from_gguf
from edge_sdk.cli import build_parser
from edge_sdk.cli._help import resolve
from edge_sdk.demo.config import DemoConfig
from edge_sdk.method import DEFAULT_CODECS, MethodSpec
from edge_sdk.models.naming import LORA_TARGETS
from edge_sdk.wire import AdapterUpdate, LoraSpec, UnknownCodecError, UpdateEncoder


def _coordinator_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["coordinator"]


def test_default_codec_is_the_demos_in_config_and_cli(tiny_gguf: Path) -> None:
    config_default = {f.name: f.default for f in dataclasses.fields(CoordinatorConfig)}["codec"]
    demo_default = {f.name: f.default for f in dataclasses.fields(DemoConfig)}["codec"]
    assert config_default is None  # by method
    assert demo_default == DEFAULT_CODECS["sft"] == "delta+int4+zlib"
    assert DemoConfig.preference().codec == DEFAULT_CODECS["dpo"] == "delta+int8+zlib"
    # The CLI declares no default of its own: it reads the config field when needed.
    assert resolve(_coordinator_parser().get_default("codec")) == config_default
    base = {
        "model_sha256": "0" * 64,
        "shapes": shapes_from_gguf(tiny_gguf, LORA_TARGETS),
        "db_path": tiny_gguf.parent / "c.db",
        "join_token": "a-join-token",
    }
    assert CoordinatorConfig(**base).task_codec == "delta+int4+zlib"
    assert CoordinatorConfig(**base, method=MethodSpec("dpo")).task_codec == "delta+int8+zlib"
    given = CoordinatorConfig(**base, method=MethodSpec("dpo"), codec="delta+fp16")
    assert given.task_codec == "delta+fp16"
    with pytest.raises(UnknownCodecError, match="int3"):
        CoordinatorConfig(**base, codec="delta+int3")


def test_default_codec_update_is_4x_smaller_than_delta_fp16(tiny_gguf: Path) -> None:
    """Bytes of one r=8 update on every projection of the tiny model (real wire bodies)."""
    shapes = shapes_from_gguf(tiny_gguf, LORA_TARGETS)
    rng = np.random.default_rng(0)
    ref, new = {}, {}
    for key, (d_out, d_in) in shapes.items():
        a0 = rng.uniform(-(d_in**-0.5), d_in**-0.5, (8, d_in)).astype(np.float32)
        ref[f"{key}.lora_A"], ref[f"{key}.lora_B"] = a0, np.zeros((d_out, 8), np.float32)
        new[f"{key}.lora_A"] = a0 + (0.1 * a0.std() * rng.standard_normal(a0.shape)).astype(
            np.float32
        )
        new[f"{key}.lora_B"] = (0.01 * rng.standard_normal((d_out, 8))).astype(np.float32)

    def nbytes(codec: str) -> int:
        update = AdapterUpdate.build(
            client_id="c",
            base_version=0,
            model_sha256="0" * 64,
            lora=LoraSpec(8, 16.0, LORA_TARGETS),
            tensors=new,
            num_examples=1,
            encoder=UpdateEncoder(codec),
            reference=ref,
        )
        return len(update.to_bytes())

    compact, fp16 = nbytes("delta+int4+zlib"), nbytes("delta+fp16")
    assert compact * 4 < fp16, (compact, fp16)
