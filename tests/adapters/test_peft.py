"""PEFT format: names and config keys, round trips, foreign adapters, conversion to GGUF."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from edge_sdk.adapters.gguf_lora import read_gguf_lora
from edge_sdk.adapters.peft import CONFIG_NAME, WEIGHTS_NAME, load_peft, peft_to_gguf, save_peft
from edge_sdk.errors import InvalidAdapterError
from tests.adapters.base_stub import N_LAYER, random_adapter


def test_save_writes_peft_names_and_config(tmp_path: Path) -> None:
    tensors = random_adapter(rank=4, targets=("q_proj", "v_proj", "down_proj"))
    save_peft(
        tmp_path,
        tensors,
        rank=4,
        alpha=8.0,
        dropout=0.05,
        base_model_name_or_path="tiny",
        n_layer=N_LAYER,
        metadata={"fedlm.base_model.sha256": "ab"},
    )
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (
        tmp_path / WEIGHTS_NAME
    ).stat().st_mode & 0o777 == 0o644  # shareable, not mkstemp's 0600
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8.0, 0.05)
    assert cfg["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    assert (
        cfg["bias"] == "none"
        and cfg["fan_in_fan_out"] is False
        and cfg["layers_to_transform"] is None
    )
    assert cfg["base_model_name_or_path"] == "tiny"
    stored = load_file(str(tmp_path / WEIGHTS_NAME))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    np.testing.assert_array_equal(stored[key], tensors["model.layers.1.self_attn.v_proj.lora_B"])
    assert len(stored) == len(tensors)

    loaded = load_peft(tmp_path)
    assert (loaded.rank, loaded.alpha, loaded.dropout) == (4, 8.0, 0.05)
    assert loaded.targets == ("q_proj", "v_proj", "down_proj")
    assert loaded.metadata["fedlm.base_model.sha256"] == "ab"
    for k, v in tensors.items():
        np.testing.assert_array_equal(loaded.tensors[k], v)
    lc = loaded.lora_config()
    assert (lc.rank, lc.alpha, lc.targets, lc.layers) == (
        4,
        8.0,
        ("q_proj", "v_proj", "down_proj"),
        (0, 1),
    )


def test_partial_layers_are_listed(tmp_path: Path) -> None:
    tensors = random_adapter(rank=2, n_layer=1)
    save_peft(tmp_path, tensors, rank=2, alpha=4.0, n_layer=4)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["layers_to_transform"] == [0]


def _foreign(tmp_path: Path, cfg: dict, tensors: dict[str, np.ndarray]) -> Path:
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(base | cfg))
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    return tmp_path


def test_import_foreign_variants(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 32)).astype(np.float16)
    b = rng.standard_normal((32, 2)).astype(np.float16)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    d = _foreign(
        tmp_path,
        {"use_rslora": True},
        {f"{prefix}.lora_A.default.weight": a, f"{prefix}.lora_B.default.weight": b},
    )
    got = load_peft(d)
    assert got.alpha == pytest.approx(16 * math.sqrt(2))  # rsLoRA: alpha / sqrt(r) == alpha' / r
    assert got.tensors["model.layers.0.self_attn.q_proj.lora_A"].dtype == np.float32
    np.testing.assert_array_equal(
        got.tensors["model.layers.0.self_attn.q_proj.lora_B"], b.astype(np.float32)
    )


@pytest.mark.parametrize(
    ("cfg", "keys", "match"),
    [
        ({"use_dora": True}, None, "DoRA"),
        ({"bias": "all"}, None, "bias="),
        ({"rank_pattern": {"q_proj": 4}}, None, "rank_pattern"),
        ({"peft_type": "IA3"}, None, "not a LoRA adapter"),
        ({}, ["lora_A"], "has no matching lora_B"),
        ({}, ["lora_A", "lora_B", "embed"], "not a LoRA A/B weight"),
        ({"r": 3}, ["lora_A", "lora_B"], "expected rank 3"),
    ],
)
def test_import_rejects_what_gguf_cannot_express(
    tmp_path: Path, cfg: dict, keys: list[str] | None, match: str
) -> None:
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    all_tensors = {
        "lora_A": (f"{prefix}.lora_A.weight", np.ones((2, 32), np.float32)),
        "lora_B": (f"{prefix}.lora_B.weight", np.ones((32, 2), np.float32)),
        "embed": ("base_model.model.model.embed_tokens.weight", np.ones((8, 32), np.float32)),
    }
    chosen = dict(all_tensors[k] for k in (keys or ["lora_A", "lora_B"]))
    with pytest.raises(InvalidAdapterError, match=match):
        load_peft(_foreign(tmp_path, cfg, chosen))


def test_import_rejects_broken_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapterError, match="expected adapter_config.json"):
        load_peft(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{nope")
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x00" * 16)
    with pytest.raises(InvalidAdapterError, match="unreadable JSON"):
        load_peft(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    with pytest.raises(InvalidAdapterError, match="unreadable safetensors"):
        load_peft(tmp_path)
    nan = np.full((2, 32), np.nan, np.float32)
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": nan,
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones(
                (32, 2), np.float32
            ),
        },
        str(tmp_path / WEIGHTS_NAME),
    )
    with pytest.raises(InvalidAdapterError, match="NaN"):
        load_peft(tmp_path)


def test_peft_to_gguf_round_trip(tmp_path: Path, llama_base: Path) -> None:
    tensors = random_adapter(rank=4)
    save_peft(tmp_path / "peft", tensors, rank=4, alpha=8.0)
    out = peft_to_gguf(tmp_path / "peft", llama_base, tmp_path / "a.gguf")
    lora = read_gguf_lora(out)
    assert (lora.rank, lora.alpha) == (4, 8.0)
    for k, v in tensors.items():
        np.testing.assert_array_equal(lora.tensors[k], v)


def test_hf_peft_loads_our_adapter(tmp_path: Path) -> None:
    """When HF transformers + peft are installed, they load our files into the same modules."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(cfg)
    tensors = random_adapter(rank=4)
    save_peft(tmp_path, tensors, rank=4, alpha=8.0, n_layer=2)
    peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path))
    state = peft_model.state_dict()
    for k, v in tensors.items():
        hf_key = "base_model.model." + k.replace(".lora_A", ".lora_A.default.weight").replace(
            ".lora_B", ".lora_B.default.weight"
        )
        np.testing.assert_array_equal(state[hf_key].detach().numpy(), v)
    assert peft_model.peft_config["default"].lora_alpha == 8.0
    del torch
