"""docs/wire-format.md and edge_sdk.wire say the same thing.

The worked examples are what the code produces, byte for byte; the tables and rules of the
document (canonical codec strings, rejected spellings, NF4 levels, decoding order, integer
range, optional nil fields, metadata nesting) are read from the markdown and checked against
the code, so editing either one alone fails here.

Run as a script to print the example's hex dump after a deliberate format change:
    .venv/bin/python -m tests.wire.test_wire_spec
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from edge_sdk.wire import (
    AdapterUpdate,
    CodecSpec,
    ErrorMessage,
    GlobalAdapter,
    InvalidFieldError,
    LimitExceededError,
    LoraSpec,
    MessageKind,
    TaskConfig,
    UnknownCodecError,
    UpdateEncoder,
    _envelope,
    _quant,
    parse_codec,
)
from edge_sdk.wire.codecs import DEFAULT_BLOCK, DEFAULT_TOPK_FRACTION, EncodedTensor

DOC = Path(__file__).resolve().parents[2] / "docs" / "wire-format.md"


def example_update() -> AdapterUpdate:
    """One (2, 4) lora_A tensor, int8 with blocks of 4: small enough to read in hex."""
    x = np.array([[0.5, -0.25, 0.125, 1.0], [-2.0, 0.0, 0.75, 0.5]], np.float32)
    return AdapterUpdate.build(
        client_id="dev-1",
        update_id="u1",
        base_version=0,
        model_sha256="ab" * 32,
        lora=LoraSpec(rank=2, alpha=4.0, targets=("q_proj",)),
        num_examples=16,
        num_tokens=2048,
        metrics={"loss": 2.5},
        encoder=UpdateEncoder("int8:4"),
        tensors={"model.layers.0.self_attn.q_proj.lora_A": x},
    )


def example_error() -> ErrorMessage:
    return ErrorMessage(code="stale_update", message="base 1 < 3")


def hexdump(data: bytes) -> str:
    """xxd-style: offset, 16 bytes in hex pairs."""
    return "\n".join(f"{i:04x}: {data[i : i + 16].hex(' ')}" for i in range(0, len(data), 16))


def _doc_block(name: str) -> bytes:
    text = DOC.read_text()
    m = re.search(rf"<!-- example:{name} -->\s*```text\n(.*?)```", text, re.DOTALL)
    assert m, f"no example:{name} block in {DOC}"
    return bytes.fromhex("".join(line.split(":", 1)[1] for line in m.group(1).strip().splitlines()))


def test_doc_examples_match_the_code() -> None:
    assert _doc_block("error") == example_error().to_bytes()
    assert _doc_block("update") == example_update().to_bytes()


def test_example_decodes_as_documented() -> None:
    dense = AdapterUpdate.from_bytes(_doc_block("update")).dense_tensors()
    out = dense["model.layers.0.self_attn.q_proj.lora_A"]
    # (q / 127) * s in float32, as section 4.3 says: bit for bit, not approximately.
    codes = np.array([[64, -32, 16, 127], [-127, 0, 48, 32]], np.float32)
    scales = np.array([[1.0], [2.0]], np.float32)
    np.testing.assert_array_equal(out, (codes / np.float32(127)) * scales)


# --------------------------------------------------------------------------- reading the doc


def _doc() -> str:
    return DOC.read_text()


def _section(title: str) -> str:
    """The text of one section, from its heading to the next heading of any level."""
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ )", _doc(), re.DOTALL | re.MULTILINE)
    assert m, f"no section {title!r} in {DOC}"
    return m.group(1)


def _f32(x: float) -> float:
    """Round a Python float (double) to the nearest float32, ties to even."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


# --------------------------------------------------------------------------- value formats


