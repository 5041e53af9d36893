"""One bounded, validating GGUF reader for every GGUF file the project opens.

A GGUF file is untrusted input. `gguf.GGUFReader` believes its header: it builds a numpy object
per array element (1e6 key/values in a 22 MB file: 72 s and 3.1 GB), recurses into nested
arrays (`RecursionError` at depth ~600) and leaves strings undecoded until someone asks. This
reader walks the header once with `struct` over a read-only memory map and, before it builds
anything a header merely claims, checks the claim against the bytes left in the file and
against the maxima of `edge_sdk.models.gguf_limits`. No recursion: arrays of arrays are refused
(llama.cpp refuses them too).

What it guarantees once `read_gguf` returns:

- every count, length and the total header size are within limits;
- every key, string and tensor name is valid UTF-8, keys and tensor names are unique;
- every tensor has 1-4 non-zero dimensions, a type from the allowed set, a row length that is a
  multiple of its block size, and data that lies inside the file, aligned and not overlapping
  another tensor's.

Values are kept compact: scalars as Python values, numeric arrays as one numpy view of the map,
string arrays as two offset arrays decoded on demand (`GGUFField.contents`). Tensor data are
numpy views of the map, made when `GGUFTensor.data` is read. Meaning (hyper-parameters, shapes
against them, value types of known keys) is checked in `edge_sdk.models.gguf_check`.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

from edge_sdk.errors import FedlmError, InvalidModelError
from edge_sdk.models import gguf_limits as L

_MAGIC = b"GGUF"
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, kv count
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_DEFAULT_ALIGNMENT = 32

# Scalar value types: struct format, size and numpy dtype (little-endian files only).
_SCALARS: dict[GGUFValueType, tuple[str, np.dtype[Any]]] = {
    GGUFValueType.UINT8: ("<B", np.dtype("<u1")),
    GGUFValueType.INT8: ("<b", np.dtype("<i1")),
    GGUFValueType.UINT16: ("<H", np.dtype("<u2")),
    GGUFValueType.INT16: ("<h", np.dtype("<i2")),
    GGUFValueType.UINT32: ("<I", np.dtype("<u4")),
    GGUFValueType.INT32: ("<i", np.dtype("<i4")),
    GGUFValueType.FLOAT32: ("<f", np.dtype("<f4")),
    GGUFValueType.BOOL: ("<B", np.dtype("bool")),
    GGUFValueType.UINT64: ("<Q", np.dtype("<u8")),
    GGUFValueType.INT64: ("<q", np.dtype("<i8")),
    GGUFValueType.FLOAT64: ("<d", np.dtype("<f8")),
}
_STRUCTS = {t: struct.Struct(fmt) for t, (fmt, _) in _SCALARS.items()}
_INTEGER_TYPES = frozenset(t for t in _SCALARS if t.name.startswith(("UINT", "INT")))
_FLOAT_TYPES = frozenset({GGUFValueType.FLOAT32, GGUFValueType.FLOAT64})

# Tensor types whose data is one plain numpy dtype (the rest are bytes, like gguf.GGUFReader).
_PLAIN_DTYPES: dict[GGMLQuantizationType, np.dtype[Any]] = {
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.F64: np.dtype("<f8"),
    GGMLQuantizationType.I8: np.dtype("i1"),
    GGMLQuantizationType.I16: np.dtype("<i2"),
    GGMLQuantizationType.I32: np.dtype("<i4"),
    GGMLQuantizationType.I64: np.dtype("<i8"),
}

# Smallest encodings: a KV pair is a key (8-byte length, >= 1 byte), a type and a 1-byte value;
# a tensor info is a name, n_dims, one dim, a type and an offset.
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8


def quote(value: object, limit: int = L.MAX_DISPLAY_CHARS) -> str:
    """`value` for an error message: repr-quoted (control characters escaped), cut to `limit`.

    Names come from the file; quoting keeps a name with a newline from forging log lines and a
    16 MiB string from becoming a 16 MB message.
    """
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    shown = repr(text[:limit])
    return shown + f"... ({len(text)} chars)" if cut else shown


def show_path(path: os.PathLike[str] | str, limit: int = 160) -> str:
    """A file path for messages: control characters escaped, long paths cut from the left."""
    text = str(path)
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return safe if len(safe) <= limit else "..." + safe[-limit:]


class _Refused(Exception):
    """Internal: the reason a file is refused; `read_gguf` adds the path and the error class."""


@dataclass(frozen=True)
class GGUFField:
    """One metadata key/value.

    `type` is the value's GGUF type; for arrays `item_type` is the element type and `count` the
    number of elements (1 for a scalar).
    """

    name: str
    type: GGUFValueType
    offset: int
    count: int = 1
    item_type: GGUFValueType | None = None
    _value: Any = None
    """Scalar: the Python value. Numeric array: a numpy view. String array: (buffer, starts,
    lengths)."""

    @property
    def types(self) -> list[GGUFValueType]:
        """`gguf.ReaderField.types`: [type] or [ARRAY, item type]."""
        return [self.type] if self.item_type is None else [self.type, self.item_type]

    @property
    def is_array(self) -> bool:
        return self.type == GGUFValueType.ARRAY

    def contents(self) -> Any:
        """The value as Python objects (a list for arrays), like `gguf.ReaderField.contents()`."""
        if not self.is_array:
            return self._value
        if self.item_type == GGUFValueType.STRING:
            buf, starts, lengths = self._value
            # Every element was decoded once while reading, so this cannot fail.
            return [str(buf[s : s + n], "utf-8") for s, n in zip(starts, lengths)]
        return self._value.tolist()

    def __len__(self) -> int:
        return self.count

    def strings_of_length(self, *byte_lengths: int) -> set[str]:
        """The strings of a string array whose encoded length is one of `byte_lengths`.

        Picks them with numpy from the offset arrays, so a 262k-token vocabulary is not decoded.
        """
        buf, starts, lengths = self._value
        n = np.frombuffer(lengths, dtype=np.int64)
        picked = np.flatnonzero(np.isin(n, byte_lengths))
        s = np.frombuffer(starts, dtype=np.int64)
        return {str(buf[s[i] : s[i] + n[i]], "utf-8") for i in picked.tolist()}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor info; `shape` is in ggml order (ne[0] first), like `gguf.ReaderTensor`."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int
    """Absolute offset of the first byte in the file."""
    _buffer: Any = field(repr=False, default=None)

    @property
    def np_shape(self) -> tuple[int, ...]:
        """numpy/torch order: (out, in) for a linear weight."""
        return tuple(int(d) for d in reversed(self.shape.tolist()))

    @property
    def data(self) -> np.ndarray:
        """A read-only numpy view of the tensor's bytes (typed for F32/F16/..., else uint8
        blocks)."""
        raw = np.frombuffer(
            self._buffer, dtype=np.uint8, count=self.n_bytes, offset=self.data_offset
        )
        dtype = _PLAIN_DTYPES.get(self.tensor_type)
        if dtype is not None:
            return raw.view(dtype).reshape(self.np_shape)
        return raw.reshape(quant_shape_to_byte_shape(self.np_shape, self.tensor_type))


class GGUFFile:
    """A GGUF file whose container has been validated (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        buffer: Any,
        version: int,
        fields: dict[str, GGUFField],
        tensors: list[GGUFTensor],
        alignment: int,
        data_offset: int,
        error: type[FedlmError],
    ) -> None:
        self.path = path
        self.error = error
        """The error class that checks of this file raise (`InvalidModelError`,
        `InvalidAdapterError`)."""
        self.data = buffer
        self.version = version
        self.fields = fields
        self.tensors = tensors
        self.alignment = alignment
        self.data_offset = data_offset
        self.size = len(buffer)

    def get_field(self, key: str) -> GGUFField | None:
        return self.fields.get(key)


