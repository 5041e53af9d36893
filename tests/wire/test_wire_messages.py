"""Message round trips, typed rejections that name what was expected, and the import boundary."""

from __future__ import annotations

import json
import subprocess
import sys

import msgpack
import numpy as np
import pytest

from edge_sdk.errors import FedlmError
from edge_sdk.wire import (
    CONTENT_TYPE,
    MAGIC,
    PROTOCOL_VERSION,
    AdapterUpdate,
    BadMagicError,
    CodecMismatchError,
    DecodeLimits,
    ErrorMessage,
    GlobalAdapter,
    InvalidFieldError,
    InvalidKeyError,
    InvalidMetricsError,
    LimitExceededError,
    LoraSpec,
    MalformedMessageError,
    MissingFieldError,
    MissingReferenceError,
    NonFiniteError,
    ShapeMismatchError,
    TaskConfig,
    UnexpectedMessageError,
    UnknownCodecError,
    UnsupportedVersionError,
    WireError,
    decode_message,
)
from tests.wire.wire_helpers import LORA, SHA, build_update, lora_tensors


def _body(data: bytes) -> dict:
    return msgpack.unpackb(data[8:], raw=False)


def _repack(data: bytes, body: dict) -> bytes:
    return data[:8] + msgpack.packb(body, use_bin_type=True)


def test_constants() -> None:
    assert (
        PROTOCOL_VERSION == 1 and MAGIC == b"FDLM" and CONTENT_TYPE == "application/x-fedlm+msgpack"
    )
    assert issubclass(WireError, FedlmError)


@pytest.mark.parametrize(
    "codec", ["fp32", "fp16", "bf16", "int8", "int4", "nf4", "topk:0.1+int8", "delta+topk+nf4"]
)
def test_adapter_update_round_trip(codec: str) -> None:
    ref = lora_tensors(7)
    update = build_update(codec, reference=ref)
    data = update.to_bytes()
    assert data[:4] == MAGIC and data[4:6] == b"\x00\x01" and data[6] == 1
    back = AdapterUpdate.from_bytes(data)
    assert back == update
    assert back.metrics == {"loss": 1.25, "ppl": 3.49} and back.codec == str(update.codec)
    dense = back.dense_tensors(ref if "delta" in codec else None)
    original = lora_tensors(0)
    assert set(dense) == set(original)
    for key, x in original.items():
        assert dense[key].dtype == np.float32 and dense[key].shape == x.shape
        if codec == "fp32":
            np.testing.assert_array_equal(dense[key], x)
        elif "topk" not in codec:
            rel = np.linalg.norm(dense[key] - x) / np.linalg.norm(x)
            assert rel < 0.15, (codec, key, rel)


def test_update_sizes_shrink_with_codec() -> None:
    # Tiny tensors (3.7k elements): per-tensor framing keeps ratios below the benchmark's.
    sizes = {
        c: len(build_update(c).to_bytes())
        for c in ("fp32", "fp16", "int8", "nf4", "topk:0.01+int8")
    }
    ratio = {c: sizes["fp32"] / n for c, n in sizes.items()}
    assert 1.8 < ratio["fp16"] < 2.0
    assert 3.0 < ratio["int8"] < 4.0
    assert 5.0 < ratio["nf4"] < 8.0
    assert ratio["topk:0.01+int8"] > 10


def test_delta_update_needs_reference() -> None:
    update = AdapterUpdate.from_bytes(
        build_update("delta+int8", reference=lora_tensors(7)).to_bytes()
    )
    with pytest.raises(MissingReferenceError, match="reference"):
        update.dense_tensors()
    partial = dict(lora_tensors(7))
    partial.pop(next(iter(partial)))
    with pytest.raises(
        MissingReferenceError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A: delta-coded"
    ):
        update.dense_tensors(partial)


