"""Build hostile GGUF files byte by byte: the pieces of the format, and a file taken apart.

`gguf.GGUFWriter` only writes well-formed files (and recurses on nested arrays), so crafted
files are packed with `struct` here. `Parts` splits a valid file into its header counts, raw
key/value records, tensor infos and data, so that a test or the fuzzer can change one piece
and `Parts.build()` the rest exactly as it was.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGMLQuantizationType, GGUFValueType

from edge_sdk.models.gguf_meta import read_gguf

V = GGUFValueType
_FMT = {
    V.UINT8: "<B",
    V.INT8: "<b",
    V.UINT16: "<H",
    V.INT16: "<h",
    V.UINT32: "<I",
    V.INT32: "<i",
    V.FLOAT32: "<f",
    V.BOOL: "<B",
    V.UINT64: "<Q",
    V.INT64: "<q",
    V.FLOAT64: "<d",
}


def s(text: str | bytes) -> bytes:
    """A GGUF string: u64 length, then the bytes (need not be UTF-8)."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def scalar(vtype: V, value: object) -> bytes:
    """Type tag + value of a scalar or string."""
    if vtype == V.STRING:
        return struct.pack("<I", vtype) + s(value)  # type: ignore[arg-type]
    return struct.pack("<I", vtype) + struct.pack(_FMT[vtype], value)


def array(
    item: V,
    items: list[object] | None = None,
    *,
    count: int | None = None,
    raw: bytes | None = None,
) -> bytes:
    """Type tag ARRAY + item type + count + items; `count` may lie about `items`."""
    if raw is None:
        raw = b"".join(
            s(x) if item == V.STRING else struct.pack(_FMT[item], x) for x in (items or [])
        )  # type: ignore[arg-type]
    n = len(items or []) if count is None else count
    return struct.pack("<IIQ", V.ARRAY, item, n) + raw


def nested_array(depth: int) -> bytes:
    """An array of an array of ... (depth levels) of one UINT8: built without recursion."""
    out = struct.pack("<IQ", V.UINT8, 1) + b"\x07"
    for _ in range(depth - 1):
        out = struct.pack("<IQ", V.ARRAY, 1) + out
    return struct.pack("<I", V.ARRAY) + out


def kv(key: str | bytes, value: bytes) -> bytes:
    """One key/value record: key string + (type tag, value) from `scalar`/`array`."""
    return s(key) + value


@dataclass
class TensorInfo:
    name: bytes
    dims: list[int]
    """ggml order: ne[0] (the row length) first."""
    type: int
    offset: int
    """Relative to the start of the data section."""

    def pack(self) -> bytes:
        return (
            s(self.name)
            + struct.pack("<I", len(self.dims))
            + struct.pack(f"<{len(self.dims)}Q", *self.dims)
            + struct.pack("<IQ", self.type, self.offset)
        )


