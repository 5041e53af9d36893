"""`fedlm demo`: federated QLoRA on one machine, with baselines that show what federation gained.

    from edge_sdk.demo import DemoConfig, run_demo
    report = run_demo(DemoConfig.quick(), "out/")   # also out/report.json, plot, adapters

Modules: `tasks` (built-in non-IID data + exact match), `evaluate` (eval loss and exact match),
`federation` (the backend contract), `simulate` (in-process runs and `InProcessFederation`),
`network` (`NetworkFederation`: real processes), `report` (report.json, table, plot), `run`.
"""

from __future__ import annotations

from typing import Any

from edge_sdk.demo.config import DemoConfig
from edge_sdk.demo.errors import DemoConfigError, DemoDataError, DemoError, FederationError

_RUN_NAMES = ("Federation", "InProcessFederation", "run_demo")


def __getattr__(name: str) -> Any:
    # `run` is imported on first use, so `python -m edge_sdk.demo.simulate` does not import
    # the module it is about to execute through the package.
    if name in _RUN_NAMES:
        from edge_sdk.demo import run

        return getattr(run, name)
    raise AttributeError(f"module 'edge_sdk.demo' has no attribute {name!r}")


__all__ = [
    "DemoConfig",
    "DemoConfigError",
    "DemoDataError",
    "DemoError",
    "Federation",
    "FederationError",
    "InProcessFederation",
    "run_demo",
]
