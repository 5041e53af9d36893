"""Adapter files: GGUF LoRA for llama.cpp, PEFT for Hugging Face, and conversion between them.

Tensors cross this package as numpy arrays keyed by `edge_sdk.models.naming`
(`model.layers.{i}.self_attn.q_proj.lora_A` (r, in) / `.lora_B` (out, r)), in Hugging Face row
order; only the GGUF writer and reader know llama.cpp's Q/K row permutation. numpy, `gguf` and
`safetensors` only: the inference runtime uses this package without torch.
"""

from edge_sdk.adapters.export import GGUF_NAME, ExportPaths, export_adapter
from edge_sdk.adapters.gguf_lora import (
    BaseModelInfo,
    GgufLora,
    check_adapter_compatible,
    read_gguf_lora,
    write_gguf_lora,
)
from edge_sdk.adapters.peft import PeftAdapter, load_peft, peft_to_gguf, save_peft

__all__ = [
    "GGUF_NAME",
    "BaseModelInfo",
    "ExportPaths",
    "GgufLora",
    "PeftAdapter",
    "check_adapter_compatible",
    "export_adapter",
    "load_peft",
    "peft_to_gguf",
    "read_gguf_lora",
    "save_peft",
    "write_gguf_lora",
]