def read_gguf(
    path: os.PathLike[str] | str,
    *,
    error: type[FedlmError] = InvalidModelError,
    tensor_types: frozenset[GGMLQuantizationType] = L.MODEL_TENSOR_TYPES,
) -> GGUFFile:
    """Read and validate the container of the GGUF file at `path`.

    Raises `error` (an `InvalidModelError` unless told otherwise) with a one-line message
    `<path>: <reason>`; `tensor_types` is the set of tensor types allowed.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_HEADER.size)
            if head[:4] != _MAGIC:
                raise error(
                    f"{show_path(p)}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')"
                )
            if len(head) < _HEADER.size:
                raise error(
                    f"{show_path(p)}: truncated GGUF (the {size}-byte file ends inside the header)"
                )
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise error(f"{show_path(p)}: cannot read ({exc.strerror or exc})") from None
    try:
        return _Parser(p, buffer, tensor_types, error).parse()
    except _Refused as exc:
        raise error(f"{show_path(p)}: {exc}") from None


class _Parser:
    """Walks the header once; every `_need` is checked before the bytes are touched."""

    def __init__(
        self,
        path: Path,
        buf: Any,
        tensor_types: frozenset[GGMLQuantizationType],
        error: type[FedlmError],
    ) -> None:
        self.path = path
        self.error = error
        self.buf = buf
        self.size = len(buf)
        self.tensor_types = tensor_types
        self.elements = 0  # array elements so far, all keys together

    # -- primitives ------------------------------------------------------------------------

    def _need(self, offs: int, n: int, what: str) -> None:
        if offs + n > self.size:
            raise _Refused(
                f"truncated GGUF ({what} at byte {offs} needs {n} bytes, the file has {self.size})"
            )
        if offs + n > L.MAX_METADATA_BYTES and what != "tensor data":
            raise _Refused(f"header is larger than {L.MAX_METADATA_BYTES >> 20} MiB")

    def _u32(self, offs: int, what: str) -> int:
        self._need(offs, 4, what)
        return int(_U32.unpack_from(self.buf, offs)[0])

    def _u64(self, offs: int, what: str) -> int:
        self._need(offs, 8, what)
        return int(_U64.unpack_from(self.buf, offs)[0])

    def _str(self, offs: int, limit: int, what: str) -> tuple[str, int]:
        """(decoded string, offset after it); the length is checked before any byte is read."""
        n = self._u64(offs, what)
        if n > limit:
            raise _Refused(f"{what} is {n} bytes long, more than the limit of {limit}")
        self._need(offs + 8, n, what)
        try:
            text = str(self.buf[offs + 8 : offs + 8 + n], "utf-8")
        except UnicodeDecodeError:
            raise _Refused(f"{what} at byte {offs} is not valid UTF-8") from None
        return text, offs + 8 + n

    def _count(self, n: int, what: str, limit: int, min_bytes: int) -> None:
        if n > limit:
            raise _Refused(f"header claims {n} {what}, more than the limit of {limit}")
        if n * min_bytes > self.size:
            raise _Refused(
                f"truncated or corrupt GGUF: header claims {n} {what}, "
                f"the {self.size}-byte file has room for at most {self.size // min_bytes}"
            )

    def _value_type(self, raw: int, where: str) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise _Refused(f"{where} has unknown value type {raw}") from None

    # -- sections --------------------------------------------------------------------------

    def parse(self) -> GGUFFile:
        magic, version, n_tensors, n_kv = _HEADER.unpack_from(self.buf, 0)
        del magic
        if version not in L.SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            raise _Refused(f"GGUF version {version} is not supported{hint}; supported: 2, 3")
        self._count(n_kv, "metadata keys", L.MAX_KV_COUNT, _MIN_KV_BYTES)
        self._count(n_tensors, "tensors", L.MAX_TENSOR_COUNT, _MIN_TENSOR_INFO_BYTES)
        offs = _HEADER.size
        fields: dict[str, GGUFField] = {}
        for i in range(n_kv):
            key, offs = self._str(offs, L.MAX_KEY_BYTES, f"key {i}")
            if not key:
                raise _Refused(f"key {i} is empty")
            if key in fields:
                raise _Refused(f"duplicate key {quote(key)}")
            fields[key], offs = self._field(key, offs)
        alignment = _DEFAULT_ALIGNMENT
        align_field = fields.get("general.alignment")
        if align_field is not None:
            value = align_field._value
            if align_field.type != GGUFValueType.UINT32 or not (
                0 < value <= L.MAX_ALIGNMENT and value & (value - 1) == 0
            ):
                raise _Refused(
                    f"general.alignment should be a UINT32 power of two up to {L.MAX_ALIGNMENT}"
                )
            alignment = value
        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            info, offs = self._tensor_info(i, offs)
            if info[0] in names:
                raise _Refused(f"duplicate tensor name {quote(info[0])}")
            names.add(info[0])
            infos.append(info)
        data_offset = offs + (-offs) % alignment
        tensors = self._tensors(infos, data_offset, alignment)
        return GGUFFile(
            self.path, self.buf, version, fields, tensors, alignment, data_offset, self.error
        )

    def _field(self, key: str, offs: int) -> tuple[GGUFField, int]:
        start = offs
        vtype = self._value_type(self._u32(offs, f"type of key {quote(key)}"), f"key {quote(key)}")
        offs += 4
        if vtype == GGUFValueType.STRING:
            value, offs = self._str(offs, L.MAX_STRING_BYTES, f"value of {quote(key)}")
            return GGUFField(key, vtype, start, _value=value), offs
        if vtype != GGUFValueType.ARRAY:
            st = _STRUCTS[vtype]
            self._need(offs, st.size, f"value of {quote(key)}")
            scalar = st.unpack_from(self.buf, offs)[0]
            if vtype == GGUFValueType.BOOL:
                scalar = bool(scalar)
            return GGUFField(key, vtype, start, _value=scalar), offs + st.size
        itype = self._value_type(
            self._u32(offs, f"array type of {quote(key)}"), f"array {quote(key)}"
        )
        count = self._u64(offs + 4, f"array length of {quote(key)}")
        offs += 12
        if itype == GGUFValueType.ARRAY:
            # Depth limit L.MAX_ARRAY_DEPTH = 1: nested arrays are refused, never walked.
            raise _Refused(
                f"key {quote(key)} holds an array of arrays (not supported, nor by llama.cpp)"
            )
        item_size = 8 if itype == GGUFValueType.STRING else _SCALARS[itype][1].itemsize
        if count > L.MAX_ARRAY_ELEMENTS:
            raise _Refused(
                f"array {quote(key)} claims {count} elements, "
                f"more than the limit of {L.MAX_ARRAY_ELEMENTS}"
            )
        if count * item_size > self.size - offs:
            raise _Refused(
                f"truncated or corrupt GGUF: array {quote(key)} "
                f"claims {count} elements past the end of the file"
            )
        self.elements += count
        if self.elements > L.MAX_METADATA_ELEMENTS:
            raise _Refused(
                f"metadata arrays hold more than {L.MAX_METADATA_ELEMENTS} elements together"
            )
        if itype != GGUFValueType.STRING:
            dtype = _SCALARS[itype][1]
            self._need(offs, count * dtype.itemsize, f"array {quote(key)}")
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=offs)
            return GGUFField(key, vtype, start, count, itype, values), offs + count * dtype.itemsize
        return self._string_array(key, start, offs, count)

    def _string_array(self, key: str, start: int, offs: int, count: int) -> tuple[GGUFField, int]:
        # Offsets go into two compact int64 arrays (16 bytes per element, not two Python
        # objects); each string is decoded once here to check its UTF-8.
        starts = array("q", bytes(8 * count))
        lengths = array("q", bytes(8 * count))
        buf, size, unpack = self.buf, self.size, _U64.unpack_from
        limit = L.MAX_ARRAY_STRING_BYTES
        end_of_header = min(size, L.MAX_METADATA_BYTES)
        for i in range(count):
            if offs + 8 > end_of_header:
                raise _Refused(f"truncated GGUF (string {i} of {quote(key)} runs past the end)")
            n = unpack(buf, offs)[0]
            if n > limit or offs + 8 + n > end_of_header:
                raise _Refused(
                    f"string {i} of {quote(key)} is {n} bytes "
                    f"long (limit {limit}, or the end of the file)"
                )
            try:
                str(buf[offs + 8 : offs + 8 + n], "utf-8")
            except UnicodeDecodeError:
                raise _Refused(f"string {i} of {quote(key)} is not valid UTF-8") from None
            starts[i] = offs + 8
            lengths[i] = n
            offs += 8 + n
        value = (buf, starts, lengths)
        return GGUFField(key, GGUFValueType.ARRAY, start, count, GGUFValueType.STRING, value), offs

    def _tensor_info(self, i: int, offs: int) -> tuple[tuple[str, list[int], int, int], int]:
        name, offs = self._str(offs, L.MAX_TENSOR_NAME_BYTES, f"name of tensor {i}")
        if not name:
            raise _Refused(f"tensor {i} has an empty name")
        what = f"tensor {quote(name)}"
        n_dims = self._u32(offs, what)
        offs += 4
        if not 1 <= n_dims <= L.MAX_DIMS:
            raise _Refused(f"{what} has {n_dims} dimensions (should be 1 to {L.MAX_DIMS})")
        self._need(offs, 8 * n_dims, what)
        dims = [int(d) for d in struct.unpack_from(f"<{n_dims}Q", self.buf, offs)]
        offs += 8 * n_dims
        if any(d == 0 for d in dims):
            raise _Refused(f"{what} has a zero dimension {dims}")
        raw_type = self._u32(offs, what)
        rel_offset = self._u64(offs + 4, what)
        return (name, dims, raw_type, rel_offset), offs + 12

    def _tensors(
        self, infos: list[tuple[str, list[int], int, int]], data_offset: int, alignment: int
    ) -> list[GGUFTensor]:
        tensors = []
        spans = []
        data_size = self.size - data_offset
        for name, dims, raw_type, rel in infos:
            what = f"tensor {quote(name)}"
            try:
                ttype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise _Refused(f"{what} has unknown type {raw_type}") from None
            if ttype not in self.tensor_types or ttype not in GGML_QUANT_SIZES:
                allowed = ", ".join(sorted(t.name for t in self.tensor_types))
                raise _Refused(
                    f"{what} has type {ttype.name}, not one of the allowed types ({allowed})"
                )
            block, type_size = GGML_QUANT_SIZES[ttype]
            if dims[0] % block:
                raise _Refused(
                    f"{what}: row length {dims[0]} is not a "
                    f"multiple of {ttype.name}'s block of {block}"
                )
            n_elements = 1
            for d in dims:  # Python ints: no silent wrap-around
                n_elements *= d
            n_bytes = n_elements // block * type_size
            if n_bytes > data_size or rel > data_size - n_bytes:
                raise _Refused(
                    f"truncated or corrupt GGUF: {what} ({n_bytes} bytes at data offset {rel}) "
                    "lies past the end of the file"
                )
            if rel % alignment:
                raise _Refused(
                    f"{what} starts at data offset {rel}, not "
                    f"a multiple of the alignment {alignment}"
                )
            spans.append((rel, rel + n_bytes, name))
            tensors.append(
                GGUFTensor(
                    name,
                    ttype,
                    np.array(dims, dtype=np.uint64),
                    n_elements,
                    n_bytes,
                    data_offset + rel,
                    self.buf,
                )
            )
        spans.sort()
        for (_, end, a), (begin, _, b) in itertools.pairwise(spans):
            if begin < end:
                raise _Refused(f"tensors {quote(a)} and {quote(b)} overlap in the file")
        return tensors


def integer_types() -> frozenset[GGUFValueType]:
    """GGUF value types holding an integer."""
    return _INTEGER_TYPES


def float_types() -> frozenset[GGUFValueType]:
    """GGUF value types holding a float (an integer is accepted where a float is read, too)."""
    return _FLOAT_TYPES
