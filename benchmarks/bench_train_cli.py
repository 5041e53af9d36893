"""The whole `fedlm train` process against the HF script a user would write instead, in one run.

What issue 16 asks to compare: everything each process loads and does (tokenizer, data, model,
evaluation before and after, training, the adapter written out), its peak RSS
(`/usr/bin/time -f %M`), wall time, and training tokens/s: as each prints it ("trained N steps,
T tokens in S s (X tokens/s)": all steps, evaluation excluded), and the median of the steps
after the first (each writes its per-step records to `metrics.json`), which the first step's
one-off costs (allocator growth, first calls) do not move. The commands alternate,
the order flipping every round, so drift on a shared machine hits both alike; the ratios are
of medians.

- ours: `fedlm train MODEL --data FILE --seq-len L --batch-size 1 --rank R --steps S --out DIR`
  (no other flags: the defaults are what is measured, `--compute auto` included);
- ours-bf16, ours-fp32-compute: the same with `--compute bf16` or `--compute fp32`;
- hf: `benchmarks/hf_train_script.py` (transformers + peft + bitsandbytes NF4, same sizes).

Neither gets an OMP_WAIT_POLICY from here: `fedlm train` chooses its own, the HF script gets
libgomp's default, which is what each user would get.

Run: `.venv/bin/python benchmarks/bench_train_cli.py --data FILE.txt --rounds 3 --steps 8`
(without --data, a text file is made from this repository's docs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_SUMMARY = re.compile(r"trained \d+ steps, (\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\)")


def _docs_text(path: Path) -> Path:
    """A text file of this repository's docs (plain paragraphs), for a run without --data."""
    parts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").rglob("*.md"))]
    path.write_text("\n\n".join(parts), encoding="utf-8")
    return path


def _command(stack: str, args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    sizes = ["--seq-len", str(args.seq_len), "--batch-size", "1", "--rank", str(args.rank)]
    sizes += ["--steps", str(args.steps), "--out", str(out)]
    if stack.startswith("ours"):
        code = "import sys; from edge_sdk.cli import main; sys.exit(main(sys.argv[1:]))"
        options = {"ours-bf16": ["--compute", "bf16"], "ours-fp32-compute": ["--compute", "fp32"]}
        option = options.get(stack, [])
        return [
            sys.executable,
            "-c",
            code,
            "train",
            args.model,
            "--data",
            str(data),
            *sizes,
            *option,
        ]
    script = str(ROOT / "benchmarks" / "hf_train_script.py")
    return [sys.executable, script, "--model", args.model, "--data", str(data), *sizes]


def run_once(stack: str, args: argparse.Namespace, data: Path, workdir: Path) -> dict[str, Any]:
    """One whole process under /usr/bin/time: peak RSS, wall time and the printed tokens/s."""
    out = workdir / f"{stack}-out"
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = ["/usr/bin/time", "-f", "TIME %M %e", *_command(stack, args, data, out)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=1800)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{stack} failed (exit {proc.returncode}):\n{text[-3000:]}")
    rss_kb, wall = re.findall(r"TIME (\d+) ([\d.]+)", text)[-1]
    tokens, seconds, tps = _SUMMARY.findall(text)[-1]
    evals = re.findall(r"eval loss ([\d.]+) -> ([\d.]+)", text)
    history = json.loads((out / "metrics.json").read_text())["metrics"]["history"]
    steady = [h["tokens_per_s"] for h in history[1:]] or [float(tps)]
    return {
        "step_tokens_per_s": statistics.median(steady),
        "peak_rss_mb": int(rss_kb) / 1024,
        "wall_s": float(wall),
        "train_s": float(seconds),
        "tokens": int(tokens),
        "tokens_per_s": float(tps),
        "eval_loss": [float(x) for x in evals[-1]] if evals else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, help="a text file (default: this repository's docs)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--stacks",
        default="ours,hf",
        help="comma list of: ours (fedlm train's defaults), ours-bf16 (--compute bf16), "
        "ours-fp32-compute (--compute fp32), hf",
    )
    ap.add_argument("--json", type=Path, help="also write every run here")
    args = ap.parse_args(argv)

    stacks = args.stacks.split(",")
    runs: dict[str, list[dict[str, Any]]] = {stack: [] for stack in stacks}
    with tempfile.TemporaryDirectory(prefix="bench-train-cli-") as tmp:
        workdir = Path(tmp)
        data = args.data or _docs_text(workdir / "docs.txt")
        for r in range(args.rounds):
            order = stacks if r % 2 == 0 else stacks[::-1]
            for stack in order:
                res = run_once(stack, args, data, workdir)
                runs[stack].append(res)
                print(
                    f"round {r + 1} {stack:4s}: {res['peak_rss_mb']:.0f} MB, "
                    f"{res['tokens_per_s']:.0f} tokens/s (steps after the first: "
                    f"{res['step_tokens_per_s']:.0f}), wall {res['wall_s']:.1f} s, "
                    f"eval loss {res['eval_loss']}",
                    flush=True,
                )
    med = {
        stack: {
            k: statistics.median(r[k] for r in rs)
            for k in ("peak_rss_mb", "tokens_per_s", "step_tokens_per_s", "wall_s")
        }
        for stack, rs in runs.items()
    }
    ours = [stack for stack in stacks if stack != "hf"]
    print(
        f"\n| whole process, median of {args.rounds} | "
        + " | ".join(stacks)
        + " | "
        + " | ".join(f"{o} / hf" for o in ours)
        + " |"
    )
    print("|---" * (1 + len(stacks) + len(ours)) + "|")
    for key, label in (
        ("peak_rss_mb", "peak RSS (MB)"),
        ("tokens_per_s", "tokens/s, whole run"),
        ("step_tokens_per_s", "tokens/s, median step after the first"),
        ("wall_s", "wall (s)"),
    ):
        cells = [f"{med[stack][key]:.0f}" for stack in stacks]
        if "hf" in med:
            cells += [f"**{med[o][key] / med['hf'][key]:.2f}x**" for o in ours]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
