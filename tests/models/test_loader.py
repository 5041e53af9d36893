"""GGUF → torch loading on tiny generated models: config, shapes, precisions, errors,
permutation."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from edge_sdk.errors import UnsupportedArchitectureError
from edge_sdk.models.config import SUPPORTED_ARCHS, ModelConfig
from edge_sdk.models.loader import (
    dequantize_tensor,
    load_model,
    read_config,
    write_f32_copy,
)
from edge_sdk.models.qk_order import permute_qk, unpermute_qk
from tests.models.tiny_families import FamilySpec, write_family_gguf

ARCHS = ("llama", "gemma3", "qwen2", "qwen3")


@pytest.fixture(scope="module")
def family_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("families")
    return {arch: write_family_gguf(d / f"{arch}.gguf", arch) for arch in ARCHS}


def _ids(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(5, 290, size=(2, n)))


@pytest.mark.parametrize("arch", ARCHS)
def test_config_from_gguf(family_paths: dict[str, Path], arch: str) -> None:
    cfg = read_config(family_paths[arch])
    spec = FamilySpec()
    assert (cfg.arch, cfg.n_layer, cfg.n_head, cfg.n_kv_head) == (
        arch,
        spec.n_layer,
        spec.n_head,
        spec.n_kv_head,
    )
    assert (cfg.head_dim, cfg.d_model, cfg.d_ff) == (spec.head_dim, spec.d_model, spec.d_ff)
    assert cfg.vocab_size > 256
    assert cfg.tie_embeddings == (arch == "gemma3")
    assert cfg.target_shapes()["q_proj"] == (spec.n_head * spec.head_dim, spec.d_model)
    assert cfg.target_shapes()["down_proj"] == (spec.d_model, spec.d_ff)
    if arch == "gemma3":
        assert cfg.sliding_window == spec.sliding_window
        # llama.cpp's pattern: every 6th layer is global, so all 3 tiny layers are local.
        assert cfg.local_layers == (True, True, True)
        assert cfg.embed_scale == pytest.approx(spec.d_model**0.5)
        assert cfg.activation == "gelu_tanh" and cfg.qk_norm and cfg.sandwich_norm
        assert cfg.rope_base_local == 10000.0 and cfg.rope_base == 1_000_000.0
    assert cfg.qkv_bias == (arch == "qwen2")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "nf4"])
def test_load_shapes_and_precision(
    family_paths: dict[str, Path], arch: str, precision: str
) -> None:
    model = load_model(family_paths[arch], precision=precision)
    ids = _ids()
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, 16, model.config.vocab_size)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert not any(p.requires_grad for p in model.parameters())
    q = model.model["layers"][0].self_attn.q_proj
    if precision == "nf4":
        from edge_sdk.models.nf4 import NF4Linear

        assert isinstance(q, NF4Linear) and q.weight.dtype == torch.uint8 and q.blocksize == 64
    else:
        assert q.weight.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    if precision != "fp32":
        ref = load_model(family_paths[arch], precision="fp32")
        with torch.no_grad():
            ref_logits = ref(ids)
        # Lower precision changes the logits a little, never the picture (4-bit random weights
        # through 3 blocks measured 0.979; bf16 0.9999).
        corr = np.corrcoef(ref_logits.flatten().numpy(), logits.flatten().numpy())[0, 1]
        assert corr > (0.95 if precision == "nf4" else 0.999)


def test_forward_loss_matches_cross_entropy(family_paths: dict[str, Path]) -> None:
    model = load_model(family_paths["llama"], precision="fp32")
    ids = _ids(12)
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        logits = model(ids)
        loss = model(ids, labels)
        total = model(ids, labels, reduction="sum")
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    n_scored = int((labels[:, 1:] != -100).sum())
    assert total.item() == pytest.approx(ref.item() * n_scored, rel=1e-5)
    with torch.no_grad():
        assert model(ids, torch.full_like(ids, -100)).item() == 0.0  # nothing scored
    with pytest.raises(ValueError, match="labels shape"):
        model(ids, labels[:, :-1])


def test_quantized_gguf_dequantizes_like_f32_copy(tmp_path: Path) -> None:
    q8 = write_family_gguf(tmp_path / "q8.gguf", "llama", quant=gguf.GGMLQuantizationType.Q8_0)
    copy = write_f32_copy(q8, tmp_path / "q8.f32.gguf")
    src, dst = gguf.GGUFReader(q8), gguf.GGUFReader(copy)
    assert [t.name for t in src.tensors] == [t.name for t in dst.tensors]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in dst.tensors)
    for a, b in zip(src.tensors, dst.tensors):
        np.testing.assert_array_equal(dequantize_tensor(a), dequantize_tensor(b))
    # Every metadata key survives, tokenizer arrays included; only the file type changes.
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.file_type":
            continue
        assert dst.fields[key].contents() == field.contents(), key
    assert dst.fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    with torch.no_grad():
        a = load_model(q8, precision="fp32")(_ids())
        b = load_model(copy, precision="fp32")(_ids())
    torch.testing.assert_close(a, b)


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="'mamba'") as info:
        load_model(path)
    for arch in SUPPORTED_ARCHS:
        assert arch in str(info.value)


def test_bad_precision_and_missing_file(family_paths: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`precision`"):
        load_model(family_paths["llama"], precision="int3")
    from edge_sdk.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match=r"no such GGUF file: .*nope\.gguf"):
        load_model(tmp_path / "nope.gguf")


def test_permute_matches_llama_cpp_convention() -> None:
    # convert_hf_to_gguf.py: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)
    n_head, head_dim, cols = 3, 8, 5
    hf = np.arange(n_head * head_dim * cols, dtype=np.float32).reshape(n_head * head_dim, cols)
    gg = permute_qk(hf, n_head)
    # Head 0 in llama.cpp order pairs HF rows (0, 4), (1, 5), ...: rotate-half halves interleaved.
    assert [int(r) for r in gg[:8, 0] // cols] == [0, 4, 1, 5, 2, 6, 3, 7]
    np.testing.assert_array_equal(unpermute_qk(gg, n_head), hf)
    t = torch.from_numpy(hf)
    torch.testing.assert_close(permute_qk(t, n_head), torch.from_numpy(gg))
    bias = np.arange(n_head * head_dim, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(bias, n_head), n_head), bias)
    with pytest.raises(ValueError, match="heads"):
        permute_qk(hf[:7], n_head)


def test_model_config_validation() -> None:
    base = {
        "arch": "llama",
        "n_layer": 1,
        "n_head": 4,
        "n_kv_head": 2,
        "head_dim": 8,
        "d_model": 32,
        "d_ff": 64,
        "vocab_size": 10,
    }
    ModelConfig(**base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`n_head`"):
        ModelConfig(**{**base, "n_kv_head": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`d_ff` should be a positive integer, got 0"):
        ModelConfig(**{**base, "d_ff": 0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`activation`"):
        ModelConfig(**{**base, "activation": "relu"})  # type: ignore[arg-type]
    with pytest.raises(UnsupportedArchitectureError, match="llama, gemma3"):
        ModelConfig(**{**base, "arch": "gpt2"})  # type: ignore[arg-type]
