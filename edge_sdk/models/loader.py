"""GGUF → trainable torch model: read, dequantize, re-quantize to NF4 (or keep bf16/fp32).

The file is memory-mapped and checked by `gguf_check.open_model`; every tensor is dequantized with
`gguf.quants.dequantize` only when its module is built and is dropped right after, so peak
memory is the final model plus one fp32 tensor, never the whole fp32 model.

Name mapping (GGUF → module path in `edge_sdk.models.transformer`):

    token_embd.weight              model.embed_tokens.weight
    output_norm.weight             model.norm.weight
    output.weight                  lm_head.weight            (absent when tied)
    blk.{i}.attn_norm              model.layers.{i}.attn_norm
    blk.{i}.attn_q|k|v|output      model.layers.{i}.self_attn.q|k|v|o_proj
    blk.{i}.attn_q_norm|k_norm     model.layers.{i}.self_attn.q_norm|k_norm
    blk.{i}.post_attention_norm    model.layers.{i}.post_attn_norm
    blk.{i}.ffn_norm               model.layers.{i}.ffn_norm
    blk.{i}.ffn_gate|up|down       model.layers.{i}.mlp.gate|up|down_proj
    blk.{i}.post_ffw_norm          model.layers.{i}.post_ffn_norm

llama.cpp's converter permutes the rows of Q and K of `llama` models so that its "normal"
RoPE (adjacent channel pairs) equals HF's rotate-half RoPE (`permute` in convert_hf_to_gguf.py).
`unpermute_qk` undoes that here; export re-applies `permute_qk` to the rows of `lora_B`.
gemma3 and qwen2/3 use llama.cpp's NEOX RoPE and are stored unpermuted.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edge_sdk.choices import PRECISIONS, Precision
from edge_sdk.env import LOW_MEMORY_ENV
from edge_sdk.errors import InvalidModelError, ModelNotFoundError
from edge_sdk.models.config import ModelConfig
from edge_sdk.models.gguf_meta import GGUFFile, quote, show_path
from edge_sdk.models.naming import LORA_TARGETS, gguf_stem, hf_module
from edge_sdk.models.nf4 import NF4_BLOCKSIZE, NF4Linear
from edge_sdk.models.qk_order import PERMUTED_ARCHS, unpermute_qk
from edge_sdk.models.quant_rows import QuantizedEmbedding
from edge_sdk.models.transformer import Transformer
from edge_sdk.validators import require_architecture

if TYPE_CHECKING:
    from edge_sdk.training.lora import LoraConfig

log = logging.getLogger(__name__)


# Norm tensors per block: GGUF suffix -> module path inside the block.
_BLOCK_NORMS = {
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
    "post_attention_norm": "post_attn_norm",
    "post_ffw_norm": "post_ffn_norm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}


_DEQUANT_ROWS = 4096
_FLOAT_TYPES = frozenset({0, 1, 30})  # GGMLQuantizationType F32, F16, BF16: views, no temporaries


# -- Q/K permutation ---------------------------------------------------------------------------


# -- GGUF reading ------------------------------------------------------------------------------


def _open(path: str | os.PathLike[str]) -> GGUFFile:
    # The project's one validating reader: container, key types, hyper-parameters and tensor
    # shapes are checked before torch allocates anything (see gguf_check).
    from edge_sdk.models.gguf_check import open_model

    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(f"no such GGUF file: {show_path(p)}")
    return open_model(p)


def read_metadata(reader: GGUFFile) -> dict[str, Any]:
    """GGUF key/values as Python values; large arrays are left out (their length kept)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if field.is_array and field.count > 1024:
            meta[key + ".__len__"] = field.count
            continue
        meta[key] = field.contents()
    if "tokenizer.ggml.tokens" not in meta and "tokenizer.ggml.tokens.__len__" in meta:
        meta["tokenizer.ggml.tokens"] = range(meta["tokenizer.ggml.tokens.__len__"])
    return meta


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The `ModelConfig` of a GGUF file, without loading any tensor."""
    reader = _open(path)
    return _config(reader)


def _config(reader: GGUFFile) -> ModelConfig:
    # The checks in gguf_check make every value here well typed; ModelConfig's own ValueError
    # (a combination it cannot run) still names the file.
    try:
        return ModelConfig.from_gguf_fields(read_metadata(reader), {t.name for t in reader.tensors})
    except ValueError as exc:
        raise InvalidModelError(f"{show_path(reader.path)}: {exc}") from None


def dequantize_tensor(tensor: Any) -> np.ndarray:
    """A GGUF reader tensor as float32, numpy axis order (a 2-D weight is (out, in)).

    Q8_0/Q4_0/Q4_1 go through a C kernel (native/dequant.py), everything else through
    `gguf.quants.dequantize`; both give the same values.
    """
    from native.dequant import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    raw = tensor.data
    if raw.ndim == 2 and raw.shape[0] > _DEQUANT_ROWS and tensor.tensor_type not in _FLOAT_TYPES:
        # Row chunks: gguf's numpy dequantization makes several full-size temporaries, which
        # for a 49k x 576 embedding would be the load's memory peak.
        out = np.empty(shape, dtype=np.float32)
        flat = out.reshape(raw.shape[0], -1)
        for r in range(0, raw.shape[0], _DEQUANT_ROWS):
            flat[r : r + _DEQUANT_ROWS] = dequantize(raw[r : r + _DEQUANT_ROWS], tensor.tensor_type)
        return out
    data = dequantize(raw, tensor.tensor_type)
    # F32 tensors come back as read-only views of the memory map: copy those, so the model
    # never aliases the file.
    return np.require(data, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]).reshape(shape)


# -- module construction -----------------------------------------------------------------------


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _make_linear(weight: torch.Tensor, bias: torch.Tensor | None, precision: str) -> nn.Module:
    """A frozen linear layer holding `weight` (out, in) fp32 in the requested precision."""
    out_f, in_f = weight.shape
    if precision == "nf4":
        # Our own NF4 layer with bitsandbytes' exact bytes (native/nf4.c quantizes ~16x faster
        # than bitsandbytes' CPU path). No double quantization of the absmax: it would save
        # 0.4 bit per weight but cost a second dequantization on every forward and backward.
        # Not bitsandbytes' Linear4bit: its import alone costs ~120 MB RSS (torch._inductor),
        # and its AVX512-BF16 repacking broke our kernels before (see edge_sdk.models.nf4).
        return NF4Linear.from_float(weight, bias, NF4_BLOCKSIZE)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    linear.weight = _frozen(weight.to(dtype))
    if bias is not None:
        linear.bias = _frozen(bias.to(dtype))
    return linear


def _keeps_blocks(tensor: Any) -> bool:
    """Whether the embedding `tensor` can stay in its GGUF blocks (`QuantizedEmbedding`)."""
    from native.dequant import KERNEL_TYPES

    return int(tensor.tensor_type) in KERNEL_TYPES and tensor.data.ndim == 2


def _quantized_embedding(tensor: Any, dim: int, path: str | os.PathLike[str]) -> QuantizedEmbedding:
    """The token embedding kept in its GGUF blocks (Q8_0 / Q4_0 / Q4_1): the values are those
    an fp32 table would hold, at a quarter of the memory or less (issue 16, part 2).

    The blocks are copied out of the memory map (the model never aliases the file) and checked
    for NaN / inf one row chunk at a time, without an fp32 copy of the whole table.
    """
    raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8, order="C", copy=True))
    emb = QuantizedEmbedding(raw, int(tensor.tensor_type), dim)
    for r in range(0, emb.num_embeddings, _DEQUANT_ROWS):
        chunk = emb.row_range(r, min(emb.num_embeddings, r + _DEQUANT_ROWS))
        if not bool(torch.isfinite(chunk).all()):
            raise InvalidModelError(
                f"{show_path(path)}: tensor {quote(tensor.name)} holds NaN or inf"
            )
    return emb


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _set_param(root: nn.Module, path: str, value: torch.Tensor) -> None:
    module_path, _, name = path.rpartition(".")
    module = root.get_submodule(module_path)
    current = getattr(module, name)
    if tuple(current.shape) != tuple(value.shape):
        raise InvalidModelError(
            f"tensor for {path} has shape {tuple(value.shape)}, expected {tuple(current.shape)}"
        )
    setattr(module, name, _frozen(value))


def _iter_progress(items: list[int], enabled: bool, desc: str) -> Iterator[int]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, unit="layer")


MMAP_THRESHOLD = 640 * 1024
"""Bytes from which glibc serves an allocation with its own mmap (`tune_malloc`)."""

LOW_MEMORY_MMAP_THRESHOLD = 128 * 1024
"""The same with FEDLM_LOW_MEMORY=1 (glibc's initial value)."""


def tune_malloc(low_memory: bool = False) -> None:
    """Pin glibc's mmap threshold, so that a training step's largest tensors are returned to
    the OS when freed instead of fragmenting the heap (issue 16, part 2).

    glibc starts at 128 KiB but raises the threshold to the size of each mmapped block freed
    (up to 32 MiB): after the load's fp32 blocks it is several MiB, every activation of the
    step (0.2-1.5 MB each for SmolLM2 at seq 256) then comes from the heap, and the holes that
    the forward's temporaries leave between the tensors saved for backward grow it: peak RSS
    803 MB against 673 MB pinned at 256 KiB (SmolLM2 QLoRA, seq 256, batch 1, bench worker).
    But each mapped tensor costs a map, page faults on first write and an unmap, which cost
    most while OpenMP threads spin on the other cores (what `fedlm train` uses on an idle
    machine): at 256 KiB, ~150k page faults per step and steps 1.25x slower than at 640 KiB
    (median of 5 paired runs, all 5 slower). At 640 KiB the (tokens, d_model) tensors
    (590 KB at seq 256) reuse the heap, ~10k faults per step, and only the (tokens, d_ff)
    ones are mapped, for ~70 MB more at the peak (BENCHMARKS.md, issue 16).
    FEDLM_LOW_MEMORY=1: 128 KiB (and the MLP's saved activations in bf16,
    `transformer.SAVE_16BIT`).
    """
    libc = _libc()
    if libc is None:
        return
    threshold = LOW_MEMORY_MMAP_THRESHOLD if low_memory else MMAP_THRESHOLD
    try:
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(threshold))  # M_MMAP_THRESHOLD
    except AttributeError:  # not glibc (musl, ...): nothing to tune
        pass


