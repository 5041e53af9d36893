"""PEFT or GGUF LoRA adapters → `.onnx_adapter` files for a model from `edge_sdk.onnx.export`.

The exported graph computes, per projection, `x @ W + (x @ A_onnx) @ B_onnx` where the builder
names the LoRA weights `model.layers.{i}.attn.{q,k,v,o}_proj.lora_{A,B}.MatMul.weight` and
`model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.MatMul.weight`, stored (in, out) like every
ONNX MatMul weight. Our naming convention holds A (r, in) and B (out, r) in HF row order, so:
A_onnx = A.T, B_onnx = (scale * B).T with scale = alpha / r folded in. Projections the adapter
does not touch get zeros of the same rank, so every LoRA input of the graph is always fed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edge_sdk.errors import AdapterMismatchError, InvalidAdapterError
from edge_sdk.models.naming import LORA_TARGETS, hf_module

log = logging.getLogger(__name__)

SUFFIX = ".onnx_adapter"


def onnx_lora_name(layer: int, target: str, which: str) -> str:
    """The exported graph's input name for one LoRA matrix (`which` is 'A' or 'B')."""
    group = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "attn"
    return f"model.layers.{layer}.{group}.{target}.lora_{which}.MatMul.weight"


class AdapterSource(NamedTuple):
    """An adapter as read from the network: naming-convention tensors and how to scale them."""

    tensors: dict[str, np.ndarray]
    scale: float
    """alpha / r."""
    arch: str | None
    """The GGUF's `general.architecture` (None for PEFT, which does not record it)."""


def read_adapter(
    path: str | os.PathLike[str],
    base_gguf: str | os.PathLike[str] | None = None,
) -> AdapterSource:
    """A PEFT directory or a GGUF LoRA file, read (and validated) once."""
    p = Path(path)
    if p.is_dir():
        from edge_sdk.adapters.peft import load_peft

        peft = load_peft(p)
        return AdapterSource(peft.tensors, peft.alpha / peft.rank, None)
    if not p.is_file():
        raise InvalidAdapterError(
            f"no such adapter: {p} (expected a GGUF LoRA file or a PEFT directory)"
        )
    from edge_sdk.adapters.gguf_lora import read_gguf_lora

    lora = read_gguf_lora(p, base=base_gguf) if base_gguf is not None else read_gguf_lora(p)
    return AdapterSource(lora.tensors, lora.scale, lora.arch)


def content_hash(path: str | os.PathLike[str]) -> str:
    """sha256 of an adapter's bytes: the file, or a PEFT directory's config + weights.

    The cache key of converted adapters: a federation re-sends the same global version under
    new file names, and A -> B -> A swaps should not convert A twice.
    """
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class _Slot(NamedTuple):
    """One LoRA input of the graph and where its values come from."""

    name: str
    shape: tuple[int, int]
    """ONNX (in, r) for A, (r, out) for B."""
    source: np.ndarray | None
    """Naming-convention tensor: A (r, in) or B (out, r); None: the projection is not adapted."""
    factor: float
    """Multiplier folded in (alpha/r for B, 1 for A)."""

    def fill(self, out: np.ndarray) -> None:
        """Write this input's values into `out` (a zeroed float32 array of `shape`): one pass."""
        if self.source is None:
            return
        src = self.source.T
        if self.factor == 1.0:
            np.copyto(out, src, casting="same_kind")
        else:
            np.multiply(src, np.float32(self.factor), out=out, casting="same_kind")


def _slots(
    tensors: Mapping[str, np.ndarray],
    scale: float,
    input_shapes: Mapping[str, tuple[int, int]],
    source: str,
) -> list[_Slot]:
    """Check `tensors` against the graph's LoRA inputs and say where each input comes from.

    Raises `AdapterMismatchError` when a tensor does not fit the model (wrong layer count,
    shape) so a wrong adapter never reaches ONNX Runtime.
    """
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A")}
    if len(ranks) != 1:
        raise InvalidAdapterError(
            f"{source}: expected one LoRA rank, found {sorted(ranks) or 'none'}"
        )
    rank = ranks.pop()
    slots: list[_Slot] = []
    used: set[str] = set()
    for name, (n_in, n_out) in input_shapes.items():
        parts = name.split(".")
        layer, target, which = int(parts[2]), parts[4], parts[5][-1]
        key = f"{hf_module(layer, target)}.lora_{which}"
        shape = (n_in, rank) if which == "A" else (rank, n_out)
        t = tensors.get(key)
        if t is not None:
            used.add(key)
            if t.dtype != np.float32:
                t = np.asarray(t, dtype=np.float32)
            if t.shape != shape[::-1]:
                raise AdapterMismatchError(
                    f"{source}: {key} has shape {t.shape}, the model needs {shape[::-1]}"
                )
        factor = float(scale) if which == "B" else 1.0
        slots.append(_Slot(name, shape, t, factor))
    extra = sorted(set(tensors) - used)
    if extra:
        raise AdapterMismatchError(
            f"{source}: {len(extra)} tensors have no place in this model (first: {extra[0]}); "
            "was the adapter trained for another base?"
        )
    return slots


