"""Codec round trips within each codec's error bound, top-k selection, error feedback, encoder
state."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_sdk.wire import (
    BlockScales,
    CodecSpec,
    EncodedTensor,
    MissingReferenceError,
    NonFiniteError,
    ShapeMismatchError,
    SparseIndex,
    UnknownCodecError,
    UpdateEncoder,
    encode_tensor,
    parse_codec,
)
from edge_sdk.wire._quant import NF4_LEVELS, from_bf16_bits, to_bf16_bits

FAST = settings(
    max_examples=int(os.environ.get("FEDLM_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Worst-case error of one element as a fraction of its block's absmax: half a quantisation step,
# plus fp16 scale rounding (scales are rounded up by at most 2**-10 relative).
_BLOCK_BOUND = {"int8": 0.5 / 127, "int4": 0.5 / 7, "nf4": float(np.max(np.diff(NF4_LEVELS))) / 2}


def _bound(x: np.ndarray, values: str, block: int) -> np.ndarray:
    """Per-element absolute error bound of value format `values` for flat float32 `x`."""
    ax = np.abs(x.astype(np.float64))
    if values == "fp32":
        return np.zeros_like(ax)
    if values == "fp16":
        return ax * 2.0**-11 + 2.0**-25
    if values == "bf16":
        return ax * 2.0**-8 + 2.0**-133  # bf16 subnormal spacing is 2**-133
    nb = -(-x.size // block)
    padded = np.zeros(nb * block)
    padded[: x.size] = ax
    absmax = np.repeat(padded.reshape(nb, block).max(axis=1), block)[: x.size]
    return absmax * (_BLOCK_BOUND[values] * (1 + 2.0**-9) + 1e-6) + 1e-38


shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40)
wide = st.floats(-(2.0**100), 2.0**100, width=32)
narrow = st.floats(-6e4, 6e4, width=32)  # representable in fp16


@FAST
@given(
    data=st.data(),
    values=st.sampled_from(["fp32", "fp16", "bf16", "int8", "int4", "nf4"]),
    block=st.sampled_from([1, 7, 64]),
)
def test_dense_round_trip_within_bound(data: st.DataObject, values: str, block: int) -> None:
    elements = narrow if values == "fp16" else wide
    x = data.draw(hnp.arrays(np.float32, shapes, elements=elements))
    spec = CodecSpec(values=values, block=block)
    enc, residual = encode_tensor(x, spec)
    out = enc.decode()
    assert out.dtype == np.float32 and out.shape == x.shape
    err = np.abs(out.astype(np.float64) - x)
    assert np.all(err <= _bound(x.reshape(-1), values, block).reshape(x.shape))
    np.testing.assert_allclose(residual, x - out, rtol=0, atol=0)


@FAST
@given(
    data=st.data(),
    values=st.sampled_from(["fp32", "bf16", "int8", "nf4"]),
    fraction=st.floats(0.01, 1.0),
)
def test_topk_keeps_largest_and_bounds_kept_values(
    data: st.DataObject, values: str, fraction: float
) -> None:
    x = data.draw(hnp.arrays(np.float32, shapes, elements=st.floats(-1e3, 1e3, width=32)))
    enc, _ = encode_tensor(x, CodecSpec(values=values, topk=fraction, block=16))
    flat = x.reshape(-1)
    k = max(1, int(np.ceil(fraction * flat.size)))
    assert enc.index is not None and enc.index.nnz == min(k, flat.size)
    out = enc.decode().reshape(-1)
    kept = np.zeros(flat.size, bool)
    from edge_sdk.wire._quant import decode_gaps

    kept[decode_gaps(enc.index.indices, enc.index.width)] = True
    assert kept.sum() == enc.index.nnz
    if (~kept).any():  # every dropped entry is no larger than every kept one
        assert np.abs(flat[~kept]).max() <= np.abs(flat[kept]).min()
        assert np.all(out[~kept] == 0)
    # Kept values are quantised as a contiguous vector of nnz values, block by block.
    kept_x = flat[kept]
    assert np.all(np.abs(out[kept] - kept_x) <= _bound(kept_x, values, 16))


@FAST
@given(
    data=st.data(),
    codec=st.sampled_from(["delta+fp32", "delta+int8", "delta+topk:0.3+nf4", "delta+bf16"]),
)
def test_delta_round_trip(data: st.DataObject, codec: str) -> None:
    shape = data.draw(shapes)
    x = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-10, 10, width=32)))
    ref = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-10, 10, width=32)))
    enc, residual = encode_tensor(x, codec, reference=ref)
    assert enc.delta
    out = enc.decode(ref)
    # decode(ref) = ref + transmitted, transmitted = (x - ref) - residual
    np.testing.assert_allclose(out, ref + (x - ref) - residual, atol=1e-5)
    if codec == "delta+fp32":
        np.testing.assert_allclose(out, x, atol=1e-5)
    with pytest.raises(
        MissingReferenceError, match=r"tensor: delta-coded, expected its reference tensor"
    ):
        enc.decode(None)
    with pytest.raises(ShapeMismatchError, match=r"tensor: expected a reference of shape \("):
        enc.decode(np.zeros(x.size + 1, np.float32))


def test_parse_codec_canonical_forms() -> None:
    assert str(parse_codec("int8")) == "int8:64"
    assert str(parse_codec("topk+int8")) == "topk:0.01+int8:64"
    assert str(parse_codec("int8:128+topk:0.05+delta")) == "delta+topk:0.05+int8:128"
    assert str(parse_codec("delta")) == "delta+fp32"
    spec = parse_codec("delta+topk:0.02+nf4:32")
    assert spec == CodecSpec(values="nf4", topk=0.02, delta=True, block=32)
    assert parse_codec(str(spec)) == spec


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("int9", "unknown codec stage 'int9'"),
        ("int8+nf4", "more than one 'values'"),
        ("topk:2", "topk"),
        ("topk:nan", "topk"),
        ("fp16:8", "no parameter"),
        ("int8:0", "block"),
        ("", "1-128 chars"),
        ("delta:1", "no parameter"),
        ("int8+", "unknown codec stage ''"),
    ],
)
def test_parse_codec_rejects_with_expectation(bad: str, expected: str) -> None:
    with pytest.raises(UnknownCodecError, match=expected):
        parse_codec(bad)


def test_codec_spec_validates_fields() -> None:
    with pytest.raises(ValueError, match="`values`"):
        CodecSpec(values="int3")
    with pytest.raises(ValueError, match="`topk`"):
        CodecSpec(topk=0.0)
    with pytest.raises(ValueError, match="`block`"):
        CodecSpec(values="int8", block=0)


def test_bf16_rounds_to_nearest_even() -> None:
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, 3.0e38], np.float32)
    bits = to_bf16_bits(x)
    # 1 + 2**-8 is a tie between 1 and 1 + 2**-7: rounds to the even mantissa (1.0).
    np.testing.assert_array_equal(from_bf16_bits(bits)[:4], [1.0, 1.0, 1.0 + 2**-6, -2.5])
    assert bits[0] == 0x3F80


def test_nf4_levels_decode_exactly() -> None:
    x = (NF4_LEVELS * 3.0).astype(np.float32)
    enc, _ = encode_tensor(x, "nf4:16")
    np.testing.assert_allclose(enc.decode(), x, rtol=1e-3)
    assert len(enc.data) == 8 and enc.blocks is not None and enc.blocks.dtype == "f16"


def test_tiny_scales_fall_back_to_f32() -> None:
    x = np.full(64, 1e-7, np.float32)  # below fp16's normal range
    enc, _ = encode_tensor(x, "int8")
    assert enc.blocks is not None and enc.blocks.dtype == "f32"
    np.testing.assert_allclose(enc.decode(), x, rtol=1e-2)


def test_zero_and_empty_tensors() -> None:
    for codec in ("int8", "nf4", "topk+int4", "fp16"):
        z, _ = encode_tensor(np.zeros((3, 5), np.float32), codec)
        assert np.all(z.decode() == 0)
        e, _ = encode_tensor(np.zeros((0, 5), np.float32), codec)
        assert e.decode().shape == (0, 5)


def test_encoder_refuses_non_finite_and_fp16_overflow() -> None:
    with pytest.raises(NonFiniteError, match="non-finite"):
        encode_tensor(np.array([1.0, np.nan], np.float32), "int8")
    with pytest.raises(ValueError, match="overflow fp16"):
        encode_tensor(np.array([1e5], np.float32), "fp16")
    with pytest.raises(TypeError, match="real numeric"):
        encode_tensor(np.array(["a"]), "fp32")


def test_error_feedback_telescopes_and_beats_plain_topk() -> None:
    rng = np.random.default_rng(1)
    steps = [(rng.standard_normal((16, 64)) * 0.01).astype(np.float32) for _ in range(30)]
    ef = UpdateEncoder("topk:0.05+int8")
    plain = UpdateEncoder("topk:0.05+int8", error_feedback=False)
    sent_ef = np.zeros((16, 64))
    sent_plain = np.zeros((16, 64))
    for x in steps:
        sent_ef += ef.encode({"w": x})["w"].decode()
        sent_plain += plain.encode({"w": x})["w"].decode()
    total = np.sum(steps, axis=0)
    # Nothing is lost: what was sent plus what is still held equals what was asked for.
    np.testing.assert_allclose(sent_ef + ef.residual["w"], total, atol=1e-5)
    assert plain.residual == {}
    err_ef = np.linalg.norm(sent_ef - total) / np.linalg.norm(total)
    err_plain = np.linalg.norm(sent_plain - total) / np.linalg.norm(total)
    assert err_ef < 0.5 * err_plain


def test_encoder_state_save_load(tmp_path) -> None:
    rng = np.random.default_rng(2)
    ref = {"model.layers.0.mlp.up_proj.lora_B": rng.standard_normal((32, 4)).astype(np.float32)}
    x = {k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for k, v in ref.items()}
    enc = UpdateEncoder("delta+topk:0.1+int8", reference=ref)
    enc.encode(x)
    path = tmp_path / "encoder.npz"
    enc.save(path)
    loaded = UpdateEncoder.load(path)
    assert loaded.codec == enc.codec and loaded.error_feedback
    for k, value in ref.items():
        np.testing.assert_array_equal(loaded.residual[k], enc.residual[k])
        np.testing.assert_array_equal(loaded.reference[k], value)
    # Both continue identically.
    a, b = enc.encode(x), loaded.encode(x)
    assert a == b
    assert [p.name for p in tmp_path.iterdir()] == ["encoder.npz"]  # no temp file left behind


def test_encoder_needs_reference_for_delta_and_drops_stale_residual() -> None:
    enc = UpdateEncoder("delta+topk:0.5+fp16")
    with pytest.raises(MissingReferenceError, match="set_reference"):
        enc.encode({"w": np.ones(4, np.float32)})
    enc.set_reference({"w": np.zeros(4, np.float32)})
    enc.encode({"w": np.arange(4, dtype=np.float32)})
    assert enc.residual["w"].shape == (4,)
    enc.set_reference({"w": np.zeros(6, np.float32)})  # rank changed: old residual no longer fits
    out = enc.encode({"w": np.arange(6, dtype=np.float32)})
    assert out["w"].shape == (6,) and enc.residual["w"].shape == (6,)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"data": b"\x00" * 7}, ShapeMismatchError, "tensor.data: expected 8 bytes .* got 7"),
        ({"scales": b"\x00" * 3}, ShapeMismatchError, "tensor.scales: expected 4 bytes .* got 3"),
        ({"scales": b"\x00\xfc" * 2}, NonFiniteError, "tensor.scales: expected finite"),  # -inf
        (
            {"nnz": 2, "indices": b"\x05\x00", "index_width": 1},
            ShapeMismatchError,
            "tensor.idx: expected strictly increasing indices",
        ),  # duplicate index
    ],
)
def test_encoded_tensor_checks_lengths(kwargs: dict, error: type[Exception], message: str) -> None:
    base = {
        "shape": (2, 4),
        "values": "int8",
        "data": b"\x01" * 8,
        "block": 4,
        "scales": b"\x00\x3c" * 2,
        "scale_dtype": "f16",
    }

    def tensor(shape, values, data, block, scales, scale_dtype, **sparse) -> EncodedTensor:
        return EncodedTensor(
            shape,
            values,
            data,
            blocks=BlockScales(block, scales, scale_dtype),
            index=SparseIndex(sparse["nnz"], sparse["indices"], sparse["index_width"])
            if sparse
            else None,
        )

    tensor(**base)  # the base is valid
    with pytest.raises(error, match=message):
        tensor(**{**base, **kwargs})
