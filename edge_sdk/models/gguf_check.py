"""What a GGUF model's metadata means, checked before llama.cpp or torch sees the file.

`gguf_meta.read_gguf` validates the container; this module validates the meaning:

- the value type of every key the project reads (`general.*`, the architecture's
  hyper-parameters, the tokenizer); a wrong type is an error here, not a `TypeError` later or
  a GGML_ASSERT abort in llama.cpp;
- the hyper-parameters are positive, within `gguf_limits` (block count <= LLAMA_MAX_LAYERS,
  experts <= LLAMA_MAX_EXPERTS, a RoPE scaling type llama.cpp knows) and consistent: heads
  divide the width, the KV heads divide the heads, token ids are inside the vocabulary;
- the tensors match them: no block index past `block_count`, and for the families with a
  torch implementation (`SUPPORTED_ARCHS`) every block is present and every linear weight,
  norm and embedding has the shape the hyper-parameters give.

`open_model` reads and checks a model file (cached by path, size and mtime, since the CLI, the
runtime, the tokenizer and the adapter checks all open the same file).
"""

from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path
from typing import Any

from gguf import GGUFValueType

from edge_sdk.errors import FedlmError, InvalidModelError
from edge_sdk.models import gguf_limits as L
from edge_sdk.models.config import SUPPORTED_ARCHS
from edge_sdk.models.gguf_meta import (
    GGUFFile,
    float_types,
    integer_types,
    quote,
    read_gguf,
    show_path,
)

_ARCH_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")

# Kinds of value a key may hold.
STR, INT, FLOAT, BOOL, INT_OR_INTS, STRS, FLOATS, INTS = (
    "a string",
    "an integer",
    "a number",
    "a boolean",
    "an integer or an integer array",
    "an array of strings",
    "an array of numbers",
    "an array of integers",
)

GENERAL_KEYS: dict[str, str] = {
    "general.architecture": STR,
    "general.type": STR,
    "general.name": STR,
    "general.file_type": INT,
    "general.license": STR,
    "general.quantization_version": INT,
}

ARCH_KEYS: dict[str, str] = {
    "context_length": INT,
    "embedding_length": INT,
    "block_count": INT,
    "feed_forward_length": INT_OR_INTS,
    "vocab_size": INT,
    "attention.head_count": INT_OR_INTS,
    "attention.head_count_kv": INT_OR_INTS,
    "attention.key_length": INT,
    "attention.value_length": INT,
    "attention.layer_norm_rms_epsilon": FLOAT,
    "attention.layer_norm_epsilon": FLOAT,
    "attention.sliding_window": INT,
    "attention.sliding_window_pattern": INT,
    "rope.dimension_count": INT,
    "rope.freq_base": FLOAT,
    "rope.freq_base_swa": FLOAT,
    "rope.scaling.type": STR,
    "rope.scaling.factor": FLOAT,
    "final_logit_softcapping": FLOAT,
    "expert_count": INT,
    "expert_used_count": INT,
}

TOKENIZER_KEYS: dict[str, str] = {
    "tokenizer.ggml.model": STR,
    "tokenizer.ggml.pre": STR,
    "tokenizer.ggml.tokens": STRS,
    "tokenizer.ggml.scores": FLOATS,
    "tokenizer.ggml.token_type": INTS,
    "tokenizer.ggml.merges": STRS,
    "tokenizer.ggml.add_bos_token": BOOL,
    "tokenizer.ggml.add_eos_token": BOOL,
    "tokenizer.chat_template": STR,
}
_TOKEN_ID_KEYS = ("bos", "eos", "unknown", "separator", "padding", "eot", "eom", "mask")


def refuse(f: GGUFFile, reason: str) -> FedlmError:
    """The error to raise for `f`: `<path>: <reason>` of the file's error class."""
    return f.error(f"{show_path(f.path)}: {reason}")


def _kind_of(field: Any) -> str:
    if field.type == GGUFValueType.ARRAY:
        return f"an array of {field.count} {field.item_type.name}"
    return f"a {field.type.name}"


def _matches(field: Any, kind: str) -> bool:
    t, it = field.type, field.item_type
    ints, floats = integer_types(), float_types() | integer_types()
    return {
        STR: t == GGUFValueType.STRING,
        INT: t in ints,
        FLOAT: t in floats,
        BOOL: t == GGUFValueType.BOOL,
        INT_OR_INTS: t in ints or (t == GGUFValueType.ARRAY and it in ints),
        STRS: t == GGUFValueType.ARRAY and it == GGUFValueType.STRING,
        FLOATS: t == GGUFValueType.ARRAY and it in floats,
        INTS: t == GGUFValueType.ARRAY and it in ints,
    }[kind]


