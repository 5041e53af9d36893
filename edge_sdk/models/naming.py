"""One naming scheme for LoRA targets, shared by training, export, the wire and the coordinator.

Adapter tensors are keyed by the HF/PEFT module path plus `lora_A`/`lora_B`:

    model.layers.{i}.self_attn.q_proj.lora_A   (r, in_features)
    model.layers.{i}.self_attn.q_proj.lora_B   (out_features, r)

GGUF names (llama.cpp) for the same modules are `blk.{i}.attn_q` and so on.
"""

from __future__ import annotations

import re

# target -> (HF submodule path, GGUF tensor stem)
_TARGETS: dict[str, tuple[str, str]] = {
    "q_proj": ("self_attn.q_proj", "attn_q"),
    "k_proj": ("self_attn.k_proj", "attn_k"),
    "v_proj": ("self_attn.v_proj", "attn_v"),
    "o_proj": ("self_attn.o_proj", "attn_output"),
    "gate_proj": ("mlp.gate_proj", "ffn_gate"),
    "up_proj": ("mlp.up_proj", "ffn_up"),
    "down_proj": ("mlp.down_proj", "ffn_down"),
}

LORA_TARGETS: tuple[str, ...] = tuple(_TARGETS)
"""Every linear projection of a decoder block; the default LoRA targets."""

_HF_MODULE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)$")
_GGUF_STEM = {stem: target for target, (_, stem) in _TARGETS.items()}
_GGUF_NAME = re.compile(r"^blk\.(\d+)\.(\w+)$")


def _check_target(target: str) -> None:
    if target not in _TARGETS:
        raise ValueError(
            f"unknown LoRA target {target!r}; expected one of {', '.join(LORA_TARGETS)}"
        )


def hf_module(layer: int, target: str) -> str:
    """`model.layers.3.self_attn.q_proj` for (3, 'q_proj')."""
    _check_target(target)
    return f"model.layers.{layer}.{_TARGETS[target][0]}"


def gguf_stem(layer: int, target: str) -> str:
    """`blk.3.attn_q` for (3, 'q_proj'); the base weight is that plus `.weight`."""
    _check_target(target)
    return f"blk.{layer}.{_TARGETS[target][1]}"


def parse_hf_module(name: str) -> tuple[int, str]:
    """(layer, target) from an HF module path; `ValueError` if it is not a LoRA target."""
    m = _HF_MODULE.match(name)
    if not m or m.group(3) not in _TARGETS or _TARGETS[m.group(3)][0].split(".")[0] != m.group(2):
        raise ValueError(f"not a LoRA target module path: {name!r}")
    return int(m.group(1)), m.group(3)


def parse_gguf_stem(name: str) -> tuple[int, str]:
    """(layer, target) from `blk.N.attn_q`; `ValueError` otherwise."""
    m = _GGUF_NAME.match(name)
    if not m or m.group(2) not in _GGUF_STEM:
        raise ValueError(f"not a LoRA target GGUF tensor: {name!r}")
    return int(m.group(1)), _GGUF_STEM[m.group(2)]
