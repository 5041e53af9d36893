"""Structure-aware fuzzing of model and adapter files through the CLI and the training loader.

A small mutator takes a valid tiny model (tests/tiny_models.py) and a real adapter written by
`write_gguf_lora` apart (`gguf_craft.Parts`) and changes what a hostile file would: counts,
value types, lengths, nesting, hyper-parameters, tensor dims, types, offsets and names, tensor
values (NaN/inf), the chat template, plus raw byte flips and truncation. For every mutated file
`fedlm inspect`, `fedlm generate` (the model through llama.cpp, or the adapter through
`--adapter`) and the loader behind `fedlm train` run in a child process and must end with exit 0
and a valid result, or exit 2 with one `fedlm: error:` line, within 10 s (30 s for the torch
loader) and 1 GiB; a signal, a hang or a traceback fails the test and prints the case's seed.

CI runs 40 model and 40 adapter cases (about 20 s on 2 idle cores). A longer run:

    FEDLM_FUZZ_CASES=500 FEDLM_FUZZ_SEED=7 python -m pytest tests/fuzz -q

`FEDLM_FUZZ_CASES` scales the model and adapter cases (the loader runs on a quarter of them);
`FEDLM_FUZZ_SEED` picks another sequence of cases.
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fuzz.gguf_craft import Parts, V, array, nested_array, scalar
from tests.fuzz.runner import Outcome, run
from tests.helpers import random_adapter
from tests.tiny_models import write_tiny_gguf

CASES = int(os.environ.get("FEDLM_FUZZ_CASES", "40"))
SEED = int(os.environ.get("FEDLM_FUZZ_SEED", "1"))
WORKERS = 2

_HPARAMS = (
    "block_count",
    "attention.head_count",
    "attention.head_count_kv",
    "embedding_length",
    "feed_forward_length",
    "context_length",
    "vocab_size",
    "rope.dimension_count",
    "attention.key_length",
    "rope.freq_base",
    "attention.layer_norm_rms_epsilon",
    "expert_count",
    "expert_used_count",
    "rope.scaling.type",
    "rope.scaling.factor",
)
_INTS = (
    0,
    1,
    2,
    3,
    4,
    7,
    16,
    32,
    63,
    64,
    65,
    128,
    299,
    511,
    512,
    513,
    1000,
    2**31 - 1,
    2**31,
    2**32 - 1,
)
_TEMPLATES = (
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{{ 'x' * 100000000 }}",
    (
        "{% set ns = namespace(s='ab') %}{% for i in range(60) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
    ),
    "{{ raise_exception('no') }}",
    "{% for m in messages %}{{ m.content }}{% endfor %",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% if 1 %}" * 2000 + "{% endif %}" * 2000,
    "{{ messages[0]['content'] | center(1000000000) }}",
)


def _random_value(rng: random.Random) -> bytes:
    kind = rng.choice(
        ("int", "float", "str", "badstr", "arr", "liearr", "nested", "strarr", "bool")
    )
    if kind == "int":
        t = rng.choice((V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64))
        fmt = {
            V.UINT8: "<B",
            V.INT8: "<b",
            V.UINT16: "<H",
            V.INT16: "<h",
            V.UINT32: "<I",
            V.INT32: "<i",
            V.UINT64: "<Q",
            V.INT64: "<q",
        }[t]
        size = struct.calcsize(fmt) * 8
        lo, hi = (-(2 ** (size - 1)), 2 ** (size - 1) - 1) if fmt[1].islower() else (0, 2**size - 1)
        return scalar(
            t, max(lo, min(hi, rng.choice((0, 1, -1, 7, 512, 1000, 2**31, -(2**31), hi))))
        )
    if kind == "float":
        return scalar(
            rng.choice((V.FLOAT32, V.FLOAT64)),
            rng.choice((0.0, -1.0, 1e30, float("nan"), float("inf"), 3.5)),
        )
    if kind == "str":
        return scalar(
            V.STRING, "".join(rng.choice("ab\n\x00é'\"") for _ in range(rng.randrange(0, 200)))
        )
    if kind == "badstr":
        return scalar(V.STRING, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20))))
    if kind == "arr":
        return array(V.UINT32, [rng.randrange(2**32) for _ in range(rng.randrange(0, 50))])
    if kind == "liearr":
        return array(V.UINT32, [1, 2, 3], count=rng.choice((4, 1000, 2**31, 2**63)))
    if kind == "nested":
        return nested_array(rng.choice((2, 3, 50, 700)))
    if kind == "strarr":
        return array(V.STRING, [rng.choice(("", "a", "\xff")) for _ in range(rng.randrange(0, 20))])
    return scalar(V.BOOL, rng.randrange(256))


def _mutate(parts: Parts, rng: random.Random, arch: str = "llama") -> list[str]:
    """Apply 1-3 structural mutations in place; returns what was done (for the failure report)."""
    done = []
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(
            (
                "kv",
                "hparam",
                "hparam",
                "drop",
                "dup",
                "counts",
                "dims",
                "dims",
                "type",
                "offset",
                "name",
                "data",
                "template",
                "tokens",
            )
        )
        if op == "kv" and parts.kvs:
            key = rng.choice(parts.kvs)[0]
            parts.set(key, _random_value(rng))
            done.append(f"kv {key}")
        elif op == "hparam":
            key = f"{arch}.{rng.choice(_HPARAMS)}"
            if key.endswith("scaling.type"):
                value = scalar(V.STRING, rng.choice(("yarn", "linear", "bogus", "")))
            elif rng.random() < 0.2:
                value = _random_value(rng)
            else:
                value = scalar(V.UINT32, rng.choice(_INTS))
            parts.set(key, value)
            done.append(f"hparam {key}")
        elif op == "drop" and parts.kvs:
            key = rng.choice(parts.kvs)[0]
            parts.drop(key)
            done.append(f"drop {key}")
        elif op == "dup" and parts.kvs:
            parts.kvs.append(rng.choice(parts.kvs))
            done.append("dup kv")
        elif op == "counts":
            which = rng.choice(("n_kv", "n_tensors"))
            base = len(parts.kvs) if which == "n_kv" else len(parts.tensors)
            setattr(parts, which, rng.choice((0, base - 1, base + 1, 2**31, 2**63, 10**6)))
            done.append(f"counts {which}")
        elif op == "dims" and parts.tensors:
            t = rng.choice(parts.tensors)
            choice = rng.choice(("swap", "zero", "add", "drop", "huge", "double", "empty", "five"))
            if choice == "swap":
                t.dims = list(reversed(t.dims))
            elif choice == "zero":
                t.dims = [0, *t.dims[1:]]
            elif choice == "add":
                t.dims = [*t.dims, rng.choice((1, 2))]
            elif choice == "drop" and len(t.dims) > 1:
                t.dims = t.dims[:-1]
            elif choice == "huge":
                t.dims = [t.dims[0], 2**40]
            elif choice == "double":
                t.dims = [t.dims[0] * 2, *t.dims[1:]]
            elif choice == "empty":
                t.dims = []
            else:
                t.dims = [*t.dims, 1, 1, 1, 1][:5]
            done.append(f"dims {t.name!r} {choice}")
        elif op == "type" and parts.tensors:
            t = rng.choice(parts.tensors)
            t.type = rng.choice((0, 1, 2, 8, 16, 24, 25, 26, 27, 28, 30, 39, 4, 5, 1000))
            done.append(f"type {t.name!r} {t.type}")
        elif op == "offset" and len(parts.tensors) > 1:
            t = rng.choice(parts.tensors)
            t.offset = rng.choice(
                (
                    rng.choice(parts.tensors).offset,
                    t.offset + 1,
                    t.offset + 32,
                    2**40,
                    len(parts.data),
                )
            )
            done.append(f"offset {t.name!r}")
        elif op == "name" and parts.tensors:
            t = rng.choice(parts.tensors)
            t.name = rng.choice(
                (
                    b"",
                    b"x" * 100,
                    b"a\nTraceback",
                    b"\xff\xfe",
                    rng.choice(parts.tensors).name,
                    t.name + b".lora_a",
                    b"blk.99999999.attn_q.weight",
                    b"blk.x.attn_q.weight",
                )
            )
            done.append("name")
        elif op == "data" and parts.data:
            data = bytearray(parts.data)
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(0, max(1, len(data) - 4)) & ~3
                data[pos : pos + 4] = struct.pack(
                    "<f", rng.choice((float("nan"), float("inf"), 1e38))
                )
            parts.data = bytes(data)
            done.append("data")
        elif op == "template":
            parts.set("tokenizer.chat_template", scalar(V.STRING, rng.choice(_TEMPLATES)))
            done.append("template")
        elif op == "tokens" and rng.random() < 0.3:
            vocab = rng.choice(
                ("bert", "none", "no_vocab", "t5", "rwkv", "plamo2", "ugm", "gpt2", "bogus", "")
            )
            parts.set("tokenizer.ggml.model", scalar(V.STRING, vocab))
            done.append(f"tokenizer model {vocab!r}")
        elif op == "tokens":
            key = rng.choice(
                (
                    "tokenizer.ggml.bos_token_id",
                    "tokenizer.ggml.eos_token_id",
                    "tokenizer.ggml.tokens",
                    "tokenizer.ggml.scores",
                    "tokenizer.ggml.token_type",
                )
            )
            if key.endswith("_id"):
                parts.set(key, scalar(V.UINT32, rng.choice((299, 300, 2**31, 2**32 - 1))))
            else:
                parts.set(
                    key, array(V.STRING, ["a", "b"]) if rng.random() < 0.5 else _random_value(rng)
                )
            done.append(f"tokens {key}")
    return done


def _bytes_of(parts: Parts, rng: random.Random) -> tuple[bytes, list[str]]:
    data = bytearray(parts.build())
    done = []
    if rng.random() < 0.15:
        cut = rng.randrange(0, len(data))
        del data[cut:]
        done.append(f"truncate {cut}")
    if rng.random() < 0.15:
        header = min(len(data), 24 + sum(len(r) for _, r in parts.kvs))
        for _ in range(rng.randint(1, 8)):
            if header:
                data[rng.randrange(header)] ^= 1 << rng.randrange(8)
        done.append("byteflip")
    return bytes(data), done


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("fuzz-seeds")
    model = write_tiny_gguf(d / "model.gguf")
    adapter = random_adapter(
        d / "adapter.gguf", model, rank=4, targets=("q_proj", "v_proj", "down_proj")
    )
    return model, adapter


def _check(out: Outcome, what: str, valid: Callable[[Outcome], bool]) -> str | None:
    problem = out.problem()
    if problem is None and out.returncode == 0 and not valid(out):
        problem = f"exit 0 with an invalid result: {out.stdout[-200:]!r}"
    return None if problem is None else f"{what}: {problem}"


def _inspect_valid(out: Outcome) -> bool:
    report = json.loads(out.stdout)
    return isinstance(report.get("architecture"), str) and isinstance(
        report.get("parameter_count"), int
    )


def _fuzz(tmp: Path, seed_file: Path, n: int, kind: str) -> list[str]:
    rng = random.Random(f"{SEED}-{kind}")
    model = seed_file if kind == "model" else None
    jobs = []
    for i in range(n):
        parts = Parts.of(seed_file)
        done = _mutate(parts, rng)
        data, more = _bytes_of(parts, rng)
        path = tmp / f"{kind}-{i}.gguf"
        path.write_bytes(data)
        desc = f"{kind} case {i} (FEDLM_FUZZ_SEED={SEED}): {done + more}"
        if kind == "model":
            jobs.append((desc, ("inspect", str(path), "--json"), False, _inspect_valid))
            jobs.append(
                (
                    desc,
                    ("generate", str(path), "hello", "--max-tokens", "2", "--n-ctx", "64"),
                    False,
                    lambda o: o.stdout.startswith("hello"),
                )
            )
            if i % 4 == 0:
                jobs.append((desc, (str(path),), True, lambda o: o.stdout.strip() == "ok"))
        else:
            jobs.append(
                (
                    desc,
                    (
                        "generate",
                        str(model or tmp / "base.gguf"),
                        "hello",
                        "--adapter",
                        str(path),
                        "--max-tokens",
                        "2",
                        "--n-ctx",
                        "64",
                    ),
                    False,
                    lambda o: o.stdout.startswith("hello"),
                )
            )
    failures = []
    with ThreadPoolExecutor(WORKERS) as pool:
        outs = pool.map(lambda job: (job, run(*job[1], loader=job[2])), jobs)
        for (desc, args, loader, valid), out in outs:
            what = "loader" if loader else " ".join(args[:1])
            problem = _check(out, what, valid)
            if problem:
                failures.append(f"{desc}: {problem}")
    return failures


def test_fuzz_model_files(tmp_path: Path, seeds: tuple[Path, Path]) -> None:
    failures = _fuzz(tmp_path, seeds[0], CASES, "model")
    assert not failures, "\n".join(failures)


def test_fuzz_adapter_files(tmp_path: Path, seeds: tuple[Path, Path]) -> None:
    model, adapter = seeds
    (tmp_path / "base.gguf").write_bytes(model.read_bytes())
    failures = _fuzz(tmp_path, adapter, CASES, "adapter")
    assert not failures, "\n".join(failures)


def test_mutator_changes_files(seeds: tuple[Path, Path]) -> None:
    # The fuzzer is only as good as its mutations: most cases must differ from the seed.
    rng = random.Random(0)
    original = seeds[0].read_bytes()
    changed = 0
    for _ in range(20):
        parts = Parts.of(seeds[0])
        _mutate(parts, rng)
        changed += _bytes_of(parts, rng)[0] != original
    assert changed >= 18
    assert Parts.of(seeds[0]).build() == original  # taking apart and rebuilding is exact
