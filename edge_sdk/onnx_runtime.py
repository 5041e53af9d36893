"""`OnnxEdgeModel`: the `EdgeModel` API served by ONNX Runtime GenAI, with LoRA hot-swap.

The model argument is a folder written by `fedlm export-onnx` (model.onnx, genai_config.json,
tokenizer, fedlm_export.json). Adapters arrive as the federation ships them (a GGUF LoRA file or
a PEFT directory) and are converted here, on the device, to an `.onnx_adapter` (see
`edge_sdk.onnx_adapters`) which `onnxruntime_genai.Adapters` loads. A swap loads the new file,
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from typing_extensions import Self

from edge_sdk.errors import (
    AdapterMismatchError,
    InvalidAdapterError,
    InvalidModelError,
    ModelNotFoundError,
    RuntimeBusyError,
)
from edge_sdk.onnx_errors import OnnxNotInstalledError
from edge_sdk.runtime import GenerationConfig, Message, _config

log = logging.getLogger(__name__)


def import_genai() -> Any:
    """`onnxruntime_genai`, or `OnnxNotInstalledError` naming the extra to install."""
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise OnnxNotInstalledError(
            f"the ONNX backend needs the `onnx` extra ({exc.name} "
            "is missing): pip install 'fedlm-edge[onnx]'"
        ) from None
    return og


@dataclass
class _LoadedAdapter:
    path: Path
    name: str
    scale: float
    seconds: float
    """Time to convert + load + activate, for the benchmark."""


class OnnxEdgeModel:
    """An exported ONNX model served by onnxruntime-genai, whose LoRA adapter can be swapped live.

    Args:
        model: a folder written by `fedlm export-onnx`.
        n_ctx: context window in tokens (prompt + answer).
        n_threads: intra-op threads; defaults to all cores.
        adapter: a GGUF LoRA file or PEFT directory to serve from the start.
        providers: execution providers in priority order (genai names: 'cpu', 'cuda', 'dml',
            'qnn', ...); CPU by default. Other names are passed through as given.
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
        self._lock = threading.Lock()
        self._adapter: _LoadedAdapter | None = None
        self._adapter_shapes: dict[str, tuple[int, int]] | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="fedlm-onnx-adapters-"))
        self._counter = 0
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
        return self._adapter.seconds if self._adapter else None

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

    @contextmanager
    def _generating(self) -> Iterator[None]:
        with self._lock:
            yield

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

            def pieces() -> Iterator[str]:
                # The lock is held until the stream is exhausted or closed, as in EdgeModel.
                with self._generating():
                    yield from self._pieces(tokens, cfg)

            return pieces()
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
        """`path` (GGUF LoRA or PEFT directory) as an `.onnx_adapter` file in this model's work
        dir."""
        from edge_sdk.onnx_adapters import (
            lora_input_shapes,
            onnx_lora_tensors,
            read_adapter,
            write_onnx_adapter,
        )

        if self._adapter_shapes is None:
            self._adapter_shapes = lora_input_shapes(self.path / "model.onnx")
        src = Path(path)
        tensors, lora_scale = read_adapter(src)
        arch = self.info.get("arch")
        if src.is_file() and arch:
            from edge_sdk.adapters.gguf_lora import read_gguf_lora

            got = read_gguf_lora(src).arch
            if got != arch:
                raise AdapterMismatchError(f"{src}: adapter is for {got!r}, the model is {arch!r}")
        onnx = onnx_lora_tensors(tensors, lora_scale * scale, self._adapter_shapes, source=str(src))
        self._counter += 1
        return write_onnx_adapter(onnx, self._workdir / f"adapter-{self._counter}.onnx_adapter")

    def load_adapter(
        self, path: str | os.PathLike[str], *, scale: float = 1.0, wait: float = 0.0
    ) -> None:
        """Serve a GGUF LoRA or PEFT adapter from now on, replacing the current one.

        Converted and checked against the model's LoRA inputs before the swap; `wait` is how long
        to wait for a running generation, after which the swap is refused with RuntimeBusyError.
        """
        t0 = time.perf_counter()
        converted = self.convert_adapter(path, scale)
        with self._swap_lock(wait):
            name = converted.stem
            try:
                self._adapters.load(str(converted), name)
            except RuntimeError as exc:  # onnxruntime_genai raises plain RuntimeError
                raise InvalidAdapterError(
                    f"{path}: onnxruntime-genai refused the adapter: {exc}"
                ) from None
            old = self._adapter
            self._adapter = _LoadedAdapter(Path(path), name, scale, time.perf_counter() - t0)
            if old is not None:
                self._unload(old)
        log.info(
            "serving adapter %s (scale %.3g) in %.1f ms", path, scale, self._adapter.seconds * 1e3
        )

    def remove_adapter(self, *, wait: float = 0.0) -> None:
        """Go back to the bare base model."""
        with self._swap_lock(wait):
            if self._adapter is None:
                return
            old, self._adapter = self._adapter, None
            self._unload(old)
        log.info("adapter removed")

    def _unload(self, adapter: _LoadedAdapter) -> None:
        self._adapters.unload(adapter.name)
        (self._workdir / f"{adapter.name}.onnx_adapter").unlink(missing_ok=True)

    @contextmanager
    def _swap_lock(self, wait: float) -> Iterator[None]:
        acquired = (
            self._lock.acquire(timeout=wait) if wait > 0 else self._lock.acquire(blocking=False)
        )
        if not acquired:
            waited = f" and did not finish within wait={wait:g} s" if wait > 0 else ""
            raise RuntimeBusyError(
                f"cannot swap the adapter of {self.path.name}: a generation is running{waited}; "
                "finish or close the stream first, or pass wait=SECONDS to wait for it"
            )
        try:
            yield
        finally:
            self._lock.release()

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
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
