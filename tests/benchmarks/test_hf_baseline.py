"""The HF baseline of `benchmarks/bench_train_cli.py` trains with correct gradients.

bitsandbytes 0.50's CPU `Linear4bit`, on a CPU with AVX512-BF16, repacks its weight for a bf16
inference kernel at its first forward in eval mode; after that its output has no gradient path
to its input, so training a LoRA model through it silently drops every gradient that crosses a
frozen projection (and runs ~1.9x faster per step). `hf_train_script.py` evaluates in train mode
under no_grad to keep its training the same as a run that never evaluated: that is checked
here on a tiny Llama with real bitsandbytes NF4 layers and peft.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _tiny_qlora():
    from benchmarks.hf_qlora import add_lora, quantize_linears_nf4

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    quantize_linears_nf4(model)
    model = add_lora(model, rank=4, alpha=8.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would hide a missing gradient path through A
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    return model


def _first_layer_grad(model, ids: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    a = next(p for n, p in model.named_parameters() if "layers.0." in n and "lora_A" in n)
    assert a.grad is not None
    return a.grad.clone()


def test_evaluation_in_the_hf_script_keeps_the_gradients_of_a_never_evaluated_model() -> None:
    script = _load("hf_train_script")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    model = _tiny_qlora()
    before = _first_layer_grad(model, ids)
    script._eval_loss(model, ids, batch_size=1)
    after = _first_layer_grad(model, ids)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_an_eval_mode_forward_cuts_bitsandbytes_gradients_on_avx512_bf16() -> None:
    """Why the script does not call `model.eval()`: the gradient of the first block's adapter,
    which only reaches it through the frozen NF4 projections above, changes after one."""
    model = _tiny_qlora()
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    if not getattr(layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps its training path")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    before = _first_layer_grad(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    after = _first_layer_grad(model, ids)
    assert not torch.allclose(after, before, rtol=1e-3, atol=1e-6)
