"""Every enumerated choice of the SDK and the coordinator, defined once.

Each choice is a `Literal` type (for annotations and the type checker) and a tuple of its
values derived from it with `typing.get_args` (for validation and argparse `choices`), so
the two cannot drift. Config dataclasses annotate their fields with the `Literal`; the CLI
takes its `choices` from the tuple. Imports nothing but `typing`: the wire format and the
CLI's parser build import it without loading torch, numpy or aiohttp.
"""

from __future__ import annotations

from typing import Literal, get_args

Precision = Literal["nf4", "bf16", "fp32"]
"""Storage of the frozen base weights in training: NF4 4-bit (QLoRA), bfloat16 or float32."""
PRECISIONS: tuple[Precision, ...] = get_args(Precision)

Compute = Literal["auto", "fp32", "bf16"]
"""Arithmetic of the NF4 base's two matrix products in training (the forward and the input
gradient): fp32, or bf16 (weights and activations rounded to bf16, products widened back; the
adapter, its gradients, norms, attention, the loss and the optimizer stay fp32), or auto (bf16
where the CPU has bf16 dot products, else fp32: `edge_sdk.compute`)."""
COMPUTES: tuple[Compute, ...] = get_args(Compute)

LoraMode = Literal["naive", "frozen-a", "exact"]
"""Federated LoRA aggregation: "naive" (average A and B), "frozen-a" (A from a shared seed,
only B trained and averaged), "exact" (average of the products B·A, re-factorised)."""
LORA_MODES: tuple[LoraMode, ...] = get_args(LoraMode)

StrategyName = Literal["fedavg", "fedbuff"]
"""Coordinator strategy: synchronous rounds (FedAvg) or buffered asynchronous (FedBuff)."""
STRATEGIES: tuple[StrategyName, ...] = get_args(StrategyName)

RobustAggregator = Literal["mean", "trimmed-mean", "median"]
"""How the coordinator combines client deltas: weighted mean, coordinate-wise trimmed mean or
coordinate-wise median."""
ROBUST_AGGREGATORS: tuple[RobustAggregator, ...] = get_args(RobustAggregator)

Backend = Literal["llama.cpp", "onnx"]
"""Inference runtime of `fedlm generate`."""
BACKENDS: tuple[Backend, ...] = get_args(Backend)

OnnxPrecision = Literal["int4", "fp32"]
"""Weight precision of an ONNX export."""
ONNX_PRECISIONS: tuple[OnnxPrecision, ...] = get_args(OnnxPrecision)

FloatFormat = Literal["fp32", "fp16", "bf16"]
"""Wire value formats stored as plain floats."""
FLOAT_FORMATS: tuple[FloatFormat, ...] = get_args(FloatFormat)

BlockFormat = Literal["int8", "int4", "nf4"]
"""Wire value formats quantized in blocks with one scale per block."""
BLOCK_FORMATS: tuple[BlockFormat, ...] = get_args(BlockFormat)

ValueFormat = Literal[FloatFormat, BlockFormat]
"""The value stage of a wire codec (one per pipeline)."""
VALUE_FORMATS: tuple[ValueFormat, ...] = FLOAT_FORMATS + BLOCK_FORMATS

CodecStage = Literal["delta", "topk", ValueFormat, "zlib"]
"""A stage of a wire codec pipeline such as "delta+topk:0.01+int8:64+zlib"."""
CODEC_STAGES: tuple[str, ...] = ("delta", "topk", *VALUE_FORMATS, "zlib")

Architecture = Literal["llama", "gemma3", "qwen2", "qwen3"]
"""GGUF `general.architecture` values the torch model (training) supports."""
ARCHITECTURES: tuple[Architecture, ...] = get_args(Architecture)

LogLevel = Literal["debug", "info", "warning", "error"]
"""Log levels the coordinator's command line accepts."""
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)

TrainMethod = Literal["sft", "dpo"]
"""sft: supervised fine-tuning on examples; dpo: preference tuning on (chosen, rejected) pairs."""
TRAIN_METHODS: tuple[TrainMethod, ...] = get_args(TrainMethod)

DpoLoss = Literal["sigmoid", "ipo"]
"""sigmoid: DPO (Rafailov et al. 2023, arXiv:2305.18290); ipo: IPO (Azar et al. 2023,
arXiv:2310.12036)."""
DPO_LOSSES: tuple[DpoLoss, ...] = get_args(DpoLoss)

DpoReference = Literal["base", "start"]
"""The frozen reference policy of DPO: the base model (adapter disabled), or the model with the
adapter the run started from (e.g. an SFT adapter, or the federation's global adapter)."""
DPO_REFERENCES: tuple[DpoReference, ...] = get_args(DpoReference)