def value(f: GGUFFile, key: str, kind: str, *, required: bool = False) -> Any:
    """The value of `key` if it has the `kind` of value it should; None when absent."""
    field = f.fields.get(key)
    if field is None:
        if required:
            raise refuse(f, f"metadata lacks {quote(key)}")
        return None
    if not _matches(field, kind):
        raise refuse(f, f"{quote(key)} should be {kind}, got {_kind_of(field)}")
    if kind in (STRS, FLOATS, INTS):
        return field  # arrays stay lazy; callers take len() or contents()
    v = field.contents()
    if kind == FLOAT and not math.isfinite(float(v)):
        raise refuse(f, f"{quote(key)} should be a finite number, got {v}")
    return v


def check_types(f: GGUFFile, keys: dict[str, str]) -> None:
    for key, kind in keys.items():
        value(f, key, kind)


def architecture(f: GGUFFile) -> str:
    """`general.architecture`, checked: a short name of letters, digits, '_', '-' or '.'."""
    arch = value(f, "general.architecture", STR, required=True)
    if not _ARCH_RE.match(arch):
        raise refuse(f, f"general.architecture {quote(arch)} is not an architecture name")
    return arch


def _positive(f: GGUFFile, key: str, v: Any, limit: int, *, zero: bool = False) -> None:
    values = v.contents() if hasattr(v, "contents") else (v if isinstance(v, list) else [v])
    low = 0 if zero else 1
    for x in values:
        if not low <= int(x) <= limit:
            raise refuse(f, f"{quote(key)} is {x}, should be {low} to {limit}")


def _scalar_or_layers(f: GGUFFile, key: str, v: Any, n_layer: int | None) -> list[int] | None:
    """An int key that llama.cpp also accepts per layer (an array of n_layer ints)."""
    if v is None:
        return None
    if isinstance(v, list):
        if n_layer is not None and len(v) != n_layer:
            raise refuse(f, f"{quote(key)} has {len(v)} per-layer values, block_count is {n_layer}")
        return [int(x) for x in v]
    return [int(v)]


def check_model(f: GGUFFile) -> None:
    """Check the metadata and tensors of a model file (see the module docstring)."""
    arch = architecture(f)
    check_types(f, GENERAL_KEYS)
    check_types(f, {f"{arch}.{k}": kind for k, kind in ARCH_KEYS.items()})
    check_types(f, TOKENIZER_KEYS)
    gtype = value(f, "general.type", STR)
    if gtype is not None and gtype != "model":
        raise refuse(f, f"general.type is {quote(gtype)}, expected 'model'")

    def get(key: str, kind: str = INT) -> Any:
        return value(f, f"{arch}.{key}", kind)

    n_layer = get("block_count")
    if n_layer is not None:
        _positive(f, f"{arch}.block_count", n_layer, L.MAX_LAYERS)
    for key, limit in (
        ("context_length", L.MAX_CONTEXT_LENGTH),
        ("embedding_length", L.MAX_WIDTH),
        ("vocab_size", L.MAX_VOCAB),
        ("attention.key_length", L.MAX_WIDTH),
        ("attention.value_length", L.MAX_WIDTH),
        ("rope.dimension_count", L.MAX_WIDTH),
        ("attention.sliding_window", L.MAX_CONTEXT_LENGTH),
        ("attention.sliding_window_pattern", L.MAX_LAYERS),
    ):
        v = get(key)
        if v is not None:
            _positive(f, f"{arch}.{key}", v, limit)
    ff = _scalar_or_layers(
        f, f"{arch}.feed_forward_length", get("feed_forward_length", INT_OR_INTS), n_layer
    )
    heads = _scalar_or_layers(
        f, f"{arch}.attention.head_count", get("attention.head_count", INT_OR_INTS), n_layer
    )
    kv = _scalar_or_layers(
        f, f"{arch}.attention.head_count_kv", get("attention.head_count_kv", INT_OR_INTS), n_layer
    )
    # Per-layer lists may hold 0 (a layer without attention or MLP); a scalar may not.
    if ff is not None:
        _positive(f, f"{arch}.feed_forward_length", ff, L.MAX_WIDTH, zero=len(ff) > 1)
    if heads is not None:
        _positive(f, f"{arch}.attention.head_count", heads, L.MAX_HEADS, zero=len(heads) > 1)
    if kv is not None:
        _positive(f, f"{arch}.attention.head_count_kv", kv, L.MAX_HEADS, zero=len(kv) > 1)
        for h, k in zip(heads or [], kv if len(kv) > 1 else kv * len(heads or [])):
            if k and h % k:
                raise refuse(
                    f, f"{arch}.attention.head_count {h} is not a multiple of head_count_kv {k}"
                )
    d_model = get("embedding_length")
    if d_model is not None and heads and get("attention.key_length") is None:
        for h in heads:
            if h and d_model % h:
                raise refuse(
                    f, f"{arch}.attention.head_count {h} does not divide embedding_length {d_model}"
                )
    scaling = get("rope.scaling.type", STR)
    if scaling is not None and scaling not in L.ROPE_SCALING_TYPES:
        raise refuse(
            f, f"{arch}.rope.scaling.type is {quote(scaling)}, not one of {L.ROPE_SCALING_TYPES}"
        )
    for key in (
        "rope.freq_base",
        "rope.freq_base_swa",
        "attention.layer_norm_rms_epsilon",
        "attention.layer_norm_epsilon",
        "rope.scaling.factor",
    ):
        v = get(key, FLOAT)
        if v is not None and float(v) < 0:
            raise refuse(f, f"{arch}.{key} is {v}, should not be negative")
    n_expert, n_used = get("expert_count"), get("expert_used_count")
    if n_expert is not None and not 0 <= n_expert <= L.MAX_EXPERTS:
        raise refuse(f, f"{arch}.expert_count is {n_expert}, should be 0 to {L.MAX_EXPERTS}")
    # llama.cpp asserts 0 < expert_used_count <= expert_count when there are experts, and
    # expert_used_count == 0 (and no expert groups) when there are none.
    n_expert, n_used = n_expert or 0, n_used or 0
    if (n_expert and not 1 <= n_used <= n_expert) or (not n_expert and n_used):
        raise refuse(
            f,
            f"{arch}.expert_used_count is {n_used}, should be 1 to expert_count ({n_expert}), "
            "or 0 without experts",
        )
    for key in ("expert_group_count", "expert_group_used_count", "nextn_predict_layers"):
        # Checks llama.cpp asserts on (llama-model.cpp load_hparams); refused when present
        # and not simply zero, rather than re-implemented.
        v = value(f, f"{arch}.{key}", INT)
        if v:
            raise refuse(f, f"{arch}.{key} is {v}: not supported")
    if n_expert and arch in SUPPORTED_ARCHS:
        raise refuse(
            f, f"{arch}.expert_count is {n_expert}: mixture-of-experts {arch} is not supported"
        )
    n_vocab = _check_tokenizer(f)
    _check_blocks(f, n_layer)
    if arch in SUPPORTED_ARCHS:
        _check_shapes(f, arch, n_vocab)


