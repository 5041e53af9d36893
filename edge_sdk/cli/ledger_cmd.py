"""`fedlm ledger`: show every request this device sent (the outbox ledger of `fedlm join`)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from edge_sdk.cli.join_cmd import DEFAULT_STATE_DIR


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ledger",
        help="list and summarise every request this device sent to a coordinator",
        description="Read the outbox ledger of a client state directory: one line per request "
        "(time, destination, kind, body size and sha256; tensor names and shapes for updates), "
        "then totals.",
    )
    p.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"client state ({DEFAULT_STATE_DIR})",
    )
    p.add_argument("--json", action="store_true", help="machine-readable: {summary, entries}")
    p.add_argument("--summary", action="store_true", help="totals only")
    p.set_defaults(func=_ledger)


def _ledger(args: argparse.Namespace) -> int:
    from edge_sdk.client.errors import StateError
    from edge_sdk.client.ledger import LEDGER_NAME, Ledger, format_summary, summarise

    path = Path(args.state_dir).expanduser() / LEDGER_NAME
    if not path.parent.is_dir():
        raise StateError(f"{path.parent}: no client state directory")
    entries = Ledger(path).entries()
    summary = summarise(entries)
    if args.json:
        print(json.dumps({"summary": summary, "entries": [asdict(e) for e in entries]}, indent=1))
        return 0
    if not args.summary:
        for e in entries:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
            retry = f" (try {e.attempt})" if e.attempt > 1 else ""
            line = (
                f"{e.seq:>5} {when} {e.method:<4} {e.url} {e.kind} {e.bytes} B "
                f"sha256:{e.sha256[:16]}{retry}"
            )
            if e.kind == "update":
                tensors = e.detail.get("tensors", [])
                line += (
                    f"\n      update {e.detail.get('update_id')} "
                    f"base v{e.detail.get('base_version')} "
                    f"{e.detail.get('codec')}: {len(tensors)} "
                    f"tensors, metrics {e.detail.get('metrics')}"
                )
            print(line)
    print(format_summary(summary))
    return 0
