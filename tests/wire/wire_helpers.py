"""Shared builders for the wire tests: small realistic LoRA tensors and one valid message of each
kind."""

from __future__ import annotations

import numpy as np

from edge_sdk.wire import (
    AdapterUpdate,
    ErrorMessage,
    GlobalAdapter,
    LoraSpec,
    TaskConfig,
    UpdateEncoder,
)

SHA = "ab" * 32
LORA = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "down_proj"))


def lora_tensors(seed: int = 0, rank: int = 4) -> dict[str, np.ndarray]:
    """Two layers of q_proj (96 -> 96) and down_proj (160 -> 96); A uniform, B small gaussian."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for layer in range(2):
        for mod, (d_out, d_in) in (("self_attn.q_proj", (96, 96)), ("mlp.down_proj", (96, 160))):
            bound = 1.0 / np.sqrt(d_in)
            key = f"model.layers.{layer}.{mod}"
            out[f"{key}.lora_A"] = rng.uniform(-bound, bound, (rank, d_in)).astype(np.float32)
            out[f"{key}.lora_B"] = (rng.standard_normal((d_out, rank)) * 0.02).astype(np.float32)
    return out


def build_update(
    codec: str, seed: int = 0, reference: dict[str, np.ndarray] | None = None
) -> AdapterUpdate:
    return AdapterUpdate.build(
        client_id="client-1",
        base_version=3,
        model_sha256=SHA,
        lora=LORA,
        tensors=lora_tensors(seed),
        num_examples=64,
        num_tokens=8192,
        metrics={"loss": 1.25, "ppl": 3.49},
        encoder=UpdateEncoder(codec),
        reference=reference,
        update_id=f"u-{seed}",
    )


def valid_messages() -> list[bytes]:
    """One encoded message per kind and per codec family, for mutation fuzzing."""
    ref = lora_tensors(99)
    msgs = [
        build_update(c, reference=ref).to_bytes()
        for c in (
            "fp32",
            "fp16",
            "bf16",
            "int8",
            "int4:16",
            "nf4",
            "topk:0.1+int8",
            "delta+topk:0.2+nf4:32",
            "int4:128+zlib",
        )
    ]
    msgs.append(
        GlobalAdapter(
            version=4,
            lora=LORA,
            tensors=lora_tensors(1),
            metadata={"n": 2, "ids": ["a"]},
            codec="fp16",
        ).to_bytes()
    )
    msgs.append(
        TaskConfig(
            task_id="t1",
            model_sha256=SHA,
            lora=LORA,
            codec="delta+topk+int8",
            local_steps=5,
            batch_size=2,
            seq_len=64,
            lr=2e-4,
            max_rounds=10,
            extra={"dp": {"clip": 1.0}},
        ).to_bytes()
    )
    msgs.append(ErrorMessage(code="stale_update", message="base version 1 is too old").to_bytes())
    return msgs
