"""A tiny base GGUF stub for adapter tests: metadata and projection weights only."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from edge_sdk.models import naming

# (out, in) of each target for the tiny base: d_model 32, 4 heads of 8, 2 KV heads, d_ff 48.
D, N_HEAD, N_KV, HEAD_DIM, D_FF, N_LAYER = 32, 4, 2, 8, 48, 2
TARGET_SHAPES = {
    "q_proj": (N_HEAD * HEAD_DIM, D),
    "k_proj": (N_KV * HEAD_DIM, D),
    "v_proj": (N_KV * HEAD_DIM, D),
    "o_proj": (D, N_HEAD * HEAD_DIM),
    "gate_proj": (D_FF, D),
    "up_proj": (D_FF, D),
    "down_proj": (D, D_FF),
}


def write_base_stub(path: Path, arch: str = "llama", n_layer: int = N_LAYER) -> Path:
    """A GGUF with the metadata, norms and projection weights of a tiny model (no vocabulary).

    Complete enough for the model checks (`gguf_check.check_model`): hyper-parameters and the
    shapes of every block tensor agree."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name("tiny-stub")
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_block_count(n_layer)
    w.add_embedding_length(D)
    w.add_feed_forward_length(D_FF)
    w.add_context_length(64)
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    for layer in range(n_layer):
        w.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(D, np.float32))
        w.add_tensor(f"blk.{layer}.ffn_norm.weight", np.ones(D, np.float32))
        for target, shape in TARGET_SHAPES.items():
            w.add_tensor(
                naming.gguf_stem(layer, target) + ".weight",
                rng.standard_normal(shape).astype(np.float32),
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_adapter(
    rank: int = 4,
    n_layer: int = N_LAYER,
    targets: tuple[str, ...] = naming.LORA_TARGETS,
    seed: int = 1,
) -> dict[str, np.ndarray]:
    """Naming-convention tensors with non-zero A and B."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(n_layer):
        for target in targets:
            o, i = TARGET_SHAPES[target]
            module = naming.hf_module(layer, target)
            out[module + ".lora_A"] = rng.standard_normal((rank, i)).astype(np.float32)
            out[module + ".lora_B"] = rng.standard_normal((o, rank)).astype(np.float32)
    return out
