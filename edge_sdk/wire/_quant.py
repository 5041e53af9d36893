"""Vectorised numpy kernels for the value formats of the wire codecs (no per-element Python).

Every kernel works on a flat float32 vector `x` of `m` elements and produces little-endian
bytes. Blockwise formats split `x` into ceil(m / block) blocks of `block` consecutive elements
(the last one may be short) and store one absmax scale per block, as in QLoRA (Dettmers et al.
2023, arXiv:2305.14314, section 3).
"""

from __future__ import annotations

import numpy as np

# Bytes per element of the float formats.
FLOAT_ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
SCALE_ITEMSIZE = {"f16": 2, "f32": 4}

# The 16 NormalFloat4 levels of QLoRA (arXiv:2305.14314, appendix E): quantiles of N(0, 1)
# scaled to [-1, 1], with an exact zero. Code c in 0..15 decodes to NF4_LEVELS[c] * scale.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2  # (15,) decision boundaries

# Symmetric integer formats: q in [-L, L], value = q * scale / L.
INT8_LEVELS = 127
INT4_LEVELS = 7  # int4 code c in 0..15 stands for q = c - 8; encoders emit 1..15 only

_F16_MIN_NORMAL = float(np.finfo(np.float16).tiny)  # 2**-14
_F16_MAX = float(np.finfo(np.float16).max)  # 65504