def return_freed_memory_to_os() -> None:
    """`tune_malloc(low_memory=True)`; kept for callers of the earlier name."""
    tune_malloc(low_memory=True)


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to tune
        return None


def release_load_memory(reader: GGUFFile) -> None:
    """Give back what loading touched but the model does not hold (issue 16, part 2).

    - The GGUF file stays memory-mapped (`gguf_check.open_model` caches the reader for the
      tokenizer and the adapter checks), and every page the load read stays in this process's
      RSS: 94 MB for SmolLM2-135M, until exit. `MADV_DONTNEED` drops them from the process
      (a clean, shared file mapping: a later read faults them back in from the page cache).
    - The dequantization worker thread's malloc arena keeps its freed fp32 blocks (~32 MB);
      `malloc_trim(0)` returns the free pages of every arena.
    """
    import mmap

    buf = getattr(reader, "data", None)
    if isinstance(buf, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        try:
            buf.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # a closed map or an OS without it: nothing to give back
            pass
    libc = _libc()
    if libc is not None:
        try:
            libc.malloc_trim(ctypes.c_size_t(0))
        except AttributeError:
            pass


def _rope_factors(factors: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Check `rope_freqs.weight` (one positive divisor per rotated frequency) and return it fp32."""
    want = (config.rope_dim or config.head_dim) // 2
    factors = factors.reshape(-1).float()
    if (
        factors.numel() != want
        or not bool(torch.isfinite(factors).all())
        or bool((factors <= 0).any())
    ):
        raise InvalidModelError(
            f"`rope_freqs.weight` should hold {want} positive "
            f"factors, got shape {tuple(factors.shape)}"
        )
    return factors


def load_model(
    path: str | os.PathLike[str],
    precision: Precision = "nf4",
    lora: LoraConfig | None = None,
    gradient_checkpointing: bool = False,
    progress: bool = False,
) -> Transformer:
    """Build a frozen base model from a GGUF file, optionally with LoRA adapters attached.

    precision: 'nf4' (QLoRA: NF4 blocks of 64 as bitsandbytes lays them out, fp32 compute),
    'bf16' or 'fp32'.
    The embedding / tied output projection is kept in fp32 (bf16 for 'bf16'): LoRA does not
    touch it and quantizing it costs accuracy on every logit.
    Raises `UnsupportedArchitectureError` for a family without an implementation,
    `InvalidModelError` for an inconsistent file, `ValueError` for a bad `precision`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` should be one of {PRECISIONS}, got {precision!r}")
    t0 = time.perf_counter()
    tune_malloc(low_memory=os.environ.get(LOW_MEMORY_ENV) == "1")
    reader = _open(path)
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    require_architecture(arch)
    tensors = {t.name: t for t in reader.tensors}
    config = _config(reader)
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.device("meta"):
        model = Transformer(config, compute_dtype=compute_dtype)

    used: set[str] = set()
    # One worker dequantizes the next block's tensors (numpy releases the GIL) while this
    # thread quantizes the current one; at most two blocks of fp32 are alive at a time.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedlm-dequant")
    pending: dict[str, Future[np.ndarray]] = {}
    submitted: set[str] = set()

    def prefetch(layer: int) -> None:
        if layer < config.n_layer:
            for name, tensor in tensors.items():
                if name.startswith(f"blk.{layer}.") and name not in submitted:
                    submitted.add(name)
                    pending[name] = pool.submit(dequantize_tensor, tensor)

    def take(name: str, *, required: bool = True) -> torch.Tensor | None:
        t = tensors.get(name)
        if t is None:
            if required:
                raise InvalidModelError(f"GGUF lacks tensor {name!r} needed by {arch}")
            return None
        used.add(name)
        fut = pending.pop(name, None)
        values = fut.result() if fut is not None else dequantize_tensor(t)
        # A NaN or inf weight would make every logit NaN; the file is refused instead.
        if not np.isfinite(values).all():
            raise InvalidModelError(f"{show_path(path)}: tensor {quote(name)} holds NaN or inf")
        return torch.from_numpy(values)

    dense_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    prefetch(0)
    emb_tensor = tensors.get("token_embd.weight")
    if precision == "nf4" and emb_tensor is not None and _keeps_blocks(emb_tensor):
        used.add("token_embd.weight")
        model.model["embed_tokens"] = _quantized_embedding(emb_tensor, config.d_model, path)
    else:
        emb = take("token_embd.weight")
        assert emb is not None
        model.model["embed_tokens"].weight = _frozen(emb.to(dense_dtype))
        del emb
    _set_param(model, "model.norm.weight", take("output_norm.weight"))  # type: ignore[arg-type]
    if not config.tie_embeddings:
        out = take("output.weight")
        assert out is not None
        model.lm_head.weight = _frozen(out.to(dense_dtype))  # type: ignore[union-attr]

    factors = take("rope_freqs.weight", required=False)
    if factors is not None:
        model.rope_freq_factors = _rope_factors(factors, config)
    try:
        _build_blocks(model, config, take, prefetch, precision, progress)
    finally:
        for fut in pending.values():
            fut.cancel()
        pool.shutdown(wait=True)

    leftover = sorted(set(tensors) - used)
    if leftover:
        log.warning(
            "ignored %d GGUF tensors not used by %s: %s",
            len(leftover),
            arch,
            ", ".join(leftover[:8]),
        )
    meta_left = [n for n, p in model.named_parameters() if p.is_meta]
    if meta_left:
        raise InvalidModelError(f"GGUF did not provide: {', '.join(meta_left[:8])}")

    release_load_memory(reader)
    model.requires_grad_(False)
    model.gradient_checkpointing = gradient_checkpointing
    if lora is not None:
        from edge_sdk.training.lora import apply_lora

        apply_lora(model, lora)
    log.info(
        "loaded %s (%s, %d layers) as %s in %.2f s",
        Path(path).name,
        arch,
        config.n_layer,
        precision,
        time.perf_counter() - t0,
    )
    return model


def _build_blocks(
    model: Transformer,
    config: ModelConfig,
    take: Callable[..., torch.Tensor | None],
    prefetch: Callable[[int], None],
    precision: str,
    progress: bool,
) -> None:
    """Fill every decoder block of a meta-device `model`, one block at a time."""
    permuted = config.arch in PERMUTED_ARCHS
    prefetch(0)
    for i in _iter_progress(list(range(config.n_layer)), progress, "loading"):
        prefetch(i + 1)
        for target in LORA_TARGETS:
            stem = gguf_stem(i, target)
            w = take(stem + ".weight")
            b = take(stem + ".bias", required=False)
            assert w is not None
            if permuted and target in ("q_proj", "k_proj"):
                heads = config.n_head if target == "q_proj" else config.n_kv_head
                w = unpermute_qk(w, heads)
                b = unpermute_qk(b, heads) if b is not None else None
            _set_module(model, hf_module(i, target), _make_linear(w, b, precision))
        block = model.get_submodule(f"model.layers.{i}")
        for suffix, module_path in _BLOCK_NORMS.items():
            try:
                block.get_submodule(module_path)
            except AttributeError:  # this family has no such norm (the attribute is None)
                continue
            value = take(f"blk.{i}.{suffix}.weight")
            _set_param(block, f"{module_path}.weight", value)  # type: ignore[arg-type]


# -- F32 copy for parity checks ------------------------------------------------------------------


def write_f32_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write `dst`: `src` with every tensor dequantized to F32 and all metadata kept.

    llama.cpp multiplies quantized weights by quantized activations, so comparing a torch
    forward against the quantized file measures llama.cpp's rounding more than our model. On
    the F32 copy llama.cpp runs plain fp32 matmuls. Only `general.file_type` changes (to
    ALL_F32), because it describes the tensors. Tensors are streamed one at a time.
    """
    import gguf

    reader = _open(src)
    arch = str(reader.fields["general.architecture"].contents())
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
            continue
        value = field.contents()
        if key == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape.tolist())]
        writer.add_tensor_info(
            t.name,
            shape,
            np.dtype(np.float32),
            int(np.prod(shape)) * 4,
            raw_dtype=gguf.GGMLQuantizationType.F32,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(dequantize_tensor(t))
    writer.close()
    os.replace(tmp, dst)
    return dst


def cached_f32_copy(src: str | os.PathLike[str]) -> Path:
    """`write_f32_copy` of `src` under the fedlm cache (`f32/`), made once per source file."""
    from edge_sdk.models.store import cache_dir

    src = Path(src)
    st = src.stat()
    dst = cache_dir() / "f32" / f"{src.stem}-{st.st_size}-{int(st.st_mtime)}.f32.gguf"
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        log.info("writing an F32 copy of %s to %s", src.name, dst)
        write_f32_copy(src, dst)
    return dst
