"""Model and adapter files are untrusted input: one regression test per defect of issue 19.

Each test crafts the hostile file it needs (tests/fuzz/gguf_craft.py packs bytes with `struct`)
and checks that it is refused with a one-line `<file>: <reason>` error before llama.cpp or
torch sees it. The defects that crashed or hung the process are also run through the CLI in a
child process (tests/fuzz/runner.py), where a signal, a hang or a blow-up is caught.
"""

from __future__ import annotations

import math
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_sdk.adapters.gguf_lora import BaseModelInfo, check_adapter_compatible, read_gguf_lora
from edge_sdk.errors import InvalidAdapterError, InvalidModelError
from edge_sdk.models import gguf_limits as L
from edge_sdk.models.identity import inspect_model
from edge_sdk.models.loader import load_model, read_config
from tests.fuzz.gguf_craft import (
    Parts,
    Q,
    TensorInfo,
    V,
    array,
    header_only,
    kv,
    lora_file,
    nested_array,
    s,
    scalar,
)
from tests.fuzz.runner import run
from tests.tiny_models import write_tiny_gguf

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("untrusted") / "tiny.gguf")


@pytest.fixture(scope="module")
def shapes(tiny: Path) -> dict[str, tuple[int, int]]:
    info = BaseModelInfo.from_gguf(tiny)
    return {k: info.tensor_shapes[k] for k in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight")}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _one_line_exit_2(out, needle: str) -> None:
    assert out.problem() is None, out.problem()
    assert out.returncode == 2, out.stdout[-300:]
    assert needle in out.error_lines()[0], out.error_lines()


def _bf16(a: np.ndarray) -> tuple[int, bytes]:
    return int(Q.BF16), (a.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()


def _q8_0(a: np.ndarray) -> tuple[int, bytes]:
    return int(Q.Q8_0), gguf.quants.quantize(a.astype(np.float32), Q.Q8_0).tobytes()


# -- 1. alpha stored as FLOAT64 or STRING: SIGABRT in llama.cpp -----------------------------------


@pytest.mark.parametrize(
    "alpha", [scalar(V.FLOAT64, 16.0), scalar(V.STRING, "16"), array(V.FLOAT32, [16.0])]
)
def test_d01_alpha_of_wrong_type_refused(tmp_path: Path, tiny: Path, shapes, alpha: bytes) -> None:
    path = _write(tmp_path / "alpha.gguf", lora_file(shapes, alpha=alpha))
    with pytest.raises(
        InvalidAdapterError, match=r"alpha\.gguf: adapter\.lora\.alpha should be a FLOAT32"
    ):
        check_adapter_compatible(path, tiny)


def test_d01_alpha_float64_through_cli_no_abort(tmp_path: Path, tiny: Path, shapes) -> None:
    path = _write(tmp_path / "alpha64.gguf", lora_file(shapes, alpha=scalar(V.FLOAT64, 16.0)))
    out = run(
        "generate", str(tiny), "hi", "--adapter", str(path), "--max-tokens", "2", "--n-ctx", "64"
    )
    _one_line_exit_2(out, "alpha64.gguf: adapter.lora.alpha should be a FLOAT32, got FLOAT64")


# -- 2. lora tensors of type I32 or F64: SIGSEGV in llama_decode --------------------------------


@pytest.mark.parametrize("dtype,qtype", [("<i4", Q.I32), ("<f8", Q.F64)])
def test_d02_integer_and_f64_lora_tensors_refused(
    tmp_path: Path, tiny: Path, shapes, dtype, qtype
) -> None:
    path = _write(
        tmp_path / "int.gguf",
        lora_file(shapes, encode=lambda a: (int(qtype), a.astype(dtype).tobytes())),
    )
    with pytest.raises(
        InvalidAdapterError, match=rf"has type {qtype.name}, not one of the allowed types"
    ):
        check_adapter_compatible(path, tiny)
    out = run(
        "generate", str(tiny), "hi", "--adapter", str(path), "--max-tokens", "2", "--n-ctx", "64"
    )
    _one_line_exit_2(out, f"has type {qtype.name}")


# -- 3. block_count 1000: SIGABRT (n_layer_all <= LLAMA_MAX_LAYERS) -----------------------------


def test_d03_block_count_past_llama_max_layers_refused(tmp_path: Path, tiny: Path) -> None:
    path = (
        Parts.of(tiny)
        .set("llama.block_count", scalar(V.UINT32, 1000))
        .write(tmp_path / "deep.gguf")
    )
    with pytest.raises(
        InvalidModelError, match=r"deep\.gguf: 'llama\.block_count' is 1000, should be 1 to 512"
    ):
        inspect_model(path)
    out = run("generate", str(path), "hi", "--max-tokens", "2", "--n-ctx", "64")
    _one_line_exit_2(out, "deep.gguf: 'llama.block_count' is 1000, should be 1 to 512")


def test_d03_real_model_block_count_1000_refused(tmp_path: Path, smollm2_path: Path) -> None:
    data = bytearray(smollm2_path.read_bytes())
    f = __import__("edge_sdk.models.gguf_meta", fromlist=["read_gguf"]).read_gguf(smollm2_path)
    field = f.fields["llama.block_count"]
    assert field.type == V.UINT32
    struct.pack_into("<I", data, field.offset + 4, 1000)  # the value follows its 4-byte type tag
    path = _write(tmp_path / "smol-1000.gguf", bytes(data))
    out = run("generate", str(path), "hi", "--max-tokens", "2", "--n-ctx", "64")
    _one_line_exit_2(out, "'llama.block_count' is 1000")


# -- 4. NaN/inf in BF16 values, Q8_0 block scales, or alpha: exit 0 with NaN logits ------------


def test_d04_bf16_and_q8_0_adapters_load_when_finite(tmp_path: Path, tiny: Path, shapes) -> None:
    from edge_sdk.runtime import EdgeModel

    for name, enc in (("bf16", _bf16), ("q8", _q8_0)):
        path = _write(tmp_path / f"{name}.gguf", lora_file(shapes, rank=32, encode=enc))
        check_adapter_compatible(path, tiny)
        lora = read_gguf_lora(path, base=tiny)
        assert all(np.isfinite(v).all() for v in lora.tensors.values())
        with EdgeModel(tiny, n_ctx=64) as m:
            m.load_adapter(path)  # llama.cpp accepts these types
            assert np.isfinite(m.next_token_logits("hello")).all()


def test_d04_nan_in_bf16_refused(tmp_path: Path, tiny: Path, shapes) -> None:
    def enc(a: np.ndarray) -> tuple[int, bytes]:
        a = a.copy()
        a.flat[3] = np.nan
        return _bf16(a)

    path = _write(tmp_path / "bf16nan.gguf", lora_file(shapes, encode=enc))
    with pytest.raises(InvalidAdapterError, match="holds NaN or inf"):
        check_adapter_compatible(path, tiny)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_d04_nonfinite_q8_0_block_scale_refused(
    tmp_path: Path, tiny: Path, shapes, bad: float
) -> None:
    def enc(a: np.ndarray) -> tuple[int, bytes]:
        t, raw = _q8_0(a)
        return t, np.array([bad], "<f2").tobytes() + raw[2:]  # the first block's f16 scale

    path = _write(tmp_path / "q8nan.gguf", lora_file(shapes, rank=32, encode=enc))
    with pytest.raises(InvalidAdapterError, match="holds NaN or inf"):
        check_adapter_compatible(path, tiny)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf, 1e30, -1.0])
