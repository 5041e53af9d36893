"""The `fedlm` command line.

Each sub-command lives in its own module under `edge_sdk.cli` and exposes
`register(subparsers)`, which adds its parser and sets `func` to a handler
`(args) -> int`. Handlers import heavy modules lazily so that `fedlm --help` is instant.
Every `FedlmError` becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from edge_sdk.cli._openmp import SHARED, apply_wait_policy
from edge_sdk.errors import FedlmError

# Order is the order in `fedlm --help`.
_COMMAND_MODULES = (
    "edge_sdk.cli.models_cmd",
    "edge_sdk.cli.generate_cmd",
    "edge_sdk.cli.export_onnx_cmd",
    "edge_sdk.cli.train_cmd",
    "edge_sdk.cli.coordinator_cmd",
    "edge_sdk.cli.join_cmd",
    "edge_sdk.cli.ledger_cmd",
    "edge_sdk.cli.demo_cmd",
)

EXIT_USAGE = 2
MAX_ERROR_CHARS = 1000
"""An error line is cut here: a message must never carry a whole hostile string."""


def one_line(message: str) -> str:
    """`message` as one printable line: control characters escaped, cut to MAX_ERROR_CHARS.

    Messages quote what they take from files (`gguf_meta.quote`); this is the last guard, so
    that no file name or value can forge a second line (a fake "Traceback", a fake prompt).
    """
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    return safe if len(safe) <= MAX_ERROR_CHARS else safe[:MAX_ERROR_CHARS] + "..."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlm",
        description="Federated post-training of open-weight language models on your own devices.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # imports no torch: the wait policy can still be chosen
    apply_wait_policy(getattr(args, "openmp", SHARED))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except FedlmError as exc:
        print(f"fedlm: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
