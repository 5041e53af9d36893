"""`fedlm coordinator`: run the LAN coordinator for one model (also `python -m coordinator`)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edge_sdk.choices import LOG_LEVELS, LORA_MODES, ROBUST_AGGREGATORS, STRATEGIES
from edge_sdk.cli._help import CommaListDefault, ConfigDefault, DefaultsHelpFormatter, resolve
from edge_sdk.env import JOIN_TOKEN_ENV, OPERATOR_TOKEN_ENV
from edge_sdk.method import DPO_LOSSES, METHODS, MethodSpec
from edge_sdk.models.store import DEFAULT_MODEL

if TYPE_CHECKING:
    from coordinator.config import CoordinatorConfig

_MIB = 1 << 20


def _bytes_from_mib(mib: float) -> int:
    """A size given in MiB (the flags' unit) in bytes (the configs' unit)."""
    return int(mib * _MIB)


@dataclasses.dataclass(frozen=True)
class _MibDefault(ConfigDefault):
    """A byte-count field's default in MiB, the unit of its flag (`_bytes_from_mib` inverts it)."""

    def value(self) -> float:
        return float(super().value()) / _MIB


def _method_default(field: str) -> ConfigDefault:
    """The default of `MethodSpec.<field>`, the task's post-training method."""
    return ConfigDefault("edge_sdk.method", "MethodSpec", field)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "coordinator",
        help="run the federated coordinator on this machine (REST API + mDNS)",
        formatter_class=DefaultsHelpFormatter,
        description="Aggregate LoRA adapter updates from devices on the LAN. "
        "Serves HTTPS with a self-signed certificate made on first start and kept beside the "
        "database, and prints a join code (the join token bound to the certificate's "
        "fingerprint) that devices take as `fedlm join --join-code`. "
        f"The join token comes from --join-token, else ${JOIN_TOKEN_ENV}, else it is generated.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or .gguf path")
    # Not CoordinatorConfig.host (127.0.0.1): the library default keeps an embedded or test
    # coordinator off the network, while this command exists to serve the devices of the LAN
    # (TLS and the join code authenticate both ends).
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0: all)")
    p.add_argument(
        "--port",
        type=int,
        default=ConfigDefault("coordinator.config", "CoordinatorConfig", "port"),
        help="TCP port; 0 picks a free one",
    )
    p.add_argument(
        "--db",
        default="fedlm-coordinator.sqlite",
        help="SQLite database (resumed if it exists); the TLS certificate goes to <db>.tls/",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=None,
        help="aggregation schedule (default: fedbuff; fedavg with --secure)",
    )
    p.add_argument(
        "--clients-per-round",
        type=int,
        default=None,
        # The numbers are FedAvg.clients_per_round and secagg's MIN_COHORT (not imported: they
        # pull numpy into --help); tests/cli/test_cli_defaults.py checks they agree.
        help="fedavg: close a round at this many (default: 2; with --secure, the cohort size, "
        "default max(3, --min-cohort))",
    )
    p.add_argument(
        "--secure",
        action="store_true",
        help="secure aggregation: devices send masked updates and the coordinator learns only "
        "each cohort's sum (default fedavg; fedbuff: a cohort is the first --buffer-size "
        "devices of one version; --lora-mode frozen-a; the --dp-* flags make DP distributed; "
        "docs/secure-aggregation.md)",
    )
    p.add_argument(
        "--min-cohort",
        type=int,
        default=ConfigDefault("coordinator.config", "CoordinatorConfig", "min_cohort"),
        help="--secure: smallest cohort a round closes with (default: %(default)s; raised to the "
        "protocol's floor, stated in the task)",
    )
    p.add_argument(
        "--secure-clip",
        type=float,
        default=ConfigDefault("coordinator.config", "CoordinatorConfig", "secure_clip"),
        help="--secure: devices clip each B-delta value to [-C, C]",
    )
    p.add_argument(
        "--secure-grid-bits",
        type=int,
        default=ConfigDefault("coordinator.config", "CoordinatorConfig", "secure_grid_bits"),
        help="--secure: integer grid bits over [-C, C] (0: the widest grid whose ring, bits + "
        "ceil(log2 cohort), fits 7 bits, which keeps a masked update >= 4x below fp32)",
    )
    p.add_argument(
        "--secure-phase",
        type=float,
        default=ConfigDefault("coordinator.config", "CoordinatorConfig", "secure_phase_s"),
        metavar="SECONDS",
        help="--secure: each protocol phase closes after this long; late devices drop out",
    )
    p.add_argument(
        "--min-clients",
        type=int,
        default=ConfigDefault("coordinator.strategies", "FedAvg", "min_clients"),
        help="fedavg: close at the deadline with this many",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=ConfigDefault("coordinator.strategies", "FedAvg", "deadline_s"),
        help="fedavg: round deadline in seconds",
    )
    p.add_argument(
        "--buffer-size",
        type=int,
        default=ConfigDefault("coordinator.strategies", "FedBuff", "buffer_size"),
        help="fedbuff: aggregate every K updates",
    )
    p.add_argument(
        "--min-updates",
        type=int,
        default=ConfigDefault("coordinator.strategies", "FedBuff", "min_updates"),
        help="fedbuff: a partial buffer with at least this many updates is aggregated after "
        "--max-wait",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=ConfigDefault("coordinator.strategies", "FedBuff", "max_wait_s"),
        metavar="SECONDS",
        help="fedbuff: longest wait after a buffer's first update",
    )
    p.add_argument(
        "--max-staleness",
        type=int,
        default=ConfigDefault("coordinator.strategies", "FedBuff", "max_staleness"),
        help="fedbuff: refuse older updates",
    )
    p.add_argument(
        "--lora-mode",
        choices=LORA_MODES,
        default=None,
        help="how LoRA factors are aggregated (default: exact; frozen-a with --secure, the "
        "only mode exact under secure sums)",
    )
    p.add_argument(
        "--rank",
        type=int,
        default=ConfigDefault("coordinator.next_version", "AggregationConfig", "rank"),
        help="LoRA rank",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=ConfigDefault("coordinator.next_version", "AggregationConfig", "alpha"),
        help="LoRA alpha",
    )
    p.add_argument(
        "--targets",
        default=CommaListDefault("coordinator.config", "CoordinatorConfig", "targets"),
        help="comma-separated LoRA targets",
    )
    p.add_argument(
        "--a-seed",
        type=int,
        default=ConfigDefault("coordinator.next_version", "AggregationConfig", "a_seed"),
        help="seed of the initial / frozen A matrices",
    )
    p.add_argument(
        "--codec",
        default=ConfigDefault("coordinator.config", "CoordinatorConfig", "codec"),
        help="codec clients are asked to use (default: by --method, delta+int4+zlib for sft, "
        "delta+int8+zlib for dpo)",
    )
    p.add_argument(
        "--exact-max-rank",
        type=int,
        default=ConfigDefault("coordinator.next_version", "AggregationConfig", "exact_max_rank"),
        help="exact mode: rank kept by the streaming sum between folds (0: 4·rank)",
    )
    p.add_argument(
        "--server-lr",
        type=float,
        default=ConfigDefault("coordinator.next_version", "AggregationConfig", "server_lr"),
        help="server learning rate",
    )
    p.add_argument(
        "--fedadam", action="store_true", help="FedAdam server optimizer (naive/frozen-a)"
    )
    p.add_argument(
        "--clip-norm",
        type=float,
        default=None,
        help="fixed bound on the norm of one update's effect (default: none; the adaptive "
        "bound applies)",
    )
    p.add_argument(
        "--clip-multiplier",
        type=float,
        default=ConfigDefault("coordinator.next_version", "AggregationConfig", "clip_multiplier"),
        metavar="C",
        help="adaptive clip: bound each update's effect to C x the lower median norm of the "
        "buffer and the last --clip-history updates",
    )
    p.add_argument(
        "--clip-history",
        type=int,
        default=ConfigDefault("coordinator.next_version", "AggregationConfig", "clip_history"),
        help="adaptive clip: earlier norms",
    )
    p.add_argument(
        "--no-clip",
        action="store_true",
        help="turn the adaptive clip off (one device can then move the model without bound)",
    )
    p.add_argument(
        "--max-weight-examples",
        type=int,
        default=None,
        metavar="N",
        help="most examples an update's weight counts (default: local-steps x batch-size)",
    )
    p.add_argument(
        "--robust",
        choices=ROBUST_AGGREGATORS,
        default=ConfigDefault("coordinator.next_version", "AggregationConfig", "robust"),
        help="robust aggregation",
    )
    p.add_argument(
        "--trim-ratio",
        type=float,
        default=ConfigDefault("coordinator.next_version", "AggregationConfig", "trim_ratio"),
        help="trimmed-mean: share cut",
    )
    p.add_argument(
        "--dp-noise",
        type=float,
        default=None,
        help="central DP noise multiplier, enables DP (default: off)",
    )
    p.add_argument(
        "--dp-clip",
        type=float,
        default=ConfigDefault("coordinator.privacy", "DpConfig", "clip_norm"),
        help="central DP clip norm",
    )
    p.add_argument(
        "--dp-delta",
        type=float,
        default=ConfigDefault("coordinator.privacy", "DpConfig", "delta"),
        help="central DP delta",
    )
    p.add_argument(
        "--local-steps",
        type=int,
        default=ConfigDefault("coordinator.config", "CoordinatorConfig", "local_steps"),
        help="task: local steps per round",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=ConfigDefault("coordinator.config", "CoordinatorConfig", "batch_size"),
        help="task: local batch size",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=ConfigDefault("coordinator.config", "CoordinatorConfig", "seq_len"),
        help="task: sequence length in tokens",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=ConfigDefault("coordinator.config", "CoordinatorConfig", "lr"),
        help="task: local learning rate",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default=_method_default("name"),
        help="task: post-training method devices run (dpo trains on the preference pairs "
        "each device's app records; a device without pairs sits the round out)",
    )
    p.add_argument(
        "--beta",
        type=float,
        default=_method_default("beta"),
        help="task, dpo: strength of the pull to the reference",
    )
    p.add_argument(
        "--sft-weight",
        type=float,
        default=_method_default("sft_weight"),
        help="task, dpo: weight of an NLL term on the chosen answer (RPO alpha; 0 = plain DPO)",
    )
    p.add_argument(
        "--dpo-loss",
        choices=DPO_LOSSES,
        default=_method_default("loss"),
        help="task, dpo: loss variant",
    )
    p.add_argument(
        "--max-rounds",
        type=int,
        default=None,
        help="stop after this many versions (default: never)",
    )
    p.add_argument(
        "--join-token",
        default=None,
        # 8 = coordinator.config.MIN_JOIN_TOKEN_CHARS (not imported: it pulls numpy into --help)
        help="enrollment secret, at least 8 characters "
        f"(default: ${JOIN_TOKEN_ENV}, else generated)",
    )
    p.add_argument(
        "--operator-token",
        default=None,
        help="read-only operator token: GET /v1/status with it shows every client's updates "
        f"(default: ${OPERATOR_TOKEN_ENV} or generated and printed once)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve plain HTTP without TLS: the join token crosses the LAN in clear text and "
        "devices cannot authenticate this coordinator (they need --insecure too)",
    )
    p.add_argument("--no-mdns", action="store_true", help="do not advertise on mDNS")
    p.add_argument(
        "--mdns-name",
        metavar="NAME",
        help="mDNS instance name, for `fedlm join --coordinator-name` "
        "(default: fedlm-<task>-<random>)",
    )
    p.add_argument(
        "--mdns-interface",
        action="append",
        default=None,
        help="IPv4 address to advertise on, repeatable (default: the --host address, or all)",
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=_MibDefault("coordinator.config", "CoordinatorConfig", "max_body_bytes"),
        help="largest accepted update, MiB",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=ConfigDefault("coordinator.config", "CoordinatorConfig", "rate_per_s"),
        help="per-client requests per second",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        help="log level of the coordinator",
    )
    p.set_defaults(func=_run)