def num_blocks(m: int, block: int) -> int:
    return -(-m // block)


def payload_len(fmt: str, m: int) -> int:
    """Bytes of the `data` field for `m` values in format `fmt`."""
    if fmt in FLOAT_ITEMSIZE:
        return m * FLOAT_ITEMSIZE[fmt]
    if fmt == "int8":
        return m
    return -(-m // 2)  # int4 / nf4: two 4-bit codes per byte


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 (m,) -> uint16 (m,) bfloat16 bit patterns, rounded to nearest, ties to even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """uint16 (m,) bfloat16 bit patterns -> float32 (m,), exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _blocked(x: np.ndarray, block: int) -> np.ndarray:
    """(m,) -> (nb, block), zero-padded at the end."""
    nb = num_blocks(x.size, block)
    padded = np.zeros(nb * block, dtype=np.float32)
    padded[: x.size] = x
    return padded.reshape(nb, block)


def _scales(xb: np.ndarray) -> tuple[np.ndarray, bytes, str]:
    """Per-block absmax -> (scales as stored, as float32 (nb,); their bytes; "f16" or "f32").

    fp16 halves the scale overhead and is used whenever every non-zero scale is a normal fp16
    number. A scale rounded down would push the block's max element outside [-1, 1], so
    rounded-down scales are bumped to the next fp16 value instead.
    """
    absmax = np.abs(xb).max(axis=1) if xb.size else np.zeros(0, np.float32)
    nz = absmax[absmax > 0]
    if nz.size == 0 or (nz.min() >= _F16_MIN_NORMAL and nz.max() <= _F16_MAX / 1.001):
        s16 = absmax.astype(np.float16)
        low = s16.astype(np.float32) < absmax
        s16[low] = np.nextafter(s16[low], np.float16(np.inf))
        return s16.astype(np.float32), s16.astype("<f2").tobytes(), "f16"
    return absmax, absmax.astype("<f4").tobytes(), "f32"


def _pack_nibbles(codes: np.ndarray) -> bytes:
    """uint8 codes (m,) in 0..15 -> ceil(m/2) bytes; element 2j in the low nibble of byte j."""
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_nibbles(data: bytes, m: int) -> np.ndarray:
    """Inverse of `_pack_nibbles`: ceil(m/2) bytes -> uint8 codes (m,)."""
    packed = np.frombuffer(data, dtype=np.uint8)
    codes = np.empty(packed.size * 2, dtype=np.uint8)
    codes[0::2] = packed & 0x0F
    codes[1::2] = packed >> 4
    return codes[:m]


def encode_values(x: np.ndarray, fmt: str, block: int) -> tuple[bytes, bytes | None, str | None]:
    """Flat finite float32 `x` -> (data, scales or None, scale dtype or None)."""
    if fmt == "fp32":
        return x.astype("<f4").tobytes(), None, None
    if fmt == "fp16":
        return x.astype("<f2").tobytes(), None, None
    if fmt == "bf16":
        return to_bf16_bits(x).astype("<u2").tobytes(), None, None
    xb = _blocked(x, block)  # (nb, block)
    scales, scale_bytes, scale_dtype = _scales(xb)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    unit = xb / safe[:, None]  # each row in [-1, 1]
    if fmt == "int8":
        q = np.clip(np.rint(unit * INT8_LEVELS), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
        return q.reshape(-1)[: x.size].tobytes(), scale_bytes, scale_dtype
    if fmt == "int4":
        q = np.clip(np.rint(unit * INT4_LEVELS), -INT4_LEVELS, INT4_LEVELS)
        codes = (q + 8).astype(np.uint8).reshape(-1)[: x.size]
    elif fmt == "nf4":
        # Nearest level = number of midpoints below the value; 15 vector compares are ~4x
        # faster than np.searchsorted here and give the same codes.
        flat = unit.reshape(-1)[: x.size]
        codes = np.zeros(x.size, dtype=np.uint8)
        for mid in _NF4_MIDPOINTS:  # 15 boundaries, not elements
            codes += flat > mid
    else:  # pragma: no cover - callers validate the format first
        raise AssertionError(fmt)
    return _pack_nibbles(codes), scale_bytes, scale_dtype


def decode_scales(scale_bytes: bytes, scale_dtype: str) -> np.ndarray:
    dtype = "<f2" if scale_dtype == "f16" else "<f4"
    return np.frombuffer(scale_bytes, dtype=dtype).astype(np.float32)


def _pair_table(levels: np.ndarray) -> np.ndarray:
    """(256,) uint64: byte j -> the float32 pair (level of its low nibble, of its high one)."""
    codes = np.arange(256, dtype=np.uint8)
    pairs = np.stack([levels[codes & 0x0F], levels[codes >> 4]], axis=1).astype(np.float32)
    # As one uint64 per byte: a 1-D gather of 8-byte items is ~7x faster than a 2-D one.
    return np.ascontiguousarray(pairs).view(np.uint64).reshape(256)


# One table lookup per byte yields both of its values: a byte-indexed gather is cheaper than
# unpacking nibbles, converting and shifting them as separate whole-array passes.
_INT4_PAIRS = _pair_table((np.arange(16, dtype=np.float32) - 8) / INT4_LEVELS)
_NF4_PAIRS = _pair_table(NF4_LEVELS)


def decode_values(
    data: bytes, fmt: str, m: int, block: int | None, scales: np.ndarray | None
) -> np.ndarray:
    """Inverse of `encode_values`; lengths must already be validated. Returns float32 (m,)."""
    if fmt == "fp32":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if fmt == "fp16":
        return np.frombuffer(data, dtype="<f2").astype(np.float32)
    if fmt == "bf16":
        return from_bf16_bits(np.frombuffer(data, dtype="<u2"))
    assert block is not None and scales is not None
    packed = np.frombuffer(data, dtype=np.uint8)
    if fmt == "int8":
        # q / 127 then x scale, in float32, exactly as the spec's reference decoder rounds.
        unit = packed.view(np.int8).astype(np.float32)
        unit /= np.float32(INT8_LEVELS)
    else:
        table = _INT4_PAIRS if fmt == "int4" else _NF4_PAIRS
        unit = table[packed].view(np.float32)[:m]
    per_block = scales
    if m % block == 0:
        # Whole blocks (every SmolLM2-shaped LoRA factor): scale each row of a (nb, block) view
        # in place instead of materialising an (m,) vector of repeated scales.
        if not unit.flags.writeable or not unit.flags.c_contiguous:
            unit = np.ascontiguousarray(unit).copy()
        rows = unit.reshape(-1, block)
        rows *= per_block[:, None]
        return unit
    per_element = np.repeat(per_block, block)[:m]  # (m,) the scale of each element's block
    return (unit * per_element).astype(np.float32)


def encode_gaps(indices: np.ndarray) -> tuple[bytes, int]:
    """Sorted unique flat indices (k,) -> (gap bytes, width). gap_0 = i_0, gap_j = i_j - i_{j-1}.

    Gaps of a top-1% selection are ~100 on average, so they fit 1-2 bytes where absolute
    uint32 indices would take 4.
    """
    if indices.size == 0:
        return b"", 1
    gaps = np.diff(indices.astype(np.int64), prepend=0)
    top = int(gaps.max())
    width = 1 if top < 1 << 8 else 2 if top < 1 << 16 else 4
    return gaps.astype(f"<u{width}").tobytes(), width


def decode_gaps(data: bytes, width: int) -> np.ndarray:
    """Gap bytes -> absolute indices (int64 (k,)); the caller checks order and range."""
    return np.cumsum(np.frombuffer(data, dtype=f"<u{width}").astype(np.int64))
