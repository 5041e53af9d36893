"""How torch's OpenMP threads wait between ops, chosen per command before torch is imported.

A training step runs thousands of small ops, each a fork-join of the OpenMP pool. Measured on
2 cores (SmolLM2 QLoRA step, BENCHMARKS.md, issue 16):

| policy                          | step, idle machine | step, 2 busy processes beside it |
|---------------------------------|-------------------:|---------------------------------:|
| libgomp's default (spin, sleep) |             1.44 s |                            7.6 s |
| `OMP_WAIT_POLICY=PASSIVE`       |             2.30 s |                            2.72 s |

No policy wins both, so each command states whether it shares the cores: the demos run
several trainers at once and `fedlm join` trains in the background beside the user's apps
(always PASSIVE); `fedlm train` is a foreground job that spins unless other processes keep
the cores busy when it starts (sampled for a fifth of a second; work started later is not
seen). An `OMP_WAIT_POLICY` the user set always wins.
"""

from __future__ import annotations

import os
import time
from collections.abc import MutableMapping

PASSIVE = "PASSIVE"
SHARED = "shared"
"""The command runs beside other compute (several trainers, the user's apps): never spin."""
FOREGROUND = "foreground"
"""The command is the machine's main job: spin while the cores are free."""

BUSY_CORES = 0.5
"""Other processes using this many cores or more: a spinning pool would wait for descheduled
threads at every op (2-3x slower, above). Half a core already preempts a thread now and then."""

SAMPLE_S = 0.2


def wait_policy(kind: str, busy_cores: float) -> str | None:
    """The OMP_WAIT_POLICY for a command of `kind` (SHARED or FOREGROUND), given how many
    cores other processes use; None: libgomp's default."""
    if kind == FOREGROUND and busy_cores < BUSY_CORES:
        return None
    return PASSIVE


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies over all cores from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 8:
        return None
    total = sum(fields)
    return total - fields[3] - fields[4], total  # idle and iowait are not busy; steal is


def _busy_cores() -> float:
    """Cores kept busy by other processes (this one sleeps while it samples), steal included.

    Without /proc/stat (macOS), the 1-minute load average, which lags by about a minute.
    """
    before = _cpu_times()
    if before is None:
        try:
            return os.getloadavg()[0]
        except OSError:  # no load figure at all: assume the cores are shared
            return BUSY_CORES
    time.sleep(SAMPLE_S)
    after = _cpu_times()
    if after is None or after[1] <= before[1]:
        return BUSY_CORES
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


def apply_wait_policy(kind: str, environ: MutableMapping[str, str] | None = None) -> str | None:
    """Set OMP_WAIT_POLICY for `kind` unless the user did; returns the policy in force.

    Only effective before torch is imported (libgomp reads its environment when it is loaded);
    inherited by every process the command spawns.
    """
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env:
        return env["OMP_WAIT_POLICY"]
    policy = wait_policy(kind, _busy_cores() if kind == FOREGROUND else BUSY_CORES)
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    return policy
