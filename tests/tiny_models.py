"""Tiny random GGUF models for unit tests: written with `gguf.GGUFWriter`, loadable by llama.cpp.

A SentencePiece-style vocabulary (control tokens, all 256 byte tokens, letters and a few words)
keeps llama.cpp's tokenizer happy; weights are seeded random F32, so a test runs in
milliseconds and is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    n_kv_head: int = 2
    d_ff: int = 128
    context_length: int = 256

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def _vocab() -> tuple[list[str], list[float], list[int]]:
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL, T.CONTROL, T.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256
    words = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += [
        "\u2581" + w
        for w in ("the", "a", "hello", "world", "is", "of", "and", "to", "in", "user", "assistant")
    ]
    tokens += words
    types += [T.NORMAL] * len(words)
    scores = [0.0] * (len(tokens) - len(words)) + [-float(i) for i in range(len(words))]
    return tokens, scores, [int(t) for t in types]


def add_tiny_tokenizer(w: gguf.GGUFWriter) -> int:
    """Write the tiny SentencePiece-style vocabulary into `w`; returns the vocabulary size."""
    tokens, scores, types = _vocab()
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    return len(tokens)


def write_tiny_gguf(
    path: Path | str,
    *,
    arch: str = "llama",
    spec: TinySpec = TinySpec(),
    seed: int = 0,
    licence: str | None = "apache-2.0",
    chat_template: str | None = CHATML_TEMPLATE,
    name: str = "tiny-test-model",
) -> Path:
    """Write a tiny random model of `arch`'s llama-style layout and return its path."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    vocab = len(_vocab()[0])
    kv_dim = spec.n_kv_head * spec.head_dim

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    if licence is not None:
        w.add_license(licence)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.d_model)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.d_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_kv_head)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    add_tiny_tokenizer(w)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def rand(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # numpy shapes are (out, in); GGUFWriter stores them reversed, as ggml expects.
    w.add_tensor("token_embd.weight", rand(vocab, spec.d_model, scale=0.5))
    for i in range(spec.n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(spec.d_model, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(spec.d_model, spec.d_model))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(kv_dim, spec.d_model))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(kv_dim, spec.d_model))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(spec.d_model, spec.d_model))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(spec.d_model, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(spec.d_ff, spec.d_model))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(spec.d_ff, spec.d_model))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(spec.d_model, spec.d_ff))
    w.add_tensor("output_norm.weight", np.ones(spec.d_model, np.float32))
    w.add_tensor("output.weight", rand(vocab, spec.d_model, scale=0.5))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
