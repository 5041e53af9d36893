"""The four messages of protocol version 1, each a dataclass with a `to_bytes`/`from_bytes` pair.

`to_bytes` writes the envelope (see `_envelope`) and one msgpack map; `from_bytes` reads untrusted
bytes and raises only `WireError` subclasses. Field names and types: docs/wire-format.md.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edge_sdk.choices import LORA_MODES, LoraMode
from edge_sdk.validators import is_int_in, is_positive_finite
from edge_sdk.wire import _envelope
from edge_sdk.wire._envelope import PROTOCOL_VERSION, MessageKind
from edge_sdk.wire._errors import (
    CodecMismatchError,
    InvalidFieldError,
    LimitExceededError,
    ShapeMismatchError,
    UnsupportedVersionError,
    WireError,
)
from edge_sdk.wire._fields import (
    KEY_PATTERN,
    SHA256_PATTERN,
    check_json_like,
    check_key,
    check_metrics,
    get,
    get_float,
    get_int,
    get_map,
    get_opt_int,
    get_str,
)
from edge_sdk.wire.codecs import (
    CodecSpec,
    EncodedTensor,
    UpdateEncoder,
    check_scales,
    decode_many,
    encode_tensor,
    parse_codec,
)
from edge_sdk.wire.limits import DEFAULT_LIMITS, INT_MAX, DecodeLimits

MAX_RANK = 65536
_ID_MAX = 128
_ERROR_CODE = re.compile(r"[a-z0-9_.\-]{1,64}")

if TYPE_CHECKING:
    from typing_extensions import Self


def _check_id(value: Any, name: str) -> str:
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= _ID_MAX
        or not KEY_PATTERN.fullmatch(value)
    ):
        raise ValueError(f"`{name}` should be 1-{_ID_MAX} chars of [A-Za-z0-9_.:/-], got {value!r}")
    return value


def _check_count(value: Any, name: str, lo: int = 0) -> int:
    # INT_MAX, not 2^64-1: whatever is encoded must also decode and fit a SQLite INTEGER.
    if not is_int_in(value, lo):
        raise ValueError(f"`{name}` should be an integer >= {lo}, got {value!r}")
    if value > INT_MAX:
        raise ValueError(
            f"`{name}` should be at most 2^63-1 (a signed 64-bit integer), got {value}"
        )
    return value


def _check_sha(value: Any, name: str) -> str:
    if not isinstance(value, str) or not SHA256_PATTERN.fullmatch(value):
        raise ValueError(f"`{name}` should be 64 lowercase hex digits, got {value!r}")
    return value


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA configuration an adapter was trained with."""

    rank: int
    """r of this sender's factors: lora_A is (r, in), lora_B is (out, r). May differ per client
    in exact mode."""
    alpha: float
    """LoRA scaling numerator: the update is (alpha / r) * B @ A."""
    targets: tuple[str, ...]
    """Adapted projections, e.g. ("q_proj", "v_proj") (edge_sdk.models.naming.LORA_TARGETS)."""
    mode: LoraMode = "exact"
    """Aggregation mode: "naive" (average A and B), "frozen-a" (A from `a_seed`, only B trained),
    "exact"."""
    a_seed: int | None = None
    """Seed of the shared frozen A (required in frozen-a mode)."""

    def __post_init__(self) -> None:
        _check_count(self.rank, "rank", lo=1)
        if self.rank > MAX_RANK:
            raise ValueError(f"`rank` should be at most {MAX_RANK}, got {self.rank}")
        if not is_positive_finite(self.alpha):
            raise ValueError(f"`alpha` should be a finite positive number, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if isinstance(self.targets, str) or not isinstance(self.targets, (tuple, list)):
            raise TypeError(f"`targets` should be a sequence of module names, got {self.targets!r}")
        targets = tuple(self.targets)
        if not targets or len(targets) > 256 or len(set(targets)) != len(targets):
            raise ValueError(f"`targets` should be 1-256 distinct names, got {targets!r}")
        for t in targets:
            _check_id(t, "targets[]")
        object.__setattr__(self, "targets", targets)
        if self.mode not in LORA_MODES:
            raise ValueError(f"`mode` should be one of {', '.join(LORA_MODES)}, got {self.mode!r}")
        if self.a_seed is not None:
            _check_count(self.a_seed, "a_seed")
        elif self.mode == "frozen-a":
            raise ValueError("`a_seed` is required when mode='frozen-a', got None")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "mode": self.mode,
        }
        if self.a_seed is not None:
            obj["a_seed"] = self.a_seed
        return obj

    @classmethod
    def from_obj(cls, obj: Any, where: str = "lora") -> LoraSpec:
        if not isinstance(obj, dict):
            raise InvalidFieldError(f"{where}: expected a map, got {type(obj).__name__}")
        targets = get(obj, "targets", where)
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise InvalidFieldError(f"{where}.targets: expected a list of strings")
        return _construct(
            cls,
            where,
            rank=get_int(obj, "rank", where, 1, MAX_RANK),
            alpha=get_float(obj, "alpha", where),
            targets=tuple(targets),
            mode=get_str(obj, "mode", where, 16),
            a_seed=get_opt_int(obj, "a_seed", where),
        )


