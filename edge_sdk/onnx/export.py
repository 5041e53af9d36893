"""GGUF → ONNX Runtime GenAI model folder, with LoRA adapters as graph inputs.

Route (see issue 13 for why not `torch.onnx.export`):

1. Our own loader dequantizes the GGUF to fp32 (`load_model(precision="fp32")`): Q/K rows come
   back unpermuted (HF order), Gemma norms are stored by llama.cpp as (1 + w) and HF wants w.
   The tensors are written as a Hugging Face folder (safetensors + config.json) with a tokenizer
   converted from the GGUF's own vocabulary by transformers' GGUF converter.
2. A placeholder PEFT adapter (rank `PLACEHOLDER_RANK`, B = 0) on all 7 projections makes the
   genai model builder emit a separate MatMul(A)·MatMul(B) branch per projection instead of
   fusing it into the base weight.
3. The builder's LoRA initializers are turned into graph inputs whose rank axis is symbolic,
   each keeping its zero initializer as the default: with no adapter the graph is the base
   model; an `.onnx_adapter` (`edge_sdk.onnx.adapters`) overrides them per run.

int4 would quantize twice (GGUF Q4_1 → fp32 → the builder's int4 RTN, blocks of 32: on SmolLM2
top-1 0.69 / KL 0.48 against the GGUF). So after the build, the GGUF's own Q4_0/Q4_1 blocks are
copied into the int4 `MatMulNBits` weights and its Q8_0 blocks into the 8-bit lm_head
(`edge_sdk.onnx.gguf_blocks`): those weights are then the GGUF's exactly. Weights of other GGUF
types (Gemma 3's Q4_K/Q5_0/Q6_K) keep the builder's requantization. `precision="fp32"` is exact.

The output folder holds model.onnx (+ .data), genai_config.json, the tokenizer files and
`fedlm_export.json` (the source file's size/mtime and options), so running the same export again
is a no-op.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_sdk.choices import ONNX_PRECISIONS
from edge_sdk.errors import UnsupportedArchitectureError
from edge_sdk.models.config import ModelConfig
from edge_sdk.models.naming import LORA_TARGETS
from edge_sdk.onnx.errors import OnnxExportError

log = logging.getLogger(__name__)

EXPORT_ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "gemma3")
"""GGUF architectures `export_onnx` can build (the genai builder's llama/qwen/gemma3 paths)."""

PRECISIONS = ONNX_PRECISIONS
"""`--precision` values: int4 (MatMulNBits, block 32) or fp32 (exact parity)."""

PLACEHOLDER_RANK = 1
"""Rank of the zero adapter built into the graph; the rank axis is symbolic afterwards."""

MANIFEST = "fedlm_export.json"
"""Written last into the output folder: what was exported, from which file, how."""

ProgressFn = Callable[[str], None]

# Module path in our Transformer → HF name, per family (block-level norms only).
_NORMS = {
    "llama": {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        "attn_norm": "input_layernorm",
        "post_attn_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffn_norm": "post_feedforward_layernorm",
    },
}
_NORMS["qwen2"] = _NORMS["qwen3"] = _NORMS["llama"]


def _lora_module(target: str) -> str:
    return ("self_attn." if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp.") + target


def hf_state_dict(model: Any, config: ModelConfig) -> dict[str, Any]:
    """The fp32 tensors of our `Transformer` under Hugging Face names, as HF stores them."""
    import torch

    gemma = config.arch == "gemma3"
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    norms = _NORMS[config.arch]
    for name, value in sd.items():
        value = value.detach().to(torch.float32).contiguous()
        parts = name.split(".")
        if name.startswith("model.layers.") and len(parts) == 5 and parts[3] in norms:
            hf = f"model.layers.{parts[2]}.{norms[parts[3]]}.weight"
        elif (
            name.startswith("model.layers.")
            and parts[3] == "self_attn"
            and parts[4] in ("q_norm", "k_norm")
        ):
            hf = name
        else:
            hf = name
        # llama.cpp's Gemma converter adds 1 to every RMSNorm weight; HF's Gemma3RMSNorm
        # multiplies by (1 + w), so the stored value is w.
        if gemma and hf.endswith("norm.weight"):
            value = value - 1.0
        out[hf] = value
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def hf_config(config: ModelConfig, bos: int | None, eos: int | None) -> dict[str, Any]:
    """config.json for `config`'s family, in the transformers 5 layout (rope_parameters)."""
    common: dict[str, Any] = {
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "num_hidden_layers": config.n_layer,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": float(config.norm_eps),
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
        "attention_dropout": 0.0,
    }
    if config.rope_scale != 1.0:
        raise UnsupportedArchitectureError(
            f"ONNX export does not support linear RoPE scaling (rope_scale={config.rope_scale})"
        )
    if config.arch == "llama":
        return {
            **common,
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "rope_theta": config.rope_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        }
    if config.arch in ("qwen2", "qwen3"):
        cls = "Qwen2ForCausalLM" if config.arch == "qwen2" else "Qwen3ForCausalLM"
        return {
            **common,
            "architectures": [cls],
            "model_type": config.arch,
            "hidden_act": "silu",
            "attention_bias": config.qkv_bias,
            "use_sliding_window": False,
            "rope_theta": config.rope_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        }
    if config.arch == "gemma3":
        layer_types = [
            "sliding_attention" if config.is_local(i) else "full_attention"
            for i in range(config.n_layer)
        ]
        local = config.rope_base_local or config.rope_base
        return {
            **common,
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": False,
            "query_pre_attn_scalar": round(1.0 / config.softmax_scale**2),
            "sliding_window": config.sliding_window,
            "layer_types": layer_types,
            "final_logit_softcapping": config.final_logit_softcap,
            "attn_logit_softcapping": None,
            # The genai builder still reads the flat transformers 4 keys (issue 13: KeyError
            # 'rope_type' on nested rope_parameters), so both layouts are written.
            "rope_theta": config.rope_base,
            "rope_local_base_freq": local,
            "rope_scaling": None,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": config.rope_base},
                "sliding_attention": {"rope_type": "default", "rope_theta": local},
            },
        }
    raise UnsupportedArchitectureError(
        "ONNX export does not support architecture "
        f"{config.arch!r}; supported: {', '.join(EXPORT_ARCHS)}"
    )


def write_hf_folder(gguf_path: Path, out: Path, progress: ProgressFn) -> ModelConfig:
    """Write `out` as a Hugging Face checkpoint of `gguf_path` (fp32 safetensors + tokenizer)."""
    from safetensors.torch import save_file

    from edge_sdk.models.loader import load_model, read_config

    config = read_config(gguf_path)
    if config.arch not in EXPORT_ARCHS:
        raise UnsupportedArchitectureError(
            f"{gguf_path.name}: ONNX export does not support architecture {config.arch!r}; "
            f"supported: {', '.join(EXPORT_ARCHS)}"
        )
    if any(getattr(config, "rope_dim", None) not in (None, config.head_dim) for _ in [0]):
        raise UnsupportedArchitectureError(
            f"{gguf_path.name}: partial RoPE (rope_dim) is not supported by export"
        )
    out.mkdir(parents=True, exist_ok=True)
    progress("dequantizing GGUF to fp32")
    model = load_model(gguf_path, precision="fp32")
    if getattr(model, "rope_freq_factors", None) is not None:
        raise UnsupportedArchitectureError(
            f"{gguf_path.name}: per-frequency RoPE factors "
            "(rope_freqs.weight) are not supported by export"
        )
    tensors = hf_state_dict(model, config)
    del model
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    progress("converting the GGUF tokenizer")
    tok = convert_tokenizer(gguf_path, config.arch)
    tok.save_pretrained(str(out))
    cfg = hf_config(config, tok.bos_token_id, tok.eos_token_id)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "do_sample": False}
        )
    )
    return config


