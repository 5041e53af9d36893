"""Errors of `fedlm demo`; the CLI prints them as one line."""

from __future__ import annotations

from edge_sdk.errors import FedlmError


class DemoError(FedlmError):
    """Base of every demo failure a user can fix."""


class DemoConfigError(DemoError):
    """A flag gives the demo an invalid setting (the message names it)."""


class DemoDataError(DemoError):
    """`--data DIR` does not hold usable per-client JSONL files."""


class FederationError(DemoError):
    """The federation published no global adapter."""
