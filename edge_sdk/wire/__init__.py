"""The wire format shared by devices and the coordinator: versioned msgpack messages and codecs.

Everything that crosses the network is defined here (spec: docs/wire-format.md). Only numpy
and msgpack are imported, so the coordinator can use it without torch.

    update = AdapterUpdate.build(client_id="phone-1", base_version=3, model_sha256=sha,
                                 lora=LoraSpec(8, 16.0, ("q_proj", "v_proj")),
                                 tensors=delta_tensors, num_examples=128,
                                 encoder=UpdateEncoder("topk:0.01+int8"))
    body = update.to_bytes()                       # POST with CONTENT_TYPE
    same = AdapterUpdate.from_bytes(body)          # raises only WireError on bad input
    dense = same.dense_tensors()                   # dict[str, float32 ndarray]
"""

from __future__ import annotations

from edge_sdk.wire._envelope import (
    CONTENT_TYPE,
    MAGIC,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    MessageKind,
)
from edge_sdk.wire._errors import (
    BadMagicError,
    CodecMismatchError,
    InvalidFieldError,
    InvalidKeyError,
    InvalidMetricsError,
    LimitExceededError,
    MalformedMessageError,
    MissingFieldError,
    MissingReferenceError,
    NonFiniteError,
    OutOfRangeError,
    ShapeMismatchError,
    UnexpectedMessageError,
    UnknownCodecError,
    UnsupportedVersionError,
    WireError,
)
from edge_sdk.wire.codecs import (
    CODEC_NAMES,
    VALUE_FORMATS,
    BlockScales,
    CodecSpec,
    EncodedTensor,
    SparseIndex,
    UpdateEncoder,
    encode_tensor,
    parse_codec,
)
from edge_sdk.wire.limits import DEFAULT_LIMITS, DecodeLimits
from edge_sdk.wire.messages import (
    LORA_MODES,
    AdapterUpdate,
    ErrorMessage,
    GlobalAdapter,
    LoraSpec,
    Message,
    TaskConfig,
    decode_message,
)

__all__ = [
    "CODEC_NAMES",
    "CONTENT_TYPE",
    "DEFAULT_LIMITS",
    "LORA_MODES",
    "MAGIC",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "VALUE_FORMATS",
    "AdapterUpdate",
    "BadMagicError",
    "BlockScales",
    "CodecMismatchError",
    "CodecSpec",
    "DecodeLimits",
    "EncodedTensor",
    "ErrorMessage",
    "GlobalAdapter",
    "InvalidFieldError",
    "InvalidKeyError",
    "InvalidMetricsError",
    "LimitExceededError",
    "LoraSpec",
    "MalformedMessageError",
    "Message",
    "MessageKind",
    "MissingFieldError",
    "MissingReferenceError",
    "NonFiniteError",
    "OutOfRangeError",
    "ShapeMismatchError",
    "SparseIndex",
    "TaskConfig",
    "UnexpectedMessageError",
    "UnknownCodecError",
    "UnsupportedVersionError",
    "UpdateEncoder",
    "WireError",
    "decode_message",
    "encode_tensor",
    "parse_codec",
]
