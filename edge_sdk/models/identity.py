"""A model's identity and openness report, read from its GGUF file.

The sha256 of the file is the model's identity in a federation: a client only trains for a
coordinator whose model hash equals its own. Hashing a 100 MB-1 GB file takes a while, so the
digest is cached by (resolved path, size, mtime_ns) in the cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gguf import LlamaFileType

from edge_sdk.errors import InvalidModelError, ModelNotFoundError
from edge_sdk.models.gguf_check import INT, STR, open_model, value
from edge_sdk.models.gguf_meta import GGUFFile, show_path
from edge_sdk.models.licence import LicenceClass, classify
from edge_sdk.models.store import cache_dir, resolve

log = logging.getLogger(__name__)

_HASH_CHUNK = 4 << 20
_cache_lock = threading.Lock()


def _hash_cache_file() -> Path:
    return cache_dir() / "sha256-cache.json"


def model_sha256(path: os.PathLike[str] | str) -> str:
    """sha256 hex digest of a file, streamed, cached by path + size + mtime."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: no such file") from None
    key = str(p)
    stamp = [st.st_size, st.st_mtime_ns]
    cache_file = _hash_cache_file()
    with _cache_lock:
        cache = _load_cache(cache_file)
        hit = cache.get(key)
        if hit and hit.get("stamp") == stamp:
            return str(hit["sha256"])
    digest = hashlib.sha256()
    with p.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    hexdigest = digest.hexdigest()
    with _cache_lock:
        cache = _load_cache(cache_file)
        cache[key] = {"stamp": stamp, "sha256": hexdigest}
        _atomic_write_json(cache_file, cache)
    return hexdigest


def _load_cache(cache_file: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache_file.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _atomic_write_json(path: Path, data: Any) -> None:
    # Several processes (the demo's clients) may hash at once: write aside, then rename.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        log.warning("could not write the sha256 cache %s", path, exc_info=True)
        Path(tmp).unlink(missing_ok=True)


@dataclass(frozen=True)
class ModelIdentity:
    """What a client needs to know about a base model before it trains on it."""

    path: str
    sha256: str
    size_bytes: int
    name: str | None
    architecture: str
    parameter_count: int
    quantization: dict[str, int]
    """GGML tensor type -> number of tensors of that type."""
    file_type: str | None
    """llama.cpp's overall quantization label, e.g. `MOSTLY_Q4_1`."""
    context_length: int | None
    vocab_size: int | None
    has_chat_template: bool
    licence: str | None
    licence_class: LicenceClass
    extra: dict[str, Any] = field(default_factory=dict)
    """Other `general.*` provenance fields (organization, basename, size_label, ...)."""

    def to_json_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["licence_class"] = self.licence_class.value
        return d


_PROVENANCE_KEYS = (
    "organization",
    "basename",
    "finetune",
    "size_label",
    "license.name",
    "license.link",
    "url",
    "repo_url",
    "source.url",
    "source.repo_url",
)


def open_gguf(path: Path) -> GGUFFile:
    """Open and check a GGUF model file (`gguf_check.open_model`); errors name the file and
    reason."""
    return open_model(path)


def field_value(reader: GGUFFile, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _display(v: Any, limit: int = 200) -> Any:
    """A provenance string as shown: control characters escaped, cut to `limit` characters."""
    if not isinstance(v, str):
        return v
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in v[:limit])
    return safe if len(v) <= limit else safe + f"... ({len(v)} chars)"


def _file_type_name(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return LlamaFileType(int(value)).name
    except ValueError:
        return f"unknown({value})"


def inspect_model(model: str | os.PathLike[str]) -> ModelIdentity:
    """The openness report of a model name or GGUF path."""
    path = resolve(model)
    reader = open_gguf(path)  # container, key types and shapes checked
    arch = value(reader, "general.architecture", STR, required=True)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = value(reader, f"{arch}.vocab_size", INT)
    if vocab is None and tokens is not None:
        vocab = tokens.count
    licence = value(reader, "general.license", STR)
    extra = {}
    for k in _PROVENANCE_KEYS:
        field = reader.fields.get(f"general.{k}")
        if field is None:
            continue
        if field.is_array:
            raise InvalidModelError(
                f"{show_path(path)}: general.{k} should be a "
                f"single value, got an array of {field.count}"
            )
        extra[k] = _display(field.contents())
    name = value(reader, "general.name", STR)
    return ModelIdentity(
        path=str(path),
        sha256=model_sha256(path),
        size_bytes=path.stat().st_size,
        name=_display(name) if name is not None else None,
        architecture=arch,
        parameter_count=sum(int(t.n_elements) for t in reader.tensors),
        quantization=dict(Counter(t.tensor_type.name for t in reader.tensors).most_common()),
        file_type=_file_type_name(value(reader, "general.file_type", INT)),
        context_length=value(reader, f"{arch}.context_length", INT),
        vocab_size=int(vocab) if vocab is not None else None,
        has_chat_template="tokenizer.chat_template" in reader.fields,
        licence=_display(licence) if licence is not None else None,
        licence_class=classify(licence),
        extra=extra,
    )