def _config(
    args: argparse.Namespace, join_token: str, operator_token: str = ""
) -> CoordinatorConfig:
    from coordinator.config import CoordinatorConfig
    from coordinator.lora_math import FedAdamConfig
    from coordinator.next_version import AggregationConfig
    from coordinator.privacy import DpConfig
    from coordinator.shapes import shapes_from_gguf
    from coordinator.strategies import FedAvg, FedBuff
    from edge_sdk.models.identity import model_sha256
    from edge_sdk.models.store import resolve as resolve_model
    from edge_sdk.secagg.params import MIN_COHORT

    # Options not given carry their config field's default (`ConfigDefault`).
    args = argparse.Namespace(**{k: resolve(v) for k, v in vars(args).items()})
    path = resolve_model(args.model)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    secure = bool(getattr(args, "secure", False))
    strategy_name = args.strategy or ("fedavg" if secure else FedBuff.name)
    clients_per_round = args.clients_per_round
    if clients_per_round is None:
        clients_per_round = max(MIN_COHORT, args.min_cohort) if secure else FedAvg.clients_per_round
    strategy = (
        FedAvg(clients_per_round, args.min_clients, args.deadline)
        if strategy_name == "fedavg"
        else FedBuff(
            args.buffer_size,
            args.max_staleness,
            min_updates=args.min_updates,
            max_wait_s=args.max_wait,
        )
    )
    aggregation = AggregationConfig(
        mode=args.lora_mode or ("frozen-a" if secure else AggregationConfig.mode),
        rank=args.rank,
        alpha=args.alpha,
        a_seed=args.a_seed,
        server_lr=args.server_lr,
        exact_max_rank=args.exact_max_rank,
        robust=args.robust,
        trim_ratio=args.trim_ratio,
        clip_norm=args.clip_norm,
        # Under DP the bound is --dp-clip (an adaptive one would depend on the data).
        clip_multiplier=None if args.no_clip or args.dp_noise is not None else args.clip_multiplier,
        clip_history=args.clip_history,
        max_weight_examples=args.max_weight_examples,
        fedadam=FedAdamConfig() if args.fedadam else None,
        dp=DpConfig(args.dp_noise, args.dp_clip, args.dp_delta)
        if args.dp_noise is not None
        else None,
    )
    return CoordinatorConfig(
        model_sha256=model_sha256(path),
        model_name=Path(args.model).name,
        shapes=shapes_from_gguf(path, targets),
        db_path=Path(args.db),
        targets=targets,
        aggregation=aggregation,
        strategy=strategy,
        codec=args.codec,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        method=MethodSpec(args.method, args.beta, args.dpo_loss, args.sft_weight),
        max_rounds=args.max_rounds,
        join_token=join_token,
        operator_token=operator_token,
        host=args.host,
        port=args.port,
        tls=not args.insecure,
        mdns=not args.no_mdns,
        mdns_interfaces=tuple(args.mdns_interface) if args.mdns_interface else None,
        mdns_name=args.mdns_name,
        max_body_bytes=_bytes_from_mib(args.max_body_mb),
        rate_per_s=args.rate,
        rate_burst=max(1, int(4 * args.rate)),
        secure=secure,
        min_cohort=args.min_cohort,
        secure_clip=args.secure_clip,
        secure_grid_bits=args.secure_grid_bits,
        secure_phase_s=args.secure_phase,
    )


