"""`fedlm generate` and `fedlm chat`: local inference, optionally with a LoRA adapter."""

from __future__ import annotations

import argparse
import sys

from edge_sdk.choices import BACKENDS


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name (see `fedlm models`) or path to a .gguf file")
    p.add_argument("--adapter", metavar="FILE", help="GGUF LoRA adapter to apply")
    p.add_argument("--max-tokens", type=int, default=256, metavar="N")
    p.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-ctx", type=int, default=2048, metavar="N", help="context window")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=BACKENDS[0],
        help="onnx: MODEL is a `fedlm export-onnx` folder; the adapter may be GGUF or PEFT",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt with a local model")
    _common(p)
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user turn of a chat")
    p.set_defaults(func=_generate)

    p = sub.add_parser("chat", help="interactive chat with a local model (Ctrl-D to quit)")
    _common(p)
    p.add_argument("--system", help="system prompt")
    p.set_defaults(func=_chat)


def _open(args: argparse.Namespace):  # -> EdgeModel
    from edge_sdk.runtime import EdgeModel

    return EdgeModel(args.model, adapter=args.adapter, n_ctx=args.n_ctx, backend=args.backend)


def _print_stream(pieces) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _generate(args: argparse.Namespace) -> int:
    with _open(args) as model:
        opts = {
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "seed": args.seed,
            "stream": True,
        }
        if args.chat:
            _print_stream(model.chat([{"role": "user", "content": args.prompt}], **opts))
        else:
            sys.stdout.write(args.prompt)
            _print_stream(model.generate(args.prompt, **opts))
    return 0


def _tee(pieces, sink: list[str]):
    """Yield the stream's pieces while keeping them, for the chat history."""
    for piece in pieces:
        sink.append(piece)
        yield piece


def _chat(args: argparse.Namespace) -> int:
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    with _open(args) as model:
        interactive = sys.stdin.isatty()
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            if interactive:
                sys.stdout.write("model> ")
            answer: list[str] = []
            pieces = model.chat(
                history,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                seed=args.seed,
                stream=True,
            )
            _print_stream(_tee(pieces, answer))
            history.append({"role": "assistant", "content": "".join(answer)})
    return 0