def _construct(cls: type[Any], where: str, **kwargs: Any) -> Any:
    """Build a dataclass from decoded fields; its ValueErrors become InvalidFieldError."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise InvalidFieldError(f"{where}: {exc}") from None


def _tensors_from_obj(obj: Any, limits: DecodeLimits) -> dict[str, EncodedTensor]:
    if not isinstance(obj, dict):
        raise InvalidFieldError(f"tensors: expected a map, got {type(obj).__name__}")
    if len(obj) > limits.max_tensors:
        raise LimitExceededError(
            f"tensors: {len(obj)} tensors exceed max_tensors={limits.max_tensors}"
        )
    out: dict[str, EncodedTensor] = {}
    total = 0
    for key, value in obj.items():
        check_key(key, "tensors", limits)
        out[key] = EncodedTensor.from_obj(value, f"tensors[{key}]", limits, defer_scales=True)
        total += out[key].numel
        if total > limits.max_total_elements:
            raise LimitExceededError(
                f"tensors: more than max_total_elements={limits.max_total_elements} elements"
            )
    check_scales(out)
    return out


def _check_tensors(tensors: Mapping[str, EncodedTensor], spec: CodecSpec, lora: LoraSpec) -> None:
    """Every tensor encoded as `spec` says, and LoRA factors of the declared rank."""
    for key, t in tensors.items():
        if not isinstance(t, EncodedTensor):
            raise TypeError(f"tensors[{key}]: expected EncodedTensor, got {type(t).__name__}")
        if not t.matches(spec):
            got = ("delta+" if t.delta else "") + ("topk+" if t.sparse else "") + t.values
            raise CodecMismatchError(f"tensors[{key}]: expected encoding {spec}, got {got}")
        # lora_A is (r, in) and lora_B is (out, r): the rank is the shared inner dimension.
        if key.endswith("lora_A") and (len(t.shape) != 2 or t.shape[0] != lora.rank):
            raise ShapeMismatchError(
                f"tensors[{key}]: expected shape ({lora.rank}, in), got {t.shape}"
            )
        if key.endswith("lora_B") and (len(t.shape) != 2 or t.shape[1] != lora.rank):
            raise ShapeMismatchError(
                f"tensors[{key}]: expected shape (out, {lora.rank}), got {t.shape}"
            )


def _dense(
    tensors: Mapping[str, EncodedTensor], reference: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    return decode_many(tensors, reference)


class _Message:
    """to_bytes/from_bytes over the envelope; subclasses give KIND, to_obj and _from_body."""

    KIND: ClassVar[MessageKind]

    def to_obj(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _from_body(cls, body: dict[str, Any], limits: DecodeLimits) -> Self:
        raise NotImplementedError

    def _deflate(self) -> bool:
        """Whether the body is sent zlib-compressed (the `zlib` codec stage)."""
        return False

    def to_bytes(self) -> bytes:
        return _envelope.pack(self.KIND, self.to_obj(), deflate=self._deflate())

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, limits: DecodeLimits | None = None
    ) -> Self:
        """Decode untrusted bytes; raises only `WireError` subclasses (or TypeError for
        non-bytes)."""
        limits = limits or DEFAULT_LIMITS
        _, body = _envelope.unpack(data, cls.KIND, limits)
        return cls._from_body(body, limits)


@dataclass(frozen=True)
class AdapterUpdate(_Message):
    """A client's trained adapter update (POST /v1/updates)."""

    KIND: ClassVar[MessageKind] = MessageKind.ADAPTER_UPDATE

    def _deflate(self) -> bool:
        return parse_codec(self.codec).deflate

    client_id: str
    update_id: str
    """Unique per update; the coordinator ignores a second update with the same id (idempotent
    retries)."""
    base_version: int
    """Version of the global adapter this update was trained from (and delta-coded against)."""
    model_sha256: str
    lora: LoraSpec
    num_examples: int
    num_tokens: int
    metrics: dict[str, float]
    codec: str
    """Canonical codec string; every tensor is encoded this way."""
    tensors: dict[str, EncodedTensor]

    def __post_init__(self) -> None:
        _check_id(self.client_id, "client_id")
        _check_id(self.update_id, "update_id")
        _check_count(self.base_version, "base_version")
        _check_sha(self.model_sha256, "model_sha256")
        if not isinstance(self.lora, LoraSpec):
            raise TypeError(f"`lora` should be a LoraSpec, got {type(self.lora).__name__}")
        _check_count(self.num_examples, "num_examples")
        _check_count(self.num_tokens, "num_tokens")
        try:
            metrics = check_metrics(self.metrics, "metrics")
        except WireError as exc:
            raise ValueError(str(exc)) from None
        object.__setattr__(self, "metrics", metrics)
        spec = parse_codec(self.codec)
        object.__setattr__(self, "codec", str(spec))
        object.__setattr__(self, "tensors", dict(self.tensors))
        for key in self.tensors:
            check_key(key, "tensors", DEFAULT_LIMITS)
        _check_tensors(self.tensors, spec, self.lora)

    @classmethod
    def build(
        cls,
        *,
        client_id: str,
        base_version: int,
        model_sha256: str,
        lora: LoraSpec,
        tensors: Mapping[str, np.ndarray],
        num_examples: int,
        num_tokens: int = 0,
        metrics: Mapping[str, float] | None = None,
        encoder: UpdateEncoder | None = None,
        codec: str | CodecSpec | None = None,
        reference: Mapping[str, np.ndarray] | None = None,
        update_id: str | None = None,
    ) -> AdapterUpdate:
        """Encode float tensors with `encoder` (stateful: error feedback) or a stateless `codec`."""
        if encoder is None:
            encoder = UpdateEncoder(codec if codec is not None else "fp32", error_feedback=False)
        elif codec is not None and parse_codec(codec) != encoder.codec:
            raise ValueError(
                f"`codec` {codec!r} disagrees with the encoder's codec {encoder.codec}"
            )
        return cls(
            client_id=client_id,
            update_id=update_id or uuid.uuid4().hex,
            base_version=base_version,
            model_sha256=model_sha256,
            lora=lora,
            num_examples=num_examples,
            num_tokens=num_tokens,
            metrics=dict(metrics or {}),
            codec=str(encoder.codec),
            tensors=encoder.encode(tensors, reference),
        )

    def dense_tensors(
        self, reference: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Decoded float32 tensors; delta codecs need the dense global adapter of `base_version`."""
        return _dense(self.tensors, reference)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def to_obj(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "update_id": self.update_id,
            "base_version": self.base_version,
            "model_sha256": self.model_sha256,
            "lora": self.lora.to_obj(),
            "num_examples": self.num_examples,
            "num_tokens": self.num_tokens,
            "metrics": self.metrics,
            "codec": self.codec,
            "tensors": {k: t.to_obj() for k, t in self.tensors.items()},
        }

    @classmethod
    def _from_body(cls, body: dict[str, Any], limits: DecodeLimits) -> AdapterUpdate:
        w = "AdapterUpdate"
        metrics = check_metrics(get(body, "metrics", w), f"{w}.metrics")
        spec = parse_codec(get_str(body, "codec", w, 128))
        return _construct(
            cls,
            w,
            client_id=get_str(body, "client_id", w, _ID_MAX),
            update_id=get_str(body, "update_id", w, _ID_MAX),
            base_version=get_int(body, "base_version", w, 0, INT_MAX),
            model_sha256=get_str(body, "model_sha256", w, 64),
            lora=LoraSpec.from_obj(get(body, "lora", w), f"{w}.lora"),
            num_examples=get_int(body, "num_examples", w, 0, INT_MAX),
            num_tokens=get_int(body, "num_tokens", w, 0, INT_MAX),
            metrics=metrics,
            codec=str(spec),
            tensors=_tensors_from_obj(get(body, "tensors", w), limits),
        )


@dataclass(frozen=True)
class GlobalAdapter(_Message):
    """The coordinator's aggregated adapter (GET /v1/global). Arrays are encoded on construction,
    so `dense_tensors()` returns exactly what a client decodes (the reference of delta codecs)."""

    KIND: ClassVar[MessageKind] = MessageKind.GLOBAL_ADAPTER

    def _deflate(self) -> bool:
        return parse_codec(self.codec).deflate

    version: int
    lora: LoraSpec
    tensors: dict[str, EncodedTensor | np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)
    """Aggregation metadata (JSON-like): strategy, contributing updates, staleness, ..."""
    codec: str = "fp32"
    """Dense value format of the tensors: fp32, fp16, bf16, int8, int4 or nf4 (no delta/topk)."""

    def __post_init__(self) -> None:
        _check_count(self.version, "version")
        if not isinstance(self.lora, LoraSpec):
            raise TypeError(f"`lora` should be a LoraSpec, got {type(self.lora).__name__}")
        spec = parse_codec(self.codec)
        if spec.delta or spec.topk is not None:
            raise ValueError(
                f"`codec` of a global adapter should be a dense value format, got {self.codec!r}"
            )
        object.__setattr__(self, "codec", str(spec))
        if not isinstance(self.metadata, Mapping):
            raise TypeError(f"`metadata` should be a mapping, got {type(self.metadata).__name__}")
        object.__setattr__(
            self, "metadata", check_json_like(dict(self.metadata), "metadata", DEFAULT_LIMITS)
        )
        tensors: dict[str, EncodedTensor] = {}
        for key, t in self.tensors.items():
            check_key(key, "tensors", DEFAULT_LIMITS)
            tensors[key] = (
                t
                if isinstance(t, EncodedTensor)
                else encode_tensor(t, spec, name=key, with_residual=False)[0]
            )
        object.__setattr__(self, "tensors", tensors)
        _check_tensors(tensors, spec, self.lora)

    def dense_tensors(self) -> dict[str, np.ndarray]:
        return _dense(self.tensors, None)  # type: ignore[arg-type]

    def to_obj(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "lora": self.lora.to_obj(),
            "codec": self.codec,
            "metadata": self.metadata,
            "tensors": {k: t.to_obj() for k, t in self.tensors.items()},  # type: ignore[union-attr]
        }

    @classmethod
    def _from_body(cls, body: dict[str, Any], limits: DecodeLimits) -> GlobalAdapter:
        w = "GlobalAdapter"
        return _construct(
            cls,
            w,
            version=get_int(body, "version", w, 0, INT_MAX),
            lora=LoraSpec.from_obj(get(body, "lora", w), f"{w}.lora"),
            codec=str(parse_codec(get_str(body, "codec", w, 128))),
            metadata=check_json_like(
                get_map(body, "metadata", w, default={}), f"{w}.metadata", limits
            ),
            tensors=_tensors_from_obj(get(body, "tensors", w), limits),
        )


@dataclass(frozen=True)
class TaskConfig(_Message):
    """What the coordinator asks of clients (GET /v1/task, msgpack or JSON)."""

    KIND: ClassVar[MessageKind] = MessageKind.TASK_CONFIG

    task_id: str
    model_sha256: str
    """The base model every client must train on (GGUF file sha256)."""
    lora: LoraSpec
    codec: str
    """Codec clients must use for updates (canonical string)."""
    local_steps: int
    batch_size: int
    seq_len: int
    lr: float
    max_rounds: int | None = None
    """Stop after this many global versions; None runs until the coordinator stops."""
    global_version: int = 0
    """Current global adapter version (0: none yet, train from a fresh adapter)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """JSON-like settings of other components (privacy, schedules) that need no wire change."""

    def __post_init__(self) -> None:
        _check_id(self.task_id, "task_id")
        _check_sha(self.model_sha256, "model_sha256")
        if not isinstance(self.lora, LoraSpec):
            raise TypeError(f"`lora` should be a LoraSpec, got {type(self.lora).__name__}")
        object.__setattr__(self, "codec", str(parse_codec(self.codec)))
        for name in ("local_steps", "batch_size", "seq_len"):
            _check_count(getattr(self, name), name, lo=1)
        if not is_positive_finite(self.lr):
            raise ValueError(f"`lr` should be a finite positive number, got {self.lr!r}")
        object.__setattr__(self, "lr", float(self.lr))
        if self.max_rounds is not None:
            _check_count(self.max_rounds, "max_rounds", lo=1)
        _check_count(self.global_version, "global_version")
        if not isinstance(self.extra, Mapping):
            raise TypeError(f"`extra` should be a mapping, got {type(self.extra).__name__}")
        object.__setattr__(
            self, "extra", check_json_like(dict(self.extra), "extra", DEFAULT_LIMITS)
        )

    def to_obj(self) -> dict[str, Any]:
        obj = {
            "task_id": self.task_id,
            "model_sha256": self.model_sha256,
            "lora": self.lora.to_obj(),
            "codec": self.codec,
            "local_steps": self.local_steps,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "lr": self.lr,
            "global_version": self.global_version,
            "extra": self.extra,
        }
        if self.max_rounds is not None:
            obj["max_rounds"] = self.max_rounds
        return obj

    def to_json_dict(self) -> dict[str, Any]:
        """The same fields as a JSON-serialisable dict, plus "protocol_version"."""
        return {"protocol_version": PROTOCOL_VERSION, **self.to_obj()}

    @classmethod
    def from_json_dict(cls, obj: Any, limits: DecodeLimits | None = None) -> TaskConfig:
        """Inverse of `to_json_dict` for untrusted JSON; raises only `WireError` subclasses."""
        limits = limits or DEFAULT_LIMITS
        if not isinstance(obj, dict):
            raise InvalidFieldError(f"TaskConfig: expected a JSON object, got {type(obj).__name__}")
        version = get(obj, "protocol_version", "TaskConfig")
        if version != PROTOCOL_VERSION or isinstance(version, bool):
            raise UnsupportedVersionError(
                f"expected protocol_version {PROTOCOL_VERSION}, got {version!r}"
            )
        # depth=-1: the object is the message itself, so `extra` counts its nesting from 0 as
        # in the msgpack form (docs/wire-format.md, section 3.3).
        return cls._from_body(check_json_like(obj, "TaskConfig", limits, depth=-1), limits)

    @classmethod
    def _from_body(cls, body: dict[str, Any], limits: DecodeLimits) -> TaskConfig:
        w = "TaskConfig"
        return _construct(
            cls,
            w,
            task_id=get_str(body, "task_id", w, _ID_MAX),
            model_sha256=get_str(body, "model_sha256", w, 64),
            lora=LoraSpec.from_obj(get(body, "lora", w), f"{w}.lora"),
            codec=str(parse_codec(get_str(body, "codec", w, 128))),
            local_steps=get_int(body, "local_steps", w, 1, INT_MAX),
            batch_size=get_int(body, "batch_size", w, 1, INT_MAX),
            seq_len=get_int(body, "seq_len", w, 1, INT_MAX),
            lr=get_float(body, "lr", w),
            max_rounds=get_opt_int(body, "max_rounds", w, lo=1),
            global_version=get_int(body, "global_version", w, 0, INT_MAX, default=0),
            extra=check_json_like(get_map(body, "extra", w, default={}), f"{w}.extra", limits),
        )


@dataclass(frozen=True)
class ErrorMessage(_Message):
    """An error answer: a stable machine-readable code and a human-readable message."""

    KIND: ClassVar[MessageKind] = MessageKind.ERROR

    code: str
    """1-64 chars of [a-z0-9_.-], e.g. "stale_update", "bad_request", "wire.bad_magic"."""
    message: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, str) or not _ERROR_CODE.fullmatch(self.code):
            raise ValueError(f"`code` should be 1-64 chars of [a-z0-9_.-], got {self.code!r}")
        if not isinstance(self.message, str) or len(self.message) > DEFAULT_LIMITS.max_str_len:
            raise ValueError(
                f"`message` should be a string of at most {DEFAULT_LIMITS.max_str_len} chars"
            )

    @classmethod
    def from_exception(cls, exc: WireError) -> ErrorMessage:
        """ "wire.<snake_case class name>" and the exception text, e.g. for a 400 answer."""
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__.removesuffix("Error")).lower()
        return cls(code=f"wire.{name}", message=str(exc)[: DEFAULT_LIMITS.max_str_len])

    def to_obj(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def _from_body(cls, body: dict[str, Any], limits: DecodeLimits) -> ErrorMessage:
        w = "Error"
        return _construct(
            cls,
            w,
            code=get_str(body, "code", w, 64),
            message=get_str(body, "message", w, limits.max_str_len),
        )


Message = AdapterUpdate | GlobalAdapter | TaskConfig | ErrorMessage
_BY_KIND: dict[MessageKind, type[_Message]] = {
    MessageKind.ADAPTER_UPDATE: AdapterUpdate,
    MessageKind.GLOBAL_ADAPTER: GlobalAdapter,
    MessageKind.TASK_CONFIG: TaskConfig,
    MessageKind.ERROR: ErrorMessage,
}


def decode_message(
    data: bytes | bytearray | memoryview, limits: DecodeLimits | None = None
) -> Message:
    """Decode any message by its envelope kind; raises only `WireError` subclasses."""
    limits = limits or DEFAULT_LIMITS
    kind, body = _envelope.unpack(data, None, limits)
    return _BY_KIND[kind]._from_body(body, limits)  # type: ignore[return-value]