@dataclass
class Parts:
    """A GGUF file taken apart; `build()` puts it back together (counts from the lists unless
    set)."""

    kvs: list[tuple[str, bytes]]
    """(key, raw record) in file order; the record includes the key."""
    tensors: list[TensorInfo]
    data: bytes
    alignment: int = 32
    version: int = 3
    n_kv: int | None = None
    n_tensors: int | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @classmethod
    def of(cls, path: Path) -> Parts:
        f = read_gguf(path)
        buf = bytes(f.data[:])
        starts = [fl.offset - 8 - len(k.encode()) for k, fl in f.fields.items()]
        infos = [
            TensorInfo(
                t.name.encode(),
                [int(d) for d in t.shape],
                int(t.tensor_type),
                t.data_offset - f.data_offset,
            )
            for t in f.tensors
        ]
        end = buf.find(s(infos[0].name), starts[-1]) if infos else f.data_offset
        bounds = [*starts, end]
        kvs = [(k, buf[bounds[i] : bounds[i + 1]]) for i, k in enumerate(f.fields)]
        return cls(kvs, infos, buf[f.data_offset :], f.alignment, f.version)

    def set(self, key: str, value: bytes) -> Parts:
        """Replace (or append) `key` with a (type tag, value) from `scalar`/`array`."""
        rec = kv(key, value)
        for i, (k, _) in enumerate(self.kvs):
            if k == key:
                self.kvs[i] = (k, rec)
                return self
        self.kvs.append((key, rec))
        return self

    def drop(self, key: str) -> Parts:
        self.kvs = [(k, r) for k, r in self.kvs if k != key]
        return self

    def tensor(self, name: str) -> TensorInfo:
        return next(t for t in self.tensors if t.name == name.encode())

    def build(self) -> bytes:
        head = struct.pack(
            "<4sIQQ",
            b"GGUF",
            self.version,
            len(self.tensors) if self.n_tensors is None else self.n_tensors,
            len(self.kvs) if self.n_kv is None else self.n_kv,
        )
        body = head + b"".join(r for _, r in self.kvs) + b"".join(t.pack() for t in self.tensors)
        body += b"\x00" * ((-len(body)) % self.alignment)
        return body + self.data

    def write(self, path: Path) -> Path:
        path.write_bytes(self.build())
        return path


def header_only(
    kvs: list[bytes],
    *,
    n_kv: int | None = None,
    tensors: list[TensorInfo] = (),
    data: bytes = b"",
    n_tensors: int | None = None,
) -> bytes:
    """A whole file from raw key/value records and tensor infos."""
    head = struct.pack(
        "<4sIQQ",
        b"GGUF",
        3,
        len(tensors) if n_tensors is None else n_tensors,
        len(kvs) if n_kv is None else n_kv,
    )
    body = head + b"".join(kvs) + b"".join(t.pack() for t in tensors)
    return body + b"\x00" * ((-len(body)) % 32) + data


Q = GGMLQuantizationType


def pack_tensors(
    tensors: list[tuple[str, int, list[int], bytes]], alignment: int = 32
) -> tuple[list[TensorInfo], bytes]:
    """(name, ggml type, ggml dims, raw bytes) -> tensor infos and the aligned data section."""
    infos, data = [], b""
    for name, ttype, dims, raw in tensors:
        data += b"\x00" * ((-len(data)) % alignment)
        infos.append(TensorInfo(name.encode(), dims, ttype, len(data)))
        data += raw
    return infos, data


def lora_file(
    shapes: dict[str, tuple[int, int]],
    *,
    rank: int = 2,
    arch: str = "llama",
    alpha: bytes | None = None,
    encode=None,
    general_type: bytes | None = None,
    seed: int = 0,
) -> bytes:
    """A LoRA adapter for base tensors `shapes` ({name: (out, in)}), tensors made by `encode`.

    `encode(np_array) -> (ggml type, raw bytes)` defaults to F32; `alpha` and `general_type`
    are (type tag, value) records, by default FLOAT32 2*rank and the string "adapter".
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    encode = encode or (lambda a: (int(Q.F32), a.astype("<f4").tobytes()))
    kvs = [
        kv("general.architecture", scalar(V.STRING, arch)),
        kv("general.type", general_type or scalar(V.STRING, "adapter")),
        kv("adapter.type", scalar(V.STRING, "lora")),
        kv("adapter.lora.alpha", alpha or scalar(V.FLOAT32, 2.0 * rank)),
    ]
    items = []
    for name, (out_f, in_f) in shapes.items():
        a = (rng.standard_normal((rank, in_f)) * 0.05).astype(np.float32)
        b = (rng.standard_normal((out_f, rank)) * 0.05).astype(np.float32)
        ta, ra = encode(a)
        tb, rb = encode(b)
        items.append((f"{name}.lora_a", ta, [in_f, rank], ra))
        items.append((f"{name}.lora_b", tb, [rank, out_f], rb))
    infos, data = pack_tensors(items)
    return header_only(kvs, tensors=infos, data=data)
