"""Compiled kernels for measured hot spots, each with a pure-Python twin that gives the same bytes.

- `native.nf4`: NF4 blockwise quantization (bitsandbytes-identical), ~16x faster than
  bitsandbytes' CPU path; it was ~70% of `load_model` for SmolLM2-135M.
- `native.dequant`: GGUF Q8_0/Q4_0/Q4_1 dequantization (gguf-identical), ~40x faster than
  gguf's numpy code; the next largest share of the load.

Kernels are plain C compiled on first use (`native._build`), cached by source hash, and
called through ctypes. Set FEDLM_NO_NATIVE=1 to force the Python twins.
"""
