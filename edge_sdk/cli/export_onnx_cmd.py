"""`fedlm export-onnx`: a GGUF model as an ONNX Runtime GenAI folder with LoRA adapter inputs."""

from __future__ import annotations

import argparse
import sys
import time

from edge_sdk.choices import ONNX_PRECISIONS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="export a model for ONNX Runtime (serve it with `--backend onnx`)",
        description="Dequantize a GGUF model, build it with the onnxruntime-genai model builder "
        "(LoRA weights as graph inputs, so adapters hot-swap) and write model.onnx, "
        "genai_config.json and the tokenizer into --out. Needs the `onnx` extra. Running it "
        "again on the same model and options does nothing.",
    )
    p.add_argument("model", help="model name (see `fedlm models`) or path to a .gguf file")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder (created; must be empty or an earlier export)",
    )
    p.add_argument(
        "--precision",
        choices=ONNX_PRECISIONS,
        default="int4",
        help="int4 MatMulNBits weights (default) or fp32 (exact)",
    )
    p.add_argument(
        "--adapter",
        metavar="ADAPTER",
        help="also convert this GGUF LoRA / PEFT folder to DIR/adapter.onnx_adapter",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if DIR holds this export")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from edge_sdk.models.store import resolve
    from edge_sdk.onnx.runtime import import_genai

    import_genai()  # one clear line when the extra is missing, before any work
    from edge_sdk.onnx.export import export_onnx

    src = resolve(args.model)
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    out = export_onnx(src, args.out, precision=args.precision, progress=progress, force=args.force)
    if args.adapter:
        from edge_sdk.onnx.adapters import convert_adapter

        dest = convert_adapter(args.adapter, out, out / "adapter.onnx_adapter", base_gguf=src)
        progress(f"wrote {dest}")
    print(out)
    return 0
