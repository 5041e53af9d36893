"""GGUF LoRA adapters: layout llama.cpp expects, round trips, Q/K permutation, validation."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_sdk.adapters.gguf_lora import (
    BaseModelInfo,
    check_adapter_compatible,
    read_gguf_lora,
    write_gguf_lora,
)
from edge_sdk.errors import AdapterMismatchError, InvalidAdapterError
from edge_sdk.models.qk_order import permute_qk, unpermute_qk
from tests.adapters.base_stub import N_HEAD, N_KV, TARGET_SHAPES, random_adapter, write_base_stub

Q_B = "model.layers.0.self_attn.q_proj.lora_B"
K_B = "model.layers.0.self_attn.k_proj.lora_B"


def test_permute_matches_rope_interleaving() -> None:
    # One head of 8 rows: HF halves [x0..x3 | y0..y3] become llama.cpp pairs [x0 y0 x1 y1 ...].
    w = np.arange(8, dtype=np.float32)[:, None]
    assert permute_qk(w, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    rng = np.random.default_rng(0)
    b = rng.standard_normal((32, 4))
    np.testing.assert_array_equal(unpermute_qk(permute_qk(b, 4), 4), b)
    # Permuting B's rows permutes the delta B @ A the same way, which is why A is left alone.
    a = rng.standard_normal((4, 16))
    np.testing.assert_allclose(permute_qk(b, 4) @ a, permute_qk(b @ a, 4))
    with pytest.raises(ValueError, match="heads"):
        permute_qk(b, 3)


def test_written_file_has_llama_cpp_layout(tmp_path: Path, llama_base: Path) -> None:
    tensors = random_adapter(rank=4)
    out = write_gguf_lora(tmp_path / "a.gguf", tensors, alpha=8.0, base=llama_base)
    reader = gguf.GGUFReader(out)
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    assert reader.get_field("adapter.lora.alpha").contents() == pytest.approx(8.0)
    assert reader.get_field("general.architecture").contents() == "llama"
    by_name = {t.name: t for t in reader.tensors}
    assert len(by_name) == 2 * 2 * len(TARGET_SHAPES)
    # ggml ne order: lora_a [in, r], lora_b [r, out].
    q_a, q_b = by_name["blk.0.attn_q.weight.lora_a"], by_name["blk.0.attn_q.weight.lora_b"]
    assert q_a.shape.tolist() == [32, 4] and q_b.shape.tolist() == [4, 32]
    assert by_name["blk.1.ffn_down.weight.lora_a"].shape.tolist() == [48, 4]
    assert by_name["blk.1.ffn_down.weight.lora_b"].shape.tolist() == [4, 32]
    # Q/K lora_B rows are permuted for llama, lora_A and V are not.
    np.testing.assert_array_equal(np.asarray(q_b.data), permute_qk(tensors[Q_B], N_HEAD))
    k_b = np.asarray(by_name["blk.0.attn_k.weight.lora_b"].data)
    np.testing.assert_array_equal(k_b, permute_qk(tensors[K_B], N_KV))
    np.testing.assert_array_equal(
        np.asarray(q_a.data), tensors["model.layers.0.self_attn.q_proj.lora_A"]
    )
    v_b = np.asarray(by_name["blk.0.attn_v.weight.lora_b"].data)
    np.testing.assert_array_equal(v_b, tensors["model.layers.0.self_attn.v_proj.lora_B"])
    assert not list(tmp_path.glob("*.tmp")), "temporary file left behind"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_round_trip_restores_hf_order(tmp_path: Path, arch: str) -> None:
    base = write_base_stub(tmp_path / f"{arch}.gguf", arch)
    tensors = random_adapter(rank=3, targets=("q_proj", "k_proj", "up_proj"))
    path = write_gguf_lora(tmp_path / "a.gguf", tensors, alpha=6.0, base=base)
    lora = read_gguf_lora(path)
    assert (lora.arch, lora.rank, lora.alpha, lora.scale) == (arch, 3, 6.0, 2.0)
    assert lora.targets == ("q_proj", "k_proj", "up_proj")
    assert set(lora.tensors) == set(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(lora.tensors[key], value)
    raw = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    permuted = not np.array_equal(raw["blk.0.attn_q.weight.lora_b"], tensors[Q_B])
    assert permuted == (arch == "llama")
    assert lora.metadata["general.base_model.0.name"] == "tiny-stub"


def test_f16_and_base_info_without_file(tmp_path: Path) -> None:
    info = BaseModelInfo(arch="llama", n_head=N_HEAD, n_kv_head=N_KV, name="x", sha256="ab" * 32)
    tensors = random_adapter(rank=2, n_layer=1)
    path = write_gguf_lora(tmp_path / "a.gguf", tensors, alpha=2.0, base=info, dtype="f16")
    types = {t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types == {gguf.GGMLQuantizationType.F16}
    lora = read_gguf_lora(path)
    assert lora.metadata["fedlm.base_model.sha256"] == "ab" * 32
    for key, value in tensors.items():
        np.testing.assert_allclose(lora.tensors[key], value, rtol=1e-3, atol=1e-3)


def test_write_rejects_bad_input(tmp_path: Path, llama_base: Path) -> None:
    tensors = random_adapter(rank=2)
    partial = {k: v for k, v in tensors.items() if k != Q_B}
    with pytest.raises(ValueError, match="q_proj: lora_B is missing"):
        write_gguf_lora(tmp_path / "a.gguf", partial, alpha=2.0, base=llama_base)
    bad_rank = dict(tensors, **{Q_B: np.ones((32, 3), np.float32)})
    with pytest.raises(ValueError, match="rank"):
        write_gguf_lora(tmp_path / "a.gguf", bad_rank, alpha=2.0, base=llama_base)
    too_deep = random_adapter(rank=2, n_layer=3)
    with pytest.raises(AdapterMismatchError, match="blk.2.attn_q.weight"):
        write_gguf_lora(tmp_path / "a.gguf", too_deep, alpha=2.0, base=llama_base)
    with pytest.raises(ValueError, match="alpha"):
        write_gguf_lora(tmp_path / "a.gguf", tensors, alpha=0.0, base=llama_base)
    nan = dict(tensors, **{Q_B: np.full((32, 2), np.nan, np.float32)})
    with pytest.raises(ValueError, match="NaN"):
        write_gguf_lora(tmp_path / "a.gguf", nan, alpha=2.0, base=llama_base)
    assert not (tmp_path / "a.gguf").exists()


def test_check_accepts_matching_adapter(tmp_path: Path, llama_base: Path) -> None:
    path = write_gguf_lora(tmp_path / "a.gguf", random_adapter(), alpha=8.0, base=llama_base)
    check_adapter_compatible(path, llama_base)
    check_adapter_compatible(path, BaseModelInfo.from_gguf(llama_base))


def test_check_rejects_other_architecture(
    tmp_path: Path, llama_base: Path, gemma_base: Path
) -> None:
    path = write_gguf_lora(tmp_path / "a.gguf", random_adapter(), alpha=8.0, base=gemma_base)
    with pytest.raises(AdapterMismatchError, match="'gemma3'.*'llama'"):
        check_adapter_compatible(path, llama_base)


def test_check_rejects_missing_tensor_and_shapes(tmp_path: Path, llama_base: Path) -> None:
    deep_base = write_base_stub(tmp_path / "deep.gguf", n_layer=3)
    path = write_gguf_lora(
        tmp_path / "a.gguf", random_adapter(n_layer=3), alpha=8.0, base=deep_base
    )
    with pytest.raises(
        AdapterMismatchError, match=r"tensor 'blk\.2\.\w+\.weight' does not exist in base model"
    ):
        check_adapter_compatible(path, llama_base)

    # Same names, other width: an adapter for a model with d_model 64.
    wide = BaseModelInfo(arch="llama", n_head=N_HEAD, n_kv_head=N_KV)
    rng = np.random.default_rng(0)
    tensors = {
        "model.layers.0.mlp.up_proj.lora_A": rng.standard_normal((4, 64)).astype(np.float32),
        "model.layers.0.mlp.up_proj.lora_B": rng.standard_normal((48, 4)).astype(np.float32),
    }
    wide_path = write_gguf_lora(tmp_path / "wide.gguf", tensors, alpha=8.0, base=wide)
    with pytest.raises(AdapterMismatchError) as info:
        check_adapter_compatible(wide_path, llama_base)
    msg = str(info.value)
    assert "wide.gguf" in msg and "blk.0.ffn_up.weight" in msg
    assert "(48, 64)" in msg and "(48, 32)" in msg


def test_check_rejects_invalid_files(tmp_path: Path, llama_base: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(InvalidAdapterError, match="not a GGUF"):
        check_adapter_compatible(junk, llama_base)
    with pytest.raises(InvalidAdapterError, match="general.type is 'model', expected 'adapter'"):
        check_adapter_compatible(llama_base, llama_base)
    with pytest.raises(InvalidAdapterError, match="cannot read"):
        check_adapter_compatible(tmp_path / "missing.gguf", llama_base)

    good = write_gguf_lora(tmp_path / "a.gguf", random_adapter(), alpha=8.0, base=llama_base)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(InvalidAdapterError, match="truncated"):  # data cut short
        check_adapter_compatible(truncated, llama_base)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(good.read_bytes()[:200])
    with pytest.raises(InvalidAdapterError, match=r"header.gguf: truncated .* 200-byte file"):
        check_adapter_compatible(header_only, llama_base)


def test_check_rejects_non_lora_adapter_and_nan(tmp_path: Path, llama_base: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "cvec.gguf", "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string("adapter.type", "control_vector")
    w.add_tensor("direction.1", np.zeros(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InvalidAdapterError, match="adapter.type is 'control_vector'"):
        check_adapter_compatible(tmp_path / "cvec.gguf", llama_base)

    path = write_gguf_lora(tmp_path / "a.gguf", random_adapter(), alpha=8.0, base=llama_base)
    raw = bytearray(path.read_bytes())
    raw[-4:] = np.array([np.nan], np.float32).tobytes()  # last element of the last tensor
    (tmp_path / "nan.gguf").write_bytes(bytes(raw))
    with pytest.raises(InvalidAdapterError, match="NaN"):
        check_adapter_compatible(tmp_path / "nan.gguf", llama_base)
    with pytest.raises(InvalidAdapterError, match="NaN"):
        read_gguf_lora(tmp_path / "nan.gguf")
