"""Packed examples are isolated (issue 16, part 1): an example packed with others gives the same
logits, loss and adapter gradients as the same example alone, and the logits llama.cpp gives it
alone. Tiny random models of llama and gemma3; Gemma's sliding window (5) is crossed by every
example here but the first."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_sdk.models.loader import load_model
from edge_sdk.models.transformer import packed_spans
from edge_sdk.training.data import IGNORE_INDEX, Example, pack
from edge_sdk.training.lora import LoraConfig, lora_parameters
from tests.models.tiny_families import FamilySpec, write_family_gguf

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing"
)

LENGTHS = (4, 11, 9, 7, 13)
"""Token counts of the packed examples; seq 24 packs them as [4, 11, 9], [7, 13, pad x4]."""
SEQ_LEN = 24


def _examples(seed: int = 3) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [
        Example(
            np.concatenate([[1], rng.integers(5, 290, size=n - 1)]).astype(np.int64),
            np.ones(n, bool),
            f"ex{i}",
        )
        for i, n in enumerate(LENGTHS)
    ]


def _model(path: Path, ckpt: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = load_model(path, precision="fp32", lora=LoraConfig(rank=4), gradient_checkpointing=ckpt)
    for p in lora_parameters(model):  # non-zero B so that A gets a gradient too
        torch.nn.init.normal_(p, std=0.05)
    model.train()
    return model


def _loss_and_grads(
    model: torch.nn.Module, ids: np.ndarray, labels: np.ndarray, positions: np.ndarray | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for p in lora_parameters(model):
        p.grad = None
    pos = None if positions is None else torch.from_numpy(positions)
    loss = model(torch.from_numpy(ids), torch.from_numpy(labels), reduction="sum", position_ids=pos)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch = request.param
    return write_family_gguf(
        tmp_path_factory.mktemp(arch) / f"{arch}.gguf",
        arch,
        spec=FamilySpec(n_layer=3, sliding_window=5),
    )


def test_packer_positions_give_the_examples() -> None:
    packed = pack(_examples(), SEQ_LEN, pad_id=2)
    spans = packed_spans(torch.from_numpy(packed.positions))
    # Padding joins the last example's span: it is never scored and only later padding reads it.
    assert spans == (((0, 4), (4, 15), (15, 24)), ((0, 7), (7, 24)))
    assert packed_spans(torch.arange(SEQ_LEN).repeat(2, 1)) is None


def test_packed_logits_equal_each_example_alone(family: Path) -> None:
    model = _model(family).eval()
    exs = _examples()
    packed = pack(exs, SEQ_LEN, pad_id=2)
    spans = packed_spans(torch.from_numpy(packed.positions))
    assert spans is not None
    with torch.no_grad():
        together = model(
            torch.from_numpy(packed.ids), position_ids=torch.from_numpy(packed.positions)
        )
        contaminated = model(torch.from_numpy(packed.ids))
        k = 0
        for row, row_spans in enumerate(spans):
            for s, e in row_spans:
                n = len(exs[k].input_ids)
                alone = model(torch.from_numpy(exs[k].input_ids)[None])[0]  # (n, V)
                torch.testing.assert_close(together[row, s : s + n], alone, rtol=1e-5, atol=1e-5)
                if s > 0:  # without positions, a later example sees the ones before it
                    assert (contaminated[row, s : s + n] - alone).abs().max() > 1e-3
                k += 1
    assert k == len(exs)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_packed_loss_and_grads_equal_example_alone(family: Path, ckpt: bool) -> None:
    """Example 1 (11 tokens, 2nd in row 0) is scored alone; everything else is packed around it.

    The unscored neighbours then contribute nothing, so the loss and every LoRA gradient of the
    packed batch must be those of example 1 on its own (batch of one, no padding).
    """
    model = _model(family, ckpt)
    exs = _examples()
    packed = pack(exs, SEQ_LEN, pad_id=2)
    target = 1
    s, n = 4, len(exs[target].input_ids)
    assert packed.ids[0, s : s + n].tolist() == exs[target].input_ids.tolist()
    labels = np.full_like(packed.labels, IGNORE_INDEX)
    labels[0, s : s + n] = packed.labels[0, s : s + n]
    assert labels[0, s] == IGNORE_INDEX and (labels != IGNORE_INDEX).sum() == n - 1

    alone_ids = exs[target].input_ids[None]
    alone_labels = alone_ids.copy()
    alone_labels[0, 0] = IGNORE_INDEX
    ref_loss, ref_grads = _loss_and_grads(model, alone_ids, alone_labels, None)
    loss, grads = _loss_and_grads(model, packed.ids, labels, packed.positions)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        # fp32 summation order differs (other GEMM shapes): 1e-4 of the tensor's largest entry.
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))
    # The same batch without positions is what training did before: not the example alone.
    bad_loss, _ = _loss_and_grads(model, packed.ids, labels, None)
    assert abs(float(bad_loss) - float(ref_loss)) > 1e-3


def test_whole_packed_batch_loss_is_the_sum_of_its_examples(family: Path) -> None:
    """Every example scored at once: the batch's summed loss is the sum of the examples' alone."""
    model = _model(family).eval()
    exs = _examples()
    packed = pack(exs, SEQ_LEN, pad_id=2)
    with torch.no_grad():
        total = model(
            torch.from_numpy(packed.ids),
            torch.from_numpy(packed.labels),
            reduction="sum",
            position_ids=torch.from_numpy(packed.positions),
        )
        parts = 0.0
        for ex in exs:
            labels = ex.input_ids.copy()
            labels[0] = IGNORE_INDEX
            parts += float(
                model(
                    torch.from_numpy(ex.input_ids)[None],
                    torch.from_numpy(labels)[None],
                    reduction="sum",
                )
            )
    assert float(total) == pytest.approx(parts, rel=1e-5)


def test_position_ids_shape_is_checked(family: Path) -> None:
    model = _model(family)
    with pytest.raises(ValueError, match="position_ids shape"):
        model(torch.zeros(1, 6, dtype=torch.long), position_ids=torch.zeros(1, 5, dtype=torch.long))


@needs_llama_cpp
def test_packed_example_matches_llama_cpp_alone(family: Path) -> None:
    """The packed example's logits are llama.cpp's logits for that example evaluated alone."""
    from llama_cpp import Llama

    exs = _examples()
    packed = pack(exs, SEQ_LEN, pad_id=2)
    model = load_model(family, precision="fp32")
    with torch.no_grad():
        together = model(
            torch.from_numpy(packed.ids), position_ids=torch.from_numpy(packed.positions)
        )
    llm = Llama(str(family), logits_all=True, n_ctx=64, n_threads=1, verbose=False)
    try:
        for (row, s), ex in zip([(0, 0), (0, 4), (0, 15), (1, 0), (1, 7)], exs, strict=True):
            ids = ex.input_ids.tolist()
            llm.reset()
            llm.eval(ids)
            ref = np.array(llm.scores[: len(ids)], dtype=np.float32)
            ours = together[row, s : s + len(ids)].numpy()
            # llama.cpp keeps K/V in f16: a few 1e-3 on logits of size ~5 (as in test_transformer).
            assert np.abs(ref - ours).max() < 0.03, (row, s)
            assert (ref.argmax(-1) == ours.argmax(-1)).all()
    finally:
        llm.close()
