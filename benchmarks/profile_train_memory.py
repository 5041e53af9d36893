"""Where the peak RSS of a whole `fedlm train` process goes, phase by phase (issue 16, part 2).

Runs `fedlm train MODEL --data FILE --out DIR ...` in this process through the CLI's own `main`,
with a thread sampling the process's RSS (psutil) every 20 ms, and marks the phases by wrapping
the functions `edge_sdk.training.trainer.run` calls: imports, tokenizer (llama.cpp vocab-only
load), data, model sha256, model load, evaluation, training steps, export. For each phase it
prints the RSS at its start and end and the highest sample during it; the process's peak
(`ru_maxrss`, what `/usr/bin/time -f %M` reports) comes last.

Python-level allocations (tracemalloc) are a few MB throughout and are not the story: torch,
llama.cpp and glibc allocate outside Python's allocator, so RSS sampling is what attributes.

Run: `.venv/bin/python benchmarks/profile_train_memory.py --data FILE.txt -- --steps 6`
(arguments after `--` go to `fedlm train`; default model smollm2-135m, seq 256, batch 1, rank 8).
"""

from __future__ import annotations

import argparse
import functools
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

_proc = psutil.Process()
_samples: list[tuple[float, int]] = []
_marks: list[tuple[float, str]] = []
_stop = threading.Event()


def _sampler(interval: float) -> None:
    while not _stop.is_set():
        _samples.append((time.perf_counter(), _proc.memory_info().rss))
        time.sleep(interval)


def _mark(name: str) -> None:
    _samples.append((time.perf_counter(), _proc.memory_info().rss))
    _marks.append((time.perf_counter(), name))


def _wrap(module: Any, attr: str, name: str) -> None:
    fn: Callable[..., Any] = getattr(module, attr)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _mark(name)
        try:
            return fn(*args, **kwargs)
        finally:
            _mark(f"after {name}")

    setattr(module, attr, wrapper)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", required=True)
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("train_args", nargs="*", help="extra `fedlm train` arguments (after --)")
    args = ap.parse_args()

    threading.Thread(target=_sampler, args=(args.interval,), daemon=True).start()
    _mark("python start")
    _mark("imports")
    import edge_sdk.adapters.export as export_mod
    import edge_sdk.models.identity as identity_mod
    import edge_sdk.training.data as data_mod
    import edge_sdk.training.tokenizer as tokenizer_mod
    from edge_sdk.cli import main as cli_main
    from edge_sdk.training import pipeline, sft, trainer

    _wrap(tokenizer_mod, "load_tokenizer", "tokenizer load")
    _wrap(data_mod, "build_dataset", "tokenize + pack")
    _wrap(pipeline, "build_dataset", "tokenize + pack")
    _wrap(identity_mod, "model_sha256", "model sha256")
    _wrap(pipeline, "load_for_training", "model load")
    _wrap(sft, "evaluate", "evaluate")
    _wrap(export_mod, "export_adapter", "export")
    steps = {"n": 0}

    def on_step(_record: dict[str, float]) -> None:  # marks every optimizer step's end
        steps["n"] += 1
        _mark(f"step {steps['n']} done")

    real_run = trainer.run

    def run(*a: Any, **kw: Any) -> Any:
        user = kw.pop("on_step", None)

        def both(record: dict[str, float]) -> None:
            on_step(record)
            if user is not None:
                user(record)

        return real_run(*a, on_step=both, **kw)

    trainer.run = run  # type: ignore[assignment]
    _mark("cli")
    with tempfile.TemporaryDirectory() as out:
        rc = cli_main(
            [
                "train",
                args.model,
                "--data",
                args.data,
                "--out",
                out,
                "--seq-len",
                "256",
                "--batch-size",
                "1",
                "--rank",
                "8",
                *args.train_args,
            ]
        )
    _mark("end")
    _stop.set()

    # Phase table: each mark opens a phase that runs to the next mark.
    print(f"{'phase':28s} {'RSS start':>10s} {'RSS end':>10s} {'max in phase':>13s}  (MB)")
    for i, (t0, name) in enumerate(_marks[:-1]):
        t1 = _marks[i + 1][0]
        inside = [r for t, r in _samples if t0 <= t <= t1]
        start = inside[0] if inside else 0
        end = inside[-1] if inside else 0
        print(f"{name:28s} {start / 2**20:10.0f} {end / 2**20:10.0f} {max(inside) / 2**20:13.0f}")
    print(
        "peak RSS (ru_maxrss): "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
        f"highest sample {max(r for _, r in _samples) / 2**20:.0f} MB; exit {rc}"
    )
    heavy = sorted(
        {
            k.split(".")[0] if k.startswith("bitsandbytes") else ".".join(k.split(".")[:2])
            for k in sys.modules
            if k.startswith(("bitsandbytes", "torch._inductor", "torch._dynamo"))
        }
    )
    print(f"heavy modules imported: {', '.join(heavy) or 'none'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
