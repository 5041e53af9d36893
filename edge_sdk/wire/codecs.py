"""Tensor codecs: parse a codec string, encode float tensors, decode untrusted encoded tensors.

A codec is a pipeline of up to three stages, always applied in this order:

    delta      x - reference                (the last global adapter the client received)
    topk:F     keep the ceil(F * n) largest-magnitude entries (indices + values)
    <values>   fp32 | fp16 | bf16 | int8[:B] | int4[:B] | nf4[:B]   (B = block size, default 64)

written as e.g. "delta+topk:0.01+int8". Lossy pipelines can run with error feedback (Seide et
al. 2014; Karimireddy et al. 2019, arXiv:1901.09847): what a message failed to carry stays on the
device in `UpdateEncoder.residual` and is added to the next update, so nothing is lost for good.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.choices import BLOCK_FORMATS, CODEC_STAGES, FLOAT_FORMATS, VALUE_FORMATS
from edge_sdk.validators import is_int_in, is_number
from edge_sdk.wire import _quant
from edge_sdk.wire._errors import (
    InvalidFieldError,
    LimitExceededError,
    MissingReferenceError,
    NonFiniteError,
    ShapeMismatchError,
    UnknownCodecError,
)
from edge_sdk.wire._fields import (
    check_key,
    get,
    get_bool,
    get_bytes,
    get_int,
    get_str,
)
from edge_sdk.wire.limits import DEFAULT_LIMITS, DecodeLimits

logger = logging.getLogger(__name__)

CODEC_NAMES = CODEC_STAGES
DEFAULT_BLOCK = 64
DEFAULT_TOPK_FRACTION = 0.01
MAX_BLOCK = 1 << 16
_INDEX_WIDTHS = (1, 2, 4)
# Numbers a decoder accepts in codec strings (docs/wire-format.md, section 4.1): ASCII decimal
# digits only. Python's float()/int() would also take "0.0_1", "4_0", " 4", "infinity" or
# non-ASCII digits, which another implementation would not, so a message could mean two things.
_FRACTION_SPELLING = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e-?[0-9]+)?")
_BLOCK_SPELLING = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class CodecSpec:
    """A parsed codec pipeline. `str(spec)` is its canonical string, e.g.
    "delta+topk:0.01+int8:64"."""

    values: str = "fp32"
    """Value format of the transmitted numbers: fp32, fp16, bf16, int8, int4 or nf4."""
    topk: float | None = None
    """Fraction of entries kept per tensor (0 < topk <= 1), or None for dense tensors."""
    delta: bool = False
    """Whether tensors are sent as differences to the last received global adapter."""
    block: int = DEFAULT_BLOCK
    """Elements per absmax block of int8/int4/nf4 (ignored by the float formats)."""
    deflate: bool = False
    """Whether the whole message body is zlib-compressed (lossless; envelope flag bit 0).
    Quantized codes are not uniformly distributed (int4 codes carry ~3.5 bits of entropy),
    and tensor keys repeat, so this buys 10-15% on top of a 4-bit value format."""

    def __post_init__(self) -> None:
        if self.values not in VALUE_FORMATS:
            raise ValueError(
                f"`values` should be one of {', '.join(VALUE_FORMATS)}, got {self.values!r}"
            )
        if self.topk is not None and (not is_number(self.topk) or not 0.0 < self.topk <= 1.0):
            raise ValueError(f"`topk` should be a fraction in (0, 1], got {self.topk!r}")
        if not is_int_in(self.block, 1, MAX_BLOCK):
            raise ValueError(
                f"`block` should be an integer in [1, {MAX_BLOCK}], got {self.block!r}"
            )
        if self.topk is not None:
            object.__setattr__(self, "topk", float(self.topk))

    @property
    def lossy(self) -> bool:
        return self.values != "fp32" or self.topk is not None

    @property
    def blockwise(self) -> bool:
        return self.values in BLOCK_FORMATS

    def __str__(self) -> str:
        stages = ["delta"] if self.delta else []
        if self.topk is not None:
            stages.append(f"topk:{self.topk!r}")
        stages.append(f"{self.values}:{self.block}" if self.blockwise else self.values)
        if self.deflate:
            stages.append("zlib")
        return "+".join(stages)


def parse_codec(codec: str | CodecSpec) -> CodecSpec:
    """ "delta+topk:0.01+int8" -> CodecSpec. Raises `UnknownCodecError` naming what was expected."""
    if isinstance(codec, CodecSpec):
        return codec
    if not isinstance(codec, str):
        raise TypeError(f"codec should be a str or CodecSpec, got {type(codec).__name__}")
    expected = f"stages joined by '+' from {', '.join(CODEC_NAMES)} (e.g. 'delta+topk:0.01+int8')"
    if not codec or len(codec) > 128:
        raise UnknownCodecError(
            f"expected a codec string of 1-128 chars, {expected}; got {codec[:128]!r}"
        )
    fields: dict[str, Any] = {}
    seen: set[str] = set()
    for stage in codec.strip().lower().split("+"):
        name, _, param = stage.strip().partition(":")
        if name not in CODEC_NAMES:
            raise UnknownCodecError(
                f"unknown codec stage {name!r} in {codec!r}; expected {expected}"
            )
        kind = "values" if name in VALUE_FORMATS else name
        if kind in seen:
            raise UnknownCodecError(
                f"codec {codec!r} has more than one {kind!r} stage; expected {expected}"
            )
        seen.add(kind)
        try:
            if name == "delta":
                if param:
                    raise ValueError("delta takes no parameter")
                fields["delta"] = True
            elif name == "topk":
                if param and not _FRACTION_SPELLING.fullmatch(param):
                    raise ValueError(
                        f"fraction {param!r} should be a decimal such as 0.01 or 2e-05"
                    )
                fields["topk"] = float(param) if param else DEFAULT_TOPK_FRACTION
            elif name == "zlib":
                if param:
                    raise ValueError("zlib takes no parameter")
                fields["deflate"] = True
            else:
                fields["values"] = name
                if param:
                    if name in FLOAT_FORMATS:
                        raise ValueError(f"{name} takes no parameter")
                    if not _BLOCK_SPELLING.fullmatch(param):
                        raise ValueError(f"block {param!r} should be decimal digits such as 64")
                    fields["block"] = int(param)
            spec_for_check = CodecSpec(**fields)
        except ValueError as exc:
            raise UnknownCodecError(
                f"bad parameter in codec stage {stage!r} of {codec!r}: {exc}"
            ) from None
    return spec_for_check


@dataclass(frozen=True)
class BlockScales:
    """Side data of a blockwise format (int8/int4/nf4): one absmax scale per `block` values."""

    block: int
    scales: bytes
    dtype: str
    """"f16" or "f32": how `scales` are stored."""

    def to_obj(self) -> dict[str, Any]:
        return {"block": self.block, "scales": self.scales, "sdt": self.dtype}


@dataclass(frozen=True)
class SparseIndex:
    """Which entries a sparse (top-k) tensor transmits."""

    nnz: int
    """Number of transmitted entries."""
    indices: bytes
    """Gap-coded flat indices, `width` bytes each, little-endian."""
    width: int

    def to_obj(self) -> dict[str, Any]:
        return {"nnz": self.nnz, "idx": self.indices, "idxw": self.width}


@dataclass(frozen=True, eq=True)
class EncodedTensor:
    """One tensor as it travels: its shape, value format, payload bytes and codec side data.

    Construction checks that every length agrees with the shape (raising `WireError`s), so an
    instance is always safe to `decode`.
    """

    shape: tuple[int, ...]
    values: str
    data: bytes
    blocks: BlockScales | None = None
    """Block size and scales: present exactly for the blockwise formats."""
    index: SparseIndex | None = None
    """The transmitted entries of a sparse (top-k) tensor; None for dense tensors."""
    delta: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        self._check("tensor")

    @classmethod
    def _unchecked_scales(cls, where: str, **fields: Any) -> EncodedTensor:
        """Construct with every check except the block scales' values (finite, >= 0), which the
        caller then checks for many tensors at once (`check_scales`)."""
        tensor = cls.__new__(cls)
        for name in cls.__dataclass_fields__:
            object.__setattr__(
                tensor, name, fields.get(name, cls.__dataclass_fields__[name].default)
            )
        object.__setattr__(tensor, "shape", tuple(tensor.shape))
        tensor._check(where, scale_values=False)
        return tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sparse(self) -> bool:
        return self.index is not None

    @property
    def count(self) -> int:
        """Number of transmitted values: `nnz` for a sparse tensor, else every element."""
        return self.index.nnz if self.index is not None else self.numel

    @property
    def nbytes(self) -> int:
        """Payload bytes: data + scales + indices (the msgpack framing adds ~60 bytes)."""
        return (
            len(self.data)
            + (len(self.blocks.scales) if self.blocks is not None else 0)
            + (len(self.index.indices) if self.index is not None else 0)
        )

    def _check(self, where: str, scale_values: bool = True) -> None:
        for d in self.shape:
            if not is_int_in(d, 0):
                raise InvalidFieldError(
                    f"{where}.shape: expected non-negative integers, got {self.shape!r}"
                )
        if self.values not in VALUE_FORMATS:
            raise UnknownCodecError(
                f"{where}.values: expected one of {', '.join(VALUE_FORMATS)}, got {self.values!r}"
            )
        n = self.numel
        if self.index is not None:
            index = self.index
            if not isinstance(index.indices, bytes) or index.width not in _INDEX_WIDTHS:
                raise InvalidFieldError(
                    f"{where}: a sparse tensor needs `idx` and `idxw` in {_INDEX_WIDTHS}"
                )
            if not 0 <= index.nnz <= n:
                raise ShapeMismatchError(
                    f"{where}.nnz: expected 0..{n} for shape {self.shape}, got {index.nnz}"
                )
            if len(index.indices) != index.nnz * index.width:
                raise ShapeMismatchError(
                    f"{where}.idx: expected {index.nnz} x {index.width} bytes, "
                    f"got {len(index.indices)}"
                )
            idx = _quant.decode_gaps(index.indices, index.width)
            if idx.size and (idx[-1] >= n or (idx.size > 1 and np.any(np.diff(idx) <= 0))):
                raise ShapeMismatchError(
                    f"{where}.idx: expected strictly increasing indices below {n}"
                )
        m = self.count
        want = _quant.payload_len(self.values, m)
        if len(self.data) != want:
            raise ShapeMismatchError(
                f"{where}.data: expected {want} bytes for {m} "
                f"{self.values} values of shape {self.shape}, "
                f"got {len(self.data)}"
            )
        if self.values in BLOCK_FORMATS:
            self._check_blocks(where, m, scale_values)
        else:
            if self.blocks is not None:
                raise InvalidFieldError(f"{where}: {self.values} takes no `block`/`scales`/`sdt`")
            if not np.isfinite(_quant.decode_values(self.data, self.values, m, None, None)).all():
                raise NonFiniteError(f"{where}.data: expected finite {self.values} values")

    def _check_blocks(self, where: str, m: int, scale_values: bool = True) -> None:
        blocks = self.blocks
        block = None if blocks is None else blocks.block
        if not is_int_in(block, 1, MAX_BLOCK):
            raise InvalidFieldError(
                f"{where}.block: expected an integer in [1, {MAX_BLOCK}], got {block!r}"
            )
        assert blocks is not None
        if blocks.dtype not in _quant.SCALE_ITEMSIZE or not isinstance(blocks.scales, bytes):
            raise InvalidFieldError(
                f"{where}: {self.values} needs `scales` and `sdt` in ('f16', 'f32')"
            )
        nb = _quant.num_blocks(m, blocks.block)
        want = nb * _quant.SCALE_ITEMSIZE[blocks.dtype]
        if len(blocks.scales) != want:
            raise ShapeMismatchError(
                f"{where}.scales: expected {want} bytes for {nb} blocks, got {len(blocks.scales)}"
            )
        if self.values != "int8" and m % 2 and self.data[-1] >> 4:
            raise InvalidFieldError(
                f"{where}.data: expected a zero padding nibble after an odd count"
            )
        if scale_values:
            self._check_scale_values(where)

    def _check_scale_values(self, where: str) -> None:
        if self.blocks is None:
            return
        scales = _quant.decode_scales(self.blocks.scales, self.blocks.dtype)
        if not np.isfinite(scales).all():
            raise NonFiniteError(f"{where}.scales: expected finite scales")
        if np.any(scales < 0):
            raise InvalidFieldError(f"{where}.scales: expected non-negative absmax scales")

    def payload(self) -> np.ndarray:
        """The transmitted quantity as dense float32 of `shape` (before adding a delta
        reference)."""
        blocks = self.blocks
        vals = _quant.decode_values(
            self.data,
            self.values,
            self.count,
            None if blocks is None else blocks.block,
            None if blocks is None else _quant.decode_scales(blocks.scales, blocks.dtype),
        )
        if self.index is not None:
            dense = np.zeros(self.numel, dtype=np.float32)
            dense[_quant.decode_gaps(self.index.indices, self.index.width)] = vals
            vals = dense
        return vals.reshape(self.shape)

    def decode(self, reference: np.ndarray | None = None, *, name: str = "tensor") -> np.ndarray:
        """Dense float32 tensor; `reference` (same shape) is required for delta-coded tensors."""
        out = self.payload()
        if self.delta:
            if reference is None:
                raise MissingReferenceError(f"{name}: delta-coded, expected its reference tensor")
            ref = np.asarray(reference, dtype=np.float32)
            if ref.shape != self.shape:
                raise ShapeMismatchError(
                    f"{name}: expected a reference of shape {self.shape}, got {ref.shape}"
                )
            with np.errstate(over="ignore", invalid="ignore"):
                out = ref + out
        if not np.isfinite(out).all():
            raise NonFiniteError(f"{name}: decoding produced non-finite values")
        return out

    def to_obj(self) -> dict[str, Any]:
        """The msgpack map of this tensor (see docs/wire-format.md, "Encoded tensor")."""
        obj: dict[str, Any] = {"shape": list(self.shape), "values": self.values, "data": self.data}
        if self.blocks is not None:
            obj.update(self.blocks.to_obj())
        if self.index is not None:
            obj.update(self.index.to_obj())
        if self.delta:
            obj["delta"] = True
        return obj

    @classmethod
    def from_obj(
        cls,
        obj: Any,
        where: str,
        limits: DecodeLimits = DEFAULT_LIMITS,
        *,
        defer_scales: bool = False,
    ) -> EncodedTensor:
        """Validate an untrusted decoded map; raises only `WireError`s.

        `defer_scales=True` leaves the block scales' values unchecked: the caller must pass the
        tensor to `check_scales` before using it (a message checks all its tensors at once)."""
        if defer_scales:
            fast = cls._from_obj_fast(obj, limits)
            if fast is not None:
                return fast
        if not isinstance(obj, dict):
            raise InvalidFieldError(f"{where}: expected a map, got {type(obj).__name__}")
        shape = get(obj, "shape", where)
        if not isinstance(shape, list) or len(shape) > limits.max_ndim:
            raise InvalidFieldError(
                f"{where}.shape: expected a list of at most {limits.max_ndim} integers"
            )
        for d in shape:
            if not is_int_in(d, 0, limits.max_elements):
                raise InvalidFieldError(
                    f"{where}.shape: expected integers in [0, {limits.max_elements}], got {shape}"
                )
        if math.prod(shape) > limits.max_elements:
            raise LimitExceededError(
                f"{where}: {math.prod(shape)} elements exceed max_elements={limits.max_elements}"
            )
        values = get_str(obj, "values", where, 16)
        blockwise = values in BLOCK_FORMATS
        # Optional fields may be absent or nil (docs/wire-format.md, section 1): a nil `nnz`
        # is a dense tensor, as an absent one is.
        sparse = obj.get("nnz") is not None
        make = (lambda **kw: cls._unchecked_scales("tensor", **kw)) if defer_scales else cls
        return make(
            shape=tuple(shape),
            values=values,
            data=get_bytes(obj, "data", where),
            blocks=BlockScales(
                get_int(obj, "block", where, 1, MAX_BLOCK),
                get_bytes(obj, "scales", where),
                get_str(obj, "sdt", where, 8),
            )
            if blockwise
            else None,
            index=SparseIndex(
                get_int(obj, "nnz", where, 0, limits.max_elements),
                get_bytes(obj, "idx", where),
                get_int(obj, "idxw", where, 1, 8),
            )
            if sparse
            else None,
            delta=get_bool(obj, "delta", where, default=False),
        )

    @classmethod
    def _from_obj_fast(cls, obj: Any, limits: DecodeLimits) -> EncodedTensor | None:
        """The common case, a well-formed dense blockwise tensor, validated with inline checks
        that accept exactly what `from_obj` and `_check` accept for it (scales' values aside);
        None for anything else, which then takes the general path and its precise errors.

        An adapter update is hundreds of small tensors, and the general path's per-field
        helper calls were most of the time a coordinator spent decoding one."""
        if type(obj) is not dict:
            return None
        get_ = obj.get
        shape, values, data = get_("shape"), get_("values"), get_("data")
        block, scales, sdt = get_("block"), get_("scales"), get_("sdt")
        delta = get_("delta")
        if (
            type(shape) is not list
            or len(shape) > limits.max_ndim
            or type(values) is not str
            or values not in BLOCK_FORMATS
            or type(data) is not bytes
            or type(block) is not int
            or not 1 <= block <= MAX_BLOCK
            or type(scales) is not bytes
            or type(sdt) is not str
            or sdt not in _quant.SCALE_ITEMSIZE
            or get_("nnz") is not None
            or get_("idx") is not None
            or get_("idxw") is not None
            or not (delta is None or type(delta) is bool)
        ):
            return None
        n = 1
        for d in shape:
            if type(d) is not int or not 0 <= d <= limits.max_elements:
                return None
            n *= d
        if n > limits.max_elements or len(data) != _quant.payload_len(values, n):
            return None
        if len(scales) != _quant.num_blocks(n, block) * _quant.SCALE_ITEMSIZE[sdt]:
            return None
        if values != "int8" and n % 2 and data[-1] >> 4:
            return None
        tensor = cls.__new__(cls)
        tensor.__dict__.update(
            shape=tuple(shape), values=values, data=data,
            blocks=BlockScales(block, scales, sdt), index=None, delta=bool(delta),
        )  # fmt: skip
        return tensor

    def matches(self, spec: CodecSpec) -> bool:
        """Whether this tensor is encoded the way `spec` says (block sizes may differ per
        tensor)."""
        return (
            self.values == spec.values
            and self.sparse == (spec.topk is not None)
            and self.delta == spec.delta
        )


def check_scales(tensors: Mapping[str, EncodedTensor], where: str = "tensors") -> None:
    """The block scales of many tensors (from `from_obj(defer_scales=True)`) are finite and
    non-negative: one numpy pass per scale dtype instead of several per tensor. On a failure
    the tensors are checked one by one, so the error names the first bad one."""
    groups: dict[str, list[bytes]] = {}
    for t in tensors.values():
        if t.blocks is not None:
            groups.setdefault(t.blocks.dtype, []).append(t.blocks.scales)
    for dtype, parts in groups.items():
        scales = _quant.decode_scales(b"".join(parts), dtype)
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            for key, t in tensors.items():
                t._check_scale_values(f"{where}[{key}]")
            raise AssertionError("unreachable: a batch of scales failed but none alone")


def decode_many(
    tensors: Mapping[str, EncodedTensor], reference: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """`{key: t.decode(reference[key])}` for many tensors, with the same results and errors.

    Dense blockwise tensors of whole blocks that share a format and block size are dequantized
    together in one pass over their concatenated bytes: an adapter is hundreds of small
    tensors, and per-tensor numpy calls, not arithmetic, dominated decoding them one by one.
    The returned arrays are views into one buffer per group (disjoint; each may be written)."""
    out: dict[str, np.ndarray] = {}
    groups: dict[tuple[str, int, str], list[str]] = {}
    refs: Mapping[str, np.ndarray] = reference if reference is not None else {}
    for key, t in tensors.items():
        if t.delta and key not in refs:
            raise MissingReferenceError(
                f"{key}: delta-coded, expected the reference adapter's tensor"
            )
        n, blocks = t.numel, t.blocks
        if (
            blocks is None
            or t.sparse
            or n == 0
            or n % blocks.block
            or (t.values != "int8" and n % 2)
        ):
            out[key] = t.decode(refs[key] if t.delta else None, name=key)
        else:
            groups.setdefault((t.values, blocks.block, blocks.dtype), []).append(key)
    for (fmt, block, scale_dtype), keys in groups.items():
        members = [tensors[k] for k in keys]
        total = sum(t.numel for t in members)
        scales = _quant.decode_scales(
            b"".join(t.blocks.scales for t in members if t.blocks is not None), scale_dtype
        )
        flat = _quant.decode_values(b"".join(t.data for t in members), fmt, total, block, scales)
        offset = 0
        for key, t in zip(keys, members):
            view = flat[offset : offset + t.numel].reshape(t.shape)
            offset += t.numel
            if t.delta:
                ref = np.asarray(refs[key], dtype=np.float32)
                if ref.shape != t.shape:
                    raise ShapeMismatchError(
                        f"{key}: expected a reference of shape {t.shape}, got {ref.shape}"
                    )
                with np.errstate(over="ignore", invalid="ignore"):
                    np.add(ref, view, out=view)
            out[key] = view
        if not np.isfinite(flat).all():
            for key in keys:
                if not np.isfinite(out[key]).all():
                    raise NonFiniteError(f"{key}: decoding produced non-finite values")
    return {key: out[key] for key in tensors}


def _as_float32(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise NonFiniteError(
            f"{name}: {int((~np.isfinite(arr)).sum())} non-finite values; refusing to encode"
        )
    return arr


def encode_tensor(
    x: Any,
    codec: str | CodecSpec,
    *,
    reference: np.ndarray | None = None,
    residual: np.ndarray | None = None,
    name: str = "tensor",
    with_residual: bool = True,
) -> tuple[EncodedTensor, np.ndarray | None]:
    """Encode one tensor. Returns (encoded, new residual = intended - transmitted, float32).

    `with_residual=False` skips decoding the payload again and returns None as the residual.
    """
    spec = parse_codec(codec)
    arr = _as_float32(x, name)
    target = arr
    if spec.delta:
        if reference is None:
            raise MissingReferenceError(f"{name}: codec {spec} needs a reference tensor")
        ref = np.asarray(reference, dtype=np.float32)
        if ref.shape != arr.shape:
            raise ValueError(
                f"{name}: reference shape {ref.shape} differs from tensor shape {arr.shape}"
            )
        target = arr - ref
    if residual is not None:
        target = target + residual
    flat = np.ascontiguousarray(target, dtype=np.float32).reshape(-1)
    index: SparseIndex | None = None
    if spec.topk is not None:
        k = min(flat.size, max(1, math.ceil(spec.topk * flat.size))) if flat.size else 0
        # argpartition is O(n); sorting only the k survivors keeps gaps non-negative.
        idx = (
            np.sort(np.argpartition(-np.abs(flat), k - 1)[:k])
            if 0 < k < flat.size
            else np.arange(k)
        )
        vals = flat[idx]
        gap_bytes, width = _quant.encode_gaps(idx)
        index = SparseIndex(int(k), gap_bytes, width)
    else:
        vals = flat
    if (
        spec.values == "fp16"
        and vals.size
        and float(np.abs(vals).max()) > float(np.finfo(np.float16).max)
    ):
        raise ValueError(
            f"{name}: values up to {float(np.abs(vals).max()):.3g} overflow fp16; use bf16 or fp32"
        )
    data, scales, scale_dtype = _quant.encode_values(vals, spec.values, spec.block)
    try:
        enc = EncodedTensor(
            shape=arr.shape,
            values=spec.values,
            data=data,
            blocks=BlockScales(spec.block, scales, scale_dtype)
            if spec.blockwise and scales is not None and scale_dtype is not None
            else None,
            index=index,
            delta=spec.delta,
        )
    except NonFiniteError as exc:  # bf16 rounding of values near float32 max
        raise ValueError(f"{name}: values overflow {spec.values}: {exc}") from None
    return enc, (target - enc.payload()) if with_residual else None


class UpdateEncoder:
    """Stateful device-side encoder: holds the error-feedback residual and the delta reference.

    `encode` commits the new residual immediately. To retry a failed upload, resend the same
    bytes (updates are idempotent by `update_id`) rather than encoding again; persist the
    encoder with `save` together with the outbox so a restart does not lose the residual.
    """

    def __init__(
        self,
        codec: str | CodecSpec,
        *,
        error_feedback: bool | None = None,
        residual: Mapping[str, np.ndarray] | None = None,
        reference: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.codec = parse_codec(codec)
        # Error feedback is what makes top-k converge; other lossy codecs may opt in.
        self.error_feedback = (
            self.codec.topk is not None if error_feedback is None else bool(error_feedback)
        )
        self.residual: dict[str, np.ndarray] = {
            k: np.asarray(v, dtype=np.float32).copy() for k, v in (residual or {}).items()
        }
        self.reference: dict[str, np.ndarray] | None = None
        if reference is not None:
            self.set_reference(reference)

    def set_reference(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Remember the dense tensors of the last global adapter received
        (`GlobalAdapter.dense_tensors()`)."""
        self.reference = {k: np.asarray(v, dtype=np.float32).copy() for k, v in tensors.items()}

    def reset(self) -> None:
        self.residual.clear()

    def encode(
        self, tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, EncodedTensor]:
        """Encode every tensor with this encoder's codec; `reference` overrides the stored one."""
        ref = reference if reference is not None else self.reference
        if self.codec.delta and ref is None:
            raise MissingReferenceError(
                f"codec {self.codec} needs a reference: call set_reference() first"
            )
        out: dict[str, EncodedTensor] = {}
        new_residual: dict[str, np.ndarray] = {}
        for key, value in tensors.items():
            check_key(key, "tensors", DEFAULT_LIMITS)
            if self.codec.delta and (ref is None or key not in ref):
                raise MissingReferenceError(f"{key}: no reference tensor for codec {self.codec}")
            res = self.residual.get(key) if self.error_feedback else None
            if res is not None and res.shape != np.shape(value):
                logger.warning(
                    "dropping residual of %s: shape %s -> %s", key, res.shape, np.shape(value)
                )
                res = None
            enc, leftover = encode_tensor(
                value,
                self.codec,
                reference=ref[key] if self.codec.delta and ref is not None else None,
                residual=res,
                name=key,
                with_residual=self.error_feedback,
            )
            out[key] = enc
            if leftover is not None:
                new_residual[key] = leftover
        if self.error_feedback:
            self.residual.update(new_residual)
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write codec, residual and reference to one .npz file, atomically."""
        arrays: dict[str, np.ndarray] = {
            "codec": np.array(str(self.codec)),
            "error_feedback": np.array(self.error_feedback),
        }
        arrays.update({f"residual:{k}": v for k, v in self.residual.items()})
        arrays.update({f"reference:{k}": v for k, v in (self.reference or {}).items()})
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                # numpy's stub types **kwds as the `allow_pickle` flag.
                np.savez(fh, **arrays)  # type: ignore[arg-type]
                fh.flush()
                # The bytes reach the disk before the rename makes them current.
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # and the rename itself survives a power cut
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> UpdateEncoder:
        """Inverse of `save` (never unpickles)."""
        with np.load(path, allow_pickle=False) as npz:
            residual = {k.split(":", 1)[1]: npz[k] for k in npz.files if k.startswith("residual:")}
            reference = {
                k.split(":", 1)[1]: npz[k] for k in npz.files if k.startswith("reference:")
            }
            enc = cls(
                str(npz["codec"]), error_feedback=bool(npz["error_feedback"]), residual=residual
            )
        if reference:
            enc.set_reference(reference)
        return enc