def test_global_adapter_round_trip_and_codec() -> None:
    tensors = lora_tensors(3)
    g = GlobalAdapter(
        version=5,
        lora=LORA,
        tensors=tensors,
        metadata={"strategy": "fedbuff", "updates": ["u-1", "u-2"]},
        codec="fp16",
    )
    back = GlobalAdapter.from_bytes(g.to_bytes())
    assert back == g and back.metadata["updates"] == ["u-1", "u-2"]
    # The object's dense view is exactly what a client decodes: the reference for delta codecs.
    for key, arr in g.dense_tensors().items():
        np.testing.assert_array_equal(arr, back.dense_tensors()[key])
        np.testing.assert_allclose(arr, tensors[key], rtol=2**-10, atol=2**-24)  # fp16 subnormals
    assert GlobalAdapter(version=0, lora=LORA, tensors=tensors).codec == "fp32"
    with pytest.raises(ValueError, match="dense value format"):
        GlobalAdapter(version=1, lora=LORA, tensors=tensors, codec="topk+int8")


def test_task_config_bytes_and_json() -> None:
    task = TaskConfig(
        task_id="smollm2-chat",
        model_sha256=SHA,
        lora=LoraSpec(8, 16, ("q_proj",), "frozen-a", a_seed=42),
        codec="delta+topk+int8",
        local_steps=20,
        batch_size=4,
        seq_len=256,
        lr=2e-4,
        max_rounds=None,
        global_version=3,
        extra={"dp": {"noise": 0.8}},
    )
    assert TaskConfig.from_bytes(task.to_bytes()) == task
    wire_json = json.loads(json.dumps(task.to_json_dict()))
    assert wire_json["protocol_version"] == 1 and wire_json["codec"] == "delta+topk:0.01+int8:64"
    assert TaskConfig.from_json_dict(wire_json) == task
    with pytest.raises(UnsupportedVersionError, match="expected protocol_version 1"):
        TaskConfig.from_json_dict({**wire_json, "protocol_version": 2})
    with pytest.raises(InvalidFieldError, match="local_steps"):
        TaskConfig.from_json_dict({**wire_json, "local_steps": 0})
    with pytest.raises(MissingFieldError, match="'lr'"):
        TaskConfig.from_json_dict({k: v for k, v in wire_json.items() if k != "lr"})


def test_error_message() -> None:
    err = ErrorMessage(code="stale_update", message="base version 1 < 3")
    assert ErrorMessage.from_bytes(err.to_bytes()) == err
    assert ErrorMessage.from_exception(UnknownCodecError("x")).code == "wire.unknown_codec"
    with pytest.raises(ValueError, match="`code`"):
        ErrorMessage(code="Bad Code", message="")


def test_decode_message_dispatches_on_kind() -> None:
    data = build_update("int8").to_bytes()
    assert isinstance(decode_message(data), AdapterUpdate)
    with pytest.raises(UnexpectedMessageError, match="expected a GLOBAL_ADAPTER message"):
        GlobalAdapter.from_bytes(data)


def test_lora_spec_validation() -> None:
    with pytest.raises(ValueError, match="`rank` should be an integer >= 1, got 0"):
        LoraSpec(0, 16, ("q_proj",))
    with pytest.raises(ValueError, match="`mode`"):
        LoraSpec(8, 16, ("q_proj",), mode="avg")
    with pytest.raises(ValueError, match="a_seed"):
        LoraSpec(8, 16, ("q_proj",), mode="frozen-a")
    with pytest.raises(ValueError, match="`alpha`"):
        LoraSpec(8, float("nan"), ("q_proj",))
    with pytest.raises(ValueError, match="`targets`"):
        LoraSpec(8, 16, ())


def test_mixed_ranks_are_checked_against_the_senders_rank() -> None:
    rank2 = LoraSpec(2, 4.0, ("q_proj", "down_proj"))
    upd = AdapterUpdate.build(
        client_id="c2",
        base_version=0,
        model_sha256=SHA,
        lora=rank2,
        tensors=lora_tensors(0, rank=2),
        num_examples=1,
        codec="int8",
    )
    assert AdapterUpdate.from_bytes(upd.to_bytes()).lora.rank == 2
    body = _body(upd.to_bytes())
    body["lora"]["rank"] = 4
    with pytest.raises(ShapeMismatchError, match=r"expected shape \(4, in\)"):
        AdapterUpdate.from_bytes(_repack(upd.to_bytes(), body))