def _spec_decode(fmt: str, code: int, scale: float) -> float:
    """One element decoded as section 4.3 writes it, in scalar float32 steps.

    Each float32 operation is done in double and rounded once to float32: for +, -, * and /
    of float32 operands that is exactly the float32 result (double has > 2 * 24 + 2 bits).
    """
    if fmt == "int8":
        unit = _f32(float(code) / 127.0)  # q as float32, one rounding for the division
    elif fmt == "int4":
        unit = _f32(float(code - 8) / 7.0)
    else:
        unit = float(_quant.NF4_LEVELS[code])
    return _f32(unit * scale)


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_blockwise_decoding_is_the_documented_float32_order(fmt: str) -> None:
    table = _section("4.3 Value formats and byte layouts")
    assert {"int8": "`(q / 127) * s`", "int4": "`((c - 8) / 7) * s`", "nf4": "`NF4[c] * s`"}[
        fmt
    ] in table
    rng = np.random.default_rng(7)
    # Scales as a decoder meets them: f16 scales (exact in float32) and arbitrary f32 ones.
    scales = np.concatenate(
        [
            rng.uniform(1e-4, 4, 40).astype(np.float16).astype(np.float32),
            rng.uniform(1e-6, 100, 40).astype(np.float32),
        ]
    )
    codes = np.arange(-128, 128) if fmt == "int8" else np.arange(16)
    m = codes.size
    if fmt == "int8":
        data = codes.astype(np.int8).tobytes()
    else:
        data = _quant._pack_nibbles(codes.astype(np.uint8))
    for s in scales:
        got = _quant.decode_values(data, fmt, m, m, np.array([s], np.float32))
        want = np.array([_spec_decode(fmt, int(c), float(s)) for c in codes], np.float32)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_the_other_order_differs_as_the_doc_warns() -> None:
    """`q * s / 127` is not the same float32 for every q, s: the order matters."""
    rng = np.random.default_rng(3)
    differs = sum(
        _f32(_f32(q * float(s)) / 127.0) != _f32(_f32(q / 127.0) * float(s))
        for s in rng.uniform(1e-3, 10, 50).astype(np.float32)
        for q in range(-127, 128)
    )
    assert differs > 0


def test_nf4_levels_in_the_doc_are_the_codes_levels() -> None:
    text = _section("4.3 Value formats and byte layouts")
    m = re.search(r"The 16 NF4 levels.*?```\n(.*?)```", text, re.DOTALL)
    assert m
    levels = np.array([float(v) for v in m.group(1).replace("\n", " ").split(",")], np.float32)
    np.testing.assert_array_equal(levels, _quant.NF4_LEVELS)


def test_nf4_encoding_sends_a_tie_to_the_lower_level() -> None:
    mids = (_quant.NF4_LEVELS[1:] + _quant.NF4_LEVELS[:-1]) / np.float32(2)
    x = np.concatenate([mids, [1.0]]).astype(np.float32)  # scale 1 (the last one is the max)
    data, _, _ = _quant.encode_values(x, "nf4", x.size)
    codes = _quant.unpack_nibbles(data, x.size)
    np.testing.assert_array_equal(codes[:15], np.arange(15))


