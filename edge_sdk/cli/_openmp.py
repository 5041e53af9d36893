"""How torch's OpenMP threads wait between ops, chosen per command before torch is imported.

A training step runs thousands of small ops, each a fork-join of the OpenMP pool. Measured on
2 cores (SmolLM2 QLoRA step, BENCHMARKS.md, issue 16):

| policy                          | step, idle machine | step, 2 busy processes beside it |
|---------------------------------|-------------------:|---------------------------------:|
| libgomp's default (spin, sleep) |             1.44 s |                            7.6 s |
| `OMP_WAIT_POLICY=PASSIVE`       |             2.30 s |                            2.72 s |

No policy wins both, so each command states whether it shares the cores: the demos run
several trainers at once and `fedlm join` trains in the background beside the user's apps
(always PASSIVE); `fedlm train` is a foreground job that spins unless the machine is already
busy when it starts. An `OMP_WAIT_POLICY` the user set always wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

PASSIVE = "PASSIVE"
SHARED = "shared"
"""The command runs beside other compute (several trainers, the user's apps): never spin."""
FOREGROUND = "foreground"
"""The command is the machine's main job: spin while the cores are free."""

BUSY_LOAD = 1.0
"""A 1-minute load average from this on means another core's worth of work is running: a
spinning pool would then wait for descheduled threads at every op (2-3x slower, above)."""


def wait_policy(kind: str, load_1min: float) -> str | None:
    """The OMP_WAIT_POLICY for a command of `kind` (SHARED or FOREGROUND); None: libgomp's."""
    if kind == FOREGROUND and load_1min < BUSY_LOAD:
        return None
    return PASSIVE


def _load_1min() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # no load average (some sandboxes): assume the cores are shared
        return BUSY_LOAD


def apply_wait_policy(kind: str, environ: MutableMapping[str, str] | None = None) -> str | None:
    """Set OMP_WAIT_POLICY for `kind` unless the user did; returns the policy in force.

    Only effective before torch is imported (libgomp reads its environment when it is loaded);
    inherited by every process the command spawns.
    """
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env:
        return env["OMP_WAIT_POLICY"]
    policy = wait_policy(kind, _load_1min())
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    return policy