# GGUF architecture -> the model type transformers' GGUF config loader gives it, whose entry in
# TOKENIZER_MAPPING_NAMES is the class AutoTokenizer ends up building.
_TOKENIZER_MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
}


def convert_tokenizer(gguf_path: Path, arch: str) -> Any:
    """The GGUF's tokenizer as a transformers tokenizer (the same one `AutoTokenizer` builds).

    `AutoTokenizer.from_pretrained(gguf_file=...)` first runs `load_gguf_checkpoint` on llama and
    gemma3 files only to learn the model type, and that parses every metadata string with
    gguf-py one numpy slice at a time: ~21 of the 28 s CPU for Gemma 3's 262k-token vocabulary
    (profile in BENCHMARKS.md), hours' worth on a loaded machine. The architecture is already
    known here, so the tokenizer class is picked directly and only the converter itself runs
    (transformers' fast metadata reader + its merge derivation).
    """
    from transformers.models.auto.tokenization_auto import (
        TOKENIZER_MAPPING_NAMES,
        tokenizer_class_from_name,
    )

    model_type = _TOKENIZER_MODEL_TYPES.get(arch)
    if model_type is None:
        raise UnsupportedArchitectureError(
            f"{gguf_path.name}: no tokenizer conversion for architecture {arch!r}; "
            f"supported: {', '.join(_TOKENIZER_MODEL_TYPES)}"
        )
    # AutoTokenizer falls back to the generic backend where a type registers no class (llama).
    name = TOKENIZER_MAPPING_NAMES.get(model_type) or "TokenizersBackend"
    cls = tokenizer_class_from_name(name)
    if cls is None:
        raise OnnxExportError(
            f"transformers has no tokenizer class {name!r} for {arch!r}; "
            "reinstall the `onnx` extra (pip install 'fedlm-edge[onnx]')"
        )
    tok = cls.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    pre = _gguf_string(gguf_path, "tokenizer.ggml.pre")
    if pre in _DIGIT_SPLIT_PRE:
        # llama.cpp splits every digit off before the GPT-2 regex for these vocabularies
        # (llama-vocab.cpp: "\\p{N}" first); transformers' converter keeps plain ByteLevel, so
        # "coast  3" came out as " ", " ", "3" instead of "  ", "3" (26 of 300 test strings).
        from tokenizers import pre_tokenizers

        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return tok


