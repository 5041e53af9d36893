"""The written GGUF LoRA loads in llama.cpp, and our checker agrees with llama.cpp's verdict."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.adapters.gguf_lora import BaseModelInfo, check_adapter_compatible, write_gguf_lora
from edge_sdk.errors import AdapterMismatchError
from edge_sdk.models import naming

llama_cpp = pytest.importorskip("llama_cpp")


def _adapter_for(
    info: BaseModelInfo, n_layer: int, rank: int, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(n_layer):
        for target in naming.LORA_TARGETS:
            o, i = info.tensor_shapes[naming.gguf_stem(layer, target) + ".weight"]
            module = naming.hf_module(layer, target)
            out[module + ".lora_A"] = (rng.standard_normal((rank, i)) / np.sqrt(i)).astype(
                np.float32
            )
            out[module + ".lora_B"] = (rng.standard_normal((o, rank)) * 0.05).astype(np.float32)
    return out


def _last_logits(llm: llama_cpp.Llama, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[len(tokens) - 1], dtype=np.float32)


def _load(path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=64, n_threads=2, verbose=False, logits_all=True
    )


def test_adapter_loads_and_changes_logits(tmp_path: Path, smollm2_path: Path) -> None:
    info = BaseModelInfo.from_gguf(smollm2_path)
    n_layer = sum(1 for n in info.tensor_shapes if n.endswith(".attn_q.weight"))
    path = write_gguf_lora(
        tmp_path / "a.gguf", _adapter_for(info, n_layer, 4), alpha=8.0, base=smollm2_path
    )
    check_adapter_compatible(path, smollm2_path)

    llm = _load(smollm2_path)
    tokens = llm.tokenize(b"The capital of France is", add_bos=True)
    base = _last_logits(llm, tokens)
    adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode())
    assert adapter, "llama.cpp refused the adapter"
    try:
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(1.0)
        assert llama_cpp.llama_set_adapters_lora(llm.ctx, arr, 1, scales) == 0
        with_adapter = _last_logits(llm, tokens)
        assert llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None) == 0
        again = _last_logits(llm, tokens)
    finally:
        llama_cpp.llama_adapter_lora_free(adapter)
    assert np.abs(with_adapter - base).max() > 1e-2  # the adapter acts
    np.testing.assert_allclose(again, base, atol=1e-4)  # and is removable


def test_llama_cpp_and_checker_both_reject_foreign_adapter(
    tmp_path: Path, smollm2_path: Path, tiny_gguf: Path
) -> None:
    tiny = BaseModelInfo.from_gguf(tiny_gguf)
    assert tiny.arch == "llama"
    path = write_gguf_lora(
        tmp_path / "tiny.gguf", _adapter_for(tiny, 1, 2), alpha=4.0, base=tiny_gguf
    )
    with pytest.raises(AdapterMismatchError, match=r"tensor 'blk\.0\.\w+\.weight': adapter lora_a"):
        check_adapter_compatible(path, smollm2_path)
    llm = _load(smollm2_path)
    assert not llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode())