def test_int_encoding_follows_the_doc() -> None:
    """u = x / s, q = clamp(round_half_even(u * L)), all float32; int4 codes are q + 8."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal(64 * 20).astype(np.float32)
    x[5] = 0.0
    for fmt, levels in (("int8", 127), ("int4", 7)):
        data, scale_bytes, sdt = _quant.encode_values(x, fmt, 64)
        s = _quant.decode_scales(scale_bytes, sdt)  # as stored, f16 rounded up
        assert sdt == "f16" and np.all(s >= np.abs(x).reshape(20, 64).max(axis=1))
        u = x.reshape(20, 64) / s[:, None]
        q = np.clip(np.rint(u * np.float32(levels)), -levels, levels).reshape(-1)
        if fmt == "int8":
            got = np.frombuffer(data, np.int8)
        else:
            got = _quant.unpack_nibbles(data, x.size).astype(np.int64) - 8
        np.testing.assert_array_equal(got, q)


# --------------------------------------------------------------------------- codec strings


def test_codec_defaults_in_the_doc_are_the_codes() -> None:
    text = _section("4.1 Codec strings")
    m = re.search(r"Defaults: format `(\w+)`, topk fraction `([0-9.]+)`, block `(\d+)`", text)
    assert m, "the defaults sentence of section 4.1 changed shape"
    assert m.group(1) == CodecSpec().values
    assert float(m.group(2)) == DEFAULT_TOPK_FRACTION
    assert int(m.group(3)) == DEFAULT_BLOCK


def _canonical_table() -> list[tuple[str, str]]:
    text = _section("4.1 Codec strings")
    start = text.index("<!-- table:codec-canonical -->")
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|$", text[start:], re.MULTILINE)
    assert len(rows) >= 5
    return rows


@pytest.mark.parametrize("written,canonical", _canonical_table())
def test_canonical_codec_table(written: str, canonical: str) -> None:
    assert str(parse_codec(written)) == canonical
    assert parse_codec(canonical) == parse_codec(written)
    assert str(parse_codec(canonical)) == canonical  # canonical is a fixed point


def _rejected() -> list[str]:
    text = _section("4.1 Codec strings")
    m = re.search(r"These are rejected: (.*?)\.\n", text, re.DOTALL)
    assert m
    return re.findall(r"`([^`]+)`", m.group(1))


@pytest.mark.parametrize("spelling", _rejected())
def test_rejected_codec_spellings(spelling: str) -> None:
    with pytest.raises(UnknownCodecError, match=re.escape(repr(spelling))):
        parse_codec(spelling)


@pytest.mark.parametrize(
    "spelling", ["topk:1\u0660", "topk:\u0660.5", "int8:\u0664", "topk:infinity"]
)
def test_non_ascii_and_word_numbers_are_rejected(spelling: str) -> None:
    """Python's float()/int() read Arabic-Indic digits and "infinity"; the grammar does not."""
    with pytest.raises(UnknownCodecError, match=r"bad parameter in codec stage '"):
        parse_codec(spelling)


def test_codec_string_length_and_repeats_are_as_documented() -> None:
    assert "A codec string is 1 to 128 characters." in _section("4.1 Codec strings")
    longest = "delta+topk:0." + "0" * 100 + "1+int8:64"
    assert len(longest) <= 128 and parse_codec(longest).topk == 1e-101
    for bad in ("", longest + "0" * (129 - len(longest)), "int8+int4", "delta+delta"):
        with pytest.raises(
            UnknownCodecError, match=r"stages joined by '\+' from delta, topk, fp32, fp16, bf16"
        ):
            parse_codec(bad)


def _doc_fraction_spelling(f: float) -> str:
    """Section 4.1's rule, written independently of `repr`: the shortest round-tripping
    digits, positional at or above 1e-4, else `d[.ddd]e-XX`."""
    for p in range(17):
        sci = f"{f:.{p}e}"
        if float(sci) == f:
            break
    mantissa, exp_text = sci.split("e")
    digits, exp = mantissa.replace(".", ""), int(exp_text)
    if f >= 1e-4:
        if exp >= 0:
            whole, frac = digits[: exp + 1].ljust(exp + 1, "0"), digits[exp + 1 :]
        else:
            whole, frac = "0", "0" * (-exp - 1) + digits
        return f"{whole}.{frac or '0'}"
    head = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{head}e-{-exp:02d}"


def test_canonical_fraction_spelling_follows_the_rule() -> None:
    rng = np.random.default_rng(5)
    fractions = [1.0, 0.5, 0.1, 0.01, 1e-4, 9.999e-5, 2e-5, 1.5e-7, 1e-10, 0.3333333333333333]
    fractions += list(10 ** rng.uniform(-9, 0, 2000))
    for f in fractions:
        text = str(CodecSpec(topk=f))
        assert text == f"topk:{_doc_fraction_spelling(f)}+fp32", f
        assert parse_codec(text).topk == f  # reads back as the same double


