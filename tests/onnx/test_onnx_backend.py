"""ONNX Runtime backend: export parity, KV-cache decode, adapters and hot-swap on tiny models.

Every model here is generated (tests/models/tiny_families.py), exported with the real genai
model builder at fp32 and compared with our own torch forward; nothing is downloaded. The
whole module is skipped, with the reason, when the `onnx` extra is not installed, and fails
instead under FEDLM_REQUIRE_ONNX=1 (`make test`; tests/onnx/conftest.py).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_sdk.adapters.gguf_lora import write_gguf_lora
from edge_sdk.adapters.peft import save_peft
from edge_sdk.errors import (
    AdapterMismatchError,
    ModelNotFoundError,
    RuntimeBusyError,
    UnsupportedArchitectureError,
)
from edge_sdk.models.loader import load_model
from edge_sdk.models.naming import LORA_TARGETS, hf_module
from tests.models.tiny_families import FamilySpec, write_family_gguf

TOL = 1e-4
# 16 tokens: longer than the tiny Gemma 3's sliding window (5), so local layers must mask.
TOKENS = [1, 5, 270, 280, 290, 10, 100, 200, 3, 4, 150, 160, 33, 44, 55, 66]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """{arch: (gguf, fp32 export folder)} for llama and gemma3, built once per module."""
    from edge_sdk.onnx.export import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for arch in ("llama", "gemma3"):
        gguf = write_family_gguf(root / f"{arch}.gguf", arch)
        out[arch] = (gguf, export_onnx(gguf, root / f"{arch}-onnx", precision="fp32"))
    return out


def _torch_logits(
    gguf: Path, tokens: list[int], lora: dict[str, np.ndarray] | None = None, scale: float = 1.0
) -> np.ndarray:
    """(T, vocab) logits of our fp32 torch model, with `lora` merged as W + scale * B @ A."""
    model = load_model(gguf, precision="fp32")
    with torch.no_grad():
        for key in {k.rpartition(".")[0] for k in (lora or {})}:
            mod = model.get_submodule(key)
            delta = lora[f"{key}.lora_B"] @ lora[f"{key}.lora_A"]  # type: ignore[index]
            mod.weight += scale * torch.from_numpy(delta)
        return model(torch.tensor([tokens])).numpy()[0]


def _random_lora(
    gguf: Path, seed: int, rank: int = 4, targets=LORA_TARGETS
) -> dict[str, np.ndarray]:
    model = load_model(gguf, precision="fp32")
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(model.config.n_layer):
        for t in targets:
            o, n = model.get_submodule(hf_module(i, t)).weight.shape
            out[f"{hf_module(i, t)}.lora_A"] = (rng.standard_normal((rank, n)) * 0.2).astype(
                np.float32
            )
            out[f"{hf_module(i, t)}.lora_B"] = (rng.standard_normal((o, rank)) * 0.2).astype(
                np.float32
            )
    return out


def _stepwise_logits(model, tokens: list[int]) -> np.ndarray:
    """Teacher-forced logits through genai's KV cache: one token appended per step."""
    gen = model._generator(tokens[:1], None)
    rows = [np.asarray(gen.get_logits()).reshape(-1)]
    for tok in tokens[1:]:
        gen.append_tokens(np.array([tok], dtype=np.int32))
        rows.append(np.asarray(gen.get_logits()).reshape(-1))
    return np.stack(rows)


# -- parity --------------------------------------------------------------------------------------


