"""QLoRA training speed, memory and load time: fedlm-edge vs HF transformers + peft + bitsandbytes.

Both stacks train the same configuration on the same GGUF, each in its own subprocess so that
peak RSS is clean: SmolLM2-135M, sequence 256, batch 1, LoRA r=8 / alpha=16 on all seven
projections of every block, frozen NF4 base (bitsandbytes `Linear4bit`, blocks of 64, fp32
compute), AdamW on the adapter, no gradient checkpointing, no dropout. Ours runs what `fedlm
train` picks by default (`--compute auto`: the base's products in bf16 on a CPU with bf16 dot
products, fp32 elsewhere); `ours-fp32-compute` and `ours-bf16` pin it.

HF transformers refuses to combine a GGUF file with a `BitsAndBytesConfig` ("You cannot
combine Quantization and loading a model from a GGUF file"), so its QLoRA baseline is built
the way that config would build it: `from_pretrained(dir, gguf_file=...)` in fp32, then every
decoder `nn.Linear` is replaced by an NF4 `bnb.nn.Linear4bit` holding the same weight, then
`peft.get_peft_model`. The HF fp32-LoRA figure (`--hf-fp32`) skips the replacement.

Every figure is for the whole worker process: imports, load and the timed steps (peak RSS is
the process's `ru_maxrss`). One run prints each stack's tokens/s, peak RSS, load time, its
ratios to HF and its fraction of the fp32 floor (floor step time / the stack's step time).

Run: `.venv/bin/python benchmarks/bench_train.py [--steps 8] [--json out.json]
[--stacks ours,ours-plain-backward,ours-torch-adamw,ours-lowmem,hf,floor]`
(needs the `bench` extra: transformers, peft). Results go into BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _batch(vocab: int, seq_len: int, seed: int, batch_size: int = 1) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, seq_len), generator=g)


def _packed_positions(batch_size: int, seq_len: int, mean_len: int, seed: int) -> Any:
    """(B, T) position ids of rows packed with examples of U(mean/2, 3*mean/2) tokens each."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch_size):
        parts, used = [], 0
        while used < seq_len:
            n = min(seq_len - used, int(rng.integers(mean_len // 2, 3 * mean_len // 2 + 1)))
            parts.append(np.arange(n))
            used += n
        rows.append(np.concatenate(parts))
    return torch.from_numpy(np.stack(rows))


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


_CPU_TIMES: list[float] = []
"""CPU seconds (user + system, all threads) of each timed step of this worker."""


def _time_steps(step: Any, steps: int, warmup: int) -> list[float]:
    """Wall seconds of each timed step; their CPU seconds go to `_CPU_TIMES`.

    On a shared machine the wall time of a step varies 3x with the other jobs; its CPU time
    (what the step itself computed, on every thread) varies far less, so the stacks' CPU
    seconds per step are compared as well (an approximation: contention for caches and memory
    bandwidth still inflates them, and a stack that spins idle threads pays in CPU time).
    """
    times = []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), _cpu_s()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            _CPU_TIMES.append(_cpu_s() - c0)
    return times


def worker_ours(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch

    from edge_sdk.models import resolve, transformer
    from edge_sdk.models.loader import load_model
    from edge_sdk.training.adamw import AdapterAdamW
    from edge_sdk.training.lora import LoraConfig, lora_parameters, set_base_compute

    import_s = time.perf_counter() - t0
    # ours-plain-backward: plain autograd through norms, RoPE and SwiGLU (what LEAN_BACKWARD saves).
    transformer.LEAN_BACKWARD = args.stack != "ours-plain-backward"
    path = resolve(args.model)
    t0 = time.perf_counter()
    model = load_model(
        path,
        precision=args.precision,
        lora=LoraConfig(rank=args.rank, alpha=2.0 * args.rank),
        gradient_checkpointing=args.stack == "ours-ckpt",
    )
    load_s = time.perf_counter() - t0
    set_base_compute(model, _compute(args))
    model.train()
    # What `fedlm train` uses (torch.optim.AdamW would import torch._dynamo: ~70 MB RSS).
    opt = (
        torch.optim.AdamW(lora_parameters(model), lr=1e-4)
        if args.stack == "ours-torch-adamw"
        else AdapterAdamW(lora_parameters(model), lr=1e-4)
    )
    ids = _batch(model.config.vocab_size, args.seq_len, args.seed, args.batch_size)
    # ours-packed: the rows hold examples of ~--pack-len tokens, isolated from each other (what
    # `fedlm train` does); the other stacks attend across the whole row (what it did before).
    positions = (
        _packed_positions(args.batch_size, args.seq_len, args.pack_len, args.seed)
        if args.stack == "ours-packed"
        else None
    )

    def step() -> None:
        loss = model(ids, ids, position_ids=positions)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = _time_steps(step, args.steps, args.warmup)
    heavy = sorted(
        k for k in ("bitsandbytes", "torch._dynamo", "torch._inductor") if k in sys.modules
    )
    return {"import_s": import_s, "load_s": load_s, "step_s": times, "heavy_imports": heavy}


def _compute(args: argparse.Namespace) -> str:
    """The stack's `--compute`: bf16 for *-bf16, fp32 for *-fp32-compute, else what `fedlm
    train` picks here by default (auto: bf16 on CPUs with bf16 dot products)."""
    from edge_sdk.compute import resolve_compute

    if args.stack.endswith("-bf16"):
        return "bf16"
    if args.stack.endswith("-fp32-compute"):
        return "fp32"
    return resolve_compute("auto", args.precision)


def _ab_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The default NF4 model with LoRA, its AdapterAdamW and the benchmark's token batch."""
    from edge_sdk.models import resolve
    from edge_sdk.models.loader import load_model
    from edge_sdk.training.adamw import AdapterAdamW
    from edge_sdk.training.lora import LoraConfig, lora_parameters, set_base_compute

    model = load_model(
        resolve(args.model), precision="nf4", lora=LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
    )
    set_base_compute(model, _compute(args))
    model.train()
    opt = AdapterAdamW(lora_parameters(model), lr=1e-4)
    return model, opt, _batch(model.config.vocab_size, args.seq_len, args.seed, args.batch_size)


def _paired(step: Any, args: argparse.Namespace) -> dict[str, Any]:
    """`step(False)` (before) against `step(True)` (after), alternating, the order flipping per
    pair: on a shared machine the load drifts over minutes, and comparing each step with its
    neighbour cancels that drift, which separate subprocess runs cannot. Wall and CPU seconds
    (all threads; less moved by other jobs than wall time)."""
    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}

    def timed(on: bool) -> None:
        t0, c0 = time.perf_counter(), _cpu_s()
        step(on)
        wall[on].append(time.perf_counter() - t0)
        cpu[on].append(_cpu_s() - c0)

    for i in range(args.warmup + args.steps):
        order = (True, False) if i % 2 else (False, True)
        for on in order:
            timed(on)
    before, after = wall[False][args.warmup :], wall[True][args.warmup :]
    cpu_before, cpu_after = cpu[False][args.warmup :], cpu[True][args.warmup :]
    return {
        "import_s": 0.0,
        "load_s": 0.0,
        "step_s": after,
        "before_s": before,
        "ratios": [a / b for a, b in zip(after, before)],
        "cpu_ratios": [a / b for a, b in zip(cpu_after, cpu_before)],
    }


def _paired_summary(what: str, runs: list[dict[str, Any]]) -> str:
    """One line on a paired A/B stack's runs: the median after / before ratio and its spread."""
    ratios = [x for r in runs for x in r["ratios"]]
    before = [x for r in runs for x in r["before_s"]]
    after = [x for r in runs for x in r["step_s"]]
    cpu_ratios = [x for r in runs for x in r["cpu_ratios"]]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return (
        f"{what}, paired in one process: step time median {statistics.median(ratios):.3f}x "
        f"(quartiles {q[0]:.3f}..{q[2]:.3f}, {len(ratios)} pairs), CPU seconds "
        f"{statistics.median(cpu_ratios):.3f}x; before {statistics.median(before):.2f} s, "
        f"after {statistics.median(after):.2f} s median"
    )


def worker_isolation_ab(args: argparse.Namespace) -> dict[str, Any]:
    """Isolation's cost, paired: one model, steps alternating unisolated / isolated packed rows."""
    model, opt, ids = _ab_model(args)
    positions = _packed_positions(args.batch_size, args.seq_len, args.pack_len, args.seed)

    def step(isolated: bool) -> None:
        model(ids, ids, position_ids=positions if isolated else None).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _paired(step, args)


def worker_flag_ab(args: argparse.Namespace) -> dict[str, Any]:
    """A module-level switch off / on (`--flag module:NAME`, e.g.
    `edge_sdk.models.gemm:ONEDNN`), paired: steps alternating with the switch False / True."""
    import importlib

    flag = "edge_sdk.models.transformer:FEWER_PASSES" if args.stack == "floor-ab" else args.flag
    module_name, _, name = flag.partition(":")
    module = importlib.import_module(module_name)
    if not isinstance(getattr(module, name, None), bool):
        raise SystemExit(f"--flag {flag}: not a module-level bool")
    model, opt, ids = _ab_model(args)

    def step(on: bool) -> None:
        setattr(module, name, on)
        model(ids, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _paired(step, args)


def worker_hf(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch

    from benchmarks.hf_qlora import add_lora, load_gguf_fp32, quantize_linears_nf4
    from edge_sdk.models import resolve

    import_s = time.perf_counter() - t0
    path = resolve(args.model)
    t0 = time.perf_counter()
    model = load_gguf_fp32(path)
    if args.stack == "hf":
        quantize_linears_nf4(model)
    model = add_lora(model, args.rank, 2 * args.rank)
    load_s = time.perf_counter() - t0
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = _batch(model.config.vocab_size, args.seq_len, args.seed, args.batch_size)

    def step() -> None:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = _time_steps(step, args.steps, args.warmup)
    return {"import_s": import_s, "load_s": load_s, "step_s": times}


def _floor_ops(args: argparse.Namespace, onednn: bool = False) -> dict[str, tuple[Any, int]]:
    """The fp32 compute floor of one step, as ops: name -> (op, times it runs per step).

    Whatever the stack, a LoRA step on a frozen base must run, per block, each projection
    forward (x Wᵀ) and backward into its input (g W), attention forward and backward, and the
    tied output projection both ways for the loss. These run here at the step's exact shapes,
    into preallocated outputs, with nothing else: no dequantization, norms, activations,
    rank-r products, softmax or optimizer, and the same (cache-warm) weights for every layer.
    Layer 0's q/k/v need no input gradient (the embedding is frozen). A generous lower bound
    on any fp32 step on this machine. The products run through torch.mm (MKL), the floor as
    issue 16 defined it, or with `onednn` through the oneDNN path the step itself now uses
    (`edge_sdk.models.gemm`; no `out=` there, so each allocates its output as the step does).
    """
    import torch
    import torch.nn.functional as F

    from edge_sdk.models import gemm, resolve
    from edge_sdk.models.loader import read_config

    cfg = read_config(resolve(args.model))
    t = args.seq_len * args.batch_size  # tokens per step: the GEMMs' row count
    ops: dict[str, tuple[Any, int]] = {}

    def gemms(name: str, out_f: int, in_f: int, fwd_n: int, bwd_n: int) -> None:
        x, w, g = torch.randn(t, in_f), torch.randn(out_f, in_f), torch.randn(t, out_f)
        y, dx = torch.empty(t, out_f), torch.empty(t, in_f)
        if onednn:
            ops[f"{name} fwd"] = (lambda: gemm.linear(x, w), fwd_n)
            ops[f"{name} bwd"] = (lambda: gemm.matmul(g, w), bwd_n)
        else:
            ops[f"{name} fwd"] = (lambda: torch.mm(x, w.t(), out=y), fwd_n)
            ops[f"{name} bwd"] = (lambda: torch.mm(g, w, out=dx), bwd_n)

    for name, (out_f, in_f) in cfg.target_shapes().items():
        no_input_grad = 1 if name in ("q_proj", "k_proj", "v_proj") else 0  # layer 0
        gemms(name, out_f, in_f, cfg.n_layer, cfg.n_layer - no_input_grad)
    gemms("output", cfg.vocab_size, cfg.d_model, 1, 1)

    B, T = args.batch_size, args.seq_len
    q = torch.randn(B, cfg.n_head, T, cfg.head_dim, requires_grad=True)
    k = torch.randn(B, cfg.n_kv_head, T, cfg.head_dim, requires_grad=True)
    v = torch.randn(B, cfg.n_kv_head, T, cfg.head_dim, requires_grad=True)
    go = torch.randn(B, cfg.n_head, T, cfg.head_dim)

    def attention() -> None:
        o = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=cfg.n_head != cfg.n_kv_head
        )
        o.backward(go)

    ops["attention"] = (attention, cfg.n_layer)
    return ops


def worker_floor(args: argparse.Namespace) -> dict[str, Any]:
    """The floor of `_floor_ops`, each op timed alone (median of 15) times its count."""
    from collections import defaultdict

    def median_s(fn: Any, reps: int = 15) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    parts: dict[str, float] = defaultdict(float)
    for name, (op, n) in _floor_ops(args).items():
        parts[name.split()[0]] += n * median_s(op, 5 if name.startswith("output") else 15)
    attention_s = parts.pop("attention")
    return {
        "import_s": 0.0,
        "load_s": 0.0,
        "step_s": [sum(parts.values()) + attention_s],
        "gemm_s": dict(parts),
        "attention_s": attention_s,
    }


def worker_floor_pair(args: argparse.Namespace) -> dict[str, Any]:
    """Our default step against the floor's ops run back to back, paired in one process.

    Separate processes minutes apart see different machines (idle spells, other jobs); each
    of our steps here is compared with the floor step beside it. Ratio = ours / floor.
    """
    ops = list(_floor_ops(args, onednn=args.stack == "floor-pair-onednn").values())
    model, opt, ids = _ab_model(args)

    def step(ours: bool) -> None:
        if ours:
            model(ids, ids).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            for op, n in ops:
                for _ in range(n):
                    op()

    return _paired(step, args)


def run_worker(stack: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        stack,
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--seq-len",
        str(args.seq_len),
        "--rank",
        str(args.rank),
        "--seed",
        str(args.seed),
        "--precision",
        "fp32" if stack == "ours-fp32" else "nf4",
        "--batch-size",
        str(args.batch_size),
        "--pack-len",
        str(args.pack_len),
        "--flag",
        args.flag,
    ]
    env = dict(os.environ)  # main() set the OpenMP wait policy, the same for every stack
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if stack in ("ours-lowmem", "ours-ckpt"):
        env["FEDLM_LOW_MEMORY"] = "1"
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{stack} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(stack: str, runs: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """Pool the rounds of one stack: median and best step, best load, worst peak RSS."""
    steps = [t for r in runs for t in r["step_s"]]
    cpu = [t for r in runs for t in r.get("cpu_s", [])]
    med, best = statistics.median(steps), min(steps)
    return {
        "stack": stack,
        "rounds": len(runs),
        "step_s": steps,
        "median_step_s": med,
        "best_step_s": best,
        "tokens_per_s": tokens / med,
        "best_tokens_per_s": tokens / best,
        "load_s": min(r["load_s"] for r in runs),
        "import_s": min(r["import_s"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "median_cpu_s": statistics.median(cpu) if cpu else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per stack (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="subprocess runs per stack, alternating")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument(
        "--pack-len",
        type=int,
        default=64,
        help="ours-packed: mean tokens per packed example (lengths U(n/2, 3n/2))",
    )
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="nf4", help=argparse.SUPPRESS)
    ap.add_argument(
        "--stacks",
        default="ours,hf,ours-lowmem",
        help="comma list of: ours (the default `fedlm train` path), ours-packed (rows of isolated "
        "packed examples), ours-lowmem (FEDLM_LOW_MEMORY=1), ours-ckpt (that + gradient "
        "checkpointing), ours-plain-backward (LEAN_BACKWARD off), ours-torch-adamw "
        "(torch.optim.AdamW), ours-fp32, isolation-ab (paired isolated vs unisolated steps), "
        "floor-ab (paired: FEWER_PASSES off vs on), flag-ab (paired: --flag off vs on), "
        "floor-pair (paired: ours vs the floor's ops run back to back), ours-bf16 and "
        "floor-pair-bf16 (the same with `--compute bf16`), ours-fp32-compute and "
        "floor-pair-fp32-compute (with `--compute fp32`), floor-pair-onednn (ours against "
        "the floor's products through oneDNN, as the step runs them), "
        "hf, hf-fp32, floor (the step's fp32 GEMMs + attention timed alone)",
    )
    ap.add_argument(
        "--flag",
        default="edge_sdk.models.gemm:ONEDNN",
        help="flag-ab: the module-level bool to pair, as module:NAME",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        args.stack = args.worker
        workers = {
            "floor": worker_floor,
            "isolation-ab": worker_isolation_ab,
            "floor-ab": worker_flag_ab,  # the flag FEWER_PASSES
            "flag-ab": worker_flag_ab,
        }
        worker = workers.get(args.worker) or (
            worker_hf
            if args.worker.startswith("hf")
            else worker_floor_pair
            if args.worker.startswith("floor-pair")
            else worker_ours
        )
        result = worker(args)
        result["peak_rss_mb"] = _peak_rss_mb()
        result["cpu_s"] = list(_CPU_TIMES)
        print(json.dumps(result))
        return 0

    stacks = args.stacks.split(",")
    # Every stack gets the OpenMP wait policy `fedlm train` would choose now (an
    # OMP_WAIT_POLICY set by the caller wins): libgomp's default when the machine is idle,
    # PASSIVE when it is busy (edge_sdk/cli/_openmp.py; spinning costs 2-3x under load).
    # (Imported here: the workers, HF's included, must not carry edge_sdk's imports.)
    from edge_sdk.cli._openmp import FOREGROUND, apply_wait_policy

    policy = apply_wait_policy(FOREGROUND)
    print(
        f"OpenMP wait policy, every stack: {policy or 'libgomp default'} "
        "(what `fedlm train` would choose now)"
    )
    # Rounds alternate the stacks (ours, hf, ours, hf, ...) so that a busy spell on a shared
    # machine hits both rather than one.
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in stacks}
    for _ in range(args.rounds):
        for s in stacks:
            runs[s].append(run_worker(s, args))
    results = {s: summarize(s, r, args.seq_len * args.batch_size) for s, r in runs.items()}
    hf_r, floor_r = results.get("hf"), results.get("floor")
    for r in results.values():
        extra = ""
        if hf_r is not None and r is not hf_r and r["stack"] != "floor":
            extra += (
                f"  vs HF: tokens/s {r['tokens_per_s'] / hf_r['tokens_per_s']:.2f}x, "
                f"RSS {r['peak_rss_mb'] / hf_r['peak_rss_mb']:.2f}x"
            )
        if floor_r is not None and r is not floor_r:
            r["fraction_of_floor"] = floor_r["median_step_s"] / r["median_step_s"]
            extra += f"  {100 * r['fraction_of_floor']:.0f}% of the floor"
        heavy = sorted({h for run in runs[r["stack"]] for h in run.get("heavy_imports", [])})
        if r["stack"].startswith("ours") and heavy:
            extra += f"  imported: {', '.join(heavy)}"
        print(
            f"{r['stack']:20s} {r['tokens_per_s']:7.1f} "
            f"tok/s (best {r['best_tokens_per_s']:6.1f})  "
            f"step {r['median_step_s']:.2f} s  peak RSS {r['peak_rss_mb']:6.0f} MB  "
            f"load {r['load_s']:5.2f} s (+ imports {r['import_s']:.2f} s){extra}"
        )
    if "ours" in results and "hf" in results and results["hf"]["median_cpu_s"]:
        ours, hf = results["ours"], results["hf"]
        print(
            f"CPU seconds per step (user + system, all threads): ours {ours['median_cpu_s']:.2f}"
            f", HF {hf['median_cpu_s']:.2f}: "
            f"HF / ours {hf['median_cpu_s'] / ours['median_cpu_s']:.2f}x"
        )
    if "ours" in results and "hf" in results:
        ours, hf = results["ours"], results["hf"]
        print(
            f"ratios ours/hf: tokens/s {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x median, "
            f"{ours['best_tokens_per_s'] / hf['best_tokens_per_s']:.2f}x best  "
            f"peak RSS {ours['peak_rss_mb'] / hf['peak_rss_mb']:.2f}x "
            f" load {ours['load_s'] / hf['load_s']:.3f}x"
        )
    if "ours" in results and "ours-packed" in results:
        ours, packed = results["ours"], results["ours-packed"]
        spread = [t / ours["median_step_s"] for t in packed["step_s"]]
        print(
            "isolation cost: ours-packed / ours step time "
            f"{packed['median_step_s'] / ours['median_step_s']:.3f}x "
            f"median (packed steps span {min(spread):.2f}x..{max(spread):.2f}x of ours' median)"
        )
    for stack, what in (
        ("isolation-ab", "isolation: isolated / unisolated"),
        ("floor-ab", "FEWER_PASSES: on / off"),
        ("flag-ab", "--flag: on / off"),
        ("floor-pair", "ours / the floor's ops"),
        ("floor-pair-bf16", "ours --compute bf16 / the fp32 floor's ops"),
        ("floor-pair-fp32-compute", "ours --compute fp32 / the fp32 floor's ops"),
        ("floor-pair-onednn", "ours / the floor's ops through oneDNN"),
    ):
        if stack in results:
            print(_paired_summary(what, runs[stack]))
    for stack in ("floor-pair", "floor-pair-bf16", "floor-pair-fp32-compute", "floor-pair-onednn"):
        if stack in results:
            ratios = [x for r in runs[stack] for x in r["ratios"]]
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            print(
                f"{stack}: fraction of the fp32 floor, paired: "
                f"{100 / statistics.median(ratios):.0f}% "
                f"(quartiles {100 / q[2]:.0f}..{100 / q[0]:.0f}%)"
            )
    if "floor" in results and "hf" in results:
        floor, hf = results["floor"], results["hf"]
        parts = runs["floor"][-1]
        print(
            f"floor: GEMMs {sum(parts['gemm_s'].values()):.2f} "
            f"s + attention {parts['attention_s']:.2f} s "
            f"= {floor['median_step_s']:.2f} s per step; no fp32 step can beat "
            f"{floor['tokens_per_s'] / hf['tokens_per_s']:.2f}x HF's tokens/s on this machine"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