def _check_tokenizer(f: GGUFFile) -> int | None:
    tokens = value(f, "tokenizer.ggml.tokens", STRS)
    n = None if tokens is None else tokens.count
    if n is not None and not 1 <= n <= L.MAX_VOCAB:
        raise refuse(f, f"tokenizer.ggml.tokens holds {n} tokens, should be 1 to {L.MAX_VOCAB}")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        arr = f.fields.get(key)
        if arr is not None and n is not None and arr.count != n:
            raise refuse(f, f"{quote(key)} has {arr.count} entries for {n} tokens")
    for name in _TOKEN_ID_KEYS:
        key = f"tokenizer.ggml.{name}_token_id"
        tid = value(f, key, INT)
        # llama.cpp reads these as uint32; -1 means "none" in some converters.
        if tid is not None and n is not None and not -1 <= tid < n:
            raise refuse(f, f"{quote(key)} is {tid}, outside the {n}-token vocabulary")
    return n


def _block_index(name: str) -> int | None:
    if not name.startswith("blk."):
        return None
    head = name[4:].split(".", 1)[0]
    return int(head) if head.isdigit() and len(head) < 6 else -1


def _check_blocks(f: GGUFFile, n_layer: int | None) -> None:
    for t in f.tensors:
        i = _block_index(t.name)
        if i is None:
            continue
        if i < 0:
            raise refuse(f, f"tensor {quote(t.name)} has no block number")
        if n_layer is not None and i >= n_layer:
            raise refuse(f, f"tensor {quote(t.name)} is past block_count {n_layer}")


