"""Where a training step's RSS sits: glibc's heap, its own mmaps, or neither (issue 16, part 2).

Loads SmolLM2 as `fedlm train` does (NF4, LoRA r=8) and runs the bench worker's step
(seq 256, batch 1, AdapterAdamW), printing after the imports, the load, each forward and each
step: RSS, the process peak, and `mallinfo2()` (heap arena bytes, in use, free in holes, bytes
in glibc's own mmaps). After the load it also prints the largest resident mappings
(/proc/self/smaps): that is how the GGUF file's pages were found (94 MB held until exit).
A paired A/B of step CPU time runs with `--ab` (two mmap thresholds alternating step by step).

Run: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/profile_train_heap.py --steps 4`
(`--mallopt -3=262144,-8=1` sets mallopt parameters before anything is allocated).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import resource
import statistics
import time

_libc = ctypes.CDLL("libc.so.6")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc.mallinfo2.restype = _MallInfo2


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def report(tag: str) -> None:
    m = _libc.mallinfo2()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{tag:16s} RSS {_rss_mb():6.0f} MB  peak {peak:6.0f}  | heap {m.arena / 2**20:4.0f} "
        f"(in use {m.uordblks / 2**20:4.0f}, free {m.fordblks / 2**20:4.0f})  "
        f"mmapped {m.hblkhd / 2**20:4.0f} MB in {m.hblks} blocks",
        flush=True,
    )


def largest_mappings(n: int = 6) -> None:
    rss: dict[str, int] = {}
    name = "[anon]"
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split()
                name = parts[5] if len(parts) > 5 else "[anon]"
            elif line.startswith("Rss:"):
                rss[name] = rss.get(name, 0) + int(line.split()[1])
    for k, v in sorted(rss.items(), key=lambda kv: -kv[1])[:n]:
        print(f"    {v / 1024:7.1f} MB  {k}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--mallopt", default="", help="comma list of PARAM=VALUE for mallopt")
    ap.add_argument("--ab", type=int, default=0, help="pairs of steps: 256 KiB vs 32 MiB threshold")
    args = ap.parse_args()
    for kv in filter(None, args.mallopt.split(",")):
        k, v = kv.split("=")
        _libc.mallopt(int(k), int(v))
    report("start")
    import torch

    from edge_sdk.models import resolve
    from edge_sdk.models.loader import load_model
    from edge_sdk.training.adamw import AdapterAdamW
    from edge_sdk.training.lora import LoraConfig, lora_parameters

    report("imports")
    model = load_model(resolve(args.model), lora=LoraConfig(rank=8, alpha=16.0))
    model.train()
    report("load")
    largest_mappings()
    opt = AdapterAdamW(lora_parameters(model), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=g)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = model(ids, ids)
        report(f"forward {i}")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
        times.append(time.perf_counter() - t0)
        report(f"step {i} {times[-1]:.2f}s")
    if times:
        print(f"median step {statistics.median(times):.2f} s, load average {os.getloadavg()}")
    if args.ab:

        def step(threshold: int) -> float:
            """CPU seconds (user + system) of one step: far steadier than wall time under load."""
            _libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            model(ids, ids).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            return r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime

        ratios = []
        for i in range(args.ab):
            if i % 2:  # the order alternates, so that a drift in load hits both arms
                a = step(256 << 10)
                b = step(32 << 20)
            else:
                b = step(32 << 20)
                a = step(256 << 10)
            ratios.append(a / b)
        print(
            f"step CPU time 256 KiB / 32 MiB threshold: median {statistics.median(ratios):.3f} "
            f"({', '.join(f'{r:.2f}' for r in ratios)}), load average {os.getloadavg()}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
