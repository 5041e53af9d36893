from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from edge_sdk.errors import InvalidModelError, ModelNotFoundError
from edge_sdk.models import resolve
from edge_sdk.models.identity import inspect_model, model_sha256
from edge_sdk.models.licence import LicenceClass, classify, parse_policy
from tests.helpers import SMOLLM2_SHA256
from tests.tiny_models import write_tiny_gguf


def test_resolve_path_and_errors(tiny_gguf: Path, tmp_path: Path) -> None:
    assert resolve(str(tiny_gguf)) == tiny_gguf
    with pytest.raises(ModelNotFoundError, match="no such file"):
        resolve(tmp_path / "missing.gguf")
    with pytest.raises(ModelNotFoundError, match="unknown model name"):
        resolve("no-such-model")
    with pytest.raises(ModelNotFoundError, match="not a regular file"):
        resolve(tmp_path)


def test_inspect_tiny_model(tiny_gguf: Path) -> None:
    ident = inspect_model(tiny_gguf)
    assert ident.architecture == "llama"
    assert ident.quantization == {"F32": 21}
    assert ident.file_type == "ALL_F32"
    assert ident.context_length == 256
    assert ident.vocab_size == 299
    assert ident.has_chat_template
    assert ident.licence == "apache-2.0" and ident.licence_class is LicenceClass.PERMISSIVE
    # 2 layers x (4 * 64*64-ish projections ...) + embeddings: just check it is the tensor sum.
    assert ident.parameter_count == 112320
    assert json.loads(json.dumps(ident.to_json_dict()))["licence_class"] == "permissive"


def test_missing_licence_is_unknown(tmp_path: Path) -> None:
    p = write_tiny_gguf(tmp_path / "nolicence.gguf", licence=None, chat_template=None)
    ident = inspect_model(p)
    assert ident.licence is None and ident.licence_class is LicenceClass.UNKNOWN
    assert not ident.has_chat_template


def test_sha256_is_cached_by_size_and_mtime(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    first = model_sha256(p)
    assert first == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    # Same size, same mtime, different bytes: the cache answers (that is the contract).
    st = p.stat()
    p.write_bytes(b"abd")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_sha256(p) == first
    # A new mtime invalidates the entry.
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert model_sha256(p) != first


@pytest.mark.parametrize(
    "licence,expected",
    [
        ("apache-2.0", LicenceClass.PERMISSIVE),
        ("MIT", LicenceClass.PERMISSIVE),
        ("BSD 3-Clause", LicenceClass.PERMISSIVE),
        ("bsd-3-clause", LicenceClass.PERMISSIVE),
        ("gemma", LicenceClass.RESTRICTED),
        ("llama3.2", LicenceClass.RESTRICTED),
        ("cc-by-nc-4.0", LicenceClass.RESTRICTED),
        ("creativeml-openrail-m", LicenceClass.RESTRICTED),
        ("other", LicenceClass.UNKNOWN),
        ("", LicenceClass.UNKNOWN),
        (None, LicenceClass.UNKNOWN),
    ],
)
def test_licence_classes(licence: str | None, expected: LicenceClass) -> None:
    assert classify(licence) is expected


def test_policy_parsing() -> None:
    assert parse_policy("unknown, open-weights-restricted") == {
        LicenceClass.UNKNOWN,
        LicenceClass.RESTRICTED,
    }
    assert parse_policy(None) == frozenset()
    with pytest.raises(ValueError, match="unknown licence class 'closed'"):
        parse_policy("closed")


def test_not_gguf_and_truncated(tmp_path: Path, tiny_gguf: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(InvalidModelError, match=r"bad\.gguf: not a GGUF file"):
        inspect_model(bad)
    data = tiny_gguf.read_bytes()
    for cut in (200, 20_000, len(data) - 1000):
        trunc = tmp_path / f"trunc{cut}.gguf"
        trunc.write_bytes(data[:cut])
        with pytest.raises(InvalidModelError, match=rf"trunc{cut}\.gguf: (corrupt or )?truncated"):
            inspect_model(trunc)


def test_inspect_real_smollm2(smollm2_path: Path) -> None:
    ident = inspect_model("smollm2-135m")
    assert ident.sha256 == SMOLLM2_SHA256
    assert ident.licence == "apache-2.0" and ident.licence_class is LicenceClass.PERMISSIVE
    assert ident.architecture == "llama"
    assert ident.vocab_size == 49152 and ident.context_length == 8192
    assert ident.quantization == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert 134_000_000 < ident.parameter_count < 135_000_000
    assert ident.has_chat_template


def test_fast_reader_matches_gguf_reader(smollm2_path: Path) -> None:
    from gguf import GGUFReader

    from edge_sdk.models.gguf_meta import read_gguf

    # CPU time of this process, both readers measured here: other processes on a busy machine
    # do not count, and a slower machine slows both alike.
    t0 = time.process_time()
    fast = read_gguf(smollm2_path)
    fast_cpu_s = time.process_time() - t0
    t0 = time.process_time()
    slow = GGUFReader(smollm2_path)
    slow_cpu_s = time.process_time() - t0
    keys = [k for k in slow.fields if not k.startswith("GGUF.")]  # gguf's pseudo-keys
    assert list(fast.fields) == keys
    for key in keys:
        assert fast.fields[key].contents() == slow.fields[key].contents(), key
    assert [(t.name, t.shape.tolist(), t.data_offset) for t in fast.tensors] == [
        (t.name, t.shape.tolist(), t.data_offset) for t in slow.tensors
    ]
    for a, b in zip(fast.tensors, slow.tensors):
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype, a.name
    # Ours ~0.1 s of CPU, the stock reader ~3 s (a ratio of ~30): at least 4x is the promise.
    assert fast_cpu_s < slow_cpu_s / 4, (fast_cpu_s, slow_cpu_s)
