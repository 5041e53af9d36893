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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

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


def onnx_lora_tensors(
    tensors: Mapping[str, np.ndarray],
    scale: float,
    input_shapes: Mapping[str, tuple[int, int]],
    source: str = "adapter",
) -> dict[str, np.ndarray]:
    """Every LoRA input of the graph (`input_shapes`: name → (in, out) of the base projection).

    Raises `AdapterMismatchError` when a tensor does not fit the model (wrong layer count,
    shape) so a wrong adapter never reaches ONNX Runtime.
    """
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A")}
    if len(ranks) != 1:
        raise InvalidAdapterError(
            f"{source}: expected one LoRA rank, found {sorted(ranks) or 'none'}"
        )
    rank = ranks.pop()
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for name, (n_in, n_out) in input_shapes.items():
        parts = name.split(".")
        layer, target, which = int(parts[2]), parts[4], parts[5][-1]
        key = f"{hf_module(layer, target)}.lora_{which}"
        if key in tensors:
            used.add(key)
            t = np.asarray(tensors[key], dtype=np.float32)
            if which == "A":
                if t.shape != (rank, n_in):
                    raise AdapterMismatchError(
                        f"{source}: {key} has shape {t.shape}, the model needs ({rank}, {n_in})"
                    )
                out[name] = np.ascontiguousarray(t.T)
            else:
                if t.shape != (n_out, rank):
                    raise AdapterMismatchError(
                        f"{source}: {key} has shape {t.shape}, the model needs ({n_out}, {rank})"
                    )
                out[name] = np.ascontiguousarray((t * np.float32(scale)).T)
        else:
            out[name] = np.zeros((n_in, rank) if which == "A" else (rank, n_out), np.float32)
    extra = sorted(set(tensors) - used)
    if extra:
        raise AdapterMismatchError(
            f"{source}: {len(extra)} tensors have no place in this model (first: {extra[0]}); "
            "was the adapter trained for another base?"
        )
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


def write_onnx_adapter(tensors: Mapping[str, np.ndarray], dest: str | os.PathLike[str]) -> Path:
    """Write `tensors` (graph input name → array) as an `.onnx_adapter` file, atomically."""
    import onnxruntime as ort

    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".partial")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    fmt.export_adapter(str(tmp))
    os.replace(tmp, dest)
    return dest


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
    return write_onnx_adapter(
        onnx_lora_tensors(src.tensors, src.scale, shapes, source=str(adapter)), dest
    )


def targets_of(names: Iterable[str]) -> tuple[str, ...]:
    """The LoRA targets present among graph input names, in naming order."""
    found = {n.split(".")[4] for n in names}
    return tuple(t for t in LORA_TARGETS if t in found)