# --- rejections of hostile or broken input -------------------------------------------------


def test_header_rejections() -> None:
    data = build_update("fp16").to_bytes()
    with pytest.raises(BadMagicError, match="expected magic b'FDLM'"):
        AdapterUpdate.from_bytes(b"XXXX" + data[4:])
    with pytest.raises(
        BadMagicError, match=r"expected at least an 8-byte header starting with b'FDLM'"
    ):
        AdapterUpdate.from_bytes(data[:5])
    with pytest.raises(UnsupportedVersionError, match="expected protocol version 1, got 2"):
        AdapterUpdate.from_bytes(data[:4] + b"\x00\x02" + data[6:])
    with pytest.raises(UnexpectedMessageError, match="got 9"):
        decode_message(data[:6] + b"\x09" + data[7:])
    with pytest.raises(MalformedMessageError, match="flags within 0x01"):
        decode_message(data[:7] + b"\x02" + data[8:])
    with pytest.raises(MalformedMessageError, match="not zlib data"):
        decode_message(data[:7] + b"\x01" + data[8:])
    with pytest.raises(MalformedMessageError, match="trailing"):
        decode_message(data + b"\x00")
    with pytest.raises(MalformedMessageError, match=r"body is not one valid msgpack object"):
        decode_message(data[:-3])
    with pytest.raises(MalformedMessageError, match="map"):
        decode_message(data[:8] + msgpack.packb([1, 2]))


def test_size_and_count_limits() -> None:
    data = build_update("fp32").to_bytes()
    with pytest.raises(LimitExceededError, match="max_bytes"):
        AdapterUpdate.from_bytes(data, DecodeLimits(max_bytes=len(data) - 1))
    with pytest.raises(LimitExceededError, match="max_tensors"):
        AdapterUpdate.from_bytes(data, DecodeLimits(max_tensors=3))
    with pytest.raises(LimitExceededError, match="max_elements"):
        AdapterUpdate.from_bytes(data, DecodeLimits(max_elements=500))
    with pytest.raises(LimitExceededError, match="max_total_elements"):
        AdapterUpdate.from_bytes(data, DecodeLimits(max_total_elements=2000))
    with pytest.raises(InvalidKeyError, match="max_key_len"):
        AdapterUpdate.from_bytes(data, DecodeLimits(max_key_len=10))
    with pytest.raises(ValueError, match="`max_bytes`"):
        DecodeLimits(max_bytes=0)


def test_sparse_tensor_cannot_claim_a_huge_shape() -> None:
    # nnz=1 with a giant declared shape would make the decoder allocate the dense tensor.
    data = build_update("topk:0.01+int8").to_bytes()
    body = _body(data)
    key = next(iter(body["tensors"]))
    body["tensors"][key]["shape"] = [1 << 20, 1 << 20]
    with pytest.raises(LimitExceededError, match="max_elements"):
        AdapterUpdate.from_bytes(_repack(data, body))


@pytest.mark.parametrize(
    "path, value, error, match",
    [
        (("codec",), "int9", UnknownCodecError, "int9"),
        (("codec",), "int4", CodecMismatchError, "expected encoding int4:64"),
        (("base_version",), -1, InvalidFieldError, "base_version"),
        (("num_examples",), True, InvalidFieldError, "expected an integer"),
        (("model_sha256",), "abc", InvalidFieldError, "model_sha256"),
        (("metrics", "loss"), float("nan"), InvalidMetricsError, "finite"),
        (("lora", "mode"), "avg", InvalidFieldError, "mode"),
        (("tensors", 0, "data"), b"\x00", ShapeMismatchError, "expected 384 bytes"),
        (("tensors", 0, "shape"), [4, 96, 1, 1, 1], InvalidFieldError, "at most 4"),
        (("tensors", 0, "values"), "fp64", UnknownCodecError, "expected one of"),
        (("tensors", 0, "data"), "text", InvalidFieldError, "expected binary"),
        (("client_id",), "a b", InvalidFieldError, "client_id"),
    ],
)
def test_field_rejections_name_what_was_expected(path, value, error, match) -> None:
    data = build_update("int8").to_bytes()
    body = _body(data)
    node = body
    for part in path[:-1]:
        node = node[list(node)[part]] if isinstance(part, int) else node[part]
    node[path[-1]] = value
    with pytest.raises(error, match=match):
        AdapterUpdate.from_bytes(_repack(data, body))


