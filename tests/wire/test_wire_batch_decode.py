"""The batched decoder (`decode_many`, the inline-checked tensor fast path, batched scale
checks) gives exactly what decoding tensor by tensor gives, and the same errors, naming the
tensor at fault."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from edge_sdk.wire import AdapterUpdate, LoraSpec, WireError
from edge_sdk.wire.codecs import EncodedTensor, decode_many, encode_tensor

SHA = "ab" * 32


def _tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    # Whole blocks, a short last block, an odd count (a padding nibble), and a 1x1.
    shapes = [(8, 64), (64, 8), (8, 37), (3, 7), (1, 1), (16, 8)]
    return {
        f"model.layers.{i}.self_attn.q_proj.lora_{'A' if i % 2 else 'B'}": rng.normal(
            0, 0.05, s
        ).astype(np.float32)
        for i, s in enumerate(shapes)
    }


@pytest.mark.parametrize(
    "codec",
    ["int8", "int4", "nf4", "int4:16", "delta+int4+zlib", "delta+int8:32", "fp16", "topk:0.3+int8"],
)
def test_decode_many_is_bit_identical_to_one_by_one(codec: str) -> None:
    rng = np.random.default_rng(0)
    tensors = _tensors(rng)
    reference = {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in tensors.items()}
    encoded = {
        k: encode_tensor(v, codec, reference=reference[k], with_residual=False)[0]
        for k, v in tensors.items()
    }
    together = decode_many(encoded, reference)
    for key, t in encoded.items():
        alone = t.decode(reference[key] if t.delta else None, name=key)
        assert together[key].dtype == np.float32 and together[key].shape == alone.shape
        assert np.array_equal(together[key].view(np.uint32), alone.view(np.uint32)), key


def test_fast_path_builds_the_same_tensor_as_the_checked_path() -> None:
    rng = np.random.default_rng(1)
    for codec in ("int8", "int4", "nf4:16", "delta+int4"):
        t = encode_tensor(rng.normal(size=(5, 9)), codec, reference=np.zeros((5, 9)))[0]
        obj = msgpack.unpackb(msgpack.packb(t.to_obj(), use_bin_type=True), raw=False)
        fast = EncodedTensor.from_obj(obj, "t", defer_scales=True)
        assert fast == EncodedTensor.from_obj(obj, "t") == t


def _update_bytes(rng: np.random.Generator, codec: str = "int4") -> AdapterUpdate:
    from edge_sdk.models.naming import LORA_TARGETS

    tensors = {
        f"model.layers.0.self_attn.{p}.lora_{k}": rng.normal(
            0, 0.05, (8, 16) if k == "A" else (16, 8)
        ).astype(np.float32)
        for p in ("q_proj", "k_proj")
        for k in ("A", "B")
    }
    return AdapterUpdate.build(
        client_id="c",
        base_version=0,
        model_sha256=SHA,
        lora=LoraSpec(8, 16.0, LORA_TARGETS, "exact", 0),
        tensors=tensors,
        num_examples=3,
        codec=codec,
    )


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda t: t.update(scales=b"\x00\x7c" + t["scales"][2:]), "k_proj.lora_B].scales"),  # +inf
        (lambda t: t.update(scales=b"\x00\xbc" + t["scales"][2:]), "k_proj.lora_B].scales"),  # < 0
        (lambda t: t.update(data=t["data"][:-1]), "data"),
        (lambda t: t.update(shape=[16, True]), "shape"),
        (lambda t: t.update(block=0), "block"),
    ],
)
def test_a_hostile_tensor_among_many_is_refused_and_named(mutate, needle: str) -> None:
    update = _update_bytes(np.random.default_rng(2))
    obj = update.to_obj()
    mutate(obj["tensors"]["model.layers.0.self_attn.k_proj.lora_B"])
    from edge_sdk.wire import _envelope
    from edge_sdk.wire._envelope import MessageKind

    body = _envelope.pack(MessageKind.ADAPTER_UPDATE, obj)
    with pytest.raises(WireError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        AdapterUpdate.from_bytes(body)


@pytest.mark.parametrize("sdt", [["f16"], {"a": 1}, 16, None])
def test_a_type_confused_scale_dtype_is_a_wire_error(sdt) -> None:
    # Found by tests/wire/test_wire_fuzz.py: an unhashable `sdt` crashed the fast path with a
    # TypeError instead of taking the general path's WireError.
    update = _update_bytes(np.random.default_rng(4))
    obj = update.to_obj()
    obj["tensors"]["model.layers.0.self_attn.q_proj.lora_A"]["sdt"] = sdt
    from edge_sdk.wire import _envelope
    from edge_sdk.wire._envelope import MessageKind

    with pytest.raises(WireError, match=r"lora_A\]\.sdt: expected a string, got "):
        AdapterUpdate.from_bytes(_envelope.pack(MessageKind.ADAPTER_UPDATE, obj))
