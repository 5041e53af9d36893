"""The exported GGUF LoRA changes llama.cpp's logits the way the same adapter changes torch's.

On the F32 copy of SmolLM2 (so that both engines compute the base in plain fp32), for a fixed
text: delta = logits(with adapter) - logits(without), per position, in each engine. Their mean
cosine similarity must be >= 0.95 for the whole adapter and for its q/k part alone: a wrong
Q/K permutation hides behind the MLP's effect in whole-adapter figures (here it scores ~0.1 on
q/k alone, which the last assertion checks, so the test can tell).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.adapters.gguf_lora import write_gguf_lora
from edge_sdk.models.qk_order import unpermute_qk

llama_cpp = pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")

TEXT = (
    "Federated learning trains a shared model across many devices that each keep their own data. "
    "Instead of sending raw examples to a server, every device computes an update on its local "
    "data and sends only that update. The server combines the updates into a better global model "
    "and sends it back, and the process repeats round after round until the model is good enough."
)
RANK, ALPHA = 8, 16.0
pytestmark = pytest.mark.slow


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over positions of cos(a[t], b[t]); positions where `a` does not move are skipped
    (at position 0 attention sees one token, so q/k changes cannot act there)."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    ok = na > 1e-6 * na.max()
    return float(np.mean((a * b).sum(-1)[ok] / (na[ok] * np.maximum(nb[ok], 1e-30))))


class _Engines:
    """Torch fp32 model and llama.cpp on the same F32 GGUF and tokens."""

    def __init__(self, f32: Path) -> None:
        from edge_sdk.models.loader import load_model
        from edge_sdk.training.lora import LoraConfig

        self.path = f32
        self.model = load_model(f32, precision="fp32", lora=LoraConfig(rank=RANK, alpha=ALPHA))
        self.model.eval()
        self.llm = llama_cpp.Llama(model_path=str(f32), n_ctx=256, logits_all=True, verbose=False)
        self.tokens = self.llm.tokenize(TEXT.encode(), add_bos=True)

    def torch_logits(self, adapter: dict[str, np.ndarray]) -> np.ndarray:
        from edge_sdk.training.lora import load_lora_state_dict

        load_lora_state_dict(self.model, adapter)
        with torch.no_grad():
            return self.model(torch.tensor([self.tokens]))[0].double().numpy()  # (T, V)

    def cpp_logits(self, adapter_path: Path | None = None) -> np.ndarray:
        handle = None
        if adapter_path is not None:
            handle = llama_cpp.llama_adapter_lora_init(self.llm.model, str(adapter_path).encode())
            assert handle, f"llama.cpp refused {adapter_path}"
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
            assert (
                llama_cpp.llama_set_adapters_lora(self.llm.ctx, arr, 1, (ctypes.c_float * 1)(1.0))
                == 0
            )
        try:
            self.llm.reset()
            self.llm.eval(self.tokens)
            return np.array(self.llm.scores[: len(self.tokens)], dtype=np.float64)  # (T, V)
        finally:
            if handle is not None:
                llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
                llama_cpp.llama_adapter_lora_free(handle)


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> _Engines:
    from edge_sdk.models.loader import write_f32_copy

    return _Engines(
        write_f32_copy(smollm2_path, tmp_path_factory.mktemp("f32") / "smollm2.f32.gguf")
    )


def _random_adapter(model: object, seed: int = 0) -> dict[str, np.ndarray]:
    """A and B both non-zero, at a trained adapter's scale (logits move by a few percent)."""
    from edge_sdk.training.lora import lora_modules

    rng = np.random.default_rng(seed)
    out = {}
    for path, m in lora_modules(model):
        out[f"{path}.lora_A"] = (
            rng.uniform(-1, 1, (RANK, m.in_features)) / np.sqrt(m.in_features)
        ).astype(np.float32)
        out[f"{path}.lora_B"] = (rng.standard_normal((m.out_features, RANK)) * 0.02).astype(
            np.float32
        )
    return out


def test_adapter_effect_matches_between_torch_and_llama_cpp(
    tmp_path: Path, engines: _Engines
) -> None:
    assert len(engines.tokens) >= 64
    adapter = _random_adapter(engines.model)
    zero_b = {k: v if k.endswith("lora_A") else np.zeros_like(v) for k, v in adapter.items()}
    torch_base, cpp_base = engines.torch_logits(zero_b), engines.cpp_logits()
    # Sanity: the two engines agree on the base before we compare adapter effects.
    assert (torch_base.argmax(-1) == cpp_base.argmax(-1)).mean() >= 0.99

    def is_qk(key: str) -> bool:
        return ".q_proj." in key or ".k_proj." in key

    figures = {}
    for name, keep in (("all", lambda k: True), ("qk", is_qk)):
        part = {k: v for k, v in adapter.items() if keep(k)}
        in_torch = {
            k: v if keep(k) or k.endswith("lora_A") else np.zeros_like(v)
            for k, v in adapter.items()
        }
        path = write_gguf_lora(tmp_path / f"{name}.gguf", part, alpha=ALPHA, base=engines.path)
        d_torch = engines.torch_logits(in_torch) - torch_base
        d_cpp = engines.cpp_logits(path) - cpp_base
        assert np.linalg.norm(d_torch) > 1e-3 * np.linalg.norm(torch_base)  # the adapter does act
        figures[name] = _mean_cosine(d_torch, d_cpp)
        figures[name + "_norm_ratio"] = float(np.linalg.norm(d_cpp) / np.linalg.norm(d_torch))
    assert figures["all"] >= 0.95, figures
    assert figures["qk"] >= 0.95, figures
    assert 0.8 < figures["all_norm_ratio"] < 1.25, figures  # alpha/rank scaling matches too

    # Control: the same q/k adapter exported without the permutation scores far lower.
    qk = {k: v for k, v in adapter.items() if is_qk(k)}
    cfg = engines.model.config
    unpermuted = {
        k: unpermute_qk(v, cfg.n_head if ".q_proj." in k else cfg.n_kv_head)
        if k.endswith("lora_B")
        else v
        for k, v in qk.items()
    }
    wrong = write_gguf_lora(tmp_path / "wrong.gguf", unpermuted, alpha=ALPHA, base=engines.path)
    d_wrong = engines.cpp_logits(wrong) - cpp_base
    in_torch = {
        k: v if is_qk(k) or k.endswith("lora_A") else np.zeros_like(v) for k, v in adapter.items()
    }
    assert _mean_cosine(engines.torch_logits(in_torch) - torch_base, d_wrong) < 0.5