def expected_shapes(f: GGUFFile, arch: str, n_vocab: int | None) -> dict[str, tuple[int, ...]]:
    """numpy-order shape of every tensor a `SUPPORTED_ARCHS` model must have (plus optional ones
    marked by a trailing '?' in the name)."""

    def req(key: str) -> int:
        v = value(f, f"{arch}.{key}", INT_OR_INTS, required=True)
        if isinstance(v, list):
            raise refuse(f, f"{arch}.{key} per layer is not supported for {arch}")
        return int(v)

    d, n_layer, n_head, ff = (
        req("embedding_length"),
        req("block_count"),
        req("attention.head_count"),
        req("feed_forward_length"),
    )
    n_kv = value(f, f"{arch}.attention.head_count_kv", INT_OR_INTS)
    if isinstance(n_kv, list):
        raise refuse(f, f"{arch}.attention.head_count_kv per layer is not supported for {arch}")
    n_kv = n_head if n_kv is None else int(n_kv)
    head_k = value(f, f"{arch}.attention.key_length", INT) or d // n_head
    head_v = value(f, f"{arch}.attention.value_length", INT) or head_k
    vocab = n_vocab or value(f, f"{arch}.vocab_size", INT)
    shapes: dict[str, tuple[int, ...]] = {"output_norm.weight": (d,)}
    if vocab:
        shapes["token_embd.weight"] = (vocab, d)
        shapes["output.weight?"] = (vocab, d)
    for i in range(n_layer):
        b = f"blk.{i}"
        shapes.update(
            {
                f"{b}.attn_norm.weight": (d,),
                f"{b}.attn_q.weight": (n_head * head_k, d),
                f"{b}.attn_k.weight": (n_kv * head_k, d),
                f"{b}.attn_v.weight": (n_kv * head_v, d),
                f"{b}.attn_output.weight": (d, n_head * head_v),
                f"{b}.ffn_norm.weight": (d,),
                f"{b}.ffn_gate.weight": (ff, d),
                f"{b}.ffn_up.weight": (ff, d),
                f"{b}.ffn_down.weight": (d, ff),
                f"{b}.attn_q.bias?": (n_head * head_k,),
                f"{b}.attn_k.bias?": (n_kv * head_k,),
                f"{b}.attn_v.bias?": (n_kv * head_v,),
                f"{b}.attn_q_norm.weight?": (head_k,),
                f"{b}.attn_k_norm.weight?": (head_k,),
                f"{b}.post_attention_norm.weight?": (d,),
                f"{b}.post_ffw_norm.weight?": (d,),
            }
        )
    return shapes


def _check_shapes(f: GGUFFile, arch: str, n_vocab: int | None) -> None:
    have = {t.name: t.np_shape for t in f.tensors}
    for name, want in expected_shapes(f, arch, n_vocab).items():
        optional = name.endswith("?")
        name = name.rstrip("?")
        got = have.get(name)
        if got is None:
            if optional:
                continue
            raise refuse(f, f"{arch} model lacks tensor {quote(name)}")
        if got != want:
            raise refuse(f, f"tensor {quote(name)} has shape {got}, the metadata gives {want}")


@functools.lru_cache(maxsize=8)
def _open_model_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    del size, mtime_ns  # part of the cache key only: a rewritten file is read again
    f = read_gguf(path, error=InvalidModelError)
    check_model(f)
    return f


def open_model(path: os.PathLike[str] | str) -> GGUFFile:
    """Read and check a model file; `InvalidModelError` with `<path>: <reason>` when refused."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        from edge_sdk.errors import ModelNotFoundError

        raise ModelNotFoundError(f"{show_path(p)}: {exc.strerror or 'cannot read'}") from None
    return _open_model_cached(str(p), st.st_size, st.st_mtime_ns)


RUNNABLE_TOKENIZERS: tuple[str, ...] = ("llama", "gpt2")
"""`tokenizer.ggml.model` values llama.cpp may be handed here: SentencePiece (Gemma, Llama 2)
and byte-level BPE (SmolLM2, Qwen, Llama 3). llama.cpp aborts the process on other vocabularies
whose special tokens are missing (`bert`, `none`, ... in the fuzz campaign)."""


def check_runnable(f: GGUFFile) -> None:
    """Checks on top of `check_model` before llama.cpp tokenizes with this file's vocabulary.

    llama.cpp's SentencePiece tokenizer falls back to a token per raw byte (`byte_to_token`
    uses `std::map::at`, whose exception aborts the process through the C API), and it asserts
    that BOS and EOS exist when it adds them. So: a supported tokenizer model, BOS and EOS ids
    inside the vocabulary, and for SentencePiece a token for each of the 256 bytes (byte-level
    BPE skips bytes it has no token for).
    """
    model = value(f, "tokenizer.ggml.model", STR, required=True)
    if model not in RUNNABLE_TOKENIZERS:
        raise refuse(
            f,
            f"tokenizer.ggml.model is {quote(model)}; supported: {', '.join(RUNNABLE_TOKENIZERS)}",
        )
    tokens = value(f, "tokenizer.ggml.tokens", STRS, required=True)
    for name in ("bos", "eos"):
        key = f"tokenizer.ggml.{name}_token_id"
        tid = value(f, key, INT, required=True)
        if not 0 <= tid < tokens.count:
            raise refuse(f, f"{key} is {tid}, outside the {tokens.count}-token vocabulary")
    if model != "llama":
        return
    vocab = tokens.strings_of_length(1, 6)  # "<0x0A>" or the byte itself
    missing = [
        b
        for b in range(256)
        if f"<0x{b:02X}>" not in vocab and not (0 < b < 128 and chr(b) in vocab)
    ]
    if missing:
        raise refuse(
            f,
            f"the vocabulary has no token for {len(missing)} "
            f"of the 256 bytes (first: 0x{missing[0]:02X})",
        )
