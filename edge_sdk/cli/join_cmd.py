"""`fedlm join`: take part in a federation with local data (the edge client)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from edge_sdk.choices import BACKENDS, COMPUTES, PRECISIONS
from edge_sdk.cli._help import CommaListDefault, ConfigDefault, DefaultsHelpFormatter, resolve
from edge_sdk.env import JOIN_CODE_ENV, JOIN_TOKEN_ENV

DEFAULT_STATE_DIR = "~/.fedlm/client"


def _client_default(field: str) -> ConfigDefault:
    """The default of `ClientConfig.<field>`: the CLI declares none of its own."""
    return ConfigDefault("edge_sdk.client.config", "ClientConfig", field)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "join",
        help="join a federation: train on local data, send only adapter updates",
        formatter_class=DefaultsHelpFormatter,
        description="Find a coordinator for MODEL on the LAN "
        "(mDNS) or use --coordinator, verify the "
        "model and its licence, then train locally and "
        "exchange LoRA adapter updates until the task "
        "ends. The first time, give the join code that "
        "`fedlm coordinator` printed: the device then "
        "talks only to the coordinator whose certificate "
        "the code names, and remembers it. Raw data "
        "never leaves the device; every request is listed by `fedlm ledger`. "
        "Ctrl-C stops after saving (run again to continue).",
    )
    p.add_argument("model", help="model name (see `fedlm models`) or path to a .gguf file")
    p.add_argument(
        "--data", required=True, nargs="+", metavar="FILE", help="local training data file(s)"
    )
    p.add_argument(
        "--preferences",
        nargs="+",
        default=_client_default("preferences"),
        metavar="FILE",
        help="preference pair files (JSONL: prompt, chosen, rejected) for DPO tasks "
        "(`fedlm coordinator --method dpo`), besides the app's recorded feedback",
    )
    p.add_argument(
        "--join-code",
        metavar="CODE",
        help=f"the join code `fedlm coordinator` printed (default: ${JOIN_CODE_ENV}); needed once",
    )
    p.add_argument(
        "--coordinator", metavar="URL", help="coordinator base URL (default: find it by mDNS)"
    )
    p.add_argument(
        "--coordinator-name",
        metavar="NAME",
        help="choose the mDNS instance with this name (default: the only usable one)",
    )
    p.add_argument(
        "--join-token",
        metavar="TOKEN",
        help=f"enrollment secret without a join code (default: ${JOIN_TOKEN_ENV}); "
        "only with --tls-fingerprint or --insecure",
    )
    p.add_argument(
        "--tls-fingerprint",
        metavar="HEX",
        help="pin this certificate SHA-256, for --join-token "
        "(default: none; a join code carries it)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a plain-HTTP coordinator (started with --insecure): tokens cross the LAN in "
        "clear text and the coordinator is not authenticated",
    )
    p.add_argument(
        "--max-rounds",
        type=int,
        metavar="N",
        help="stop after N accepted updates (default: task end)",
    )
    p.add_argument(
        "--final-wait",
        type=float,
        default=_client_default("final_wait_s"),
        metavar="S",
        help="after the last update, wait up to S seconds for the version it feeds into",
    )
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR", help="client state")
    p.add_argument(
        "--name", metavar="NAME", help="device name shown to the coordinator (default: hostname)"
    )
    p.add_argument(
        "--refuse-licence",
        default=CommaListDefault("edge_sdk.client.config", "ClientConfig", "refuse_licences"),
        metavar="CLASSES",
        help="comma-separated licence classes to refuse: unknown, open-weights-restricted, "
        "permissive ('' refuses none)",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="cap on training threads (default: torch's default)",
    )
    p.add_argument(
        "--memory-mb",
        type=int,
        metavar="MB",
        help="cap on this process's address space (default: no cap)",
    )
    p.add_argument(
        "--dp-clip",
        type=float,
        metavar="C",
        help="local DP: clip each update's change to L2 norm C (default: off)",
    )
    p.add_argument(
        "--dp-noise",
        type=float,
        default=ConfigDefault("edge_sdk.client.controls", "LocalDpConfig", "noise_multiplier"),
        metavar="SIGMA",
        help="local DP: noise multiplier (std = SIGMA * C; needs --dp-clip)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=_client_default("precision"),
        help="frozen base precision",
    )
    p.add_argument(
        "--compute",
        choices=COMPUTES,
        default=_client_default("compute"),
        help="the NF4 base's matrix products: bf16 (faster on CPUs with bf16 dot products, e.g. "
        "AVX512-BF16), fp32, or auto (default): bf16 where the CPU has them",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=_client_default("val_fraction"),
        metavar="F",
        help="share of the local data held out to report a validation loss (0: none)",
    )
    p.add_argument(
        "--poll-interval",
        type=float,
        default=_client_default("poll_interval_s"),
        metavar="S",
        help="how often to ask for a new global version while waiting, in seconds",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=_client_default("seed"),
        metavar="S",
        help="seeds the validation split and, with the round number, each round's data order",
    )
    p.add_argument(
        "--discovery-timeout",
        type=float,
        default=_client_default("discovery_timeout_s"),
        metavar="S",
        help="mDNS listening time, s",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        metavar="{" + ",".join(BACKENDS) + "}",
        help="also serve the model locally with this backend: every new global adapter is "
        "hot-swapped into it while the device trains (default: no local runtime)",
    )
    p.add_argument(
        "--serve-model",
        metavar="PATH",
        help="what the --backend runtime loads: for onnx the `fedlm export-onnx` folder of MODEL "
        "(required); for llama.cpp a GGUF (default: MODEL)",
    )
    p.add_argument(
        "--interface",
        action="append",
        metavar="IPV4",
        help="browse mDNS on this address, repeatable (default: every interface)",
    )
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
        preferences=tuple(resolve(getattr(args, "preferences", ()))),
        state_dir=Path(args.state_dir),
        coordinator_url=args.coordinator,
        coordinator_name=args.coordinator_name,
        tls_fingerprint=args.tls_fingerprint,
        join_code=args.join_code or os.environ.get(JOIN_CODE_ENV) or None,
        join_token=args.join_token,
        insecure=args.insecure,
        final_wait_s=resolve(args.final_wait),
        max_rounds=args.max_rounds,
        refuse_licences=parse_policy(resolve(args.refuse_licence)),
        threads=args.threads,
        memory_limit_mb=args.memory_mb,
        local_dp=(
            LocalDpConfig(args.dp_clip, resolve(args.dp_noise))
            if args.dp_clip is not None
            else None
        ),
        precision=resolve(args.precision),
        compute=resolve(args.compute),
        seed=resolve(args.seed),
        val_fraction=resolve(args.val_fraction),
        poll_interval_s=resolve(args.poll_interval),
        discovery_timeout_s=resolve(args.discovery_timeout),
        discovery_interfaces=tuple(args.interface) if args.interface else None,
        **extra,
    )


def _runtime(args: argparse.Namespace) -> Any:  # -> EdgeModel | OnnxEdgeModel | None
    """The local runtime `--backend` asks for (None without it); ValueError names a bad flag."""
    if args.backend is None:
        if args.serve_model:
            raise ValueError("--serve-model needs --backend")
        return None
    if args.backend == "onnx" and not args.serve_model:
        raise ValueError(
            "--backend onnx needs --serve-model DIR: the `fedlm export-onnx` folder of "
            f"{args.model} (make it with `fedlm export-onnx {args.model} --out DIR`)"
        )
    from edge_sdk.runtime import EdgeModel

    return EdgeModel(args.serve_model or args.model, backend=args.backend, n_threads=args.threads)


def _join(args: argparse.Namespace) -> int:
    import logging

    from edge_sdk.client import FederatedClient

    try:
        config = _config(args)
    except ValueError as exc:
        print(f"fedlm join: error: {exc}", file=sys.stderr)
        return 2
    from edge_sdk.compute import compute_warning

    if warning := compute_warning(config.compute):
        print(f"fedlm join: warning: {warning}", file=sys.stderr)
    logging.getLogger("edge_sdk.client").setLevel(
        logging.INFO if not args.verbose else logging.DEBUG
    )
    # A client runs for hours: each log line carries its time (the CLI's default format does not).
    if not logging.getLogger().handlers:
        logging.basicConfig()
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    try:
        runtime = _runtime(args)
    except ValueError as exc:
        print(f"fedlm join: error: {exc}", file=sys.stderr)
        return 2
    client = FederatedClient(config, runtime=runtime)
    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupted
        if interrupted:  # a second Ctrl-C: stop waiting for the clean shutdown
            raise KeyboardInterrupt
        interrupted = True
        print(
            "fedlm join: stopping after saving (Ctrl-C again to abort)", file=sys.stderr, flush=True
        )
        client.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = client.run()
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
        served = runtime.adapter_path if runtime is not None else None
        if runtime is not None:
            runtime.close()
    print(f"coordinator {summary.coordinator}  task {summary.task_id}  client {summary.client_id}")
    for r in summary.rounds:
        resumed = f", resumed at step {r.resumed_from_step}" if r.resumed_from_step else ""
        print(
            f"round {r.round}: {r.steps} steps from version "
            f"{r.base_version}{resumed}, loss {r.train_loss:.4f}, "
            f"update {r.update_id} ({r.update_bytes} bytes) {r.outcome}"
        )
    print(
        f"finished ({summary.reason}); global version {summary.global_version}"
        + (f", adapter {summary.adapter_path}" if summary.adapter_path else "")
    )
    if runtime is not None:
        print(f"{args.backend} runtime served: {served or 'the base model (no global adapter)'}")
    print(
        f"every request sent is listed by: fedlm ledger --state-dir {os.fspath(config.state_dir)}"
    )
    return 130 if summary.reason == "stopped" and interrupted else 0
