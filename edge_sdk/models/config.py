"""`ModelConfig`: the hyper-parameters of a decoder-only model family, read from GGUF metadata.

One dataclass covers every supported family; the family-specific switches (q/k norms,
sandwich norms, sliding-window layers, embedding scale, activation, biases) are plain fields
so that `edge_sdk.models.transformer` reads as one model with options rather than a class
tree. Values that llama.cpp hard-codes per architecture instead of storing in the GGUF (for
example Gemma 3's local RoPE base and its 5-local:1-global layer pattern) are filled in by
`from_gguf_fields` with a comment saying where they come from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from edge_sdk.choices import ARCHITECTURES
from edge_sdk.errors import InvalidModelError, UnsupportedArchitectureError
from edge_sdk.models.naming import LORA_TARGETS
from edge_sdk.validators import require_architecture

SUPPORTED_ARCHS = ARCHITECTURES
"""`general.architecture` values that have a torch implementation."""

_ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass
class ModelConfig:
    """Shape and behaviour of one model; `from_gguf_fields` builds it from GGUF metadata."""

    arch: str
    """`general.architecture`: one of `SUPPORTED_ARCHS`."""
    n_layer: int
    """Number of decoder blocks."""
    n_head: int
    """Query heads per block."""
    n_kv_head: int
    """Key/value heads (grouped-query attention when smaller than `n_head`)."""
    head_dim: int
    """Width of one attention head (may differ from d_model / n_head, e.g. Gemma 3)."""
    d_model: int
    """Residual stream width (`embedding_length`)."""
    d_ff: int
    """Hidden width of the gated MLP (`feed_forward_length`)."""
    vocab_size: int
    """Rows of the token embedding."""
    context_length: int = 2048
    """Training context length from the GGUF; sequences longer than this are refused."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_base: float = 10000.0
    """RoPE theta of global (full-attention) layers."""
    rope_base_local: float | None = None
    """RoPE theta of sliding-window layers; None means the same as `rope_base`."""
    rope_scale: float = 1.0
    """Linear RoPE scaling factor of global layers (positions are divided by it)."""
    rope_dim: int | None = None
    """Rotated width of each head; None means the whole head."""
    sliding_window: int | None = None
    """Window (in tokens, self included) of local layers; None means no local layers."""
    local_layers: tuple[bool, ...] = ()
    """Per layer: True when it uses the sliding window. Empty means all global."""
    qk_norm: bool = False
    """RMSNorm over each query/key head before RoPE (Gemma 3, Qwen 3)."""
    sandwich_norm: bool = False
    """Extra RMSNorm on the attention and MLP outputs before the residual add (Gemma 2/3)."""
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen 2)."""
    embed_scale: float = 1.0
    """Token embeddings are multiplied by this (sqrt(d_model) for Gemma)."""
    attn_scale: float | None = None
    """Softmax scale of q·k; None means 1/sqrt(head_dim)."""
    final_logit_softcap: float | None = None
    """When set, logits = cap * tanh(logits / cap) (Gemma 2)."""
    activation: str = "silu"
    """Gate activation of the MLP: 'silu' (SwiGLU) or 'gelu_tanh' (GeGLU)."""
    tie_embeddings: bool = True
    """The output projection reuses the token embedding (no `output.weight` in the GGUF)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Metadata kept for reports (name, file type); not used by the model."""

    def __post_init__(self) -> None:
        require_architecture(self.arch)
        for name in (
            "n_layer",
            "n_head",
            "n_kv_head",
            "head_dim",
            "d_model",
            "d_ff",
            "vocab_size",
            "context_length",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` should be a positive integer, got {value!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"`n_head` ({self.n_head}) should be a multiple of `n_kv_head` ({self.n_kv_head})"
            )
        if self.head_dim % 2:
            raise ValueError(f"`head_dim` should be even for RoPE, got {self.head_dim}")
        if self.rope_dim is not None and (
            self.rope_dim <= 0 or self.rope_dim > self.head_dim or self.rope_dim % 2
        ):
            raise ValueError(
                f"`rope_dim` should be an even integer in (0, head_dim], got {self.rope_dim}"
            )
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"`activation` should be one of {_ACTIVATIONS}, got {self.activation!r}"
            )
        if self.norm_eps <= 0:
            raise ValueError(f"`norm_eps` should be positive, got {self.norm_eps}")
        if self.rope_base <= 0 or self.rope_scale <= 0:
            raise ValueError(
                "`rope_base`/`rope_scale` should be positive, "
                f"got {self.rope_base}/{self.rope_scale}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(
                f"`sliding_window` should be a positive integer or None, got {self.sliding_window}"
            )
        if self.local_layers and len(self.local_layers) != self.n_layer:
            raise ValueError(
                f"`local_layers` should have n_layer={self.n_layer} "
                f"entries, got {len(self.local_layers)}"
            )
        if any(self.local_layers) and self.sliding_window is None:
            raise ValueError(
                "`local_layers` marks sliding-window layers but `sliding_window` is None"
            )
        if self.final_logit_softcap is not None and self.final_logit_softcap <= 0:
            raise ValueError(
                f"`final_logit_softcap` should be positive or None, got {self.final_logit_softcap}"
            )

    # -- derived -------------------------------------------------------------------------------

    @property
    def q_dim(self) -> int:
        """Output width of q_proj: n_head * head_dim."""
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Output width of k_proj / v_proj: n_kv_head * head_dim."""
        return self.n_kv_head * self.head_dim

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def is_local(self, layer: int) -> bool:
        """True when `layer` attends through the sliding window."""
        return bool(self.local_layers) and self.local_layers[layer]

    def target_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every LoRA target projection, keyed like
        `LORA_TARGETS`."""
        d, q, kv, ff = self.d_model, self.q_dim, self.kv_dim, self.d_ff
        shapes = {
            "q_proj": (q, d),
            "k_proj": (kv, d),
            "v_proj": (kv, d),
            "o_proj": (d, q),
            "gate_proj": (ff, d),
            "up_proj": (ff, d),
            "down_proj": (d, ff),
        }
        assert set(shapes) == set(LORA_TARGETS)
        return shapes

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_gguf_fields(
        cls, meta: Mapping[str, Any], tensor_names: set[str] | None = None
    ) -> ModelConfig:
        """Build from GGUF key/values (`{key: python value}`) and optionally the tensor names.

        `tensor_names` decides `tie_embeddings` (no `output.weight` means tied); without it the
        family default is used.
        """
        arch = meta.get("general.architecture")
        if not isinstance(arch, str):
            raise InvalidModelError("GGUF has no `general.architecture`")
        require_architecture(arch)

        def get(key: str, default: Any = None, *, required: bool = False) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if required and value is None:
                raise InvalidModelError(f"GGUF metadata lacks `{arch}.{key}`")
            return value

        d_model = int(get("embedding_length", required=True))
        n_head = int(get("attention.head_count", required=True))
        if n_head <= 0:  # gguf_check refuses this first; kept so that no path divides by zero
            raise InvalidModelError(
                f"`{arch}.attention.head_count` should be positive, got {n_head}"
            )
        n_kv_head = int(get("attention.head_count_kv", n_head))
        head_dim = int(get("attention.key_length", d_model // n_head))
        n_layer = int(get("block_count", required=True))
        vocab = get("vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise InvalidModelError(f"GGUF metadata lacks `{arch}.vocab_size` and a token list")
            vocab = len(tokens)
        rope_dim = get("rope.dimension_count")
        scaling_type = get("rope.scaling.type")
        rope_scale = 1.0
        if scaling_type == "linear":
            rope_scale = float(get("rope.scaling.factor", 1.0))
        elif scaling_type not in (None, "none"):
            # YaRN / llama3-style scaling only matter beyond the original context; refuse rather
            # than silently computing different positions than llama.cpp.
            raise UnsupportedArchitectureError(
                f"RoPE scaling type {scaling_type!r} is not supported"
            )

        kwargs: dict[str, Any] = dict(  # noqa: C408 - reads like the dataclass call
            arch=arch,
            n_layer=n_layer,
            n_head=n_head,
            n_kv_head=n_kv_head,
            head_dim=head_dim,
            d_model=d_model,
            d_ff=int(get("feed_forward_length", required=True)),
            vocab_size=int(vocab),
            context_length=int(get("context_length", 2048)),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_scale=rope_scale,
            rope_dim=None if rope_dim is None or int(rope_dim) == head_dim else int(rope_dim),
            extra={"name": meta.get("general.name"), "file_type": meta.get("general.file_type")},
        )
        if tensor_names is not None:
            kwargs["tie_embeddings"] = "output.weight" not in tensor_names

        if arch == "gemma3":
            window = get("attention.sliding_window")
            # llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3): every 6th layer is global, the others
            # use the sliding window, and local layers use a fixed RoPE base of 10 000 unless
            # the GGUF says otherwise. The Q scale is 1/sqrt(query_pre_attn_scalar), which the
            # converter does not store; it equals head_dim for all sizes except 27B, where
            # llama.cpp uses d_model / n_head.
            pattern = int(get("attention.sliding_window_pattern", 6))
            scalar = d_model // n_head if n_layer == 62 else head_dim
            kwargs.update(
                sliding_window=int(window) if window else None,
                local_layers=tuple((i + 1) % pattern != 0 for i in range(n_layer))
                if window
                else (),
                rope_base_local=float(get("rope.freq_base_swa", 10000.0)),
                qk_norm=True,
                sandwich_norm=True,
                embed_scale=math.sqrt(d_model),
                attn_scale=1.0 / math.sqrt(scalar),
                activation="gelu_tanh",
                final_logit_softcap=_positive_or_none(get("final_logit_softcapping")),
            )
        elif arch == "qwen2":
            kwargs.update(qkv_bias=True)
        elif arch == "qwen3":
            kwargs.update(qk_norm=True)
        return cls(**kwargs)


def _positive_or_none(value: Any) -> float | None:
    return float(value) if value is not None and float(value) > 0 else None


def model_config(model: Any) -> ModelConfig:
    """The `ModelConfig` of a loaded `Transformer` (typed: `nn.Module` attributes are not)."""
    return cast(ModelConfig, model.config)
