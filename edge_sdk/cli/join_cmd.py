"""`fedlm join`: take part in a federation with local data (the edge client)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = "~/.fedlm/client"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "join",
        help="join a federation: train on local data, send only adapter updates",
        description="Find a coordinator for MODEL on the LAN (mDNS) or use --coordinator, verify the "
        "model and its licence, then train locally and exchange LoRA adapter updates until the task "
        "ends. Raw data never leaves the device; every request is listed by `fedlm ledger`. "
        "Ctrl-C stops after saving (run again to continue).",
    )
    p.add_argument("model", help="model name (see `fedlm models`) or path to a .gguf file")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help="local training data file(s)")
    p.add_argument("--coordinator", metavar="URL", help="coordinator base URL (skips mDNS discovery)")
    p.add_argument("--coordinator-name", metavar="NAME", help="choose this mDNS instance name or task id")
    p.add_argument("--tls-fingerprint", metavar="HEX", help="pin this certificate SHA-256 (with an https URL)")
    p.add_argument("--join-token", metavar="TOKEN", help="enrollment secret (default: $FEDLM_JOIN_TOKEN)")
    p.add_argument("--max-rounds", type=int, metavar="N", help="stop after N accepted updates")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR", help=f"client state ({DEFAULT_STATE_DIR})")
    p.add_argument("--name", metavar="NAME", help="device name shown to the coordinator (hostname)")
    p.add_argument("--refuse-licence", default="unknown", metavar="CLASSES",
                   help="comma-separated licence classes to refuse: unknown, open-weights-restricted, "
                   "permissive ('unknown'; '' refuses none)")
    p.add_argument("--threads", type=int, metavar="N", help="cap on training threads")
    p.add_argument("--memory-mb", type=int, metavar="MB", help="cap on this process's address space")
    p.add_argument("--dp-clip", type=float, metavar="C", help="local DP: clip each update's change to L2 norm C")
    p.add_argument("--dp-noise", type=float, default=1.0, metavar="SIGMA",
                   help="local DP: noise multiplier (std = SIGMA * C; default 1.0; needs --dp-clip)")
    p.add_argument("--precision", choices=("nf4", "bf16", "fp32"), default="nf4", help="frozen base precision")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="share of the local data held out to report a validation loss (0.1; 0: none)")
    p.add_argument("--poll-interval", type=float, default=2.0, metavar="S",
                   help="how often to ask for a new global version while waiting (2 s)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seeds the validation split and, with the round number, each round's data order (0)")
    p.add_argument("--discovery-timeout", type=float, default=3.0, metavar="S", help="mDNS listening time (3 s)")
    p.add_argument("--interface", action="append", metavar="IPV4", help="browse mDNS on this address (repeatable)")
    p.set_defaults(func=_join)


def _config(args: argparse.Namespace) -> Any:  # -> ClientConfig (lazy import keeps --help fast)
    from edge_sdk.client import ClientConfig, LocalDpConfig
    from edge_sdk.models.licence import parse_policy

    extra: dict[str, Any] = {}
    if args.name:
        extra["name"] = args.name
    return ClientConfig(
        model=args.model,
        data=tuple(args.data),
        state_dir=Path(args.state_dir),
        coordinator_url=args.coordinator,
        coordinator_name=args.coordinator_name,
        tls_fingerprint=args.tls_fingerprint,
        join_token=args.join_token,
        max_rounds=args.max_rounds,
        refuse_licences=parse_policy(args.refuse_licence),
        threads=args.threads,
        memory_limit_mb=args.memory_mb,
        local_dp=LocalDpConfig(args.dp_clip, args.dp_noise) if args.dp_clip is not None else None,
        precision=args.precision,
        seed=args.seed,
        val_fraction=args.val_fraction,
        poll_interval_s=args.poll_interval,
        discovery_timeout_s=args.discovery_timeout,
        discovery_interfaces=tuple(args.interface) if args.interface else None,
        **extra,
    )


def _join(args: argparse.Namespace) -> int:
    import logging

    from edge_sdk.client import FederatedClient

    try:
        config = _config(args)
    except ValueError as exc:
        print(f"fedlm join: error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("edge_sdk.client").setLevel(logging.INFO if not args.verbose else logging.DEBUG)
    # A client runs for hours: each log line carries its time (the CLI's default format does not).
    if not logging.getLogger().handlers:
        logging.basicConfig()
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    client = FederatedClient(config)
    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupted
        if interrupted:  # a second Ctrl-C: stop waiting for the clean shutdown
            raise KeyboardInterrupt
        interrupted = True
        print("fedlm join: stopping after saving (Ctrl-C again to abort)", file=sys.stderr, flush=True)
        client.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = client.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"coordinator {summary.coordinator}  task {summary.task_id}  client {summary.client_id}")
    for r in summary.rounds:
        resumed = f", resumed at step {r.resumed_from_step}" if r.resumed_from_step else ""
        print(f"round {r.round}: {r.steps} steps from version {r.base_version}{resumed}, loss {r.train_loss:.4f}, "
              f"update {r.update_id} ({r.update_bytes} bytes) {r.outcome}")
    print(f"finished ({summary.reason}); global version {summary.global_version}"
          + (f", adapter {summary.adapter_path}" if summary.adapter_path else ""))
    print(f"every request sent is listed by: fedlm ledger --state-dir {os.fspath(config.state_dir)}")
    return 130 if summary.reason == "stopped" and interrupted else 0
