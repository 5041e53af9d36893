"""`fedlm models` and `fedlm inspect`: what models are here, and how open they are."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the named models available on this machine")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_models)

    p = sub.add_parser(
        "inspect", help="openness report of a model: identity, licence, quantization"
    )
    p.add_argument("model", help="model name (see `fedlm models`) or path to a .gguf file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_inspect)


def _models(args: argparse.Namespace) -> int:
    from edge_sdk.models.store import DEFAULT_MODEL, available

    rows = available()
    if args.json:
        print(
            json.dumps(
                [{"name": n, "installed": ok, "install": hint} for n, ok, hint in rows], indent=2
            )
        )
        return 0
    for name, ok, hint in rows:
        default = " (default)" if name == DEFAULT_MODEL else ""
        state = "installed" if ok else f"not installed: {hint}"
        print(f"{name:<16} {state}{default}")
    print("Any path to a .gguf file works too.")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from edge_sdk.models.identity import inspect_model

    ident = inspect_model(args.model)
    if args.json:
        print(json.dumps(ident.to_json_dict(), indent=2))
        return 0
    quant = ", ".join(f"{k}×{v}" for k, v in ident.quantization.items())
    lines = [
        ("model", ident.name or "-"),
        ("file", ident.path),
        ("sha256", ident.sha256),
        ("size", f"{ident.size_bytes / 1e6:.1f} MB"),
        ("architecture", ident.architecture),
        ("parameters", f"{ident.parameter_count / 1e6:.1f} M"),
        ("quantization", f"{ident.file_type or '-'} ({quant})"),
        ("context length", str(ident.context_length or "-")),
        ("vocabulary", str(ident.vocab_size or "-")),
        ("chat template", "yes" if ident.has_chat_template else "no"),
        ("licence", f"{ident.licence or '(none in metadata)'} [{ident.licence_class.value}]"),
    ]
    lines += [(k, str(v)) for k, v in ident.extra.items()]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}")
    return 0