def test_d04_alpha_nonfinite_or_out_of_range_refused(
    tmp_path: Path, tiny: Path, shapes, alpha: float
) -> None:
    path = _write(tmp_path / "alpha.gguf", lora_file(shapes, alpha=scalar(V.FLOAT32, alpha)))
    with pytest.raises(InvalidAdapterError, match=r"adapter\.lora\.alpha"):
        check_adapter_compatible(path, tiny)


# -- 5. inspect exit 0 on a cut string, bad n_dims, a zero dimension, overlapping data ---------


def test_d05_string_past_the_end_refused(tmp_path: Path) -> None:
    rec = (
        kv("general.architecture", scalar(V.STRING, "llama"))
        + s("general.name")
        + struct.pack("<IQ", V.STRING, 1000)
    )
    path = _write(tmp_path / "cut.gguf", header_only([rec], n_kv=2) + b"short")
    with pytest.raises(
        InvalidModelError, match=r"cut\.gguf: truncated GGUF \(value of 'general\.name'"
    ):
        inspect_model(path)


@pytest.mark.parametrize(
    "dims,reason",
    [([], "0 dimensions"), ([64, 299, 1, 1, 1], "5 dimensions"), ([64, 0], "a zero dimension")],
)
def test_d05_bad_dimensions_refused(
    tmp_path: Path, tiny: Path, dims: list[int], reason: str
) -> None:
    parts = Parts.of(tiny)
    parts.tensor("token_embd.weight").dims = dims
    path = parts.write(tmp_path / "dims.gguf")
    with pytest.raises(
        InvalidModelError, match=rf"dims\.gguf: tensor 'token_embd\.weight' has {reason}"
    ):
        inspect_model(path)


