"""`OnnxEdgeModel`: the `EdgeModel` API served by ONNX Runtime GenAI, with LoRA hot-swap.

The model argument is a folder written by `fedlm export-onnx` (model.onnx, genai_config.json,
tokenizer, fedlm_export.json). Adapters arrive as the federation ships them (a GGUF LoRA file or
a PEFT directory) and are converted here, on the device, to an `.onnx_adapter` (see
`edge_sdk.onnx.adapters`) which `onnxruntime_genai.Adapters` loads. A swap loads the new file,
activates it for the next generation and unloads the old one: the base weights are untouched.

Thread safety mirrors the llama.cpp backend: one lock serialises generations; a swap needs the
lock and is refused with `RuntimeBusyError` while a generation (or an unfinished stream) holds
it, unless the caller passes `wait`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._serving import ServingLock
from edge_sdk.errors import (
    AdapterMismatchError,
    InvalidAdapterError,
    InvalidModelError,
    ModelNotFoundError,
)
from edge_sdk.onnx.errors import OnnxNotInstalledError
from edge_sdk.runtime import GenerationConfig, Message, _config

log = logging.getLogger(__name__)


def import_genai() -> Any:
    """`onnxruntime_genai`, or `OnnxNotInstalledError` naming the extra to install.

    Core onnxruntime is imported too: swaps write `.onnx_adapter` files with it, and importing it
    here, with the model, keeps that cost out of the first swap.
    """
    try:
        import onnxruntime  # noqa: F401
        import onnxruntime_genai as og
    except ImportError as exc:
        raise OnnxNotInstalledError(
            f"the ONNX backend needs the `onnx` extra ({exc.name} "
            "is missing): pip install 'fedlm-edge[onnx]'"
        ) from None
    return og


RAM_DIRS: tuple[str, ...] = ("/dev/shm",)
"""Where converted adapters go when one of these is a writable folder (else the temp folder)."""


def _scratch_dir() -> Path:
    """A private (0700) folder for converted adapters, RAM-backed where possible."""
    for root in RAM_DIRS:
        if os.path.isdir(root) and os.access(root, os.W_OK):
            try:
                return Path(tempfile.mkdtemp(prefix="fedlm-onnx-adapters-", dir=root))
            except OSError:
                continue
    return Path(tempfile.mkdtemp(prefix="fedlm-onnx-adapters-"))


@dataclass
class _LoadedAdapter:
    path: Path
    file: Path
    """The converted `.onnx_adapter` being served."""
    name: str
    scale: float
    seconds: float
    """Time to convert + load + activate, for the benchmark."""
    convert_seconds: float
    """Of which reading, checking and writing the `.onnx_adapter` (0 on a cache hit)."""
    cached: bool


class OnnxEdgeModel(ServingLock):
    """An exported ONNX model served by onnxruntime-genai, whose LoRA adapter can be swapped live.

    Args:
        model: a folder written by `fedlm export-onnx`.
        n_ctx: context window in tokens (prompt + answer).
        n_threads: intra-op threads; defaults to all cores.
        adapter: a GGUF LoRA file or PEFT directory to serve from the start.
        providers: execution providers in priority order (genai names: 'cpu', 'cuda', 'dml',
            'qnn', ...); CPU by default. Other names are passed through as given.
        adapter_cache: converted adapters kept (by content hash) for a swap back; >= 1.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        adapter: str | os.PathLike[str] | None = None,
        adapter_scale: float = 1.0,
        providers: Sequence[str] = ("cpu",),
        provider_options: dict[str, dict[str, str]] | None = None,
        verbose: bool = False,
        n_batch: int | None = None,
        adapter_cache: int = 3,
    ) -> None:
        # n_batch is llama.cpp's; accepted so that EdgeModel(..., backend="onnx") takes the same
        # keywords, and ignored (genai runs the whole prompt in one pass).
        og = import_genai()
        self._og = og
        self.path = Path(model)
        if not (self.path / "genai_config.json").is_file():
            hint = (
                f"export it first: `fedlm export-onnx {self.path} --out DIR`, then pass DIR"
                if self.path.suffix == ".gguf" or not self.path.exists()
                else "pass a folder written by `fedlm export-onnx`"
            )
            raise ModelNotFoundError(
                f"{self.path}: not an exported ONNX model (no genai_config.json); {hint}"
            )
        if n_ctx < 2:
            raise ValueError(f"`n_ctx` should be at least 2, got {n_ctx}")
        if adapter_cache < 1:
            raise ValueError(f"`adapter_cache` should be at least 1, got {adapter_cache}")
        manifest = self.path / "fedlm_export.json"
        self.info: dict[str, Any] = json.loads(manifest.read_text()) if manifest.is_file() else {}
        genai_cfg = json.loads((self.path / "genai_config.json").read_text())["model"]
        self._n_vocab = int(genai_cfg["vocab_size"])
        # genai refuses a max_length past the model's context; llama.cpp silently allows it.
        self.n_ctx = min(n_ctx, int(genai_cfg.get("context_length") or n_ctx))
        threads = n_threads or os.cpu_count() or 1
        started = time.perf_counter()
        config = og.Config(str(self.path))
        config.clear_providers()
        for name in providers:
            if name != "cpu":
                config.append_provider(name)
            for key, val in (provider_options or {}).get(name, {}).items():
                config.set_provider_option(name, key, val)
        config.overlay(
            json.dumps(
                {
                    "model": {
                        "decoder": {
                            "session_options": {
                                "intra_op_num_threads": threads,
                                "log_severity_level": 0 if verbose else 3,
                            }
                        }
                    }
                }
            )
        )
        self._model = og.Model(config)
        self._tokenizer = og.Tokenizer(self._model)
        self._adapters = og.Adapters(self._model)
        self.load_seconds = time.perf_counter() - started
        log.info("loaded %s in %.2f s", self.path, self.load_seconds)
        self._init_lock()
        self._adapter: _LoadedAdapter | None = None
        # The graph's LoRA inputs (in, out), as the export recorded them (older exports: read
        # from the graph at the first swap).
        stored = self.info.get("lora_input_shapes")
        self._adapter_shapes: dict[str, tuple[int, int]] | None = (
            {k: (int(v[0]), int(v[1])) for k, v in stored.items()}
            if isinstance(stored, dict)
            else None
        )
        self._workdir = _scratch_dir()
        # Removed on close(), or at interpreter exit for a model never closed (the folder may be
        # in RAM: /dev/shm outlives the process).
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._workdir, True)
        # (content hash, scale) -> converted file, least recently used first
        self._converted: OrderedDict[tuple[str, float], Path] = OrderedDict()
        self._cache_size = adapter_cache
        self._loads = 0
        # Conversions run outside the generation lock; this one keeps two concurrent swaps from
        # racing on the cache (the federated client swaps from one thread, an app may not).
        self._convert_lock = threading.Lock()
        self._formatter: Any = None
        if adapter is not None:
            self.load_adapter(adapter, scale=adapter_scale)

    # ---------------------------------------------------------------- properties

    @property
    def adapter_path(self) -> Path | None:
        """The adapter being served (as given: GGUF or PEFT), or None for the bare base model."""
        return self._adapter.path if self._adapter else None

    @property
    def last_swap_seconds(self) -> float | None:
        """Seconds the current adapter's `load_adapter` took (conversion included)."""
        return self._adapter.seconds if self._adapter else None

    @property
    def last_swap(self) -> dict[str, Any] | None:
        """How the current adapter's swap went: total and conversion seconds, cache hit."""
        a = self._adapter
        if a is None:
            return None
        return {"seconds": a.seconds, "convert_seconds": a.convert_seconds, "cached": a.cached}

    # ---------------------------------------------------------------- tokens

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        ids = [int(t) for t in self._tokenizer.encode(text)]
        bos = self._tokenizer.bos_token_id
        if add_bos and self.info.get("add_bos") and bos >= 0 and (not ids or ids[0] != bos):
            ids.insert(0, int(bos))
        return ids

    def detokenize(self, tokens: Sequence[int]) -> str:
        return str(self._tokenizer.decode(np.asarray(list(tokens), dtype=np.int32)))

    # ---------------------------------------------------------------- inference

    def _generator(self, tokens: Sequence[int], cfg: GenerationConfig | None) -> Any:
        og = self._og
        if len(tokens) >= self.n_ctx:
            raise ValueError(
                f"the prompt has {len(tokens)} tokens, more than n_ctx={self.n_ctx} allows"
            )
        params = og.GeneratorParams(self._model)
        opts: dict[str, Any] = {"max_length": self.n_ctx}
        if cfg is not None:
            opts["max_length"] = min(self.n_ctx, len(tokens) + cfg.max_tokens)
            opts["do_sample"] = cfg.temperature > 0
            if cfg.temperature > 0:
                opts.update(
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    top_k=max(cfg.top_k, 0),
                    random_seed=cfg.seed,
                )
            opts["repetition_penalty"] = cfg.repeat_penalty
        params.set_search_options(**opts)
        gen = og.Generator(self._model, params)
        if self._adapter is not None:
            gen.set_active_adapter(self._adapters, self._adapter.name)
        gen.append_tokens(np.asarray(list(tokens), dtype=np.int32))
        return gen

    def _pieces(self, tokens: list[int], cfg: GenerationConfig) -> Iterator[str]:
        """Text pieces of the answer, stop strings honoured (held back until they cannot match)."""
        gen = self._generator(tokens, cfg)
        stream = self._tokenizer.create_stream()
        hold = max((len(s) for s in cfg.stop), default=0)
        pending = ""
        produced = 0
        try:
            while not gen.is_done() and produced < cfg.max_tokens:
                gen.generate_next_token()
                produced += 1
                tok = int(gen.get_next_tokens()[0])
                if tok in self._tokenizer.eos_token_ids:
                    break
                pending += stream.decode(tok)
                if cfg.stop:
                    cut = min(
                        (i for i in (pending.find(s) for s in cfg.stop) if i >= 0), default=-1
                    )
                    if cut >= 0:
                        if pending[:cut]:
                            yield pending[:cut]
                        return
                    if len(pending) > hold:
                        yield pending[: len(pending) - hold]
                        pending = pending[len(pending) - hold :]
                elif pending:
                    yield pending
                    pending = ""
            if pending:
                yield pending
        finally:
            del gen  # an adapter cannot be unloaded while a generator uses it

    def _run(self, tokens: list[int], cfg: GenerationConfig, stream: bool) -> str | Iterator[str]:
        if stream:
            # The lock is held until the stream is exhausted or closed, as in EdgeModel.
            return self._locked_stream(lambda: self._pieces(tokens, cfg))
        with self._generating():
            return "".join(self._pieces(tokens, cfg))

    def generate(
        self,
        prompt: str,
        config: GenerationConfig | None = None,
        *,
        stream: bool = False,
        **overrides: Any,
    ) -> str | Iterator[str]:
        """Complete `prompt`. With `stream=True`, return an iterator of text pieces."""
        cfg = _config(config, overrides)
        return self._run(self.tokenize(prompt), cfg, stream)

    def render_chat(self, messages: Sequence[Message]) -> str:
        """The prompt text of `messages` in the model's own chat template (budgeted renderer)."""
        template = self.info.get("chat_template")
        if not template:
            raise InvalidModelError(
                f"{self.path}: the exported model has no chat template; use generate() instead"
            )
        if self._formatter is None:
            from edge_sdk.models.chat_template import budgeted_formatter

            self._formatter = budgeted_formatter(
                template, self.info.get("eos_token", ""), self.info.get("bos_token", "")
            )
        return str(self._formatter(messages=[dict(m) for m in messages]).prompt)

    def chat(
        self,
        messages: Sequence[Message],
        config: GenerationConfig | None = None,
        *,
        stream: bool = False,
        **overrides: Any,
    ) -> str | Iterator[str]:
        """Answer a conversation rendered with the model's own chat template."""
        cfg = _config(config, overrides)
        prompt = self.render_chat(messages)
        # llama.cpp tokenizes chat prompts with BOS only when the template did not write one.
        tokens = self.tokenize(
            prompt, add_bos=not prompt.startswith(self.info.get("bos_token") or "\0")
        )
        return self._run(tokens, cfg, stream)

    def next_token_logits(self, prompt: str | Sequence[int]) -> np.ndarray:
        """Logits (vocab,) for the token after `prompt`, evaluated from an empty cache."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise ValueError("`prompt` should contain at least one token, got none")
        with self._generating():
            gen = self._generator(tokens, None)
            logits = np.array(gen.get_logits(), dtype=np.float32).reshape(-1, self._vocab())[-1]
            del gen
        return logits

    def _vocab(self) -> int:
        return self._n_vocab

    # ---------------------------------------------------------------- adapters

    def convert_adapter(self, path: str | os.PathLike[str], scale: float = 1.0) -> Path:
        """`path` (GGUF LoRA or PEFT directory) as an `.onnx_adapter` file in this model's work dir.

        Cached by content hash and scale: converting the same bytes again returns the same file.
        """
        with self._convert_lock:
            return self._convert(Path(path), scale)[0]

    def _convert(self, src: Path, scale: float) -> tuple[Path, bool]:
        """(converted file, cache hit) for `src` at `scale`."""
        from edge_sdk.onnx.adapters import (
            content_hash,
            lora_input_shapes,
            read_adapter,
            write_lora_adapter,
        )

        if not src.exists():
            raise InvalidAdapterError(
                f"no such adapter: {src} (expected a GGUF LoRA file or a PEFT directory)"
            )
        # The sha256 (the cache key, ~7 ms for a 10 MB adapter) runs in a thread beside the
        # validating read (hashlib releases the GIL): a new adapter, the federation's every
        # version, costs max(hash, read) instead of their sum. A swap back to a cached adapter
        # reads it needlessly, which only moves its time from the hash's to the read's.
        digest: list[str] = []
        failed: list[OSError] = []

        def run_hash() -> None:
            try:
                digest.append(content_hash(src))
            except OSError as exc:  # reported below, not as a thread traceback
                failed.append(exc)

        hasher = threading.Thread(target=run_hash, name="fedlm-adapter-sha256")
        hasher.start()
        try:
            adapter = read_adapter(src)  # one read: tensors, alpha/r and the GGUF's architecture
        finally:
            hasher.join()
        if not digest:
            why = failed[0].strerror if failed else "unknown error"
            raise InvalidAdapterError(f"{src}: cannot be read to hash it ({why})")
        key = (digest[0], float(scale))
        hit = self._converted.get(key)
        if hit is not None and hit.is_file():
            self._converted.move_to_end(key)
            return hit, True
        if self._adapter_shapes is None:
            self._adapter_shapes = lora_input_shapes(self.path / "model.onnx")
        arch = self.info.get("arch")
        if adapter.arch and arch and adapter.arch != arch:
            raise AdapterMismatchError(
                f"{src}: adapter is for {adapter.arch!r}, the model is {arch!r}"
            )
        self._loads += 1
        dest = self._workdir / f"a{self._loads}-{key[0][:12]}.onnx_adapter"
        write_lora_adapter(
            adapter.tensors, adapter.scale * scale, self._adapter_shapes, dest, source=str(src)
        )
        self._converted[key] = dest
        return dest, False

    def _evict(self) -> None:
        """Drop the least recently used converted files beyond `adapter_cache` (never the one
        being served)."""
        serving = self._adapter.file if self._adapter else None
        for key in [k for k, f in self._converted.items() if f != serving]:
            if len(self._converted) <= self._cache_size:
                break
            self._converted.pop(key).unlink(missing_ok=True)

    def load_adapter(
        self, path: str | os.PathLike[str], *, scale: float = 1.0, wait: float = 0.0
    ) -> None:
        """Serve a GGUF LoRA or PEFT adapter from now on, replacing the current one.

        Converted and checked against the model's LoRA inputs before the swap (outside the lock,
        so a running generation is not held up); `wait` is how long to wait for a running
        generation, after which the swap is refused with RuntimeBusyError.
        """
        t0 = time.perf_counter()
        with self._convert_lock:
            converted, cached = self._convert(Path(path), scale)
        convert_s = time.perf_counter() - t0
        with self._swap_lock(wait):
            # A name per load: the cached file may be loaded again while its old name is in use.
            self._loads += 1
            name = f"{converted.stem}#{self._loads}"
            try:
                self._adapters.load(str(converted), name)
            except RuntimeError as exc:  # onnxruntime_genai raises plain RuntimeError
                raise InvalidAdapterError(
                    f"{path}: onnxruntime-genai refused the adapter: {exc}"
                ) from None
            old = self._adapter
            self._adapter = new = _LoadedAdapter(
                Path(path), converted, name, scale, time.perf_counter() - t0, convert_s, cached
            )
            if old is not None:
                self._adapters.unload(old.name)
            with self._convert_lock:
                self._evict()
        log.info(
            "serving adapter %s (scale %.3g) in %.1f ms (conversion %.1f ms%s)",
            path,
            scale,
            new.seconds * 1e3,
            convert_s * 1e3,
            ", cached" if cached else "",
        )

    def remove_adapter(self, *, wait: float = 0.0) -> None:
        """Go back to the bare base model."""
        with self._swap_lock(wait):
            if self._adapter is None:
                return
            old, self._adapter = self._adapter, None
            self._adapters.unload(old.name)
        log.info("adapter removed")

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Free the model and any adapter; safe to call twice."""
        if getattr(self, "_model", None) is None:
            return
        if self._adapter is not None:
            self._adapters.unload(self._adapter.name)
            self._adapter = None
        self._adapters = None
        self._tokenizer = None
        self._model = None
        self._cleanup()
