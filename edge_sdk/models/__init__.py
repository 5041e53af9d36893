"""Model store, identity/openness report, and (for training) torch model families."""

from edge_sdk.models.store import DEFAULT_MODEL, available, resolve

__all__ = ["DEFAULT_MODEL", "available", "resolve"]
