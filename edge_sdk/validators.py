"""The checks config dataclasses and decoders share: integers that are not bools, in a range,
finite positive numbers, and the supported architecture.

`bool` is a subclass of `int` in Python, so `isinstance(True, int)` holds; every integer field
here refuses bools, since `rank=True` is a mistake, not a 1. The `require_*` helpers raise
`ValueError` naming the field and the bad value, in the messages the callers had before.
Imports nothing heavy: the wire format and the CLI use it.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

from edge_sdk.choices import ARCHITECTURES, COMPUTES
from edge_sdk.errors import UnsupportedArchitectureError


def is_int(value: object) -> TypeGuard[int]:
    """An `int` that is not a `bool`."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_int_in(value: object, lo: int | None = None, hi: int | None = None) -> TypeGuard[int]:
    """An `int`, not a `bool`, with lo <= value <= hi (a None bound is open)."""
    return is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi)


def is_number(value: object) -> TypeGuard[int | float]:
    """An `int` or `float` that is not a `bool`."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: object) -> TypeGuard[int | float]:
    """A number (see `is_number`) that is neither infinite nor NaN."""
    return is_number(value) and math.isfinite(value)


def is_positive_finite(value: object) -> TypeGuard[int | float]:
    """A finite number > 0."""
    return is_finite(value) and value > 0


def require_positive_ints(obj: Any, *names: str) -> None:
    """Each field `names` of `obj` is an integer >= 1, else a `ValueError` naming it."""
    for name in names:
        value = getattr(obj, name)
        if not is_int_in(value, 1):
            raise ValueError(f"`{name}` should be a positive integer, got {value!r}")


def require_non_negative_ints(obj: Any, *names: str) -> None:
    """Each field `names` of `obj` is an integer >= 0, else a `ValueError` naming it."""
    for name in names:
        value = getattr(obj, name)
        if not is_int_in(value, 0):
            raise ValueError(f"`{name}` should be a non-negative integer, got {value!r}")


def require_int_in(name: str, value: object, lo: int, hi: int) -> int:
    """`value` if it is an integer in [lo, hi], else a `ValueError` naming `name`."""
    if not is_int_in(value, lo, hi):
        raise ValueError(f"`{name}` should be an integer in [{lo}, {hi}], got {value!r}")
    return value


def require_compute(compute: object, precision: object) -> None:
    """`compute` is one of COMPUTES, and bf16 only over an NF4 base (a bf16 or fp32 base
    computes in its own dtype; auto then means fp32: `edge_sdk.compute.resolve_compute`)."""
    if compute not in COMPUTES:
        raise ValueError(f"`compute` should be one of {COMPUTES}, got {compute!r}")
    if compute == "bf16" and precision != "nf4":
        raise ValueError(
            f"`compute` {compute} applies to an NF4 base, not precision {precision} "
            "(use precision nf4, or compute fp32)"
        )


def require_architecture(arch: object) -> str:
    """`arch` if the torch model supports it for training, else `UnsupportedArchitectureError`."""
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported for training; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    return str(arch)
