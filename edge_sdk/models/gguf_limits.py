"""Every limit the project applies to a GGUF file, in one place.

A GGUF file is untrusted input (users download models and adapters): its header may claim any
count or length. `edge_sdk.models.gguf_meta` checks each claim against two bounds before it
allocates anything for it: what the file's size allows (a claim of n items of at least k bytes
each needs n*k bytes of file left) and the sane maxima below, which are well above what real
models use (figures from SmolLM2 135M, Gemma 3 270M and Llama 3 files) and well below what
would cost seconds or gigabytes to parse. `edge_sdk.models.gguf_check` then checks meaning:
value types of the keys the project reads, hyper-parameters and tensor shapes.

The llama.cpp limits mirror its sources (ggml/src/gguf.cpp, src/llama-hparams.h): a file past
them makes llama.cpp abort the process (GGML_ASSERT) rather than report an error.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType as T

# -- container -------------------------------------------------------------------------------

SUPPORTED_VERSIONS = (2, 3)
"""GGUF versions read (v1 had 32-bit counts; llama.cpp refuses it too)."""

MAX_KV_COUNT = 4096
"""Metadata keys per file (real models: 25-60)."""

MAX_TENSOR_COUNT = 65_536
"""Tensors per file (a 70B model has ~720, large MoE files a few thousand)."""

MAX_KEY_BYTES = 256
"""Length of a metadata key name (real keys: under 60 bytes)."""

MAX_STRING_BYTES = 1 << 20
"""Length of one string value; chat templates, the longest, are 1-20 KB."""

MAX_ARRAY_STRING_BYTES = 1 << 16
"""Length of one string inside an array (a token or a BPE merge: a few bytes)."""

MAX_ARRAY_ELEMENTS = 1 << 20
"""Elements of one metadata array (Gemma 3's vocabulary: 262 144 tokens)."""

MAX_METADATA_ELEMENTS = 1 << 22
"""Array elements over all metadata keys together."""

MAX_METADATA_BYTES = 128 << 20
"""Bytes of the whole header: key/values and tensor infos (Gemma 3: ~6 MB)."""

MAX_ARRAY_DEPTH = 1
"""Arrays of arrays are refused: llama.cpp's reader refuses them (gguf.cpp), no model uses them."""

MAX_TENSOR_NAME_BYTES = 63
"""GGML_MAX_NAME - 1: llama.cpp refuses longer tensor names."""

MAX_DIMS = 4
"""GGML_MAX_DIMS."""

MAX_ALIGNMENT = 1 << 16
"""`general.alignment` must be a power of two up to this (default 32)."""

# -- model hyper-parameters ------------------------------------------------------------------

MAX_LAYERS = 512
"""LLAMA_MAX_LAYERS: llama.cpp aborts on `block_count` above it."""

MAX_EXPERTS = 1024
"""LLAMA_MAX_EXPERTS: llama.cpp aborts on `expert_count` above it."""

MAX_WIDTH = 1 << 18
"""`embedding_length`, `feed_forward_length`, head widths (largest real models: ~50k)."""

MAX_HEADS = 1 << 12
"""`attention.head_count` (real models: up to 128)."""

MAX_CONTEXT_LENGTH = 1 << 24
"""`context_length` (real models: up to 10M)."""

MAX_VOCAB = 1 << 20
"""`vocab_size` and the token list (the largest real vocabularies: ~262k)."""

ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
"""llama.cpp aborts on any other `rope.scaling.type` string."""

MAX_DISPLAY_CHARS = 80
"""Names (tensor names, keys, values) are quoted and cut to this many characters in messages."""

# -- tensor types ----------------------------------------------------------------------------

MODEL_TENSOR_TYPES: frozenset[T] = frozenset(
    t for t in T if t not in (T.I8, T.I16, T.I32, T.I64, T.F64)
)
"""Weight types of a model: floats and llama.cpp's block quantizations. Integer and F64 tensors
are not weights llama.cpp multiplies (its matmul has no kernel for them)."""

ADAPTER_TENSOR_TYPES: frozenset[T] = frozenset({T.F32, T.F16, T.BF16, T.Q8_0})
"""LoRA tensor types: what llama.cpp's convert_lora_to_gguf.py writes. llama.cpp loads any type
(llama-adapter.cpp does not check) and then crashes in llama_decode on I32 or F64."""

# -- adapters --------------------------------------------------------------------------------

MAX_LORA_ALPHA = 1 << 16
"""`adapter.lora.alpha` upper bound; llama.cpp scales B @ A by alpha / rank (ranks 1-1024)."""

FINITE_CHECK_ELEMENTS = 1 << 20
"""Adapter values are dequantized and checked in chunks of about this many elements."""

# -- chat templates --------------------------------------------------------------------------

TEMPLATE_MAX_OPERATIONS = 1_000_000
"""Calls, attribute/item look-ups and loop steps one chat rendering may take (real templates
take ~10-100 per message)."""

TEMPLATE_MAX_OUTPUT_CHARS = 4 << 20
"""Characters one chat rendering may produce (and any string it builds on the way)."""

TEMPLATE_MAX_SECONDS = 2.0
"""Wall-clock budget of one chat rendering."""
