"""Tiny random GGUF models of every supported family (llama, gemma3, qwen2, qwen3).

Like `tests.tiny_models` (whose SentencePiece-style vocabulary is reused so that llama.cpp can
load these files too) but with each family's own tensors: Gemma 3's q/k and sandwich norms and
sliding window, Qwen 2's q/k/v biases, Qwen 3's q/k norms. Weights are seeded random; `quant`
stores the projections in a llama.cpp quantized type to exercise the dequantization path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from tests.tiny_models import _vocab, add_tiny_tokenizer


@dataclass(frozen=True)
class FamilySpec:
    n_layer: int = 3
    d_model: int = 64
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 16
    d_ff: int = 96
    context_length: int = 128
    sliding_window: int = 5
    """Gemma 3 only: small so that a 16-token test sequence crosses it."""


def write_family_gguf(
    path: Path | str,
    arch: str = "llama",
    *,
    spec: FamilySpec = FamilySpec(),
    seed: int = 0,
    quant: gguf.GGMLQuantizationType | None = None,
    tied: bool | None = None,
    rope_freqs: bool = False,
    embed_quant: gguf.GGMLQuantizationType | None = None,
) -> Path:
    """Write a tiny random `arch` model; `tied` defaults to the family's habit (gemma3: tied).

    `embed_quant` stores `token_embd.weight` in that llama.cpp type (real models ship it Q8_0).

    `rope_freqs` adds Llama 3.1-style per-frequency RoPE divisors (`rope_freqs.weight`).
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    vocab = len(_vocab()[0])
    q_dim, kv_dim = spec.n_head * spec.head_dim, spec.n_kv_head * spec.head_dim
    tied = arch == "gemma3" if tied is None else tied

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.d_model)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.d_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_kv_head)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_freq_base(10000.0 if arch != "gemma3" else 1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    if arch == "gemma3":
        w.add_sliding_window(spec.sliding_window)
    add_tiny_tokenizer(w)

    def rand(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    def proj(name: str, arr: np.ndarray) -> None:
        if quant is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, quant), raw_dtype=quant)

    embd = rand(vocab, spec.d_model, scale=0.5)
    if embed_quant is None:
        w.add_tensor("token_embd.weight", embd)
    else:
        w.add_tensor(
            "token_embd.weight", gguf.quants.quantize(embd, embed_quant), raw_dtype=embed_quant
        )
    if rope_freqs:  # divisors from 1 (high frequencies kept) to 40 (low ones slowed)
        w.add_tensor(
            "rope_freqs.weight", np.geomspace(1.0, 40.0, spec.head_dim // 2).astype(np.float32)
        )
    for i in range(spec.n_layer):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", norm(spec.d_model))
        proj(f"{b}.attn_q.weight", rand(q_dim, spec.d_model))
        proj(f"{b}.attn_k.weight", rand(kv_dim, spec.d_model))
        proj(f"{b}.attn_v.weight", rand(kv_dim, spec.d_model))
        proj(f"{b}.attn_output.weight", rand(spec.d_model, q_dim))
        if arch == "qwen2":
            for t, n in (("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
                w.add_tensor(f"{b}.{t}.bias", rand(n))
        if arch in ("gemma3", "qwen3"):
            w.add_tensor(f"{b}.attn_q_norm.weight", norm(spec.head_dim))
            w.add_tensor(f"{b}.attn_k_norm.weight", norm(spec.head_dim))
        if arch == "gemma3":
            w.add_tensor(f"{b}.post_attention_norm.weight", norm(spec.d_model))
            w.add_tensor(f"{b}.post_ffw_norm.weight", norm(spec.d_model))
        w.add_tensor(f"{b}.ffn_norm.weight", norm(spec.d_model))
        proj(f"{b}.ffn_gate.weight", rand(spec.d_ff, spec.d_model))
        proj(f"{b}.ffn_up.weight", rand(spec.d_ff, spec.d_model))
        proj(f"{b}.ffn_down.weight", rand(spec.d_model, spec.d_ff))
    w.add_tensor("output_norm.weight", norm(spec.d_model))
    if not tied:
        w.add_tensor("output.weight", rand(vocab, spec.d_model, scale=0.5))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
