"""`run()`, what `fedlm train` does: resolve, tokenize, load, fit with checkpoints, export
both adapter formats and the metrics."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_sdk.models.config import model_config
from edge_sdk.training.checkpoint import CHECKPOINT_NAME
from edge_sdk.training.config import TrainConfig
from edge_sdk.training.data import Dataset, build_dataset, describe
from edge_sdk.training.errors import CheckpointError
from edge_sdk.training.model_setup import load_for_training

if TYPE_CHECKING:
    from edge_sdk.training.preferences import PreferenceDataset
    from edge_sdk.training.trainer import TrainResult

# The trainer's name, which these log lines carried before this module was split out of it.
logger = logging.getLogger("edge_sdk.training.trainer")


@dataclass
class RunOutput:
    """Where `run()` put things, and what it measured."""

    out_dir: Path
    peft_dir: Path
    gguf_path: Path
    metrics_path: Path
    result: TrainResult
    data_summary: str


def run(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    config: TrainConfig,
    *,
    resume: bool = False,
    skip_bad: bool = False,
    progress: bool = False,
    model_name: str | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_data: Callable[[str], None] | None = None,
    init_adapter: Mapping[str, np.ndarray] | None = None,
) -> RunOutput:
    """`fedlm train`: resolve, tokenize, load, fit with checkpoints, export both adapter formats.

    `config.method` "sft" reads examples (`edge_sdk.training.data`), "dpo" preference pairs
    (`edge_sdk.training.preferences`). `init_adapter` starts from an adapter (naming-convention
    tensors) instead of the seeded init: e.g. DPO after SFT, with `config.reference="start"`.

    `out_dir` receives `adapter_model.safetensors` + `adapter_config.json` (PEFT),
    `adapter.gguf` (llama.cpp), `metrics.json` and `checkpoint.pt`. `on_data` receives the
    one-line data summary as soon as the data is read, before the model loads.
    """
    from edge_sdk.adapters.export import export_adapter
    from edge_sdk.adapters.gguf_lora import BaseModelInfo
    from edge_sdk.models import resolve
    from edge_sdk.models.identity import model_sha256
    from edge_sdk.training.tokenizer import load_tokenizer

    model_path = resolve(model)
    out = Path(out_dir)
    ckpt = out / CHECKPOINT_NAME
    if ckpt.exists() and not resume:
        raise CheckpointError(
            f"{out} already holds a training checkpoint; pass --resume to continue that run, "
            "or choose another --out"
        )
    if resume and not ckpt.exists():
        raise CheckpointError(f"{ckpt}: no checkpoint to resume from")
    tokenizer = load_tokenizer(model_path)
    dataset: Dataset | PreferenceDataset
    if config.method == "dpo":
        from edge_sdk.training.preferences import build_preference_dataset, describe_pairs

        dataset = build_preference_dataset(data, tokenizer, config.data_config(skip_bad))
        summary = describe_pairs(dataset.stats)
    else:
        dataset = build_dataset(data, tokenizer, config.data_config(skip_bad))
        summary = describe(dataset.stats)
    # llama.cpp's vocabulary (~25 MB for SmolLM2) is not needed past packing (issue 16).
    del tokenizer
    logger.info("data: %s", summary)
    if on_data is not None:
        on_data(summary)
    # The file's sha256 (cached by the identity module) names the base in the checkpoint
    # fingerprint and in both adapter files.
    base_sha = model_sha256(model_path)
    torch_model = load_for_training(model_path, config, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    from edge_sdk.training.trainer import fit

    result = fit(
        torch_model,
        dataset,
        config,
        init_adapter=init_adapter,
        checkpoint_path=ckpt,
        resume=resume,
        base_id=base_sha,
        progress=progress,
        on_step=on_step,
    )
    info = BaseModelInfo.from_gguf(model_path, sha256=base_sha)
    paths = export_adapter(
        out,
        result.adapter,
        rank=config.lora.rank,
        alpha=config.lora.alpha,
        dropout=config.lora.dropout,
        base=info,
        base_model_name=model_name or str(model),
        n_layer=model_config(torch_model).n_layer,
    )
    metrics_path = out / "metrics.json"
    doc = {
        "model": str(model),
        "model_path": str(model_path),
        "model_sha256": base_sha,
        # what ran: auto's choice on this machine, not "auto"
        "config": {**dataclasses.asdict(config), "compute": config.resolved_compute},
        "data": dataclasses.asdict(dataset.stats),
        "metrics": dataclasses.asdict(result.metrics),
    }
    tmp = metrics_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=list) + "\n")
    os.replace(tmp, metrics_path)
    return RunOutput(out, paths.peft_dir, paths.gguf_path, metrics_path, result, summary)