_DIGIT_SPLIT_PRE = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
)
"""`tokenizer.ggml.pre` values whose llama.cpp pre-tokenizer is `\\p{N}` then the GPT-2 regex."""


def _gguf_string(gguf_path: Path, key: str) -> str | None:
    """A string metadata field of the GGUF, read with the bounded validating reader."""
    from edge_sdk.models.gguf_check import open_model

    field = open_model(gguf_path).fields.get(key)
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else None


def write_placeholder_adapter(out: Path, config: ModelConfig) -> None:
    """A PEFT folder: rank-`PLACEHOLDER_RANK` LoRA on all 7 projections with B = 0."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    shapes = config.target_shapes()
    tensors = {}
    for i in range(config.n_layer):
        for target in LORA_TARGETS:
            o, n = shapes[target]
            stem = f"base_model.model.model.layers.{i}.{_lora_module(target)}"
            tensors[f"{stem}.lora_A.weight"] = torch.full((PLACEHOLDER_RANK, n), 0.01)
            tensors[f"{stem}.lora_B.weight"] = torch.zeros((o, PLACEHOLDER_RANK))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": PLACEHOLDER_RANK,
                "lora_alpha": PLACEHOLDER_RANK,
                "lora_dropout": 0.0,
                "bias": "none",
                "target_modules": list(LORA_TARGETS),
                "base_model_name_or_path": None,
                "fan_in_fan_out": False,
                "use_rslora": False,
                "use_dora": False,
            }
        )
    )


def lora_node_names(config: ModelConfig) -> list[str]:
    """The builder's names of the LoRA MatMul nodes, kept in fp32 when the base goes int4."""
    names = []
    for i in range(config.n_layer):
        for target in LORA_TARGETS:
            group = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "attn"
            names += [f"/model/layers.{i}/{group}/{target}/lora_{x}/MatMul" for x in ("A", "B")]
    return names


def run_builder(
    hf_dir: Path,
    adapter_dir: Path,
    out: Path,
    precision: str,
    cache: Path,
    config: ModelConfig,
    quant_options: Sequence[str] = (),
) -> None:
    """Run onnxruntime-genai's model builder in a child process (it is a script with globals).

    int4 quantizes every MatMul but the LoRA ones: an adapter overrides those weights in fp32.
    """
    extra = [f"adapter_path={adapter_dir}"]
    if precision == "int4":
        extra.append("nodes_to_exclude=" + ",".join(lora_node_names(config)))
        # lm_head at 8 bits: the tied embedding is Q8_0 in our GGUFs, and its blocks are copied in
        extra.append("matmul_mixed_precision=last_matmul:int8")
        extra += list(quant_options)
    cmd = [
        sys.executable,
        "-m",
        "edge_sdk.onnx.builder_shim",
        "-i",
        str(hf_dir),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(cache),
        "--extra_options",
        *extra,
    ]
    # The child imports edge_sdk.onnx.builder_shim from the same tree as this module (the repo
    # root, not edge_sdk/: that would make `import onnx` find edge_sdk/onnx).
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=path)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise OnnxExportError(
            f"the onnxruntime-genai model builder failed on {hf_dir}: " + " | ".join(tail)
        )


