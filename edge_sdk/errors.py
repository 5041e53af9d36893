"""The SDK's exceptions: one base class, one subclass per kind of failure.

Caller misuse (a wrong argument type or value) raises the built-in `TypeError`/`ValueError`.
"""

from __future__ import annotations


class FedlmError(Exception):
    """Base class of every error the SDK raises on purpose."""


class ModelNotFoundError(FedlmError):
    """A model name is unknown, its package is not installed, or a path does not exist."""


class InvalidModelError(FedlmError):
    """A file is not a usable GGUF model: bad magic, truncated, or inconsistent metadata."""


class UnsupportedArchitectureError(FedlmError):
    """The GGUF's `general.architecture` has no implementation here."""


class AdapterMismatchError(FedlmError):
    """An adapter was made for another base model (architecture or tensor shapes differ)."""


class InvalidAdapterError(FedlmError):
    """An adapter file is unreadable or malformed."""


class RuntimeBusyError(FedlmError):
    """An adapter swap was asked for while a generation is running."""
