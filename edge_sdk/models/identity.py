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
from edge_sdk.models.gguf_meta import FastGGUFReader, read_gguf
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


_PROVENANCE_KEYS = ("organization", "basename", "finetune", "size_label", "license.name",
                    "license.link", "url", "repo_url", "source.url", "source.repo_url")


def open_gguf(path: Path) -> FastGGUFReader:
    """Open and sanity-check a GGUF model file; `InvalidModelError` names the file and reason."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelNotFoundError(f"{path}: cannot read ({exc.strerror})") from None
    if magic != b"GGUF":
        raise InvalidModelError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = read_gguf(path)
    except (ValueError, KeyError, IndexError, OverflowError, TypeError) as exc:
        raise InvalidModelError(f"{path}: corrupt or truncated GGUF ({exc})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise InvalidModelError(
                f"{path}: truncated GGUF (tensor {t.name} ends at byte {end}, file has {size})"
            )
    return reader


def field_value(reader: FastGGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


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
    reader = open_gguf(path)
    arch = field_value(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InvalidModelError(f"{path}: missing general.architecture")
    gtype = field_value(reader, "general.type")
    if gtype is not None and gtype != "model":
        raise InvalidModelError(f"{path}: general.type is {gtype!r}, expected 'model'")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = field_value(reader, f"{arch}.vocab_size")
    if vocab is None and tokens is not None:
        vocab = len(tokens.data)
    licence = field_value(reader, "general.license")
    extra = {k: v for k in _PROVENANCE_KEYS if (v := field_value(reader, f"general.{k}")) is not None}
    return ModelIdentity(
        path=str(path),
        sha256=model_sha256(path),
        size_bytes=path.stat().st_size,
        name=field_value(reader, "general.name"),
        architecture=arch,
        parameter_count=sum(int(t.n_elements) for t in reader.tensors),
        quantization=dict(Counter(t.tensor_type.name for t in reader.tensors).most_common()),
        file_type=_file_type_name(field_value(reader, "general.file_type")),
        context_length=field_value(reader, f"{arch}.context_length"),
        vocab_size=int(vocab) if vocab is not None else None,
        has_chat_template="tokenizer.chat_template" in reader.fields,
        licence=licence if isinstance(licence, str) else None,
        licence_class=classify(licence if isinstance(licence, str) else None),
        extra=extra,
    )