def lora_inputs_from_initializers(model_path: Path) -> list[str]:
    """Turn the builder's LoRA weights into graph inputs with a symbolic rank axis.

    Each keeps its (zero) initializer as the default value, so a run without an adapter is the
    base model. Returns the input names, sorted.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    existing = {i.name for i in graph.input}
    names: list[str] = []
    for init in graph.initializer:
        if (
            ".lora_A." not in init.name
            and ".lora_B." not in init.name
            and "lora_A" not in init.name
            and "lora_B" not in init.name
        ):
            continue
        if init.name in existing:
            continue
        if init.data_type != onnx.TensorProto.FLOAT:
            raise OnnxExportError(
                f"{model_path}: LoRA weight {init.name} was quantized (type {init.data_type}); "
                "the LoRA MatMuls must stay fp32 to take adapters"
            )
        dims = list(init.dims)
        # MatMul weights are stored (in, out): A is (in, r), B is (r, out).
        shape: list[Any] = (
            [dims[0], "lora_rank"] if "lora_A" in init.name else ["lora_rank", dims[1]]
        )
        graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, shape))
        names.append(init.name)
    if not names:
        raise OnnxExportError(
            f"{model_path}: the builder kept no LoRA weights; adapters cannot be served"
        )
    onnx.save(model, str(model_path))
    return sorted(names)


def _chat_info(gguf_path: Path) -> dict[str, Any]:
    """The GGUF's chat template and BOS/EOS texts, for the runtime's own chat rendering."""
    from edge_sdk.models.chat_template import model_templates
    from edge_sdk.models.gguf_check import open_model

    reader = open_model(gguf_path)
    fields = reader.fields
    tokens_field = fields.get("tokenizer.ggml.tokens")

    def token_text(key: str) -> str:
        f = fields.get(key)
        if f is None or tokens_field is None:
            return ""
        idx = int(f.contents())
        if not 0 <= idx < tokens_field.count:
            return ""
        buf, starts, lengths = tokens_field._value  # one string, not the whole vocabulary
        return str(buf[starts[idx] : starts[idx] + lengths[idx]], "utf-8")

    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    return {
        "chat_template": model_templates(reader).get("chat_template.default"),
        "bos_token": token_text("tokenizer.ggml.bos_token_id"),
        "eos_token": token_text("tokenizer.ggml.eos_token_id"),
        "add_bos": bool(add_bos.contents()) if add_bos is not None else False,
    }


def export_onnx(
    gguf_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    precision: str = "int4",
    progress: ProgressFn | None = None,
    force: bool = False,
) -> Path:
    """Export `gguf_path` to an ONNX Runtime GenAI folder `out`; returns `out`.

    Idempotent: when `out` already holds an export of the same file with the same options, it is
    returned unchanged (pass `force=True` to rebuild).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` should be one of {PRECISIONS}, got {precision!r}")
    src = Path(gguf_path)
    out = Path(out)
    say = progress or (lambda msg: log.info("%s", msg))
    st = src.stat()
    want = {
        "source": src.name,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "precision": precision,
        # 3: SmolLM2-type vocabularies split digits like llama.cpp (older tokenizers differ)
        # 4: Q4_1 offsets per shared input, q/k/v and gate/up as one MatMulNBits (gguf_blocks.py)
        "format": 4,
    }
    manifest = out / MANIFEST
    if not force and manifest.is_file():
        try:
            have = json.loads(manifest.read_text())
        except ValueError:
            have = {}
        if {k: have.get(k) for k in want} == want and (out / "model.onnx").is_file():
            say(f"{out} already holds this export; nothing to do")
            return out
    if out.exists() and any(out.iterdir()) and not manifest.is_file():
        raise OnnxExportError(
            f"{out} exists, is not empty and holds no fedlm export; choose an empty --out folder"
        )
    t0 = time.perf_counter()
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        hf_dir, adapter_dir, built = work / "hf", work / "placeholder_adapter", work / "onnx"
        config = write_hf_folder(src, hf_dir, say)
        write_placeholder_adapter(adapter_dir, config)
        say(f"building the {precision} ONNX graph (onnxruntime-genai model builder)")
        run_builder(hf_dir, adapter_dir, built, precision, work / "cache", config)
        if precision == "int4":
            from edge_sdk.onnx.gguf_blocks import transcode

            say("copying the GGUF's 4/8-bit blocks into the graph (no second quantization)")
            copied = transcode(built / "model.onnx", src, config)
        else:
            copied = {}
        say("turning LoRA weights into graph inputs")
        names = lora_inputs_from_initializers(built / "model.onnx")
        from edge_sdk.onnx.adapters import lora_input_shapes

        # Stored so that the runtime's first swap does not import onnx and parse the graph
        # (8.8 s of a first swap on the loaded machine, BENCHMARKS.md).
        shapes = {k: list(v) for k, v in lora_input_shapes(built / "model.onnx").items()}
        info = {
            **want,
            "arch": config.arch,
            "n_layer": config.n_layer,
            "lora_inputs": len(names),
            "lora_input_shapes": shapes,
            "gguf_blocks_copied": copied,
            "seconds": round(time.perf_counter() - t0, 2),
            **_chat_info(src),
        }
        (built / MANIFEST).write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(built, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return out
