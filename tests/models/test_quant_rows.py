"""The token embedding kept in its GGUF blocks (`QuantizedEmbedding`, issue 16 part 2): the same
values as the fp32 table it replaces, the same loss and LoRA gradients, a quarter of the memory.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import edge_sdk.models.transformer as tr
from edge_sdk.errors import InvalidModelError
from edge_sdk.models.quant_rows import QuantizedEmbedding
from edge_sdk.models.transformer import fused_linear_cross_entropy, output_logits
from tests.models.tiny_families import write_family_gguf

QTYPES = [
    gguf.GGMLQuantizationType.Q8_0,
    gguf.GGMLQuantizationType.Q4_0,
    gguf.GGMLQuantizationType.Q4_1,
]


def _table(qtype: gguf.GGMLQuantizationType, rows: int = 300, dim: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((rows, dim)).astype(np.float32)
    raw = gguf.quants.quantize(dense, qtype)  # (rows, row_bytes) uint8
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
    return QuantizedEmbedding(torch.from_numpy(raw), int(qtype), dim), ref


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_rows_equal_gguf_dequantization_bit_for_bit(qtype: gguf.GGMLQuantizationType) -> None:
    emb, ref = _table(qtype)
    ids = torch.tensor([[0, 5, 299], [17, 17, 3]])
    assert torch.equal(emb(ids), ref[ids])
    assert torch.equal(emb.row_range(10, 137), ref[10:137])
    assert torch.equal(emb.dequantize(), ref)
    assert emb.logical_numel() == ref.numel()
    assert emb.weight.numel() < ref.numel() * 4 // 3  # bytes: at most 8.5 bits a weight


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fused_loss_through_blocks_equals_dense(
    monkeypatch: pytest.MonkeyPatch, softcap: float | None
) -> None:
    emb, dense = _table(gguf.GGMLQuantizationType.Q8_0, rows=300, dim=64, seed=1)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(29, 64, generator=g, requires_grad=True)
    t = torch.randint(0, 300, (29,), generator=g)
    t[::7] = -100
    logits = h @ dense.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    ref = torch.nn.functional.cross_entropy(logits, t, ignore_index=-100, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, h)
    # Chunks of 2 vocabulary rows' worth of logits: 150 chunks and a short last one.
    monkeypatch.setattr(tr, "_CE_CHUNK_ELEMENTS", 29 * 7)
    for weight in (emb, dense):
        loss = fused_linear_cross_entropy(h, weight, t, softcap)
        (grad,) = torch.autograd.grad(loss, h)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(output_logits(h, emb, softcap), logits, rtol=1e-5, atol=1e-5)


def test_nf4_model_keeps_q8_embedding_and_computes_the_same(tmp_path: Path) -> None:
    from edge_sdk.models.loader import load_model
    from edge_sdk.training.lora import LoraConfig, lora_parameters

    path = write_family_gguf(
        tmp_path / "g.gguf", "gemma3", embed_quant=gguf.GGMLQuantizationType.Q8_0
    )
    torch.manual_seed(0)
    model = load_model(path, precision="nf4", lora=LoraConfig(rank=4, alpha=8.0))
    emb = model.model["embed_tokens"]
    assert isinstance(emb, QuantizedEmbedding)
    for p in lora_parameters(model):  # a non-zero B so that every adapter gets a gradient
        torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3)
    )

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = model(ids, ids)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]

    q_loss, q_grads = loss_and_grads()
    q_logits = model(ids).detach()
    # The same model with the fp32 table the loader used to build.
    model.model["embed_tokens"] = torch.nn.Embedding.from_pretrained(emb.dequantize(), freeze=True)
    d_loss, d_grads = loss_and_grads()
    torch.testing.assert_close(q_loss, d_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(q_grads, d_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q_logits, model(ids).detach(), rtol=1e-6, atol=1e-5)


def test_fp32_precision_keeps_a_dense_embedding(tmp_path: Path) -> None:
    from edge_sdk.models.loader import load_model

    path = write_family_gguf(
        tmp_path / "l.gguf", "llama", embed_quant=gguf.GGMLQuantizationType.Q8_0
    )
    model = load_model(path, precision="fp32")
    assert isinstance(model.model["embed_tokens"], torch.nn.Embedding)


def test_nan_in_quantized_embedding_is_refused(tmp_path: Path) -> None:
    from edge_sdk.models.loader import load_model

    path = write_family_gguf(
        tmp_path / "l.gguf", "llama", embed_quant=gguf.GGMLQuantizationType.Q8_0
    )
    from edge_sdk.models.gguf_meta import read_gguf

    f = read_gguf(path)
    t = next(t for t in f.tensors if t.name == "token_embd.weight")
    offset = t.data_offset + 5 * 34  # row 0, block 5: its fp16 scale (absolute offset)
    del f, t
    data = bytearray(path.read_bytes())
    data[offset : offset + 2] = np.float16(np.nan).tobytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(InvalidModelError, match="token_embd.weight.*NaN"):
        load_model(bad, precision="nf4")
