"""Local LoRA / QLoRA training on the GGUF model a device already runs.

The model's own GGUF is dequantized layer by layer and re-quantized to NF4 (QLoRA) or kept in
bf16/fp32; LoRA layers sit on every attention and MLP projection; llama.cpp's tokenizer and
chat template make training see exactly what inference sees. One call does it all:

    from edge_sdk.training import TrainConfig, run

    out = run("smollm2-135m", "my.jsonl", "out/", TrainConfig(steps=100))
    print(out.data_summary, out.result.metrics.eval_loss)   # "30 examples (30 chat) ...", 0.29
    # out.gguf_path is out/adapter.gguf: EdgeModel.load_adapter() serves it.

The steps `run` is made of can be used on their own (a federated client does):

    tokenizer = load_tokenizer(path)                        # llama.cpp vocabulary + template
    dataset = build_dataset(files, tokenizer, config.data_config())
    model = load_for_training(path, config)                 # frozen base + LoRA layers (torch)
    result = fit(model, dataset, config)                    # result.adapter: {key: ndarray}

Preference tuning (DPO / IPO) on JSONL pairs `{"prompt", "chosen", "rejected"}` is the same
loop with `TrainConfig(method="dpo")`: `build_preference_dataset` replaces `build_dataset`
(`edge_sdk.training.preferences`, `edge_sdk.training.dpo`).

Data formats are described in `edge_sdk.training.data`; every data, tokenizer and checkpoint
failure is a `TrainingError` whose one-line message names the file (and line) at fault.

Names are imported on first use, so `import edge_sdk.training.data` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_sdk.training.config import TrainConfig
    from edge_sdk.training.data import DataConfig, Dataset, build_dataset
    from edge_sdk.training.dpo import fit_dpo, preference_loss
    from edge_sdk.training.errors import (
        CheckpointError,
        DataFormatError,
        EmptyDatasetError,
        TokenizerError,
        TrainingError,
    )
    from edge_sdk.training.lora import LoraConfig
    from edge_sdk.training.model_setup import load_for_training
    from edge_sdk.training.pipeline import RunOutput, run
    from edge_sdk.training.preferences import (
        PreferenceDataset,
        PreferencePair,
        build_preference_dataset,
        load_preferences,
    )
    from edge_sdk.training.tokenizer import load_tokenizer
    from edge_sdk.training.trainer import TrainMetrics, TrainResult, fit

_EXPORTS = {
    "LoraConfig": "lora",
    "PreferencePair": "preferences",
    "PreferenceDataset": "preferences",
    "load_preferences": "preferences",
    "build_preference_dataset": "preferences",
    "fit_dpo": "dpo",
    "preference_loss": "dpo",
    "TrainConfig": "config",
    "TrainMetrics": "trainer",
    "TrainResult": "trainer",
    "RunOutput": "pipeline",
    "run": "pipeline",
    "fit": "trainer",
    "load_for_training": "model_setup",
    "DataConfig": "data",
    "Dataset": "data",
    "build_dataset": "data",
    "load_tokenizer": "tokenizer",
    "TrainingError": "errors",
    "DataFormatError": "errors",
    "EmptyDatasetError": "errors",
    "TokenizerError": "errors",
    "CheckpointError": "errors",
}

__all__ = [
    "CheckpointError",
    "DataConfig",
    "DataFormatError",
    "Dataset",
    "EmptyDatasetError",
    "LoraConfig",
    "PreferenceDataset",
    "PreferencePair",
    "RunOutput",
    "TokenizerError",
    "TrainConfig",
    "TrainMetrics",
    "TrainResult",
    "TrainingError",
    "build_dataset",
    "build_preference_dataset",
    "fit",
    "fit_dpo",
    "load_for_training",
    "load_preferences",
    "load_tokenizer",
    "preference_loss",
    "run",
]


def __getattr__(name: str) -> Any:
    # PEP 562: the trainer pulls in torch (seconds); the data and error modules must not.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
