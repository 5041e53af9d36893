"""Hugging Face PEFT LoRA format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are PEFT's for a causal LM (`PeftModelForCausalLM` wraps the model as
`base_model.model`, and the saved keys drop the adapter name):

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   (out, r)

i.e. `base_model.model.` + our naming-convention key + `.weight`, in HF row order (no Q/K
permutation; that exists only in GGUF). The config carries the keys `peft.LoraConfig` reads.
Import accepts adapters trained elsewhere: an adapter-name infix (`lora_A.default.weight`),
rsLoRA (folded into alpha), fp16/bf16 tensors; it refuses what a GGUF LoRA cannot express
(DoRA, bias training, per-module ranks/alphas, embedding or `modules_to_save` tensors).

numpy + safetensors only, so the runtime can convert a PEFT adapter without torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from edge_sdk.adapters.gguf_lora import BaseModelInfo, write_gguf_lora
from edge_sdk.errors import InvalidAdapterError
from edge_sdk.models import naming

if TYPE_CHECKING:
    from edge_sdk.training.lora import LoraConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(
    r"^base_model\.model\.(model\.layers\.\d+\.\w+\.\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT LoRA adapter in this project's terms."""

    tensors: dict[str, np.ndarray]
    """Naming-convention keys, A (r, in) and B (out, r), float32, HF row order."""
    rank: int
    alpha: float
    """Effective alpha: the update is (alpha / rank) * B @ A (rsLoRA already folded in)."""
    dropout: float
    targets: tuple[str, ...]
    """Adapted projections, in naming order."""
    base_model_name_or_path: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    """The safetensors header metadata."""

    def lora_config(self) -> LoraConfig:
        """The training-side `LoraConfig` that recreates these adapter layers."""
        from edge_sdk.training.lora import LoraConfig

        layers = sorted({naming.parse_hf_module(k.rpartition(".")[0])[0] for k in self.tensors})
        return LoraConfig(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            targets=self.targets,
            layers=tuple(layers),
        )


def _targets_and_layers(tensors: Mapping[str, np.ndarray]) -> tuple[tuple[str, ...], list[int]]:
    found = [naming.parse_hf_module(k.rpartition(".")[0]) for k in tensors]
    targets = {t for _, t in found}
    return tuple(t for t in naming.LORA_TARGETS if t in targets), sorted(
        {layer for layer, _ in found}
    )


