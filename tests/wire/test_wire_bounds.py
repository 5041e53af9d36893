"""Protocol bounds that protect the coordinator's storage: int64 integers and small metrics.

Every integer of every message must fit a signed 64-bit integer (SQLite's INTEGER): a larger
one is an `OutOfRangeError` from the decoder, never an OverflowError later. Metrics are at most
MAX_METRICS finite numbers under short names (`InvalidMetricsError`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import msgpack
import pytest

from edge_sdk.wire import (
    AdapterUpdate,
    GlobalAdapter,
    InvalidFieldError,
    InvalidMetricsError,
    LoraSpec,
    OutOfRangeError,
    TaskConfig,
    WireError,
    decode_message,
)
from edge_sdk.wire._envelope import HEADER_SIZE, MessageKind, pack, unpack
from edge_sdk.wire.limits import DEFAULT_LIMITS, INT_MAX, MAX_METRIC_NAME_LEN, MAX_METRICS
from tests.wire.wire_helpers import LORA, SHA, build_update, lora_tensors, valid_messages

TOO_BIG = ((1 << 63), (1 << 64) - 1)


def _int_paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """The path of every integer leaf of a decoded body (bools excluded; bin payloads skipped)."""
    out: list[tuple] = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for key, value in items:
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            out.append((*prefix, key))
        elif isinstance(value, (dict, list)):
            out.extend(_int_paths(value, (*prefix, key)))
    return out


def _set(obj: Any, path: tuple, value: Any) -> None:
    for part in path[:-1]:
        obj = obj[part]
    obj[path[-1]] = value


def _messages_with_every_int_field() -> list[bytes]:
    """valid_messages() plus a frozen-a LoRA spec, so that `a_seed` is present somewhere."""
    frozen = LoraSpec(4, 8.0, ("q_proj",), "frozen-a", a_seed=7)
    task = TaskConfig(
        task_id="t1", model_sha256=SHA, lora=frozen, codec="fp16", local_steps=5,
        batch_size=2, seq_len=64, lr=2e-4, max_rounds=10, global_version=3,
        extra={"n": 1},
    )  # fmt: skip
    return [*valid_messages(), task.to_bytes()]


def test_every_integer_field_of_every_message_refuses_more_than_int64() -> None:
    checked = set()
    for data in _messages_with_every_int_field():
        kind, body = unpack(data, None, DEFAULT_LIMITS)
        paths = _int_paths(body)
        assert paths or kind == MessageKind.ERROR, kind  # ErrorMessage has no integer
        for path in paths:
            for value in TOO_BIG:
                body2 = msgpack.unpackb(msgpack.packb(body, use_bin_type=True), raw=False)
                _set(body2, path, value)
                bad = pack(kind, body2)
                with pytest.raises(InvalidFieldError) as info:
                    decode_message(bad)
                # The top-level counters and versions name themselves as out of range.
                if path[-1] in ("base_version", "num_examples", "num_tokens", "version",
                                "global_version", "local_steps", "seq_len", "a_seed"):  # fmt: skip
                    assert isinstance(info.value, OutOfRangeError), (path, info.value)
                    assert str(path[-1]) in str(info.value)
            checked.add((kind, path[-1] if isinstance(path[-1], str) else path[-2]))
    names = {name for _, name in checked}
    for field in ("base_version", "num_examples", "num_tokens", "rank", "a_seed", "version",
                  "local_steps", "batch_size", "seq_len", "max_rounds", "global_version",
                  "block", "shape", "n"):  # fmt: skip
        assert field in names, f"{field} was never exercised"


def test_int64_max_itself_round_trips() -> None:
    update = AdapterUpdate.build(
        client_id="c1", base_version=INT_MAX, model_sha256=SHA, lora=LORA,
        tensors=lora_tensors(0), num_examples=INT_MAX, num_tokens=INT_MAX, codec="fp16",
    )  # fmt: skip
    back = AdapterUpdate.from_bytes(update.to_bytes())
    assert (back.base_version, back.num_examples, back.num_tokens) == (INT_MAX,) * 3


@pytest.mark.parametrize("field", ["base_version", "num_examples", "num_tokens"])
def test_encoders_refuse_what_decoders_would(field: str) -> None:
    kwargs: dict[str, Any] = {"base_version": 0, "num_examples": 1, "num_tokens": 0}
    kwargs[field] = (1 << 64) - 1
    with pytest.raises(ValueError, match=rf"`{field}` should be at most 2\^63-1"):
        AdapterUpdate.build(
            client_id="c1", model_sha256=SHA, lora=LORA, tensors=lora_tensors(0), **kwargs
        )
    with pytest.raises(ValueError, match="a_seed"):
        LoraSpec(4, 8.0, ("q_proj",), "frozen-a", a_seed=1 << 63)
    with pytest.raises(ValueError, match="version"):
        GlobalAdapter(version=1 << 63, lora=LORA, tensors={})


def _with_metrics(metrics: Any) -> bytes:
    data = build_update("fp16").to_bytes()
    kind, body = unpack(data, MessageKind.ADAPTER_UPDATE, DEFAULT_LIMITS)
    body["metrics"] = metrics
    return pack(kind, body)


@pytest.mark.parametrize(
    "metrics, match",
    [
        ({f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}, "65 entries exceed the protocol's 64"),
        ({"x" * (MAX_METRIC_NAME_LEN + 1): 1.0}, "should be 1-64 chars"),
        ({"": 1.0}, "should be 1-64 chars"),
        ({"eval/loss": 1.0}, "should be 1-64 chars"),  # '/' and ':' are key chars, not metric
        ({"loss\nINFO forged": 1.0}, "should be 1-64 chars"),
        ({"loss": float("inf")}, "finite"),
        ({"loss": float("nan")}, "finite"),
        ({"loss": True}, "expected a number"),
        ({"loss": "1.0"}, "expected a number"),
        ({"loss": [1.0]}, "expected a number"),
        ([1.0], "expected a map"),
    ],
)
def test_bad_metrics_are_a_typed_wire_error(metrics: Any, match: str) -> None:
    with pytest.raises(InvalidMetricsError, match=match):
        AdapterUpdate.from_bytes(_with_metrics(metrics))


def test_the_measured_attack_is_refused_before_it_is_kept() -> None:
    """65,536 metrics with 256-char keys were stored and served (52.9 MB of /v1/status)."""
    metrics = {f"{i:08d}" + "k" * 248: float(i) for i in range(65536)}
    data = _with_metrics(metrics)
    refusals, parses = [], []
    for _ in range(3):
        started = time.perf_counter()
        with pytest.raises(InvalidMetricsError, match="65536 entries"):
            AdapterUpdate.from_bytes(data)
        refusals.append(time.perf_counter() - started)
        # Baseline, measured alongside so that a busy machine slows both: parsing the body.
        started = time.perf_counter()
        msgpack.unpackb(data[HEADER_SIZE:], strict_map_key=False)
        parses.append(time.perf_counter() - started)
    # The refusal costs about one parse, not a walk over 65,536 stored entries.
    assert statistics.median(refusals) < 3 * statistics.median(parses) + 0.05, (refusals, parses)


def test_the_most_metrics_allowed_round_trip() -> None:
    metrics = {f"{i:02d}" + "a" * (MAX_METRIC_NAME_LEN - 2): i / 3 for i in range(MAX_METRICS)}
    back = AdapterUpdate.from_bytes(_with_metrics(metrics))
    assert back.metrics == metrics
    with pytest.raises(ValueError, match="65 entries"):
        AdapterUpdate.build(
            client_id="c1", base_version=0, model_sha256=SHA, lora=LORA,
            tensors=lora_tensors(0), num_examples=1,
            metrics={f"m{i}": 1.0 for i in range(MAX_METRICS + 1)},
        )  # fmt: skip


def test_bounds_errors_are_wire_errors() -> None:
    assert issubclass(OutOfRangeError, InvalidFieldError) and issubclass(OutOfRangeError, WireError)
    assert issubclass(InvalidMetricsError, InvalidFieldError)