def test_d05_overlapping_tensor_data_refused(tmp_path: Path, tiny: Path) -> None:
    parts = Parts.of(tiny)
    parts.tensor("output_norm.weight").offset = parts.tensor("blk.0.attn_norm.weight").offset
    path = parts.write(tmp_path / "overlap.gguf")
    with pytest.raises(InvalidModelError, match=r"overlap\.gguf: tensors .* overlap in the file"):
        inspect_model(path)


# -- 6. nested arrays 600 deep: RecursionError -------------------------------------------------


def test_d06_nested_arrays_refused_without_recursion(tmp_path: Path, tiny: Path) -> None:
    path = Parts.of(tiny).set("general.nested", nested_array(600)).write(tmp_path / "nest.gguf")
    with pytest.raises(InvalidModelError, match="holds an array of arrays"):
        inspect_model(path)
    for args in (("inspect", str(path)), ("generate", str(path), "hi", "--max-tokens", "2")):
        _one_line_exit_2(run(*args), "nest.gguf: key 'general.nested' holds an array of arrays")


# -- 7. values decoded outside the error handling ----------------------------------------------


@pytest.mark.parametrize("key", ["general.name", "general.architecture"])
def test_d07_invalid_utf8_refused(tmp_path: Path, tiny: Path, key: str) -> None:
    path = Parts.of(tiny).set(key, scalar(V.STRING, b"\xff\xfe\x80")).write(tmp_path / "utf8.gguf")
    with pytest.raises(
        InvalidModelError, match=rf"utf8\.gguf: value of '{key}' at byte \d+ is not valid UTF-8"
    ):
        inspect_model(path)


def test_d07_adapter_general_type_invalid_utf8_refused(tmp_path: Path, tiny: Path, shapes) -> None:
    path = _write(
        tmp_path / "t.gguf", lora_file(shapes, general_type=scalar(V.STRING, b"adap\xfeter"))
    )
    with pytest.raises(InvalidAdapterError, match="not valid UTF-8"):
        check_adapter_compatible(path, tiny)


@pytest.mark.parametrize(
    "key,value,reason",
    [
        (
            "general.file_type",
            array(V.UINT32, [1, 2]),
            "'general.file_type' should be an integer, got an array",
        ),
        (
            "llama.vocab_size",
            scalar(V.STRING, "299"),
            "'llama.vocab_size' should be an integer, got a STRING",
        ),
    ],
)
def test_d07_wrong_value_types_refused(
    tmp_path: Path, tiny: Path, key: str, value: bytes, reason: str
) -> None:
    path = Parts.of(tiny).set(key, value).write(tmp_path / "types.gguf")
    with pytest.raises(InvalidModelError, match=reason):
        inspect_model(path)
    _one_line_exit_2(run("inspect", str(path)), reason)


# -- 8. train: head_count 0, context_length 0, a relabelled linear weight ----------------------


@pytest.mark.parametrize(
    "key,reason",
    [
        ("llama.attention.head_count", "'llama.attention.head_count' is 0, should be 1"),
        ("llama.context_length", "'llama.context_length' is 0, should be 1"),
    ],
)
def test_d08_zero_hyper_parameters_refused_before_torch(
    tmp_path: Path, tiny: Path, key: str, reason: str
) -> None:
    path = Parts.of(tiny).set(key, scalar(V.UINT32, 0)).write(tmp_path / "zero.gguf")
    with pytest.raises(InvalidModelError, match=reason):
        read_config(path)
    with pytest.raises(InvalidModelError, match=reason):
        load_model(path, precision="fp32")


def test_d08_relabelled_linear_weight_refused(tmp_path: Path, tiny: Path) -> None:
    parts = Parts.of(tiny)
    down = parts.tensor("blk.0.ffn_down.weight")
    down.dims = list(reversed(down.dims))  # (in, out) relabelled as (out, in): same bytes
    path = parts.write(tmp_path / "swap.gguf")
    with pytest.raises(
        InvalidModelError,
        match=r"tensor 'blk\.0\.ffn_down\.weight' has shape \(128, 64\), "
        r"the metadata gives \(64, 128\)",
    ):
        load_model(path, precision="fp32")


