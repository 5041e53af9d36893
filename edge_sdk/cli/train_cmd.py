"""`fedlm train` (LoRA/QLoRA on local data) and `fedlm convert-adapter` (PEFT -> GGUF LoRA)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from edge_sdk.choices import COMPUTES, PRECISIONS
from edge_sdk.cli._help import ConfigDefault, DefaultsHelpFormatter
from edge_sdk.cli._help import resolve as resolve_default
from edge_sdk.cli._openmp import FOREGROUND
from edge_sdk.models.naming import LORA_TARGETS
from edge_sdk.training.methods import (
    DEFAULT_BETA,
    DEFAULT_DPO_LOSS,
    DEFAULT_METHOD,
    DEFAULT_REFERENCE,
    DEFAULT_SFT_WEIGHT,
    DPO_LOSSES,
    DPO_REFERENCES,
    TRAIN_METHODS,
)


def _train_default(field: str) -> ConfigDefault:
    """The default of `TrainConfig.<field>`: the CLI declares none of its own."""
    return ConfigDefault("edge_sdk.training.trainer", "TrainConfig", field)


def _lora_default(field: str) -> ConfigDefault:
    """The default of `LoraConfig.<field>`."""
    return ConfigDefault("edge_sdk.training.lora", "LoraConfig", field)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        formatter_class=DefaultsHelpFormatter,
        help="train a LoRA adapter on local data (QLoRA on the model's own GGUF): SFT or DPO",
        description="Train a LoRA adapter. --method sft (default) reads JSONL (chat / "
        "prompt+completion / text), a .json array of the same objects, .csv/.tsv with "
        "prompt,completion or text columns, or plain text. --method dpo reads JSONL preference "
        'pairs, {"prompt" or "messages", "chosen", "rejected"} per line. Writes '
        "adapter_model.safetensors + adapter_config.json (PEFT) and adapter.gguf (llama.cpp) "
        "into --out.",
    )
    p.add_argument("model", help="model name (see `fedlm models`) or path to a .gguf file")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help="training data file(s)")
    p.add_argument(
        "--method",
        choices=TRAIN_METHODS,
        default=DEFAULT_METHOD,
        help="sft: examples; dpo: preference pairs",
    )
    p.add_argument(
        "--beta",
        type=float,
        default=DEFAULT_BETA,
        metavar="B",
        help="DPO/IPO beta, the pull towards the reference",
    )
    p.add_argument(
        "--sft-weight",
        type=float,
        default=DEFAULT_SFT_WEIGHT,
        metavar="A",
        help="DPO: weight of an NLL term on the chosen answer (RPO alpha; "
        f"0 = plain DPO) ({DEFAULT_SFT_WEIGHT:g})",
    )
    p.add_argument(
        "--loss",
        dest="dpo_loss",
        choices=DPO_LOSSES,
        default=DEFAULT_DPO_LOSS,
        help="DPO loss: sigmoid (DPO) or ipo (IPO)",
    )
    p.add_argument(
        "--reference",
        choices=DPO_REFERENCES,
        default=DEFAULT_REFERENCE,
        help="DPO reference policy: base (adapter disabled) or start (the --init-adapter)",
    )
    p.add_argument(
        "--init-adapter",
        metavar="DIR",
        help="start from this PEFT adapter directory (e.g. an earlier `fedlm train --out`); "
        "its rank, alpha and targets are used",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--steps", type=int, default=_train_default("steps"), metavar="N", help="optimizer steps"
    )
    p.add_argument("--rank", type=int, default=_lora_default("rank"), metavar="R", help="LoRA rank")
    p.add_argument("--alpha", type=float, metavar="A", help="LoRA alpha (default: 2 x rank)")
    p.add_argument(
        "--dropout", type=float, default=_lora_default("dropout"), metavar="P", help="LoRA dropout"
    )
    p.add_argument(
        "--targets",
        default=",".join(LORA_TARGETS),
        metavar="LIST",
        help="comma-separated projections to adapt",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=_train_default("seq_len"),
        metavar="L",
        help="tokens per sequence",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=_train_default("batch_size"),
        metavar="B",
        help="sequences per micro-batch",
    )
    p.add_argument(
        "--grad-accum",
        type=int,
        default=_train_default("grad_accum"),
        metavar="K",
        help="micro-batches per step",
    )
    p.add_argument(
        "--lr", type=float, default=_train_default("lr"), metavar="LR", help="peak learning rate"
    )
    p.add_argument(
        "--warmup", type=int, default=_train_default("warmup"), metavar="N", help="warmup steps"
    )
    p.add_argument("--seed", type=int, default=_train_default("seed"), metavar="S", help="seed")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=_train_default("val_fraction"),
        metavar="F",
        help="held-out share",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=_train_default("eval_every"),
        metavar="N",
        help="evaluate every N steps (0: before and after only)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=_train_default("checkpoint_every"),
        metavar="N",
        help="checkpoint every N steps (0 disables)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=_train_default("precision"),
        help="frozen base precision (nf4 = QLoRA)",
    )
    p.add_argument(
        "--compute",
        choices=COMPUTES,
        default=_train_default("compute"),
        help="the NF4 base's matrix products: bf16 (faster on CPUs with bf16 dot products, e.g. "
        "AVX512-BF16; the adapter and the optimizer stay fp32), fp32, or auto (default): bf16 "
        "where the CPU has them",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed data lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # The machine's main job: its OpenMP threads spin while the cores are free (cli/_openmp.py).
    p.set_defaults(func=_train, openmp=FOREGROUND)

    c = sub.add_parser("convert-adapter", help="convert a PEFT LoRA directory to a GGUF LoRA")
    c.add_argument(
        "peft_dir", help="directory with adapter_config.json + adapter_model.safetensors"
    )
    c.add_argument(
        "--model", required=True, help="base model name or .gguf path it was trained for"
    )
    c.add_argument("--out", required=True, metavar="FILE", help="GGUF file to write")
    c.add_argument("--f16", action="store_true", help="store tensors as F16 (default F32)")
    c.set_defaults(func=_convert)


def _line_buffered() -> None:
    """Flush every line even when stdout/stderr are a pipe or a file, not a terminal.

    Python block-buffers a redirected stdout, so `fedlm train > log` showed nothing until the
    run ended; a log that is read while training runs needs each line when it is printed.
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # absent on some test doubles
        if reconfigure is not None and not stream.isatty():
            reconfigure(line_buffering=True)