def test_fp32_export_matches_torch_teacher_forced(exported):
    """Full prefill through core onnxruntime: every position's logits within 1e-4 of torch."""
    import onnxruntime as ort

    gguf, folder = exported["llama"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / "model.onnx"), opts)
    spec = FamilySpec()
    ids = np.array([TOKENS], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in range(spec.n_layer):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros(
                (1, spec.n_kv_head, 0, spec.head_dim), np.float32
            )
    got = sess.run(["logits"], feeds)[0][0]
    want = _torch_logits(gguf, TOKENS)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < TOL


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_decode_through_kv_cache_equals_prefill_and_torch(exported, arch):
    """Prefill-then-decode (one token at a time) equals torch at every position and equals a
    full prefill at the last; for gemma3 the 16 tokens cross its 5-token sliding window."""
    from edge_sdk.onnx.runtime import OnnxEdgeModel

    gguf, folder = exported[arch]
    want = _torch_logits(gguf, TOKENS)
    with OnnxEdgeModel(folder, n_threads=1) as model:
        steps = _stepwise_logits(model, TOKENS)
        prefill = model.next_token_logits(TOKENS)
    assert np.abs(steps - want).max() < TOL
    assert np.abs(prefill - steps[-1]).max() < TOL
    assert np.abs(prefill - want[-1]).max() < TOL


# -- adapters --------------------------------------------------------------------------------------


def test_no_adapter_equals_base_and_adapter_equals_torch_lora(exported, tmp_path):
    """A PEFT adapter (alpha/r = 2) converted on the device matches torch + LoRA; removing it
    gives the base logits back."""
    from edge_sdk.onnx.runtime import OnnxEdgeModel

    gguf, folder = exported["llama"]
    lora = _random_lora(gguf, seed=1)
    peft = save_peft(tmp_path / "peft", lora, rank=4, alpha=8.0, n_layer=3)
    base = _torch_logits(gguf, TOKENS)[-1]
    adapted = _torch_logits(gguf, TOKENS, lora, scale=2.0)[-1]
    assert np.abs(adapted - base).max() > 0.1  # the adapter really changes the answer
    with OnnxEdgeModel(folder, n_threads=1) as model:
        assert np.abs(model.next_token_logits(TOKENS) - base).max() < TOL
        model.load_adapter(peft)
        assert model.adapter_path == peft
        assert np.abs(model.next_token_logits(TOKENS) - adapted).max() < TOL
        model.remove_adapter()
        assert model.adapter_path is None
        assert np.abs(model.next_token_logits(TOKENS) - base).max() < TOL


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_swap_gguf_a_then_b_then_none(exported, tmp_path, arch):
    """GGUF LoRA A → B (different rank, subset of targets) → A (cached) → none, each equal to
    torch.

    For llama the GGUF stores Q/K lora_B rows permuted; the conversion must undo it."""
    from edge_sdk.onnx.runtime import OnnxEdgeModel

    gguf, folder = exported[arch]
    lora_a = _random_lora(gguf, seed=2, rank=4)
    lora_b = _random_lora(gguf, seed=3, rank=2, targets=("q_proj", "k_proj", "down_proj"))
    file_a = write_gguf_lora(tmp_path / "a.gguf", lora_a, alpha=4.0, base=gguf)
    file_b = write_gguf_lora(tmp_path / "b.gguf", lora_b, alpha=4.0, base=gguf)
    want_a = _torch_logits(gguf, TOKENS, lora_a, scale=1.0)[-1]
    want_b = _torch_logits(gguf, TOKENS, lora_b, scale=2.0)[-1]
    base = _torch_logits(gguf, TOKENS)[-1]
    with OnnxEdgeModel(folder, n_threads=1) as model:
        model.load_adapter(file_a)
        assert np.abs(model.next_token_logits(TOKENS) - want_a).max() < TOL
        model.load_adapter(file_b)
        assert np.abs(model.next_token_logits(TOKENS) - want_b).max() < TOL
        assert model.last_swap["cached"] is False
        # back to A: its conversion is reused (content-hash cache), and it is still A
        model.load_adapter(file_a)
        assert model.last_swap["cached"] is True
        assert np.abs(model.next_token_logits(TOKENS) - want_a).max() < TOL
        # the cache follows the bytes, not the name: A's file rewritten with B serves B
        file_a.write_bytes(file_b.read_bytes())
        model.load_adapter(file_a)
        assert np.abs(model.next_token_logits(TOKENS) - want_b).max() < TOL
        model.remove_adapter()
        assert np.abs(model.next_token_logits(TOKENS) - base).max() < TOL


def test_swap_refused_while_streaming_then_allowed(exported, tmp_path):
    """RuntimeBusyError while a stream is open (genai would also refuse the unload); after the
    stream is exhausted the swap goes through and changes the output."""
    from edge_sdk.onnx.runtime import OnnxEdgeModel

    gguf, folder = exported["llama"]
    file_a = write_gguf_lora(tmp_path / "a.gguf", _random_lora(gguf, seed=4), alpha=4.0, base=gguf)
    with OnnxEdgeModel(folder, n_threads=1, adapter=file_a) as model:
        greedy_a = model.generate("hello world", max_tokens=6)
        stream = model.generate("hello world", max_tokens=6, stream=True)
        first = next(stream)
        with pytest.raises(RuntimeBusyError) as busy:
            model.remove_adapter()
        # word for word the llama.cpp backend's message (one shared helper, edge_sdk._serving)
        assert str(busy.value) == (
            f"cannot swap the adapter of {folder.name}: a generation is running; finish or "
            "close the stream first, or pass wait=SECONDS to wait for it"
        )
        with pytest.raises(ValueError, match="`wait` should be >= 0"):
            model.remove_adapter(wait=-1.0)
        with pytest.raises(RuntimeBusyError, match="a generation is running"):
            model.load_adapter(file_a)
        assert first + "".join(stream) == greedy_a
        # wait= lets a swap queue behind a running generation instead of failing
        file_b = write_gguf_lora(
            tmp_path / "b.gguf", _random_lora(gguf, seed=8), alpha=4.0, base=gguf
        )
        stream = model.generate("hello world", max_tokens=6, stream=True)
        next(stream)
        t = threading.Thread(target=lambda: list(stream))
        t.start()
        model.load_adapter(file_b, wait=30.0)
        t.join(30)
        assert model.adapter_path == file_b
        assert model.generate("hello world", max_tokens=6) != greedy_a
        model.remove_adapter()
        assert model.adapter_path is None


def test_genai_refuses_unload_in_use(exported, tmp_path):
    """The underlying guarantee: onnxruntime-genai refuses to unload an adapter a live
    generator uses (which is why the backend drops its generator before swapping)."""
    import onnxruntime_genai as og

    from edge_sdk.onnx.runtime import OnnxEdgeModel

    gguf, folder = exported["llama"]
    file_a = write_gguf_lora(tmp_path / "a.gguf", _random_lora(gguf, seed=5), alpha=4.0, base=gguf)
    with OnnxEdgeModel(folder, n_threads=1) as model:
        converted = model.convert_adapter(file_a)
        adapters = og.Adapters(model._model)
        adapters.load(str(converted), "x")
        params = og.GeneratorParams(model._model)
        params.set_search_options(max_length=32)
        gen = og.Generator(model._model, params)
        gen.set_active_adapter(adapters, "x")
        with pytest.raises(Exception, match="in use"):
            adapters.unload("x")
        del gen
        adapters.unload("x")


def test_adapter_for_another_model_is_refused(exported, tmp_path):
    from edge_sdk.onnx.runtime import OnnxEdgeModel

    llama_gguf, _ = exported["llama"]
    _, gemma_folder = exported["gemma3"]
    lora = _random_lora(llama_gguf, seed=6)
    file_a = write_gguf_lora(tmp_path / "a.gguf", lora, alpha=4.0, base=llama_gguf)
    with OnnxEdgeModel(gemma_folder, n_threads=1) as model:
        with pytest.raises(AdapterMismatchError, match="llama"):
            model.load_adapter(file_a)
        assert model.adapter_path is None


def test_adapter_with_wrong_shapes_is_refused(exported, tmp_path):
    from edge_sdk.onnx.adapters import lora_input_shapes, onnx_lora_tensors

    gguf, folder = exported["llama"]
    shapes = lora_input_shapes(folder / "model.onnx")
    lora = _random_lora(gguf, seed=7)
    lora["model.layers.0.self_attn.q_proj.lora_B"] = np.zeros((8, 4), np.float32)
    with pytest.raises(AdapterMismatchError, match="q_proj.lora_B"):
        onnx_lora_tensors(lora, 1.0, shapes)
    extra = _random_lora(gguf, seed=7)
    extra["model.layers.7.mlp.up_proj.lora_A"] = np.zeros((4, 64), np.float32)
    with pytest.raises(AdapterMismatchError, match="no place"):
        onnx_lora_tensors(extra, 1.0, shapes)


def test_our_onnx_adapter_files_read_back_in_onnxruntime_like_its_own(exported, tmp_path):
    """The flatbuffer written without `ort.AdapterFormat` (one pass per tensor) holds the same
    versions, names, shapes and values as onnxruntime's own writer, for onnxruntime's reader;
    and the fused check+transpose+write equals the two-step route."""
    import onnxruntime as ort

    from edge_sdk.onnx.adapters import (
        onnx_lora_tensors,
        write_lora_adapter,
        write_onnx_adapter,
    )

    rng = np.random.default_rng(11)
    tensors = {
        "a": rng.standard_normal((5, 3)).astype(np.float32),
        "model.layers.0.attn.q_proj.lora_B.MatMul.weight": rng.standard_normal((1, 7)).astype(
            np.float32
        ),
        "é" * 13: np.zeros((2, 2), np.float32),  # odd, non-ASCII name length: padding
    }
    ours = write_onnx_adapter(tensors, tmp_path / "ours.onnx_adapter")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    fmt.export_adapter(str(tmp_path / "ort.onnx_adapter"))
    read = [ort.AdapterFormat.read_adapter(str(f)) for f in (ours, tmp_path / "ort.onnx_adapter")]
    versions = [
        (r.get_format_version(), r.get_adapter_version(), r.get_model_version()) for r in read
    ]
    assert versions[0] == versions[1]
    got = [{k: v.numpy() for k, v in r.get_parameters().items()} for r in read]
    assert set(got[0]) == set(got[1]) == set(tensors)
    for k, v in tensors.items():
        assert got[0][k].dtype == np.float32 and np.array_equal(got[0][k], v), k
        assert np.array_equal(got[0][k], got[1][k]), k
    assert not list(tmp_path.glob("*.partial"))

    gguf, folder = exported["llama"]
    shapes = {k: tuple(v) for k, v in lora_input_shapes_of(folder).items()}
    lora = _random_lora(gguf, seed=12)
    fused = write_lora_adapter(lora, 0.75, shapes, tmp_path / "fused.onnx_adapter")
    expect = onnx_lora_tensors(lora, 0.75, shapes)
    # Keep the reader alive: its OrtValues point into the buffer it owns (a temporary reader
    # was freed before `.numpy()` copied the last tensors, a flaky use-after-free in this test).
    fused_reader = ort.AdapterFormat.read_adapter(str(fused))
    got_f = {k: v.numpy() for k, v in fused_reader.get_parameters().items()}
    assert set(got_f) == set(expect)
    for k, v in expect.items():
        assert np.array_equal(got_f[k], v), k


def lora_input_shapes_of(folder: Path) -> dict[str, tuple[int, int]]:
    from edge_sdk.onnx.adapters import lora_input_shapes

    return lora_input_shapes(folder / "model.onnx")


# -- export ---------------------------------------------------------------------------------------


def test_export_is_idempotent_and_refuses_foreign_folders(exported, tmp_path):
    from edge_sdk.onnx.errors import OnnxExportError
    from edge_sdk.onnx.export import export_onnx

    gguf, folder = exported["llama"]
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    said: list[str] = []
    assert export_onnx(gguf, folder, precision="fp32", progress=said.append) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert any("nothing to do" in s for s in said)
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "fedlm_export.json"} <= set(before)
    foreign = tmp_path / "docs"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(OnnxExportError, match="not empty"):
        export_onnx(gguf, foreign, precision="fp32")
    assert (foreign / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="precision"):
        export_onnx(gguf, tmp_path / "x", precision="int8")


