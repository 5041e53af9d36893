"""The Hugging Face QLoRA stack the benchmarks compare against, built from the same GGUF.

- `load_gguf_fp32`: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` in fp32;
- `quantize_linears_nf4`: every `nn.Linear` but `lm_head` becomes a bitsandbytes NF4
  `Linear4bit` quantized from the loaded weight, which is what
  `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_compute_dtype=float32)` does to a non-GGUF checkpoint (HF refuses a GGUF file with
  a quantization_config);
- `add_lora`: `peft.get_peft_model` with rank, alpha, all 7 projections and no dropout.

Used by benchmarks/bench_train.py and the Flower baseline (benchmarks/flower_app); both run
with the repository root on PYTHONPATH. The libraries load when this module is imported, so
an import of it counts as the stack's import time.
"""

from __future__ import annotations

import os
from typing import Any

import bitsandbytes as bnb
import peft
import torch
from torch import nn
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_gguf_fp32(gguf: str | os.PathLike[str]) -> Any:
    """The GGUF file's model, dequantized to fp32 by transformers."""
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    )


def quantize_linears_nf4(model: nn.Module) -> None:
    """Swap every `nn.Linear` except the top-level `lm_head` for an NF4 `Linear4bit`, in place."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and not (name == "" and child_name == "lm_head"):
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.float32,
                    compress_statistics=False,
                    quant_type="nf4",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data,
                    requires_grad=False,
                    quant_type="nf4",
                    compress_statistics=False,
                    module=q,
                )
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, q.to("cpu"))  # .to quantizes


def add_lora(model: nn.Module, rank: int, alpha: float) -> Any:
    """`model` wrapped by peft with LoRA on the 7 projections (no dropout)."""
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(model, config)


def hf_qlora(gguf: str | os.PathLike[str], rank: int, alpha: float) -> Any:
    """The whole QLoRA baseline: fp32 load, NF4 linears, LoRA."""
    model = load_gguf_fp32(gguf)
    quantize_linears_nf4(model)
    return add_lora(model, rank, alpha)