# -- 9. hangs and blow-ups of the reader on small files -----------------------------------------


def _refused_quickly(path: Path, match: str) -> None:
    # CPU time of this process, not wall time: a hang or blow-up of the reader burns CPU, a busy
    # machine's other processes do not count. The refusals take ~0.01 s; the bugs took minutes.
    t0 = time.process_time()
    with pytest.raises(InvalidModelError, match=match):
        inspect_model(path)
    assert time.process_time() - t0 < 2.0


def test_d09_million_kv_pairs(tmp_path: Path) -> None:
    rec = kv("k", scalar(V.UINT8, 1))
    path = _write(
        tmp_path / "kv.gguf",
        header_only(
            [kv("general.architecture", scalar(V.STRING, "llama"))] + [rec] * 1_000_000,
            n_kv=1_000_001,
        ),
    )
    _refused_quickly(
        path, r"kv\.gguf: header claims 1000001 metadata keys, more than the limit of 4096"
    )


def test_d09_million_tensor_infos(tmp_path: Path) -> None:
    info = TensorInfo(b"t", [32], int(Q.F32), 0)
    path = _write(
        tmp_path / "ti.gguf",
        header_only(
            [kv("general.architecture", scalar(V.STRING, "llama"))], tensors=[info] * 1_000_000
        ),
    )
    _refused_quickly(path, r"header claims 1000000 tensors, more than the limit of 65536")


def test_d09_array_of_a_million_empty_arrays(tmp_path: Path) -> None:
    raw = struct.pack("<IQ", V.UINT8, 0) * 1_000_000
    rec = kv("general.arrays", struct.pack("<IIQ", V.ARRAY, V.ARRAY, 1_000_000) + raw)
    path = _write(
        tmp_path / "arr.gguf",
        header_only([kv("general.architecture", scalar(V.STRING, "llama")), rec]),
    )
    _refused_quickly(path, "holds an array of arrays")


def test_d09_millions_of_empty_tokens(tmp_path: Path) -> None:
    rec = kv("tokenizer.ggml.tokens", array(V.STRING, count=2_500_000, raw=b"\x00" * 8 * 2_500_000))
    path = _write(
        tmp_path / "tok.gguf",
        header_only([kv("general.architecture", scalar(V.STRING, "llama")), rec]),
    )
    _refused_quickly(
        path, r"'tokenizer\.ggml\.tokens' claims 2500000 elements, more than the limit"
    )
    out = run("inspect", str(path))
    _one_line_exit_2(out, "claims 2500000 elements")
    assert out.max_rss < 200 << 20


def test_d09_largest_allowed_token_list_is_cheap(tmp_path: Path) -> None:
    # At the limit (1M tokens, 12 MB): read in well under the budget.
    n = L.MAX_ARRAY_ELEMENTS
    rec = kv("tokenizer.ggml.tokens", array(V.STRING, count=n, raw=s("ab") * n))
    path = _write(
        tmp_path / "big.gguf", header_only([kv("general.architecture", scalar(V.STRING, "x")), rec])
    )
    out = run("inspect", str(path), "--json")
    assert out.problem() is None and out.returncode == 0, out.stderr
    assert out.seconds < 8 and out.max_rss < 400 << 20


# -- 10. a hostile chat template: generate --chat and train hang at 4.4 GB ----------------------


def test_d10_hostile_chat_template_refused_within_budget(tmp_path: Path) -> None:
    from edge_sdk.models.chat_template import ChatTemplateError
    from edge_sdk.training.tokenizer import load_tokenizer

    path = write_tiny_gguf(tmp_path / "loops.gguf", chat_template=NESTED_LOOPS)
    tok = load_tokenizer(path)
    t0 = time.process_time()  # CPU time, as in test_chat_template: busy neighbours do not count
    with pytest.raises(
        ChatTemplateError, match=r"loops\.gguf: chat template exceeds the rendering budget"
    ):
        tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert time.process_time() - t0 < L.TEMPLATE_MAX_SECONDS + 1
    out = run("generate", str(path), "hi", "--chat", "--max-tokens", "2", "--n-ctx", "64")
    _one_line_exit_2(out, "loops.gguf: chat template exceeds the rendering budget")
    out = run(str(path), loader=True)
    _one_line_exit_2(out, "loops.gguf: chat template exceeds the rendering budget")


