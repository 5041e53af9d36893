"""Bounds applied when decoding untrusted bytes: every one is checked before memory is committed."""

from __future__ import annotations

from dataclasses import dataclass

from edge_sdk.validators import require_positive_ints

_MIB = 1 << 20

# Protocol bounds, the same for every decoder (not tunable like `DecodeLimits`):
INT_MIN = -(1 << 63)
INT_MAX = (1 << 63) - 1
"""Every integer of every message fits a signed 64-bit integer: what SQLite's INTEGER, JSON
consumers that parse into int64 and most languages' default integer hold."""
MAX_METRICS = 64
"""Most entries of an update's `metrics` map (a device reports a few losses, not a dataset)."""
MAX_METRIC_NAME_LEN = 64
"""Longest metric name; names use only [A-Za-z0-9_.-]."""


@dataclass(frozen=True)
class DecodeLimits:
    """What a decoder accepts. The defaults fit a 7B-class adapter at r=16 on every projection."""

    max_bytes: int = 64 * _MIB
    """Largest whole message (envelope + body) in bytes; also msgpack's `max_buffer_size`."""
    max_tensors: int = 4096
    """Most tensors in one message (SmolLM2-135M at r=8 on all 7 projections has 420)."""
    max_key_len: int = 256
    """Longest tensor, metric or metadata key, in characters."""
    max_ndim: int = 4
    """Most dimensions of one tensor."""
    max_elements: int = 1 << 25
    """Most elements of one tensor once decoded (128 MiB as float32)."""
    max_total_elements: int = 1 << 27
    """Most elements over all tensors of a message once decoded (512 MiB as float32)."""
    max_str_len: int = 64 * 1024
    """Longest string value in bytes (error messages, metadata values)."""
    max_container_len: int = 65536
    """Most entries of any list or map other than the tensor map (metrics, metadata, targets)."""
    max_depth: int = 8
    """Deepest nesting of lists/maps inside free-form metadata."""

    def __post_init__(self) -> None:
        for name in (
            "max_bytes",
            "max_tensors",
            "max_key_len",
            "max_ndim",
            "max_elements",
            "max_total_elements",
            "max_str_len",
            "max_container_len",
            "max_depth",
        ):
            require_positive_ints(self, name)
        if self.max_bytes < 16:
            raise ValueError(f"`max_bytes` should be at least 16, got {self.max_bytes}")


DEFAULT_LIMITS = DecodeLimits()