def onnx_lora_tensors(
    tensors: Mapping[str, np.ndarray],
    scale: float,
    input_shapes: Mapping[str, tuple[int, int]],
    source: str = "adapter",
) -> dict[str, np.ndarray]:
    """Every LoRA input of the graph (`input_shapes`: name → (in, out) of the base projection).

    A_onnx = A.T, B_onnx = (scale * B).T; zeros for projections the adapter does not touch.
    Raises `AdapterMismatchError` when a tensor does not fit the model.
    """
    out: dict[str, np.ndarray] = {}
    for slot in _slots(tensors, scale, input_shapes, source):
        arr = np.zeros(slot.shape, np.float32)
        slot.fill(arr)
        out[slot.name] = arr
    return out


def lora_input_shapes(model_onnx: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """LoRA graph inputs of an exported model → (in, out) of the projection they adapt."""
    import onnx

    model = onnx.load(str(model_onnx), load_external_data=False)
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    shapes: dict[str, tuple[int, int]] = {}
    names = [i.name for i in model.graph.input if ".lora_" in i.name]
    for name in names:
        if name.endswith("lora_A.MatMul.weight"):
            n_in = dims[name][0]
            n_out = dims[name.replace("lora_A", "lora_B")][1]
        else:
            n_in = dims[name.replace("lora_B", "lora_A")][0]
            n_out = dims[name][1]
        shapes[name] = (n_in, n_out)
    if not shapes:
        raise InvalidAdapterError(
            f"{model_onnx}: has no LoRA inputs; re-export it with `fedlm export-onnx`"
        )
    return shapes


ADAPTER_FILE_ID = b"TORT"
"""The `.onnx_adapter` flatbuffer's file identifier (onnxruntime's adapter_schema.fbs)."""

ADAPTER_FORMAT_VERSION = 1
"""`Adapter.format_version` onnxruntime 1.20+ writes and reads."""

_FLOAT = 1  # TensorDataType.FLOAT

# The flatbuffer is laid out front to back: every offset points forward, as a verifier wants.
# One vtable serves the Adapter table and every Parameter table: both have 4 fields of 4 bytes
# at +4, +8, +12, +16 (onnxruntime's own writer shares it the same way).
_VTABLE = struct.pack("<6H", 12, 20, 4, 8, 12, 16)
_VTABLE_AT = 8
_ROOT_AT = _VTABLE_AT + len(_VTABLE)  # 20


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _write_flatbuffer(slots: Sequence[_Slot], dest: Path) -> None:
    """Write an `.onnx_adapter` holding `slots`, each tensor's values written once, in place.

    onnxruntime's `AdapterFormat` wants an OrtValue per tensor and copies every one into its
    flatbuffer builder before writing: ~34 ms of CPU for a rank-8 SmolLM2 adapter (9.8 MB), half
    of a swap. Here the layout is computed first, then each LoRA input is transposed (and scaled)
    straight into one zeroed buffer, which is written with a single call.
    """
    names = [slot.name.encode() for slot in slots]
    n = len(slots)
    vector_at = _ROOT_AT + 20  # the Adapter table: soffset + 4 fields
    pos = vector_at + 4 + 4 * n
    layout = []  # (table, name, dims, data) positions per parameter
    for slot, name in zip(slots, names, strict=True):
        table = _align(pos, 8)
        name_at = table + 20
        dims_at = _align(name_at + 4 + len(name) + 1 + 4, 8) - 4  # int64s 8-aligned
        data_at = _align(dims_at + 4 + 8 * len(slot.shape) + 4, 8) - 4  # floats 8-aligned
        pos = data_at + 4 + 4 * slot.shape[0] * slot.shape[1]
        layout.append((table, name_at, dims_at, data_at))
    # A zeroed buffer then one write: mapping the file and filling it in place measured slower
    # (18.6 against 13.5 ms CPU: a page fault per 4 kB of tmpfs).
    buf = bytearray(_align(pos, 8))  # zeroed: the NULs, the padding, the unadapted inputs
    _fill_flatbuffer(buf, slots, names, layout, vector_at)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(buf)


def _fill_flatbuffer(
    buf: Any,
    slots: Sequence[_Slot],
    names: Sequence[bytes],
    layout: Sequence[tuple[int, int, int, int]],
    vector_at: int,
) -> None:
    n = len(slots)
    struct.pack_into("<I4s", buf, 0, _ROOT_AT, ADAPTER_FILE_ID)
    buf[_VTABLE_AT:_ROOT_AT] = _VTABLE
    # Adapter: format_version, adapter_version, model_version, parameters
    struct.pack_into(
        "<i3iI",
        buf,
        _ROOT_AT,
        _ROOT_AT - _VTABLE_AT,
        ADAPTER_FORMAT_VERSION,
        1,
        1,
        vector_at - (_ROOT_AT + 16),
    )
    struct.pack_into("<I", buf, vector_at, n)
    for i, (slot, name, (table, name_at, dims_at, data_at)) in enumerate(
        zip(slots, names, layout, strict=True)
    ):
        entry = vector_at + 4 + 4 * i
        struct.pack_into("<I", buf, entry, table - entry)
        # Parameter: name, dims, data_type, raw_data
        struct.pack_into(
            "<iIIiI",
            buf,
            table,
            table - _VTABLE_AT,
            name_at - (table + 4),
            dims_at - (table + 8),
            _FLOAT,
            data_at - (table + 16),
        )
        struct.pack_into(f"<I{len(name)}s", buf, name_at, len(name), name)  # NUL: zeroed
        struct.pack_into("<I2q", buf, dims_at, 2, *slot.shape)
        count = slot.shape[0] * slot.shape[1]
        struct.pack_into("<I", buf, data_at, 4 * count)
        values = np.frombuffer(buf, np.float32, count, data_at + 4).reshape(slot.shape)
        slot.fill(values)


def write_onnx_adapter(tensors: Mapping[str, np.ndarray], dest: str | os.PathLike[str]) -> Path:
    """Write `tensors` (graph input name → 2-D array) as an `.onnx_adapter` file, atomically."""
    slots = []
    for name, t in tensors.items():
        arr = np.asarray(t, dtype=np.float32)
        if arr.ndim != 2:
            raise InvalidAdapterError(f"{name}: LoRA inputs are 2-D, got shape {arr.shape}")
        slots.append(_Slot(name, (arr.shape[0], arr.shape[1]), arr.T, 1.0))
    return _write_atomically(slots, Path(dest))


def _write_atomically(slots: Sequence[_Slot], dest: Path) -> Path:
    tmp = dest.with_name(dest.name + ".partial")
    try:
        _write_flatbuffer(slots, tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def write_lora_adapter(
    tensors: Mapping[str, np.ndarray],
    scale: float,
    input_shapes: Mapping[str, tuple[int, int]],
    dest: str | os.PathLike[str],
    source: str = "adapter",
) -> Path:
    """Check naming-convention LoRA `tensors` against the graph and write them as an
    `.onnx_adapter` (the same values as `write_onnx_adapter(onnx_lora_tensors(...))`, with
    each transpose written straight into the file's buffer)."""
    return _write_atomically(_slots(tensors, scale, input_shapes, source), Path(dest))


def convert_adapter(
    adapter: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    base_gguf: str | os.PathLike[str] | None = None,
    shapes: Mapping[str, tuple[int, int]] | None = None,
) -> Path:
    """Convert a PEFT directory or GGUF LoRA to an `.onnx_adapter` for the export in `model_dir`."""
    shapes = shapes or lora_input_shapes(Path(model_dir) / "model.onnx")
    src = read_adapter(adapter, base_gguf)
    return write_lora_adapter(src.tensors, src.scale, shapes, dest, source=str(adapter))


def targets_of(names: Iterable[str]) -> tuple[str, ...]:
    """The LoRA targets present among graph input names, in naming order."""
    found = {n.split(".")[4] for n in names}
    return tuple(t for t in LORA_TARGETS if t in found)