def _single_threaded_blas() -> None:
    """One BLAS thread: the coordinator's matrices are small (k ≤ 2·max_rank), and OpenBLAS's
    thread pool costs far more than it saves on them (30x slower on a busy 2-core machine);
    parallelism comes from the ingest threads instead. Must run before numpy is imported."""
    if "numpy" in sys.modules:
        logging.getLogger(__name__).debug("numpy already imported; BLAS threads unchanged")
        return
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")


def _run(args: argparse.Namespace) -> int:
    _single_threaded_blas()
    from coordinator.auth import generate_token
    from coordinator.config import MIN_JOIN_TOKEN_CHARS
    from coordinator.errors import CoordinatorError
    from coordinator.server import Service, serve

    logging.getLogger("coordinator").setLevel(args.log_level.upper())
    # The coordinator's own log lines (the --insecure warning among them) go to stderr.
    if not logging.getLogger().handlers:
        logging.basicConfig()
    join_token = args.join_token or os.environ.get(JOIN_TOKEN_ENV) or ""
    generated = not join_token
    if generated:
        join_token = generate_token()
    elif len(join_token) < MIN_JOIN_TOKEN_CHARS:
        source = "--join-token" if args.join_token else f"${JOIN_TOKEN_ENV}"
        print(
            f"fedlm coordinator: error: {source} should have at least {MIN_JOIN_TOKEN_CHARS} "
            f"characters, got {len(join_token)} (or leave it unset to generate one)",
            file=sys.stderr,
        )
        return 2
    operator_token = args.operator_token or os.environ.get(OPERATOR_TOKEN_ENV) or ""
    operator_generated = not operator_token
    if operator_generated:
        operator_token = generate_token()
    try:
        config = _config(args, join_token, operator_token)
    except ValueError as exc:  # a flag value the config refuses: a usage error, not a crash
        print(f"fedlm coordinator: error: {exc}", file=sys.stderr)
        return 2

    def ready(service: Service) -> None:
        coordinator = service.coordinator
        print(
            f"fedlm coordinator {service.url}  task {coordinator.task_id}  "
            f"version {coordinator.version}",
            flush=True,
        )
        if service.tls is not None:
            from edge_sdk.client.joincode import make_join_code

            print(f"TLS certificate sha256 fingerprint: {service.tls.fingerprint}", flush=True)
            # The join code holds the secret: printed at every start (the operator needs it to
            # add a device later), to this terminal only, never to the log.
            print(f"join code: {make_join_code(service.tls.fingerprint, join_token)}", flush=True)
            print(
                f"  on each device: fedlm join {args.model} --data FILE --join-code <the code>",
                flush=True,
            )
        elif generated:
            print(f"join token (shown once): {join_token}", flush=True)
            print("  on each device: fedlm join MODEL --data FILE --insecure --join-token <the "
                  f"token> --coordinator {service.url}", flush=True)  # fmt: skip
        if operator_generated:
            print(f"operator token (shown once; for GET /v1/status): {operator_token}", flush=True)

    try:
        asyncio.run(serve(config, ready))
    except CoordinatorError as exc:
        print(f"fedlm coordinator: error: {exc}", file=sys.stderr)
        return 2
    return 0
