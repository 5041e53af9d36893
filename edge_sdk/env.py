"""The environment variables fedlm reads, defined once (imports nothing)."""

from __future__ import annotations

JOIN_TOKEN_ENV = "FEDLM_JOIN_TOKEN"
"""Enrollment secret: the coordinator's join token, or a device's without a join code."""

JOIN_CODE_ENV = "FEDLM_JOIN_CODE"
"""The join code `fedlm coordinator` prints (token + certificate fingerprint) for `fedlm join`."""

OPERATOR_TOKEN_ENV = "FEDLM_OPERATOR_TOKEN"
"""Bearer token of the coordinator's operator endpoints."""

CACHE_DIR_ENV = "FEDLM_CACHE_DIR"
"""Where derived files (assembled models, sha256 cache) live; default $XDG_CACHE_HOME/fedlm."""

LOW_MEMORY_ENV = "FEDLM_LOW_MEMORY"
""""1": load models layer by layer, for devices where memory is the limit."""

CRASH_ENV = "FEDLM_CRASH_AT"
"""Tests only: the documented crash point at which a client SIGKILLs itself."""
