"""The ONNX Runtime backend (issue 13).

- `export`: `fedlm export-onnx`: GGUF → Hugging Face folder → genai model builder, LoRA weights
  turned into graph inputs; `gguf_blocks` copies the GGUF's own 4/8-bit blocks into the int4
  graph; `builder_shim` runs the builder with the Gemma 3 config fix.
- `adapters`: PEFT / GGUF LoRA → `.onnx_adapter`.
- `runtime`: `OnnxEdgeModel`, the `EdgeModel` API on onnxruntime-genai with adapter hot-swap.
- `errors`: `OnnxError` and its subclasses.

Nothing is imported here: the package needs the `onnx` extra, and `edge_sdk` must import
without it.
"""
