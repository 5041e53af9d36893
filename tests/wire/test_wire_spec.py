"""The worked example of docs/wire-format.md is what the code produces, byte for byte.

Run as a script to print the example's hex dump after a deliberate format change:
    .venv/bin/python -m tests.wire.test_wire_spec
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from edge_sdk.wire import AdapterUpdate, ErrorMessage, LoraSpec, UpdateEncoder

DOC = Path(__file__).resolve().parents[2] / "docs" / "wire-format.md"


def example_update() -> AdapterUpdate:
    """One (2, 4) lora_A tensor, int8 with blocks of 4: small enough to read in hex."""
    x = np.array([[0.5, -0.25, 0.125, 1.0], [-2.0, 0.0, 0.75, 0.5]], np.float32)
    return AdapterUpdate.build(
        client_id="dev-1",
        update_id="u1",
        base_version=0,
        model_sha256="ab" * 32,
        lora=LoraSpec(rank=2, alpha=4.0, targets=("q_proj",)),
        num_examples=16,
        num_tokens=2048,
        metrics={"loss": 2.5},
        encoder=UpdateEncoder("int8:4"),
        tensors={"model.layers.0.self_attn.q_proj.lora_A": x},
    )


def example_error() -> ErrorMessage:
    return ErrorMessage(code="stale_update", message="base 1 < 3")


def hexdump(data: bytes) -> str:
    """xxd-style: offset, 16 bytes in hex pairs."""
    return "\n".join(f"{i:04x}: {data[i : i + 16].hex(' ')}" for i in range(0, len(data), 16))


def _doc_block(name: str) -> bytes:
    text = DOC.read_text()
    m = re.search(rf"<!-- example:{name} -->\s*```text\n(.*?)```", text, re.DOTALL)
    assert m, f"no example:{name} block in {DOC}"
    return bytes.fromhex("".join(line.split(":", 1)[1] for line in m.group(1).strip().splitlines()))


def test_doc_examples_match_the_code() -> None:
    assert _doc_block("error") == example_error().to_bytes()
    assert _doc_block("update") == example_update().to_bytes()


def test_example_decodes_as_documented() -> None:
    dense = AdapterUpdate.from_bytes(_doc_block("update")).dense_tensors()
    out = dense["model.layers.0.self_attn.q_proj.lora_A"]
    # int8 codes [64, -32, 16, 127] x 1/127 and [-127, 0, 48, 32] x 2/127, as the doc computes.
    expected = np.array([[64, -32, 16, 127], [-254, 0, 96, 64]], np.float32) / 127
    np.testing.assert_allclose(out, expected, rtol=1e-6)


if __name__ == "__main__":
    for name, msg in (("error", example_error()), ("update", example_update())):
        print(f"<!-- example:{name} --> ({len(msg.to_bytes())} bytes)\n{hexdump(msg.to_bytes())}\n")