def test_d10_template_that_does_not_compile_refused_before_llama_cpp(tmp_path: Path) -> None:
    deep = "{% if 1 %}" * 3000 + "x" + "{% endif %}" * 3000
    path = write_tiny_gguf(tmp_path / "deep-tpl.gguf", chat_template=deep)
    out = run("generate", str(path), "hi", "--max-tokens", "2", "--n-ctx", "64")
    _one_line_exit_2(out, "tokenizer.chat_template: chat template is nested too deeply")


# -- 11. messages: forged lines and 16 MB error lines ----------------------------------------


def test_d11_tensor_name_with_newline_is_quoted(tmp_path: Path, tiny: Path, shapes) -> None:
    evil = "x\nTraceback (most recent call last):"
    raw = lora_file(shapes)
    parts = Parts.of(_write(tmp_path / "ok.gguf", raw))
    parts.tensors[0].name = evil.encode()
    path = parts.write(tmp_path / "evil.gguf")
    with pytest.raises(InvalidAdapterError) as info:
        check_adapter_compatible(path, tiny)
    assert "\n" not in str(info.value) and r"'x\nTraceback" in str(info.value)
    out = run("generate", str(tiny), "hi", "--adapter", str(path), "--max-tokens", "2")
    _one_line_exit_2(out, r"tensor 'x\nTraceback")
    assert not [line for line in out.stderr.splitlines() if line.startswith("Traceback")]


def test_d11_huge_architecture_string_gives_a_short_message(tmp_path: Path, tiny: Path) -> None:
    path = (
        Parts.of(tiny)
        .set("general.architecture", scalar(V.STRING, "a" * (16 << 20)))
        .write(tmp_path / "a.gguf")
    )
    with pytest.raises(InvalidModelError, match="more than the limit") as info:
        inspect_model(path)
    assert len(str(info.value)) < 300
    # Within the limit, but not a name: quoted and cut to MAX_DISPLAY_CHARS.
    path = (
        Parts.of(tiny)
        .set("general.architecture", scalar(V.STRING, "a\n" * 5000))
        .write(tmp_path / "b.gguf")
    )
    with pytest.raises(InvalidModelError, match=r"is not an architecture name") as info:
        inspect_model(path)
    assert len(str(info.value)) < 300 and "\n" not in str(info.value)


# -- 12. every llama.cpp failure blamed on "architecture ... may be unsupported" ---------------


def test_d12_llama_cpp_refusal_quotes_llama_cpp(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "arch.gguf", arch="notanarch")
    out = run("generate", str(path), "hi", "--max-tokens", "2")
    _one_line_exit_2(out, "arch.gguf: llama.cpp refused the model: ")
    assert "unknown model architecture: 'notanarch'" in out.error_lines()[0]


def test_d12_llama_cpp_adapter_refusal_quotes_llama_cpp(
    tmp_path: Path, tiny: Path, shapes, monkeypatch
) -> None:
    # An adapter our checks pass but llama.cpp refuses: a `_norm.weight` tensor of the wrong
    # rank is skipped by both; make llama.cpp see a tensor pair for a missing base tensor by
    # checking against a base info that (wrongly) lists it.
    from edge_sdk.runtime import EdgeModel

    path = _write(tmp_path / "ghost.gguf", lora_file({"blk.0.ghost.weight": (64, 64)}))
    with EdgeModel(tiny, n_ctx=64) as m:
        monkeypatch.setattr(m, "_check_adapter", lambda p: None)
        with pytest.raises(
            InvalidAdapterError, match=r"ghost\.gguf: llama\.cpp refused the adapter: .*ghost"
        ):
            m.load_adapter(path)


# -- found by the fuzzer (tests/fuzz): vocabularies that make llama.cpp abort -------------------


@pytest.mark.parametrize("model", ["bert", "none", "no_vocab"])
def test_fuzz_unsupported_tokenizer_model_refused_before_llama_cpp(
    tmp_path: Path, tiny: Path, model: str
) -> None:
    # These three aborted llama.cpp (SIGABRT) on the tiny model's vocabulary.
    path = (
        Parts.of(tiny)
        .set("tokenizer.ggml.model", scalar(V.STRING, model))
        .write(tmp_path / "vocab.gguf")
    )
    out = run("generate", str(path), "hello", "--max-tokens", "2", "--n-ctx", "64")
    _one_line_exit_2(out, f"vocab.gguf: tokenizer.ggml.model is '{model}'; supported: llama, gpt2")
    assert inspect_model(path).architecture == "llama"  # inspect does not run the vocabulary