# --------------------------------------------------------------------------- integers


def _raw(kind: MessageKind, body: dict[str, Any]) -> bytes:
    """A message as another implementation might write it (no dataclass checks)."""
    return _envelope.pack(kind, body)


def _task_body(**changes: Any) -> dict[str, Any]:
    task = TaskConfig(
        task_id="t1",
        model_sha256="ab" * 32,
        lora=LoraSpec(rank=2, alpha=4.0, targets=("q_proj",)),
        codec="int8",
        local_steps=1,
        batch_size=1,
        seq_len=8,
        lr=1e-3,
    )
    body = task.to_obj()
    body.update(changes)
    return body


def test_uint_range_in_the_doc_is_what_the_code_accepts() -> None:
    conventions = _section("1. Conventions")
    assert "never above 2^63-1" in conventions
    assert "a uint is at most\n  2^63-1 = 9223372036854775807" in conventions
    assert "| `a_seed`  | uint  | if `frozen-a` | 0..2^63-1," in _section(
        "3.1 `LoraSpec` (a map, used inside messages)"
    )
    top = (1 << 63) - 1
    lora = LoraSpec(rank=2, alpha=4.0, targets=("q_proj",), mode="frozen-a", a_seed=top)
    body = _task_body(lora=lora.to_obj())
    assert TaskConfig.from_bytes(_raw(MessageKind.TASK_CONFIG, body)).lora.a_seed == top
    body["lora"]["a_seed"] = top + 1  # a msgpack uint64
    with pytest.raises(InvalidFieldError, match="a_seed"):
        TaskConfig.from_bytes(_raw(MessageKind.TASK_CONFIG, body))
    # ... and the encoder refuses to write what decoders refuse to read.
    with pytest.raises(ValueError, match=r"`a_seed` should be at most 2\^63-1"):
        LoraSpec(rank=2, alpha=4.0, targets=("q_proj",), mode="frozen-a", a_seed=top + 1)


@pytest.mark.parametrize("field", ["base_version", "num_examples", "num_tokens"])
def test_update_counts_above_int64_are_rejected(field: str) -> None:
    """A hostile device's num_tokens = 2^64-1 would overflow the coordinator's SQLite ledger."""
    body = msgpack.unpackb(example_update().to_bytes()[8:])
    body[field] = (1 << 64) - 1
    with pytest.raises(InvalidFieldError, match=field):
        AdapterUpdate.from_bytes(_raw(MessageKind.ADAPTER_UPDATE, body))


# --------------------------------------------------------------------------- optional fields


@pytest.mark.parametrize(
    "field,default", [("max_rounds", None), ("global_version", 0), ("extra", {})]
)
def test_optional_task_fields_may_be_nil(field: str, default: Any) -> None:
    assert re.search(
        rf"^\| `{field}`\s*\| [a-z]+\s*\| no ",
        _section("3.4 `TaskConfig` (kind 3): what the coordinator asks of clients"),
        re.MULTILINE,
    )
    absent = _task_body()
    absent.pop(field, None)
    nil = _task_body(**{field: None})
    a = TaskConfig.from_bytes(_raw(MessageKind.TASK_CONFIG, absent))
    b = TaskConfig.from_bytes(_raw(MessageKind.TASK_CONFIG, nil))
    assert a == b and getattr(b, field) == default


def test_optional_a_seed_and_metadata_may_be_nil() -> None:
    body = _task_body()
    body["lora"]["a_seed"] = None  # mode exact: optional
    assert TaskConfig.from_bytes(_raw(MessageKind.TASK_CONFIG, body)).lora.a_seed is None
    glob = GlobalAdapter(version=1, lora=LoraSpec(2, 4.0, ("q_proj",)), tensors={})
    gbody = glob.to_obj()
    gbody["metadata"] = None
    assert GlobalAdapter.from_bytes(_raw(MessageKind.GLOBAL_ADAPTER, gbody)).metadata == {}


