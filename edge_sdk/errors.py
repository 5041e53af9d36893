"""The SDK's exceptions: one base class, one subclass per kind of failure.

Caller misuse (a wrong argument type or value) raises the built-in `TypeError`/`ValueError`.
"""

from __future__ import annotations


class FedlmError(Exception):
    """Base class of every error the SDK raises on purpose."""


class ModelNotFoundError(FedlmError):
    """A model name is unknown, its package is not installed, or a path does not exist."""


class InvalidModelError(FedlmError):
    """A file is not a usable GGUF model: bad magic, truncated, over a limit of
    `edge_sdk.models.gguf_limits`, or inconsistent metadata; or llama.cpp refused it."""


class ChatTemplateError(InvalidModelError):
    """A model's chat template does not compile, or exceeds the rendering budget
    (operations, time, memory or output size; see `edge_sdk.models.chat_template`)."""


class GenerationError(FedlmError):
    """llama.cpp failed while evaluating a model that loaded (e.g. `llama_decode` refused a
    batch of a hostile model); the message quotes llama.cpp's logged reason."""


class UnsupportedArchitectureError(FedlmError):
    """The GGUF's `general.architecture` has no implementation here."""


class AdapterMismatchError(FedlmError):
    """An adapter was made for another base model (architecture or tensor shapes differ)."""


class InvalidAdapterError(FedlmError):
    """An adapter file is unreadable or malformed: a bad container, a tensor type or alpha
    llama.cpp cannot take, NaN/inf values; or llama.cpp refused it."""


class RuntimeBusyError(FedlmError):
    """An adapter swap was asked for while a generation is running."""
