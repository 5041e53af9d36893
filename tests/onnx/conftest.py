"""The ONNX tests need the `onnx` extra: skipped without it, or failed when CI requires it.

`make test` sets FEDLM_REQUIRE_ONNX=1 (and `make install` installs the extra), so a broken or
missing install fails loudly there instead of turning every parity test into a silent skip.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

REQUIRE_ENV = "FEDLM_REQUIRE_ONNX"
"""Set to 1 to turn a missing `onnx` extra into a test failure."""

EXTRA_MODULES: tuple[str, ...] = (
    "onnxruntime",
    "onnxruntime_genai",
    "onnx",
    "transformers",
    "peft",
)
"""What the ONNX tests import (the `onnx` extra of pyproject.toml)."""


def missing_modules() -> list[str]:
    return [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]


@pytest.fixture(autouse=True, scope="session")
def _onnx_extra() -> None:
    missing = missing_modules()
    if not missing:
        return
    why = f"the `onnx` extra is not installed (missing: {', '.join(missing)})"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(
            f"{why}, and {REQUIRE_ENV}=1 requires it: run `make install` or "
            "pip install -e '.[onnx]'",
            pytrace=False,
        )
    pytest.skip(why)
