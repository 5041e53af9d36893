"""GGUF LoRA adapters for llama.cpp: write, read, and check against a base model.

File layout (what llama.cpp's `llama_adapter_lora_init` reads, see src/llama-adapter.cpp):

- metadata: `general.type = "adapter"`, `general.architecture` (must equal the base's),
  `adapter.type = "lora"`, `adapter.lora.alpha` (float32). llama.cpp scales the product by
  `alpha / rank`, with rank read from lora_b's first dimension.
- tensors, one pair per adapted base tensor `blk.N.attn_q.weight`:
  `blk.N.attn_q.weight.lora_a` with ggml ne = [in, r] and `.lora_b` with ne = [r, out].
  GGUFWriter reverses numpy shapes, so those are numpy arrays A (r, in) and B (out, r):
  exactly the PEFT/torch layout.

llama.cpp keeps the Q/K rows of llama-family models in its own interleaved rope order
(convert_hf_to_gguf permutes them). In the torch model and in PEFT they are in HF order. Since
`W + B @ A` must be permuted like `W`, and the permutation acts on output rows only, the export
permutes the rows of lora_B for q_proj (by n_head) and k_proj (by n_kv_head); lora_A is left
alone. gemma3, qwen2 and qwen3 are not permuted.

This module uses numpy and `gguf` only (the runtime imports it; torch stays on the training side).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edge_sdk.errors import AdapterMismatchError, InvalidAdapterError, InvalidModelError
from edge_sdk.models import gguf_limits as L
from edge_sdk.models import naming
from edge_sdk.models.gguf_check import FLOAT, INT, STR, architecture, open_model, refuse
from edge_sdk.models.gguf_check import value as meta_value
from edge_sdk.models.gguf_meta import GGUFFile, GGUFTensor, quote, read_gguf, show_path
from edge_sdk.models.qk_order import PERMUTED_ARCHS, permute_qk, unpermute_qk

logger = logging.getLogger(__name__)

_SUFFIX_A = ".lora_a"
_SUFFIX_B = ".lora_b"
_KEY_BASE_SHA = "fedlm.base_model.sha256"
_DTYPES: dict[str, type[np.floating[Any]]] = {"f32": np.float32, "f16": np.float16}


def _qk_heads(target: str, n_head: int, n_kv_head: int) -> int | None:
    return {"q_proj": n_head, "k_proj": n_kv_head}.get(target)


# --------------------------------------------------------------------------- base model facts


@dataclass(frozen=True)
class BaseModelInfo:
    """What an adapter needs to know about its base model."""

    arch: str
    """GGUF `general.architecture`, e.g. `llama`, `gemma3`."""
    n_head: int
    """Attention heads (Q/K permutation of q_proj)."""
    n_kv_head: int
    """Key/value heads (Q/K permutation of k_proj)."""
    name: str = ""
    """Human-readable base model name (`general.name`), stored in the adapter."""
    sha256: str | None = None
    """sha256 of the base GGUF, stored in the adapter when known."""
    tensor_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """GGUF tensor name -> shape in numpy/torch order, (out, in) for a linear weight.
    Empty when unknown (then writing cannot check shapes)."""

    def __post_init__(self) -> None:
        if not self.arch:
            raise ValueError("arch must be a non-empty string, got ''")
        if self.n_head <= 0:
            raise ValueError(f"n_head must be a positive integer, got {self.n_head}")
        if self.n_kv_head <= 0 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head must divide n_head={self.n_head}, got {self.n_kv_head}")

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], *, sha256: str | None = None) -> BaseModelInfo:
        """Read arch, head counts and tensor shapes of a base GGUF (cached per file version).

        Reads metadata and tensor infos only (memory-mapped); later calls for the same
        unchanged file are answered from a cache.
        """
        p = Path(path).resolve()
        try:
            st = p.stat()
        except OSError as exc:
            raise InvalidModelError(f"{p}: cannot read base model ({exc.strerror})") from exc
        info = _read_base(str(p), st.st_size, st.st_mtime_ns)
        if sha256 is not None:
            info = BaseModelInfo(
                info.arch, info.n_head, info.n_kv_head, info.name, sha256, info.tensor_shapes
            )
        return info


def _field(reader: GGUFFile, key: str) -> Any:
    f = reader.get_field(key)
    return None if f is None else f.contents()


@functools.lru_cache(maxsize=8)
def _read_base(path: str, size: int, mtime_ns: int) -> BaseModelInfo:
    # size and mtime_ns are only part of the cache key: a rewritten file is read again.
    del size, mtime_ns
    reader = open_model(path)  # container, key types and hyper-parameters checked
    arch = architecture(reader)
    n_head = meta_value(reader, gguf.Keys.Attention.HEAD_COUNT.format(arch=arch), INT)
    n_kv = meta_value(reader, gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch), INT)
    if not isinstance(n_head, int) or n_head <= 0:
        raise InvalidModelError(f"{show_path(path)}: GGUF has no valid {arch}.attention.head_count")
    n_kv = n_kv if isinstance(n_kv, int) and n_kv > 0 else n_head
    shapes = {t.name: t.np_shape for t in reader.tensors}
    name = meta_value(reader, gguf.Keys.General.NAME, STR)
    return BaseModelInfo(
        arch=arch,
        n_head=n_head,
        n_kv_head=n_kv,
        name=name if isinstance(name, str) else Path(path).stem,
        tensor_shapes=shapes,
    )


def _as_base(base: BaseModelInfo | str | os.PathLike[str]) -> BaseModelInfo:
    if isinstance(base, BaseModelInfo):
        return base
    if isinstance(base, (str, os.PathLike)):
        return BaseModelInfo.from_gguf(base)
    raise TypeError(f"base must be a BaseModelInfo or a GGUF path, got {type(base).__name__}")


# --------------------------------------------------------------------------- write


def _pairs(
    tensors: Mapping[str, np.ndarray],
) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """Group naming-convention keys into {(layer, target): (A (r, in), B (out, r))}."""
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        module, _, half = key.rpartition(".")
        if half not in ("lora_A", "lora_B"):
            raise ValueError(f"adapter tensor key must end in .lora_A or .lora_B, got {key!r}")
        layer, target = naming.parse_hf_module(module)
        arr = np.asarray(value)
        if arr.ndim != 2:
            raise ValueError(f"{key}: expected a 2-D array, got shape {arr.shape}")
        halves.setdefault((layer, target), {})[half] = arr
    pairs = {}
    order = naming.LORA_TARGETS.index
    for (layer, target), h in sorted(halves.items(), key=lambda kv: (kv[0][0], order(kv[0][1]))):
        if set(h) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(h)).pop()
            raise ValueError(f"{naming.hf_module(layer, target)}: {missing} is missing")
        a, b = h["lora_A"], h["lora_B"]
        if a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{naming.hf_module(layer, target)}: lora_A {a.shape} and lora_B {b.shape} "
                "disagree on the rank"
            )
        pairs[(layer, target)] = (a, b)
    if not pairs:
        raise ValueError("adapter has no tensors")
    return pairs


def write_gguf_lora(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    *,
    alpha: float,
    base: BaseModelInfo | str | os.PathLike[str],
    dtype: str = "f32",
) -> Path:
    """Write a llama.cpp GGUF LoRA adapter atomically and return its path.

    `tensors` are naming-convention keys (`model.layers.N.self_attn.q_proj.lora_A`, A (r, in),
    B (out, r)) in HF row order; Q/K lora_B rows are permuted here for llama-family bases.
    `base` is a `BaseModelInfo` or the base GGUF's path. `dtype` is `f32` or `f16`.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    info = _as_base(base)
    pairs = _pairs(tensors)
    np_dtype = _DTYPES[dtype]
    permute = info.arch in PERMUTED_ARCHS

    out_tensors: list[tuple[str, np.ndarray]] = []
    for (layer, target), (a, b) in pairs.items():
        stem = naming.gguf_stem(layer, target) + ".weight"
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ValueError(f"{naming.hf_module(layer, target)}: adapter holds NaN or inf")
        if info.tensor_shapes:
            want = info.tensor_shapes.get(stem)
            if want is None:
                raise AdapterMismatchError(f"base model has no tensor {stem} for this adapter")
            if want != (b.shape[0], a.shape[1]):
                raise AdapterMismatchError(
                    f"{stem}: adapter delta is {(b.shape[0], a.shape[1])} (out, in), "
                    f"base weight is {want}"
                )
        heads = _qk_heads(target, info.n_head, info.n_kv_head) if permute else None
        if heads is not None:
            b = np.ascontiguousarray(permute_qk(b, heads))
        out_tensors.append((stem + _SUFFIX_A, np.ascontiguousarray(a, dtype=np_dtype)))
        out_tensors.append((stem + _SUFFIX_B, np.ascontiguousarray(b, dtype=np_dtype)))

    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; an adapter is meant to be shared
    try:
        writer = gguf.GGUFWriter(tmp, info.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(f"LoRA adapter for {info.name}" if info.name else "LoRA adapter")
        # Head counts let a reader undo the Q/K permutation without the base model at hand.
        writer.add_head_count(info.n_head)
        writer.add_head_count_kv(info.n_kv_head)
        if info.name:
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, info.name)
        if info.sha256:
            writer.add_string(_KEY_BASE_SHA, info.sha256)
        for name, arr in out_tensors:
            writer.add_tensor(name, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("wrote GGUF LoRA %s (%d pairs, %s)", dest, len(pairs), dtype)
    return dest


# --------------------------------------------------------------------------- read


@dataclass(frozen=True)
class GgufLora:
    """A GGUF LoRA adapter read back into the naming convention."""

    arch: str
    alpha: float
    rank: int
    tensors: dict[str, np.ndarray]
    """Naming-convention keys; A (r, in), B (out, r) as float32 in HF row order."""
    metadata: dict[str, Any]
    """Every scalar or string metadata field of the file."""

    @property
    def scale(self) -> float:
        """alpha / rank: what llama.cpp multiplies B @ A by (at adapter scale 1)."""
        return self.alpha / self.rank

    @property
    def targets(self) -> tuple[str, ...]:
        """Adapted targets (q_proj, ...), in naming order."""
        found = {naming.parse_hf_module(k.rpartition(".")[0])[1] for k in self.tensors}
        return tuple(t for t in naming.LORA_TARGETS if t in found)


def _open_adapter(path: Path) -> GGUFFile:
    """Open and validate the container and the metadata llama.cpp insists on.

    llama.cpp reads `general.type`, `general.architecture` and `adapter.type` as strings and
    `adapter.lora.alpha` as a FLOAT32 with a GGML_ASSERT on the type: any other type aborts the
    process, so each is checked here. Tensor types are limited to `ADAPTER_TENSOR_TYPES`.
    """
    reader = read_gguf(path, error=InvalidAdapterError, tensor_types=L.ADAPTER_TENSOR_TYPES)
    gtype = meta_value(reader, gguf.Keys.General.TYPE, STR)
    if gtype != gguf.GGUFType.ADAPTER:
        shown = quote(gtype) if gtype is not None else "missing"
        raise refuse(reader, f"general.type is {shown}, expected 'adapter'")
    atype = meta_value(reader, gguf.Keys.Adapter.TYPE, STR)
    if atype != "lora":
        shown = quote(atype) if atype is not None else "missing"
        raise refuse(reader, f"adapter.type is {shown}, expected 'lora'")
    architecture(reader)
    meta_value(reader, gguf.Keys.General.NAME, STR)
    alpha_field = reader.get_field(gguf.Keys.Adapter.LORA_ALPHA)
    if alpha_field is not None:
        if alpha_field.type != gguf.GGUFValueType.FLOAT32:
            raise refuse(
                reader,
                f"adapter.lora.alpha should be a FLOAT32, got {alpha_field.type.name}"
                + (" array" if alpha_field.is_array else ""),
            )
        alpha = meta_value(reader, gguf.Keys.Adapter.LORA_ALPHA, FLOAT)  # refuses NaN and inf
        if not 0.0 <= alpha <= L.MAX_LORA_ALPHA:
            raise refuse(
                reader, f"adapter.lora.alpha is {alpha:g}, should be 0 to {L.MAX_LORA_ALPHA}"
            )
    return reader


def _all_finite(t: GGUFTensor) -> bool:
    """True when every value of `t` is finite, whatever its type (BF16, Q8_0 block scales, ...).

    Dequantized in row chunks of about `FINITE_CHECK_ELEMENTS` values, so a large tensor never
    costs more than a few MB of float32 at once.
    """
    raw = t.data
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        flat = raw.reshape(-1)
        step = L.FINITE_CHECK_ELEMENTS
        return all(bool(np.isfinite(flat[i : i + step]).all()) for i in range(0, flat.size, step))
    rows = raw.reshape(-1, raw.shape[-1])
    per_row = max(1, t.n_elements // max(1, rows.shape[0]))
    step = max(1, L.FINITE_CHECK_ELEMENTS // per_row)
    for r in range(0, rows.shape[0], step):
        values = gguf.quants.dequantize(rows[r : r + step], t.tensor_type)
        if not np.isfinite(values).all():
            return False
    return True


def _tensor_pairs(path: Path, reader: GGUFFile) -> dict[str, dict[str, Any]]:
    """{base tensor name: {"a": ReaderTensor, "b": ReaderTensor}} with every pair complete."""
    pairs: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        if t.name.endswith(_SUFFIX_A):
            pairs.setdefault(t.name[: -len(_SUFFIX_A)], {})["a"] = t
        elif t.name.endswith(_SUFFIX_B):
            pairs.setdefault(t.name[: -len(_SUFFIX_B)], {})["b"] = t
        elif t.name.endswith("_norm.weight"):
            continue  # llama.cpp skips these too
        else:
            raise refuse(reader, f"tensor {quote(t.name)} is neither .lora_a nor .lora_b")
    if not pairs:
        raise refuse(reader, "adapter holds no LoRA tensors")
    for name, pair in pairs.items():
        if set(pair) != {"a", "b"}:
            raise refuse(reader, f"tensor {quote(name)} lacks its lora_{'ab'[('a' in pair)]}")
        # numpy order: A (r, in), B (out, r)
        a_shape = pair["a"].np_shape
        b_shape = pair["b"].np_shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise refuse(
                reader,
                f"{quote(name)} lora_a {a_shape} and lora_b {b_shape} are not (r, in), (out, r)",
            )
    return pairs


def _dequant(t: GGUFTensor) -> np.ndarray:
    data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(t.np_shape)


def read_gguf_lora(
    path: str | os.PathLike[str], *, base: BaseModelInfo | str | os.PathLike[str] | None = None
) -> GgufLora:
    """Read a GGUF LoRA into naming-convention tensors in HF row order.

    Undoing the Q/K permutation needs the head counts: taken from the file (we write them) or,
    for adapters converted elsewhere, from `base`.
    """
    p = Path(path)
    shown = show_path(p)
    reader = _open_adapter(p)
    pairs = _tensor_pairs(p, reader)
    arch = architecture(reader)
    alpha = _field(reader, gguf.Keys.Adapter.LORA_ALPHA)
    metadata = {k: f.contents() for k, f in reader.fields.items() if not f.is_array}
    info = _as_base(base) if base is not None else None
    n_head = (
        info.n_head
        if info
        else meta_value(reader, gguf.Keys.Attention.HEAD_COUNT.format(arch=arch), INT)
    )
    n_kv = (
        info.n_kv_head
        if info
        else meta_value(reader, gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch), INT)
    )
    n_kv = n_kv or n_head

    tensors: dict[str, np.ndarray] = {}
    ranks = set()
    for name, pair in sorted(pairs.items()):
        stem = name.removesuffix(".weight")
        try:
            layer, target = naming.parse_gguf_stem(stem)
        except ValueError:
            raise InvalidAdapterError(
                f"{shown}: {quote(name)} is not a supported LoRA target"
            ) from None
        a, b = _dequant(pair["a"]), _dequant(pair["b"])
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise InvalidAdapterError(f"{shown}: {quote(name)} holds NaN or inf")
        if arch in PERMUTED_ARCHS and target in ("q_proj", "k_proj"):
            heads = _qk_heads(target, n_head or 0, n_kv or 0)
            if not heads or heads < 0:
                raise InvalidAdapterError(
                    f"{shown}: no head counts in the file; pass base= to undo the Q/K permutation"
                )
            try:
                b = np.ascontiguousarray(unpermute_qk(b, heads))
            except ValueError as exc:
                raise AdapterMismatchError(f"{shown}: {quote(name)}: {exc}") from None
        module = naming.hf_module(layer, target)
        tensors[module + ".lora_A"] = a
        tensors[module + ".lora_B"] = b
        ranks.add(a.shape[0])
    if len(ranks) != 1:
        raise InvalidAdapterError(f"{shown}: mixed LoRA ranks {sorted(ranks)} are not supported")
    rank = ranks.pop()
    if not isinstance(alpha, float):  # type, range and finiteness are checked by _open_adapter
        raise InvalidAdapterError(f"{shown}: adapter.lora.alpha is missing")
    # llama.cpp treats alpha == 0 as "no scaling" (scale 1); keep that meaning explicit.
    if alpha == 0.0:
        alpha = float(rank)
    return GgufLora(arch=arch, alpha=float(alpha), rank=rank, tensors=tensors, metadata=metadata)


# --------------------------------------------------------------------------- check


def check_adapter_compatible(
    adapter_path: str | os.PathLike[str], base_model_path: str | os.PathLike[str] | BaseModelInfo
) -> None:
    """Raise unless llama.cpp can apply this adapter to this base model.

    `InvalidAdapterError`: not a GGUF, a bad container (see `gguf_meta`), not
    `general.type=adapter`, not `adapter.type=lora`, an alpha that is not a finite FLOAT32 in
    [0, MAX_LORA_ALPHA], a tensor type outside `ADAPTER_TENSOR_TYPES`, incomplete pairs, or a
    NaN/inf anywhere (BF16 values and Q8_0 block scales included). `AdapterMismatchError`: the
    architecture differs, a tensor is missing in the base, or shapes disagree. Reads the
    adapter's (small) data for the finiteness check; the base's facts are cached.
    """
    p = Path(adapter_path)
    shown = show_path(p)
    reader = _open_adapter(p)
    pairs = _tensor_pairs(p, reader)
    info = _as_base(base_model_path)
    base_desc = (
        show_path(base_model_path)
        if not isinstance(base_model_path, BaseModelInfo)
        else quote(info.name)
    )
    arch = architecture(reader)
    if arch != info.arch:
        raise AdapterMismatchError(
            f"{shown}: adapter is for architecture {quote(arch)}, "
            f"base model {base_desc} is {quote(info.arch)}"
        )
    for name, pair in sorted(pairs.items()):
        want = info.tensor_shapes.get(name)
        if want is None:
            raise AdapterMismatchError(
                f"{shown}: tensor {quote(name)} does not exist in base model {base_desc}"
            )
        a_shape = pair["a"].np_shape  # (r, in)
        b_shape = pair["b"].np_shape  # (out, r)
        if len(want) != 2 or want != (b_shape[0], a_shape[1]):
            raise AdapterMismatchError(
                f"{shown}: tensor {quote(name)}: adapter lora_a {a_shape} x lora_b {b_shape} gives "
                f"{(b_shape[0], a_shape[1])}, base model {base_desc} has {want}"
            )
        for half in ("a", "b"):
            t = pair[half]
            if not _all_finite(t):
                raise InvalidAdapterError(f"{shown}: tensor {quote(t.name)} holds NaN or inf")