def test_fuzz_sentencepiece_vocab_without_byte_tokens_refused(tmp_path: Path, tiny: Path) -> None:
    # llama.cpp's SentencePiece tokenizer falls back to <0xXX> tokens through std::map::at.
    from edge_sdk.models.gguf_meta import read_gguf

    names = read_gguf(tiny).fields["tokenizer.ggml.tokens"].contents()
    names[names.index("<0x0A>")] = "<newline>"
    path = (
        Parts.of(tiny)
        .set("tokenizer.ggml.tokens", array(V.STRING, names))
        .write(tmp_path / "bytes.gguf")
    )
    out = run("generate", str(path), "a\nb", "--max-tokens", "2", "--n-ctx", "64")
    _one_line_exit_2(
        out, "bytes.gguf: the vocabulary has no token for 1 of the 256 bytes (first: 0x0A)"
    )


def test_fuzz_bos_token_id_outside_vocabulary_refused(tmp_path: Path, tiny: Path) -> None:
    path = (
        Parts.of(tiny)
        .set("tokenizer.ggml.bos_token_id", scalar(V.UINT32, 4000))
        .write(tmp_path / "bos.gguf")
    )
    out = run("generate", str(path), "hello", "--max-tokens", "2", "--n-ctx", "64")
    _one_line_exit_2(
        out, "bos.gguf: 'tokenizer.ggml.bos_token_id' is 4000, outside the 299-token vocabulary"
    )


def test_fuzz_experts_without_used_count_refused(tmp_path: Path, tiny: Path) -> None:
    # Fuzz case 174 of FEDLM_FUZZ_SEED=3: llama.cpp asserted expert_used_count > 0 (SIGABRT).
    path = (
        Parts.of(tiny).set("llama.expert_count", scalar(V.UINT32, 2)).write(tmp_path / "moe.gguf")
    )
    out = run("generate", str(path), "hello", "--max-tokens", "2", "--n-ctx", "64")
    _one_line_exit_2(out, "moe.gguf: llama.expert_used_count is 0, should be 1 to expert_count (2)")


def test_fuzz_llama_decode_failure_is_one_line(tmp_path: Path, tiny: Path) -> None:
    # Fuzz case 176 of FEDLM_FUZZ_SEED=3: inf/NaN weights made llama_decode fail, and
    # llama-cpp-python's bare RuntimeError came out as a traceback.
    from edge_sdk.models.gguf_meta import read_gguf

    f = read_gguf(tiny)
    data = bytearray(tiny.read_bytes())
    for name, index, bad in (("token_embd.weight", 1775, np.inf), ("output.weight", 1062, np.nan)):
        t = next(t for t in f.tensors if t.name == name)
        struct.pack_into("<f", data, t.data_offset + 4 * index, bad)
    path = _write(tmp_path / "nan.gguf", bytes(data))
    out = run("generate", str(path), "hello", "--max-tokens", "2", "--n-ctx", "64")
    assert out.problem() is None, out.problem()
    if out.returncode == 2:  # llama.cpp may also decode such a file (exit 0 with junk text)
        assert "nan.gguf: llama.cpp failed while generating: " in out.error_lines()[0]
    with pytest.raises(
        InvalidModelError, match=r"nan\.gguf: tensor 'token_embd\.weight' holds NaN or inf"
    ):
        load_model(path, precision="fp32")  # the training loader refuses it outright


def test_d11_inspect_shows_names_escaped_and_cut(tmp_path: Path, tiny: Path) -> None:
    name = "evil\nTraceback (most recent call last):" + "y" * 5000
    path = Parts.of(tiny).set("general.name", scalar(V.STRING, name)).write(tmp_path / "name.gguf")
    out = run("inspect", str(path))
    assert out.returncode == 0, out.stderr
    model_line = out.stdout.splitlines()[0]
    assert model_line.startswith("model") and "evil\\nTraceback" in model_line
    assert len(model_line) < 300 and not any(
        line.startswith("Traceback") for line in out.stdout.splitlines()
    )