def test_export_refuses_unsupported_rope(tmp_path):
    from edge_sdk.onnx.export import export_onnx

    gguf = write_family_gguf(tmp_path / "l31.gguf", "llama", rope_freqs=True)
    with pytest.raises(UnsupportedArchitectureError, match="rope_freqs"):
        export_onnx(gguf, tmp_path / "out", precision="fp32")
    assert not (tmp_path / "out").exists()


def test_backend_dispatch_and_gguf_hint(exported):
    from edge_sdk.onnx.runtime import OnnxEdgeModel
    from edge_sdk.runtime import EdgeModel

    gguf, folder = exported["llama"]
    model = EdgeModel(folder, backend="onnx", n_threads=1)
    try:
        assert isinstance(model, OnnxEdgeModel)
        text = model.generate("hello", max_tokens=4)
        assert isinstance(text, str)
    finally:
        model.close()
    with pytest.raises(ModelNotFoundError, match="export-onnx"):
        EdgeModel(gguf, backend="onnx")
    with pytest.raises(ValueError, match="backend"):
        EdgeModel(gguf, backend="tensorflow")


# -- command line
# -----------------------------------------------------------------------------------


def test_cli_export_then_generate_with_gguf_adapter(tmp_path, capsys):
    """`fedlm export-onnx` (progress on stderr, the folder on stdout, adapter converted beside
    it), a second run is a no-op, and `fedlm generate --backend onnx --adapter` serves it."""
    from edge_sdk.cli import main

    gguf = write_family_gguf(tmp_path / "m.gguf", "llama")
    adapter = write_gguf_lora(tmp_path / "a.gguf", _random_lora(gguf, seed=9), alpha=4.0, base=gguf)
    out = tmp_path / "onnx"
    assert (
        main(
            [
                "export-onnx",
                str(gguf),
                "--out",
                str(out),
                "--precision",
                "fp32",
                "--adapter",
                str(adapter),
            ]
        )
        == 0
    )
    cap = capsys.readouterr()
    assert cap.out.strip() == str(out)
    assert "building the fp32 ONNX graph" in cap.err
    assert (out / "adapter.onnx_adapter").is_file()
    assert main(["export-onnx", str(gguf), "--out", str(out), "--precision", "fp32"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                str(out),
                "hello",
                "--backend",
                "onnx",
                "--adapter",
                str(adapter),
                "--max-tokens",
                "4",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("hello")
    # a GGUF given where the export folder is expected: one line naming the fix, exit 2
    assert main(["generate", str(gguf), "hello", "--backend", "onnx"]) == 2
    assert "fedlm export-onnx" in capsys.readouterr().err


# -- int4: the GGUF's own blocks, not a second quantization ---------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_int4_export_holds_the_gguf_q4_1_blocks_exactly(tmp_path, arch):
    """With Q4_1 projections, every int4 MatMulNBits weight of the export dequantizes to exactly
    the GGUF's weight (as our loader reads it, Q/K rows unpermuted): the export adds no second
    rounding. The logits then follow torch up to int8-activation noise. q/k/v (and gate/up) run
    as one MatMulNBits: llama's goes packed into GroupQueryAttention, Gemma 3's is split for
    its q/k norms."""
    import gguf
    import onnx
    from onnx import numpy_helper

    from edge_sdk.onnx.export import export_onnx
    from edge_sdk.onnx.runtime import OnnxEdgeModel

    src = write_family_gguf(tmp_path / "q41.gguf", arch, quant=gguf.GGMLQuantizationType.Q4_1)
    folder = export_onnx(src, tmp_path / "int4", precision="int4")
    manifest = (folder / "fedlm_export.json").read_text()
    assert '"Q4_1": 21' in manifest  # 3 layers x 7 projections
    model = onnx.load(str(folder / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    torch_model = load_model(src, precision="fp32")
    checked = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or "/layers." not in node.name:
            continue
        n_out = next(a.i for a in node.attribute if a.name == "N")
        q = numpy_helper.to_array(inits[node.input[1]]).reshape(n_out, -1, 16)
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(n_out, -1, 32).astype(np.float32)
        d = numpy_helper.to_array(inits[node.input[2]]).reshape(n_out, -1, 1)
        c = numpy_helper.to_array(inits[node.input[1] + "_offset"]).T.reshape(n_out, -1, 1)
        got = (d * (q - 8) + c).reshape(n_out, -1)
        # q/k/v and gate/up run as one MatMulNBits over their stacked rows (`q_proj+k_proj+...`)
        layer, _group, targets = node.name.split("/")[2:5]
        modules = [hf_module(int(layer.split(".")[1]), t) for t in targets.split("+")]
        want = np.concatenate(
            [torch_model.get_submodule(m).weight.detach().numpy() for m in modules]
        )
        assert np.abs(got - want).max() <= 1e-6 * max(1.0, np.abs(want).max()), modules
        checked += len(modules)
    assert checked == 21
    ops = [n.op_type for n in model.graph.node]
    # per layer: one offset MatMul per distinct input (qkv, o, gate/up, down), not per projection
    assert ops.count("MatMulNBits") == 3 * 4 + 1
    assert sum(n.name.endswith("_offset") for n in model.graph.node) == 3 * 4
    assert ops.count("Split") == 3 * (1 if arch == "llama" else 2)
    want = _torch_logits(src, TOKENS)[-1]
    with OnnxEdgeModel(folder, n_threads=1) as served:
        got = served.next_token_logits(TOKENS)
    assert np.argmax(got) == np.argmax(want)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_converted_adapters_are_removed_even_without_close(exported, tmp_path):
    """The converted-adapter folder (in RAM under /dev/shm where possible) is private (0700) and
    removed when a process exits without calling close(): RAM is not leaked per crash-free exit."""
    import subprocess
    import sys

    gguf, folder = exported["llama"]
    adapter = write_gguf_lora(
        tmp_path / "a.gguf", _random_lora(gguf, seed=11), alpha=4.0, base=gguf
    )
    code = (
        "import os, stat, sys\n"
        "from edge_sdk.onnx.runtime import OnnxEdgeModel\n"
        "m = OnnxEdgeModel(sys.argv[1], n_threads=1)\n"
        "m.load_adapter(sys.argv[2])\n"
        "mode = oct(stat.S_IMODE(os.stat(m._workdir).st_mode))\n"
        "print(m._workdir, mode, len(os.listdir(m._workdir)))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(adapter)],
        capture_output=True, text=True, timeout=300, check=True, cwd=repo,
    )  # fmt: skip
    workdir, mode, files = out.stdout.split()
    assert mode == "0o700" and int(files) == 1
    assert not Path(workdir).exists()
