"""Typed field access on decoded msgpack maps: each failure is a `WireError` naming the field."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from edge_sdk.validators import is_int, is_number
from edge_sdk.wire._errors import (
    InvalidFieldError,
    InvalidKeyError,
    InvalidMetricsError,
    LimitExceededError,
    MissingFieldError,
    NonFiniteError,
    OutOfRangeError,
)
from edge_sdk.wire.limits import (
    INT_MAX,
    INT_MIN,
    MAX_METRIC_NAME_LEN,
    MAX_METRICS,
    DecodeLimits,
)

# Keys of tensors, metrics and metadata: dotted module paths and simple identifiers.
KEY_PATTERN = re.compile(r"[A-Za-z0-9_.:/\-]+")
KEY_CHARSET = "A-Z a-z 0-9 _ . : / -"
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
METRIC_NAME_PATTERN = re.compile(rf"[A-Za-z0-9_.\-]{{1,{MAX_METRIC_NAME_LEN}}}")

_MISSING = object()


def _describe(value: Any) -> str:
    return type(value).__name__


def get(obj: Mapping[str, Any], name: str, where: str, default: Any = _MISSING) -> Any:
    """The field's value; an optional field (one with a default) may also be absent or nil."""
    value = obj.get(name)
    if value is not None or (name in obj and default is _MISSING):
        return value
    if default is _MISSING:
        raise MissingFieldError(f"{where}: missing required field {name!r}")
    return default


def get_map(obj: Mapping[str, Any], name: str, where: str, default: Any = _MISSING) -> dict:
    value = get(obj, name, where, default)
    if not isinstance(value, dict):
        raise InvalidFieldError(f"{where}.{name}: expected a map, got {_describe(value)}")
    return value


def get_str(
    obj: Mapping[str, Any], name: str, where: str, max_len: int, default: Any = _MISSING
) -> str:
    value = get(obj, name, where, default)
    if not isinstance(value, str):
        raise InvalidFieldError(f"{where}.{name}: expected a string, got {_describe(value)}")
    if len(value) > max_len:
        raise LimitExceededError(f"{where}.{name}: string of {len(value)} chars exceeds {max_len}")
    return value


def get_int(
    obj: Mapping[str, Any],
    name: str,
    where: str,
    lo: int = 0,
    hi: int = INT_MAX,
    default: Any = _MISSING,
) -> int:
    """An integer in [lo, hi]; `hi` never exceeds INT_MAX (every integer fits a signed 64-bit)."""
    value = get(obj, name, where, default)
    if not is_int(value):
        raise InvalidFieldError(f"{where}.{name}: expected an integer, got {_describe(value)}")
    hi = min(hi, INT_MAX)
    if not lo <= value <= hi:
        raise OutOfRangeError(f"{where}.{name}: expected an integer in [{lo}, {hi}], got {value}")
    return value


def get_opt_int(
    obj: Mapping[str, Any], name: str, where: str, lo: int = 0, hi: int = INT_MAX
) -> int | None:
    if obj.get(name) is None:
        return None
    return get_int(obj, name, where, lo=lo, hi=hi)


def as_float(value: Any, where: str) -> float:
    if not is_number(value):
        raise InvalidFieldError(f"{where}: expected a number, got {_describe(value)}")
    out = float(value)
    if not math.isfinite(out):
        raise NonFiniteError(f"{where}: expected a finite number, got {out}")
    return out


def get_float(obj: Mapping[str, Any], name: str, where: str, default: Any = _MISSING) -> float:
    return as_float(get(obj, name, where, default), f"{where}.{name}")


def get_bool(obj: Mapping[str, Any], name: str, where: str, default: Any = _MISSING) -> bool:
    value = get(obj, name, where, default)
    if not isinstance(value, bool):
        raise InvalidFieldError(f"{where}.{name}: expected a boolean, got {_describe(value)}")
    return value


def get_bytes(obj: Mapping[str, Any], name: str, where: str) -> bytes:
    value = get(obj, name, where)
    if not isinstance(value, bytes):
        raise InvalidFieldError(
            f"{where}.{name}: expected binary (msgpack bin), got {_describe(value)}"
        )
    return value


def check_metrics(metrics: Any, where: str) -> dict[str, float]:
    """An update's metrics: at most MAX_METRICS finite numbers under short [A-Za-z0-9_.-] names.

    Metrics are stored with every update and shown by the coordinator's status, so they are
    bounded far below the generic container limits; every failure is `InvalidMetricsError`.
    """
    if not isinstance(metrics, Mapping):
        raise InvalidMetricsError(f"{where}: expected a map, got {_describe(metrics)}")
    if len(metrics) > MAX_METRICS:
        raise InvalidMetricsError(
            f"{where}: {len(metrics)} entries exceed the protocol's {MAX_METRICS}"
        )
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not METRIC_NAME_PATTERN.fullmatch(key):
            shown = key[:MAX_METRIC_NAME_LEN] if isinstance(key, str) else _describe(key)
            raise InvalidMetricsError(
                f"{where}: name {shown!r} should be 1-{MAX_METRIC_NAME_LEN} chars of [A-Za-z0-9_.-]"
            )
        try:
            out[key] = as_float(value, f"{where}.{key}")
        except (InvalidFieldError, NonFiniteError) as exc:  # not a number, or NaN/inf
            raise InvalidMetricsError(str(exc)) from None
    return out


def check_key(key: Any, where: str, limits: DecodeLimits) -> str:
    """A map key of tensors/metrics/metadata: non-empty, bounded, restricted charset."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"{where}: expected string keys, got {_describe(key)}")
    if len(key) > limits.max_key_len:
        raise InvalidKeyError(
            f"{where}: key of {len(key)} chars exceeds max_key_len={limits.max_key_len}"
        )
    if not KEY_PATTERN.fullmatch(key):
        raise InvalidKeyError(
            f"{where}: key {key[:64]!r} must be non-empty and use only [{KEY_CHARSET}]"
        )
    return key


def check_sha256(value: str, where: str) -> str:
    if not SHA256_PATTERN.fullmatch(value):
        raise InvalidFieldError(f"{where}: expected 64 lowercase hex digits, got {value[:80]!r}")
    return value


def check_json_like(value: Any, where: str, limits: DecodeLimits, depth: int = 0) -> Any:
    """Free-form metadata: str/int/float/bool/None, lists and string-keyed maps, bounded depth."""
    if depth > limits.max_depth:
        raise LimitExceededError(f"{where}: nesting deeper than max_depth={limits.max_depth}")
    if value is None or isinstance(value, (bool, str)):
        if isinstance(value, str) and len(value) > limits.max_str_len:
            raise LimitExceededError(
                f"{where}: string longer than max_str_len={limits.max_str_len}"
            )
        return value
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise OutOfRangeError(f"{where}: integer {value} outside the signed 64-bit range")
        return value
    if isinstance(value, float):
        return as_float(value, where)
    if isinstance(value, (list, tuple)):
        if len(value) > limits.max_container_len:
            raise LimitExceededError(f"{where}: list longer than max_container_len")
        return [check_json_like(v, f"{where}[{i}]", limits, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if len(value) > limits.max_container_len:
            raise LimitExceededError(f"{where}: map larger than max_container_len")
        return {
            check_key(k, where, limits): check_json_like(v, f"{where}.{k}", limits, depth + 1)
            for k, v in value.items()
        }
    raise InvalidFieldError(f"{where}: expected a JSON-like value, got {_describe(value)}")
