"""Fixtures shared by the client tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import write_tiny_gguf


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama GGUF that llama.cpp and the torch loader both load."""
    return write_tiny_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf")
