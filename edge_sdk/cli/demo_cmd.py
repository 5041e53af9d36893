"""`fedlm demo`: a federated QLoRA run on one machine that ends with evidence that it helped."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from edge_sdk.choices import COMPUTES
from edge_sdk.method import METHODS
from edge_sdk.training.methods import DEFAULT_METHOD


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="federate a QLoRA adapter across simulated clients and report what it gained",
        description="Generate non-IID instruction data for N clients (or use --data DIR), train "
        "local-only and centralized baselines, federate "
        "an adapter (a coordinator advertised by mDNS "
        "on 127.0.0.1 and N `fedlm join` processes that discover it), and report eval loss, exact "
        "match, bytes sent and wall time (report.json, a plot and both adapter formats in --out).",
    )
    p.add_argument("--clients", type=int, metavar="N", help="number of clients (4)")
    p.add_argument("--rounds", type=int, metavar="R", help="global versions to publish")
    p.add_argument(
        "--quick", action="store_true", help="the short preset (about 2.5 minutes on 2 idle cores)"
    )
    p.add_argument("--out", metavar="DIR", help="run directory (default: ./fedlm-demo-<time>)")
    p.add_argument("--data", metavar="DIR", help="one JSONL per client (+ optional eval.jsonl)")
    p.add_argument("--model", metavar="MODEL", help="base model name or .gguf path (smollm2-135m)")
    p.add_argument("--seed", type=int, metavar="S", help="seed of data and training (0)")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads (default: all cores; 1 on a busy machine)",
    )
    p.add_argument(
        "--compute",
        choices=COMPUTES,
        default=None,
        help="the NF4 base's matrix products in every training run, as `fedlm train --compute` "
        "(default auto)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="simulate the federation in this process instead of coordinator + client processes",
    )
    p.add_argument(
        "--secure",
        action="store_true",
        help="secure aggregation (coordinator --secure, LoRA mode frozen-a); compare "
        "with a run without it; not with --in-process",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default=METHODS[0],
        help="dpo: the preference arm (seeded non-IID format preferences; judged win rate and "
        "held-out reward accuracy of base, local-only, federated and centralized DPO; the "
        "federation runs in-process, the arms in 2 worker processes; with --quick a smoke run "
        "that does not show the targets)",
    )
    p.add_argument("--beta", type=float, default=None, help="dpo: beta (default: 0.1)")
    p.add_argument(
        "--sft-weight", type=float, default=None, help="dpo: RPO alpha (default: the preset's)"
    )
    p.add_argument("--greedy", action="store_true", help="dpo: also judge llama.cpp greedy answers")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import logging

    from rich.console import Console
    from rich.live import Live

    from edge_sdk.demo.config import DemoConfig
    from edge_sdk.demo.errors import DemoConfigError
    from edge_sdk.demo.live import DemoView
    from edge_sdk.demo.network import NetworkFederation
    from edge_sdk.demo.report import render
    from edge_sdk.demo.run import FULL_BUDGET_S, QUICK_BUDGET_S, run_demo

    if getattr(args, "method", DEFAULT_METHOD) == "dpo":
        return _preference_demo(args)
    config = DemoConfig.quick() if args.quick else DemoConfig.full()
    changes: dict[str, Any] = {
        k: v
        for k, v in (
            ("clients", args.clients),
            ("rounds", args.rounds),
            ("model", args.model),
            ("seed", args.seed),
            ("threads", args.threads),
            ("compute", args.compute),
        )
        if v is not None
    }
    if getattr(args, "secure", False):
        if args.in_process:
            raise DemoConfigError(
                "--secure runs the federation over the network; drop --in-process"
            )
        changes.update(secure=True, mode="frozen-a")
    try:
        config = config.replace(**changes)
    except ValueError as exc:
        raise DemoConfigError(str(exc)) from None
    out = Path(args.out) if args.out else Path.cwd() / time.strftime("fedlm-demo-%Y%m%d-%H%M%S")
    if not args.verbose:
        # The demo's datasets have no validation split on purpose (it scores a held-out set).
        logging.getLogger("edge_sdk.training.data").setLevel(logging.ERROR)
    console = Console()
    start = time.perf_counter()
    view = DemoView(config.clients, config.rounds)

    def progress(event: str, fields: dict[str, Any]) -> None:
        view(event, fields)
        # A few lines stay in the scrollback (and in a piped log, where the live table only
        # shows at the end); per-client detail lives in the table.
        clock = f"[dim]{time.perf_counter() - start:6.1f}s[/dim]"
        if event == "phase":
            console.print(f"{clock} {fields['name']} done in {fields['seconds']:.1f} s")
        elif event == "local":
            console.print(
                f"{clock}   local-only client {fields['client']}: "
                f"exact match {fields['exact_match']:.1%}"
            )
        elif event == "version":
            console.print(
                f"{clock}   global version {fields['version']}: "
                f"eval loss {fields['eval_loss']:.3f}, "
                f"exact match {fields['exact_match']:.1%}"
            )

    # Client processes get one torch thread each: N of them share the machine's cores.
    # None: run_demo federates in this process, on the model it loaded for the baselines.
    federation = (
        None
        if args.in_process
        else NetworkFederation(work_dir=out / "federation", progress=progress)
    )
    with Live(view, console=console, refresh_per_second=2):
        report = run_demo(
            config,
            out,
            data_dir=args.data,
            progress=progress,
            federation=federation,
            budget_s=QUICK_BUDGET_S if args.quick else FULL_BUDGET_S,
        )
    render(report, console)
    return 0


def _preference_demo(args: argparse.Namespace) -> int:
    """`fedlm demo --method dpo`: the preference arm, in this process (report.json in --out)."""
    import json
    import logging

    from rich.console import Console
    from rich.table import Table

    from edge_sdk.demo.config import DemoConfig
    from edge_sdk.demo.errors import DemoConfigError
    from edge_sdk.demo.preference import experiment, quick

    if args.secure or args.data:
        raise DemoConfigError("--method dpo runs the built-in preference task in this process; "
                              "drop --secure and --data")  # fmt: skip
    config = DemoConfig.preference()
    if args.quick:
        config = quick(config)
    changes = {k: v for k, v in (("clients", args.clients), ("rounds", args.rounds),
               ("model", args.model), ("seed", args.seed), ("threads", args.threads),
               ("compute", args.compute), ("beta", args.beta), ("sft_weight", args.sft_weight))
               if v is not None}  # fmt: skip
    try:
        config = config.replace(**changes)
    except ValueError as exc:
        raise DemoConfigError(str(exc)) from None
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    out = Path(args.out) if args.out else Path.cwd() / time.strftime("fedlm-demo-dpo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("edge_sdk.training.data").setLevel(logging.ERROR)
    console = Console()
    console.print(
        f"preference demo (DPO, beta {config.beta:g}, sft weight {config.sft_weight:g}): "
        f"{config.clients} clients, {config.rounds} rounds x {config.local_steps} steps; "
        f"writing {out}"
    )
    report = experiment(config, out, greedy=args.greedy)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    table = Table(title="judged win rate (greedy answer in the users' preferred format)")
    for col in ("arm", "win rate", "reward accuracy (held out)"):
        table.add_column(col)
    rows = [("base", report["base"])]
    rows += [(f"local-only {c}", r) for c, r in report["local_only"].items()]
    rows += [("federated", report["federated"]), ("centralized", report["centralized"])]
    for name, r in rows:
        table.add_row(name, f"{r['win_rate']:.1%}", f"{r['reward_accuracy']:.1%}")
    console.print(table)
    gap = report.get("gap_closed")
    console.print(f"federated closes {gap:.1%} of the base -> centralized gap; beats every "
                  f"local-only client: {report['beats_every_local']}; {report['total_s']:.0f} s"
                  if gap is not None else "centralized did not beat the base")  # fmt: skip
    return 0