def _train(args: argparse.Namespace) -> int:
    from edge_sdk.training.lora import LoraConfig
    from edge_sdk.training.trainer import TrainConfig, run

    _line_buffered()
    args = argparse.Namespace(**{k: resolve_default(v) for k, v in vars(args).items()})

    init = None
    try:
        if args.init_adapter is not None:
            from edge_sdk.adapters import load_peft

            init = load_peft(args.init_adapter)
            lora = dataclasses.replace(init.lora_config(), dropout=args.dropout)
        else:
            lora = LoraConfig(
                rank=args.rank,
                alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                dropout=args.dropout,
                targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
            )
        config = TrainConfig(
            steps=args.steps,
            lora=lora,
            method=args.method,
            beta=args.beta,
            dpo_loss=args.dpo_loss,
            sft_weight=args.sft_weight,
            reference=args.reference,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            lr=args.lr,
            warmup=args.warmup,
            seed=args.seed,
            val_fraction=args.val_fraction,
            eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every,
            precision=args.precision,
            compute=args.compute,
            gradient_checkpointing=args.gradient_checkpointing,
        )
    except ValueError as exc:
        print(f"fedlm train: error: {exc}", file=sys.stderr)
        return 2
    from edge_sdk.compute import compute_warning

    if warning := compute_warning(config.compute):
        print(f"fedlm train: warning: {warning}", file=sys.stderr)
    bar = not args.no_progress and sys.stderr.isatty()
    every = max(1, args.steps // 10)

    def log_line(record: dict[str, float]) -> None:
        # Without a terminal (logs, CI) a bar is noise: print a line every 10% instead.
        step = int(record["step"])
        if step % every == 0 or step == args.steps:
            extra = ""
            if "reward_accuracy" in record:
                extra += (
                    f", reward acc {record['reward_accuracy']:.2f}, margin "
                    f"{record['reward_margin']:.3f}, logps chosen {record['chosen_logps']:.2f} "
                    f"rejected {record['rejected_logps']:.2f}"
                )
            if "eval_loss" in record:
                extra += f", eval loss {record['eval_loss']:.4f}"
            if "eval_reward_accuracy" in record:
                extra += f", eval reward acc {record['eval_reward_accuracy']:.2f}"
            print(
                f"step {step}/{args.steps}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                f"{record['tokens_per_s']:.0f} tokens/s{extra}",
                file=sys.stderr,
                flush=True,
            )

    out = run(
        args.model,
        args.data,
        args.out,
        config,
        resume=args.resume,
        skip_bad=args.skip_bad,
        progress=bar,
        model_name=args.model,
        on_step=None if bar or args.no_progress else log_line,
        on_data=lambda summary: print(f"data: {summary}", flush=True),
        init_adapter=init.tensors if init is not None else None,
    )
    m = out.result.metrics
    print(
        f"trained {m.steps} steps, {m.num_tokens} tokens in {m.seconds:.1f} s "
        f"({m.tokens_per_s:.0f} tokens/s); final train loss {m.train_loss:.4f}"
    )
    if m.eval_loss is not None:
        before = f"{m.eval_loss_before:.4f} -> " if m.eval_loss_before is not None else ""
        if m.perplexity is not None:
            print(f"eval loss {before}{m.eval_loss:.4f} (perplexity {m.perplexity:.2f})")
        else:
            print(f"eval loss {before}{m.eval_loss:.4f}")
    if "reward_accuracy" in m.eval_metrics:
        acc0 = m.eval_metrics_before.get("reward_accuracy")
        was = f"{acc0:.2f} -> " if acc0 is not None else ""
        print(
            f"eval reward accuracy {was}{m.eval_metrics['reward_accuracy']:.2f}, "
            f"margin {m.eval_metrics['reward_margin']:.3f}"
        )
    print(
        f"wrote {out.gguf_path} and {out.peft_dir / 'adapter_model.safetensors'} "
        f"(+ adapter_config.json, metrics.json)"
    )
    return 0


def _convert(args: argparse.Namespace) -> int:
    from edge_sdk.adapters.peft import peft_to_gguf
    from edge_sdk.models import resolve

    path = peft_to_gguf(
        args.peft_dir, resolve(args.model), args.out, dtype="f16" if args.f16 else "f32"
    )
    print(f"wrote {path}")
    return 0
