"""Fast GGUF reading on top of the `gguf` package.

`gguf.GGUFReader` builds every element of every metadata array through numpy slicing, which
costs about 8 s for SmolLM2's 49k-token vocabulary and 45 s for Gemma 3's 262k tokens on a
2-core machine. `FastGGUFReader` keeps the reader's data model (the same `ReaderField` parts
and indexes, so `field.contents()` and code written for `GGUFReader` keep working) and only
changes how arrays are walked: scalar arrays become one vectorised view, and string arrays are
walked with plain integer arithmetic and cut as `memoryview` slices.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType


class FastGGUFReader(GGUFReader):
    """Drop-in `GGUFReader` with O(1)-numpy-ops array parsing (little-endian files only)."""

    def __init__(self, path: os.PathLike[str] | str) -> None:
        super().__init__(path, mode="r")

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[GGUFValueType]]:
        gtype = GGUFValueType(raw_type)
        if gtype != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        offs = orig_offs
        raw_itype = self._get(offs, np.uint32)
        offs += 4
        alen = self._get(offs, np.uint64)
        offs += 8
        count = int(alen[0])
        itype = GGUFValueType(int(raw_itype[0]))
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            # One view for the whole array; `contents()` flattens parts, so this reads the same.
            values = self._get(offs, nptype, count)
            if len(values) != count:
                raise ValueError(f"array at offset {orig_offs} runs past the end of the file")
            return offs + int(values.nbytes) - orig_offs, [raw_itype, alen, values], [2], [gtype, itype]
        if itype != GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        # Strings: find every (length, bytes) pair with integer arithmetic on a bytes view first.
        data = self.data
        size = len(data)
        buf = memoryview(data)
        starts: list[int] = []
        lengths: list[int] = []
        for _ in range(count):
            if offs + 8 > size:
                raise ValueError(f"string array at offset {orig_offs} runs past the end of the file")
            n = int.from_bytes(buf[offs : offs + 8], "little")
            starts.append(offs)
            lengths.append(n)
            offs += 8 + n
        if offs > size:
            raise ValueError(f"string array at offset {orig_offs} runs past the end of the file")
        # memoryview slices are ~20x cheaper than numpy views and offer the same `.tobytes()`
        # and `.nbytes` that `ReaderField.contents()` and size sums use.
        parts: list[Any] = [raw_itype, alen]
        for start, n in zip(starts, lengths):
            parts.append(buf[start : start + 8])
            parts.append(buf[start + 8 : start + 8 + n])
        data_idxs = list(range(3, 2 + 2 * count, 2))
        return offs - orig_offs, parts, data_idxs, [gtype, itype]


def read_gguf(path: os.PathLike[str] | str) -> FastGGUFReader:
    """Open a GGUF file for metadata and tensor views (memory-mapped, nothing loaded)."""
    return FastGGUFReader(path)
