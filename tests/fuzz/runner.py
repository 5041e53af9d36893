"""Run a `fedlm` command (or the training loader) on a file in a child process, within a budget.

The child gets an address-space limit (`RLIMIT_AS`) as a safety net and a wall-clock timeout;
its peak resident memory is read from `wait4`. A crash shows up as a negative return code (the
signal), a hang as `timed_out`, a blow-up as `max_rss` over the budget.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIME_BUDGET_S = 10.0
"""Per command and file (the issue's budget)."""
LOADER_TIME_BUDGET_S = 30.0
"""The training loader imports torch (3-5 s alone, more on a busy 2-core machine)."""
RSS_BUDGET = 1 << 30
"""Peak resident memory per command and file (1 GiB)."""
_AS_LIMIT = (
    3 << 30
)  # address space: above the RSS budget, since torch and llama.cpp map more than they touch

# The training loader as `fedlm train` runs it: tokenizer (vocab + chat template), then the
# torch model, then one forward pass, whose logits must be finite.
# Set in the child itself: a preexec_fn is unsafe while other threads run (the fuzzer's pool).
_PRELUDE = f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, ({_AS_LIMIT}, {_AS_LIMIT}))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
"""
_CLI = (
    _PRELUDE
    + """
import runpy
runpy.run_module("edge_sdk.cli", run_name="__main__", alter_sys=True)
"""
)
LOADER = (
    _PRELUDE
    + """
import sys
import torch
from edge_sdk.cli import one_line
from edge_sdk.errors import FedlmError
try:
    from edge_sdk.models.loader import load_model
    from edge_sdk.training.tokenizer import load_tokenizer
    tok = load_tokenizer(sys.argv[1])
    if tok.has_chat_template:
        tok.render_chat([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    ids = tok.encode("hello world", add_bos=True)
    model = load_model(sys.argv[1], precision="fp32")
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    assert torch.isfinite(logits).all(), "non-finite logits"
    print("ok")
except FedlmError as exc:
    print(f"fedlm: error: {one_line(str(exc))}", file=sys.stderr)
    sys.exit(2)
"""
)


@dataclass
class Outcome:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    max_rss: int
    timed_out: bool

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("fedlm: error:")]

    def problem(self) -> str | None:
        """None when the run ended as promised: exit 0, or exit 2 with one `fedlm: error:` line."""
        if self.timed_out:
            return f"hung (> {self.seconds:.0f} s)"
        if self.returncode < 0:
            return f"died by signal {-self.returncode}: {self.stderr[-300:]!r}"
        if self.max_rss > RSS_BUDGET:
            return f"used {self.max_rss >> 20} MB"
        if self.returncode == 0:
            return None
        tracebacks = [line for line in self.stderr.splitlines() if line.startswith("Traceback")]
        if self.returncode == 2 and len(self.error_lines()) == 1 and not tracebacks:
            return None
        return f"exit {self.returncode}: {self.stderr[-600:]!r}"


def run(*args: str, timeout: float | None = None, loader: bool = False) -> Outcome:
    """`fedlm ARGS` (or the training loader on ARGS[0]) in a child process."""
    timeout = timeout or (LOADER_TIME_BUDGET_S if loader else TIME_BUDGET_S)
    cmd = (
        [sys.executable, "-c", LOADER, *args]
        if loader
        else [sys.executable, "-m", "edge_sdk.cli", *args]
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    killed: list[bool] = []

    def kill() -> None:
        killed.append(True)
        proc.kill()

    # Peak RSS: the child's VmHWM, polled (ru_maxrss would count the forked pytest process).
    peak = [0]
    timer = threading.Timer(timeout, kill)
    chunks: dict[str, bytes] = {}
    readers = [
        threading.Thread(target=lambda n=n, f=f: chunks.__setitem__(n, f.read()))
        for n, f in (("out", proc.stdout), ("err", proc.stderr))
    ]
    timer.start()
    for r in readers:
        r.start()
    while proc.poll() is None:
        peak[0] = max(peak[0], _vm_hwm(proc.pid))
        time.sleep(0.02)
    timer.cancel()
    for r in readers:
        r.join()
    proc.stdout.close()
    proc.stderr.close()
    return Outcome(
        tuple(args),
        proc.returncode,
        chunks["out"].decode(errors="replace"),
        chunks["err"].decode(errors="replace"),
        time.perf_counter() - t0,
        peak[0],
        bool(killed),
    )


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