def test_dense_tensor_with_nil_sparse_and_block_fields() -> None:
    """`nnz: nil` is a dense tensor; nil block fields of a float tensor are ignored."""
    body = msgpack.unpackb(example_update().to_bytes()[8:])
    (key,) = body["tensors"]
    body["tensors"][key].update(nnz=None, idx=None, idxw=None, delta=None)
    dense = AdapterUpdate.from_bytes(_raw(MessageKind.ADAPTER_UPDATE, body)).dense_tensors()
    np.testing.assert_array_equal(dense[key], example_update().dense_tensors()[key])
    fp32 = EncodedTensor(shape=(2,), values="fp32", data=b"\0" * 8).to_obj()
    fp32.update(block=None, scales=None, sdt=None, nnz=None)
    assert EncodedTensor.from_obj(fp32, "t") == EncodedTensor((2,), "fp32", b"\0" * 8)


def test_a_required_field_that_is_nil_is_invalid() -> None:
    body = msgpack.unpackb(example_update().to_bytes()[8:])
    body["client_id"] = None
    with pytest.raises(InvalidFieldError, match="client_id"):
        AdapterUpdate.from_bytes(_raw(MessageKind.ADAPTER_UPDATE, body))


# --------------------------------------------------------------------------- nesting


def _nested(levels: int) -> dict[str, Any]:
    """{"a": [[...[1]...]]} with the 1 `levels` keys/indices below the map."""
    value: Any = 1
    for _ in range(levels - 1):
        value = [value]
    return {"a": value}


def test_metadata_nesting_limit_is_as_documented() -> None:
    text = _section("3.3 `GlobalAdapter` (kind 2): the aggregated adapter")
    m = re.search(r"a\s+value may sit at most `max_depth` = (\d+) levels deep", text)
    assert m
    depth = int(m.group(1))
    assert '`{"a": [[[[[[[1]]]]]]]}`' in text and _nested(depth) == {"a": [[[[[[[1]]]]]]]}
    lora = LoraSpec(2, 4.0, ("q_proj",))
    body = GlobalAdapter(version=1, lora=lora, tensors={}).to_obj()
    body["metadata"] = _nested(depth)
    ok = GlobalAdapter.from_bytes(_raw(MessageKind.GLOBAL_ADAPTER, body))
    assert ok.metadata == _nested(depth)
    body["metadata"] = _nested(depth + 1)
    with pytest.raises(LimitExceededError, match="max_depth"):
        GlobalAdapter.from_bytes(_raw(MessageKind.GLOBAL_ADAPTER, body))


def test_task_extra_nests_the_same_in_msgpack_and_json() -> None:
    depth = 8
    ok, deep = _task_body(extra=_nested(depth)), _task_body(extra=_nested(depth + 1))
    assert TaskConfig.from_bytes(_raw(MessageKind.TASK_CONFIG, ok)).extra == _nested(depth)
    assert TaskConfig.from_json_dict({"protocol_version": 1, **ok}).extra == _nested(depth)
    with pytest.raises(
        LimitExceededError,
        match=r"TaskConfig\.extra\.a\[0\]\[0\]\[0\]\[0\]\[0\]\[0\]\[0\]\[0\]: nesting deeper",
    ):
        TaskConfig.from_bytes(_raw(MessageKind.TASK_CONFIG, deep))
    with pytest.raises(
        LimitExceededError,
        match=r"TaskConfig\.extra\.a\[0\]\[0\]\[0\]\[0\]\[0\]\[0\]\[0\]\[0\]: nesting deeper",
    ):
        TaskConfig.from_json_dict({"protocol_version": 1, **deep})


if __name__ == "__main__":
    for name, msg in (("error", example_error()), ("update", example_update())):
        print(f"<!-- example:{name} --> ({len(msg.to_bytes())} bytes)\n{hexdump(msg.to_bytes())}\n")
