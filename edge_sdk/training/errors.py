"""Errors of the training package; all are `FedlmError`s, so the CLI prints one line for them."""

from __future__ import annotations

from edge_sdk.errors import FedlmError


class TrainingError(FedlmError):
    """Base class of the training package's errors."""


class DataFormatError(TrainingError):
    """A data file or line is malformed; the message names the file and the line number."""


class EmptyDatasetError(TrainingError):
    """The data holds no usable example (nothing to train on after parsing and filtering)."""


class TokenizerError(TrainingError):
    """The model's vocabulary or chat template cannot be loaded or rendered."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, unreadable, or was written by a run with another configuration."""
