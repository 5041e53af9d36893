"""Errors of the ONNX Runtime backend and export (subclasses of the SDK's `FedlmError`)."""

from __future__ import annotations

from edge_sdk.errors import FedlmError


class OnnxError(FedlmError):
    """Base class of the ONNX backend's own failures."""


class OnnxNotInstalledError(OnnxError):
    """The `onnx` extra (onnxruntime, onnxruntime-genai, transformers, onnx) is missing."""


class OnnxExportError(OnnxError):
    """`fedlm export-onnx` could not build the model (the builder failed, bad output folder)."""