def test_missing_fields_and_bad_keys() -> None:
    data = build_update("int8").to_bytes()
    for name in ("client_id", "lora", "tensors", "codec"):
        body = _body(data)
        del body[name]
        with pytest.raises(MissingFieldError, match=repr(name)):
            AdapterUpdate.from_bytes(_repack(data, body))
    body = _body(data)
    body["tensors"]["bad key!"] = body["tensors"].popitem()[1]
    with pytest.raises(InvalidKeyError, match="charset|only"):
        AdapterUpdate.from_bytes(_repack(data, body))


def test_non_finite_payload_is_rejected() -> None:
    data = build_update("fp32").to_bytes()
    body = _body(data)
    t = next(iter(body["tensors"].values()))
    t["data"] = np.full(len(t["data"]) // 4, np.inf, "<f4").tobytes()
    with pytest.raises(NonFiniteError, match=r"tensor\.data: expected finite fp32 values"):
        AdapterUpdate.from_bytes(_repack(data, body))


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    data = build_update("int8").to_bytes()
    body = _body(data)
    body["future_field"] = {"x": 1}
    assert AdapterUpdate.from_bytes(_repack(data, body)) == AdapterUpdate.from_bytes(data)


def test_wire_imports_neither_torch_nor_aiohttp() -> None:
    code = (
        "import sys, edge_sdk.wire; "
        "bad=[m for m in ('torch','aiohttp') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_optional_fields_may_be_nil_or_absent() -> None:
    task = TaskConfig(
        task_id="t",
        model_sha256=SHA,
        lora=LORA,
        codec="int8",
        local_steps=1,
        batch_size=1,
        seq_len=8,
        lr=1e-3,
    )
    data = task.to_bytes()
    body = _body(data)
    body.update(max_rounds=None, global_version=None, extra=None)
    assert TaskConfig.from_bytes(_repack(data, body)) == task
    del body["extra"], body["global_version"]
    assert TaskConfig.from_bytes(_repack(data, body)) == task
    body["lr"] = None  # a required field may not be nil
    with pytest.raises(InvalidFieldError, match="lr"):
        TaskConfig.from_bytes(_repack(data, body))


def test_zlib_stage_is_lossless_and_smaller() -> None:
    plain = build_update("int4:128")
    packed = build_update("int4:128+zlib")
    assert packed.codec == "int4:128+zlib"
    data = packed.to_bytes()
    assert data[7] == 0x01  # FLAG_DEFLATE
    assert len(data) < len(plain.to_bytes())
    back = AdapterUpdate.from_bytes(data)
    for key, value in plain.dense_tensors().items():
        np.testing.assert_array_equal(back.dense_tensors()[key], value)


def test_zlib_body_is_bounded_and_checked() -> None:
    import zlib

    from edge_sdk.wire import DecodeLimits, LimitExceededError

    data = build_update("fp32+zlib").to_bytes()
    header = data[:8]
    # A zip bomb: 64 MiB of zeros compresses to ~64 KiB; the bound stops it at max_bytes.
    bomb = header + zlib.compress(b"\x00" * (64 << 20), 9)
    with pytest.raises(LimitExceededError, match="decompressed body exceeds max_bytes"):
        AdapterUpdate.from_bytes(bomb, DecodeLimits(max_bytes=1 << 20))
    with pytest.raises(MalformedMessageError, match="truncated or has trailing bytes"):
        AdapterUpdate.from_bytes(data[:-4])
