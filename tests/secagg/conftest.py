"""Fixtures of the secure-aggregation tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import write_tiny_gguf


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama GGUF (the client tests' model) for whole federations on 127.0.0.1."""
    return write_tiny_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf")
