"""Fixtures for adapter tests: tiny base GGUF stubs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.adapters.base_stub import write_base_stub


@pytest.fixture
def llama_base(tmp_path: Path) -> Path:
    return write_base_stub(tmp_path / "base-llama.gguf", "llama")


@pytest.fixture
def gemma_base(tmp_path: Path) -> Path:
    return write_base_stub(tmp_path / "base-gemma3.gguf", "gemma3")