def save_peft(
    out_dir: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    base_model_name_or_path: str | None = None,
    n_layer: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` into `out_dir`; return it.

    `n_layer` (the base's block count), when given and larger than the adapted layers, makes
    the config list `layers_to_transform` so PEFT adapts only those blocks.
    """
    if not tensors:
        raise ValueError("adapter has no tensors")
    targets, layers = _targets_and_layers(tensors)
    for key, value in tensors.items():
        half = key.rpartition(".")[2]
        if half not in ("lora_A", "lora_B"):
            raise ValueError(f"adapter tensor key must end in .lora_A or .lora_B, got {key!r}")
        r = value.shape[0] if half == "lora_A" else value.shape[1]
        if value.ndim != 2 or r != rank:
            raise ValueError(f"{key}: shape {value.shape} does not have rank {rank}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(rank),
        "lora_alpha": float(alpha),
        "lora_dropout": float(dropout),
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": layers if n_layer is not None and len(layers) < n_layer else None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    arrays = {
        f"{_PREFIX}{key}.weight": np.ascontiguousarray(value, dtype=np.float32)
        for key, value in sorted(tensors.items())
    }
    header = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    _atomic(out / WEIGHTS_NAME, lambda tmp: save_file(arrays, str(tmp), metadata=header))
    _atomic(out / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    logger.info("wrote PEFT adapter %s (%d tensors, r=%d)", out, len(arrays), rank)
    return out


def _atomic(dest: Path, write: Any) -> None:
    fd, name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; an adapter is meant to be shared
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            out = {}
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                try:
                    out[key] = f.get_tensor(key)
                except (TypeError, ValueError):  # bf16 has no numpy dtype
                    out[key] = _bf16_tensor(path, key)
            return out, meta
    except (OSError, ValueError, RuntimeError) as exc:
        raise InvalidAdapterError(f"{path}: unreadable safetensors file ({exc})") from exc
    except Exception as exc:  # safetensors raises its own SafetensorError on malformed headers
        raise InvalidAdapterError(f"{path}: unreadable safetensors file ({exc})") from exc


def _bf16_tensor(path: Path, key: str) -> np.ndarray:
    try:
        import torch
        from safetensors.torch import safe_open as torch_open
    except ImportError as exc:
        raise InvalidAdapterError(f"{path}: {key} is bf16, which needs torch to read") from exc
    with torch_open(str(path), framework="pt") as f:
        return f.get_tensor(key).to(torch.float32).numpy()


def load_peft(adapter_dir: str | os.PathLike[str]) -> PeftAdapter:
    """Read a PEFT LoRA directory into naming-convention tensors (see the module docstring)."""
    d = Path(adapter_dir)
    cfg_path, weights = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights.is_file():
        raise InvalidAdapterError(f"{d}: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapterError(f"{cfg_path}: unreadable JSON ({exc})") from exc
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise InvalidAdapterError(
            f"{cfg_path}: not a LoRA adapter config (peft_type {cfg.get('peft_type')!r})"
        )
    for key, bad, why in (
        ("use_dora", True, "DoRA adapters"),
        ("fan_in_fan_out", True, "fan_in_fan_out (Conv1D) adapters"),
    ):
        if cfg.get(key) == bad:
            raise InvalidAdapterError(f"{cfg_path}: {why} cannot be converted to a GGUF LoRA")
    if cfg.get("bias", "none") != "none":
        raise InvalidAdapterError(f"{cfg_path}: bias={cfg['bias']!r} adapters are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise InvalidAdapterError(
            f"{cfg_path}: per-module rank_pattern/alpha_pattern is not supported"
        )
    rank, lora_alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0:
        raise InvalidAdapterError(f"{cfg_path}: `r` should be a positive integer, got {rank!r}")
    if not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0:
        raise InvalidAdapterError(
            f"{cfg_path}: `lora_alpha` should be positive, got {lora_alpha!r}"
        )
    # rsLoRA scales by alpha / sqrt(r); as alpha' / r that is alpha' = alpha * sqrt(r).
    alpha = float(lora_alpha) * (math.sqrt(rank) if cfg.get("use_rslora") else 1.0)

    raw, meta = _read_tensors(weights)
    tensors: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        m = _KEY.match(key)
        if m is None:
            raise InvalidAdapterError(
                f"{weights}: tensor {key} is not a LoRA A/B weight of a decoder projection"
            )
        module, half = m.group(1), m.group(2)
        try:
            naming.parse_hf_module(module)
        except ValueError:
            raise InvalidAdapterError(
                f"{weights}: {module} is not a supported LoRA target"
            ) from None
        arr = np.asarray(value, dtype=np.float32)
        expect_r = arr.shape[0] if half == "A" else arr.shape[-1]
        if arr.ndim != 2 or expect_r != rank:
            raise InvalidAdapterError(
                f"{weights}: {key} has shape {arr.shape}, expected rank {rank}"
            )
        if not np.isfinite(arr).all():
            raise InvalidAdapterError(f"{weights}: {key} holds NaN or inf")
        tensors[f"{module}.lora_{half}"] = arr
    if not tensors:
        raise InvalidAdapterError(f"{weights}: no LoRA tensors")
    for key in tensors:
        other = key[:-1] + ("B" if key.endswith("A") else "A")
        if other not in tensors:
            raise InvalidAdapterError(
                f"{weights}: {key} has no matching {other.rpartition('.')[2]}"
            )
    targets, _ = _targets_and_layers(tensors)
    dropout = cfg.get("lora_dropout", 0.0)
    return PeftAdapter(
        tensors=tensors,
        rank=rank,
        alpha=alpha,
        dropout=float(dropout) if isinstance(dropout, (int, float)) else 0.0,
        targets=targets,
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
        metadata=meta,
    )


def peft_to_gguf(
    adapter_dir: str | os.PathLike[str],
    base: BaseModelInfo | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    dtype: str = "f32",
) -> Path:
    """Convert a PEFT LoRA directory to a GGUF LoRA for `base` (checks shapes against it)."""
    adapter = load_peft(adapter_dir)
    return write_gguf_lora(out_path, adapter.tensors, alpha=adapter.alpha, base=base, dtype=dtype)


__all__: Sequence[str] = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PeftAdapter",
    "load_peft",
    "peft_to_gguf",
    "save_peft",
]
