"""Local inference on a GGUF model through llama.cpp, with LoRA adapter hot-swap.

`EdgeModel` is the only place that imports llama-cpp-python. Adapters are GGUF LoRA files
applied with llama.cpp's adapter API (`llama_adapter_lora_init` + `llama_set_adapters_lora`),
so a new global adapter replaces the old one without reloading the base weights: the swap costs
the adapter's size, not the model's.

Thread safety: generations are serialised by one lock. An adapter swap needs that lock too,
and is refused with `RuntimeBusyError` while a generation (or an unfinished stream) holds it,
unless the caller asks to wait.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from edge_sdk._llama_log import LlamaLog, llama_log
from edge_sdk._serving import ServingLock
from edge_sdk.choices import BACKENDS, Backend
from edge_sdk.errors import (
    GenerationError,
    InvalidAdapterError,
    InvalidModelError,
)
from edge_sdk.models.gguf_meta import show_path
from edge_sdk.models.identity import ModelIdentity, inspect_model
from edge_sdk.models.store import DEFAULT_MODEL, resolve

log = logging.getLogger(__name__)

Message = dict[str, str]

ANSWERS_KEPT = 256
"""Chat answers an `EdgeModel` remembers by id, so that the app can give feedback on them."""


@dataclass(frozen=True)
class AnswerRecord:
    """A chat answer as it was served: what feedback on it (`FederatedClient.record_feedback`)
    needs to make a training example or a preference pair. Kept in memory only."""

    id: str
    messages: tuple[Message, ...]
    """The conversation the answer replies to (ends with the user's turn)."""
    text: str
    """The answer."""
    adapter: str | None
    """The adapter file that was served with it (None: the base model)."""
    time: float


class Answer(str):
    """The text of a chat answer (a `str`, so existing callers see no change) with its `id`."""

    id: str
    record: AnswerRecord

    def __new__(cls, record: AnswerRecord) -> Answer:  # noqa: PYI034
        self = super().__new__(cls, record.text)
        self.id = record.id
        self.record = record
        return self


class AnswerStream:
    """A streamed chat answer: iterate for its pieces; `id` is known at once, and the answer is
    remembered under it (for feedback) when the stream is exhausted."""

    def __init__(self, answer_id: str, pieces: Iterator[str]) -> None:
        self.id = answer_id
        self._pieces = pieces

    def __iter__(self) -> AnswerStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings; the defaults are greedy and therefore reproducible."""

    max_tokens: int = 128
    """Upper bound on generated tokens."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.0
    """1.0 disables it, so greedy output is the model's own argmax."""
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"`max_tokens` should be a positive integer, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"`temperature` should be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` should be in (0, 1], got {self.top_p}")

    def completion_kwargs(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repeat_penalty": self.repeat_penalty,
            "stop": list(self.stop) or None,
            "seed": self.seed,
        }


@dataclass
class _LoadedAdapter:
    path: Path
    handle: Any  # llama_adapter_lora_p
    scale: float


class EdgeModel(ServingLock):
    """A GGUF model served locally by llama.cpp, whose LoRA adapter can be swapped live.

    Args:
        model: a model name (`smollm2-135m`, `gemma3-270m`) or a path to a `.gguf` file.
        n_ctx: context window in tokens.
        n_threads: CPU threads; defaults to all cores (llama-cpp-python's default is half).
        adapter: a GGUF LoRA adapter to load at start.
        verbose: let llama.cpp print its own logs.
        backend: 'llama.cpp' (default) or 'onnx' (`model` is then a `fedlm export-onnx` folder;
            returns an `edge_sdk.onnx.runtime.OnnxEdgeModel`).
        providers: ONNX Runtime execution providers (backend='onnx' only); CPU by default.
    """

    def __new__(
        cls,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        *args: Any,
        backend: Backend = "llama.cpp",
        **kwargs: Any,
    ) -> Any:
        # backend="onnx" serves an `fedlm export-onnx` folder through ONNX Runtime GenAI
        # (edge_sdk.onnx.runtime.OnnxEdgeModel, same methods); Python then skips __init__.
        if backend == "onnx":
            from edge_sdk.onnx.runtime import OnnxEdgeModel

            return OnnxEdgeModel(model, *args, **kwargs)
        if backend not in BACKENDS:
            raise ValueError(f"`backend` should be one of {BACKENDS}, got {backend!r}")
        return super().__new__(cls)

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        adapter: str | os.PathLike[str] | None = None,
        adapter_scale: float = 1.0,
        verbose: bool = False,
        backend: Backend = "llama.cpp",
        providers: Sequence[str] = ("cpu",),
    ) -> None:
        import llama_cpp

        from edge_sdk.models.chat_template import model_templates
        from edge_sdk.models.gguf_check import check_runnable, open_model

        llama_log.install()  # llama.cpp warnings go to logging, not the terminal
        self._llama_cpp = llama_cpp
        self.path = resolve(model)
        # Checked before llama.cpp sees the file: a header, hyper-parameter or template that
        # would crash, hang or blow up llama.cpp is refused here with its reason.
        checked = open_model(self.path)
        check_runnable(checked)
        templates = model_templates(checked)
        threads = n_threads or os.cpu_count() or 1
        started = time.perf_counter()
        with llama_log.capture() as lines:
            try:
                self._llm = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_ctx=n_ctx,
                    n_batch=n_batch,
                    n_threads=threads,
                    n_threads_batch=threads,
                    verbose=verbose,
                )
            except (ValueError, RuntimeError) as exc:
                reason = LlamaLog.reason(lines) or str(exc)
                raise InvalidModelError(
                    f"{show_path(self.path)}: llama.cpp refused the model: {reason}"
                ) from None
        self._use_budgeted_templates(templates)
        self.load_seconds = time.perf_counter() - started
        log.info("loaded %s in %.2f s", self.path.name, self.load_seconds)
        self._init_lock()
        self._answers: OrderedDict[str, AnswerRecord] = OrderedDict()
        self._answers_lock = threading.Lock()
        self._adapter: _LoadedAdapter | None = None
        self._identity: ModelIdentity | None = None
        self._base_shapes: dict[str, tuple[int, ...]] | None = None
        if adapter is not None:
            self.load_adapter(adapter, scale=adapter_scale)

    # ----------------------------------------------------------------- identity

    @property
    def identity(self) -> ModelIdentity:
        """The base model's openness report (sha256, licence, ...), computed once."""
        if self._identity is None:
            self._identity = inspect_model(self.path)
        return self._identity

    @property
    def adapter_path(self) -> Path | None:
        """The GGUF LoRA adapter being served, or None for the bare base model."""
        return self._adapter.path if self._adapter else None

    def _use_budgeted_templates(self, templates: dict[str, str]) -> None:
        """Render the model's chat templates within the operation/time/output budget.

        llama-cpp-python compiled each template into a plain sandboxed `Jinja2ChatFormatter`;
        replace them with `BudgetedChatFormatter`s of the same templates and tokens.
        """
        from edge_sdk.models.chat_template import budgeted_formatter

        if not templates:
            return
        eos, bos = self._llm.token_eos(), self._llm.token_bos()
        eos_text = self._llm._model.token_get_text(eos) if eos != -1 else ""
        bos_text = self._llm._model.token_get_text(bos) if bos != -1 else ""
        for name, template in templates.items():
            formatter = budgeted_formatter(template, eos_text, bos_text, stop_token_ids=[eos])
            self._llm._chat_handlers[name] = formatter.to_chat_handler()

    # ---------------------------------------------------------------- inference

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

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
        if stream:
            return self._stream(
                lambda: self._llm.create_completion(prompt, stream=True, **cfg.completion_kwargs()),
                lambda chunk: chunk["choices"][0].get("text", ""),
            )
        with self._generating(), self._template_errors():
            # Not streaming: one response dict (the stub's return type is the union).
            out = cast(
                dict[str, Any], self._llm.create_completion(prompt, **cfg.completion_kwargs())
            )
        return str(out["choices"][0]["text"])

    def chat(
        self,
        messages: Sequence[Message],
        config: GenerationConfig | None = None,
        *,
        stream: bool = False,
        **overrides: Any,
    ) -> Answer | AnswerStream:
        """Answer a conversation rendered with the model's own chat template.

        Returns an `Answer` (a `str` with an `id`), or with `stream=True` an `AnswerStream` of
        text pieces (its `id` at once). The model remembers the last `ANSWERS_KEPT` answers by
        id (`answer(id)`), so that the app can record the user's feedback on one.
        """
        cfg = _config(config, overrides)
        kwargs = cfg.completion_kwargs()
        msgs = [dict(m) for m in messages]
        answer_id = uuid.uuid4().hex
        if stream:
            adapter = self._adapter_name()
            parts: list[str] = []
            pieces = self._stream(
                lambda: self._llm.create_chat_completion(msgs, stream=True, **kwargs),  # type: ignore[arg-type]
                lambda chunk: chunk["choices"][0]["delta"].get("content") or "",
            )

            def remembered() -> Iterator[str]:
                for piece in pieces:
                    parts.append(piece)
                    yield piece
                self._remember(answer_id, msgs, "".join(parts), adapter)

            return AnswerStream(answer_id, remembered())
        with self._generating(), self._template_errors():
            out = cast(dict[str, Any], self._llm.create_chat_completion(msgs, **kwargs))  # type: ignore[arg-type]
            adapter = self._adapter_name()  # under the lock: the adapter that answered
        text = str(out["choices"][0]["message"]["content"] or "")
        return Answer(self._remember(answer_id, msgs, text, adapter))

    def answer(self, answer_id: str) -> AnswerRecord:
        """A recent chat answer by id; `KeyError` names it when it is unknown or forgotten."""
        with self._answers_lock:
            record = self._answers.get(answer_id)
        if record is None:
            raise KeyError(
                f"answer {answer_id!r} is not among the last {ANSWERS_KEPT} chat answers of this "
                "model (an id from another process, or an older answer)"
            )
        return record

    def _adapter_name(self) -> str | None:
        return str(self._adapter.path) if self._adapter is not None else None

    def _remember(
        self, answer_id: str, msgs: Sequence[Message], text: str, adapter: str | None
    ) -> AnswerRecord:
        record = AnswerRecord(answer_id, tuple(dict(m) for m in msgs), text, adapter, time.time())
        with self._answers_lock:
            self._answers[answer_id] = record
            while len(self._answers) > ANSWERS_KEPT:
                self._answers.popitem(last=False)
        return record

    @contextmanager
    def _template_errors(self) -> Iterator[None]:
        """Name the model in template errors; report llama.cpp's failures as `GenerationError`.

        llama-cpp-python raises a bare RuntimeError when `llama_decode` fails (a hostile model,
        e.g. with NaN weights, can make it fail); llama.cpp's logged reason is added.
        """
        from edge_sdk.models.chat_template import ChatTemplateError

        with llama_log.capture() as lines:
            try:
                yield
            except ChatTemplateError as exc:  # name the model whose template is over budget
                raise ChatTemplateError(f"{show_path(self.path)}: {exc}") from None
            except RuntimeError as exc:
                reason = LlamaLog.reason(lines) or str(exc)
                raise GenerationError(
                    f"{show_path(self.path)}: llama.cpp failed while generating: {reason}"
                ) from None

    def _stream(self, start: Any, text_of: Any) -> Iterator[str]:
        # The lock is held until the stream is exhausted or closed, so a swap cannot change
        # the adapter under a half-finished answer.
        def pieces() -> Iterator[str]:
            for chunk in start():
                piece = text_of(chunk)
                if piece:
                    yield piece

        return self._locked_stream(pieces, self._template_errors)

    def next_token_logits(self, prompt: str | Sequence[int]) -> np.ndarray:
        """Logits (vocab,) for the token after `prompt`, evaluated from an empty cache."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise ValueError("`prompt` should contain at least one token, got none")
        with self._generating():
            self._llm.reset()
            self._llm.eval(tokens)
            ptr = self._llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
            logits = np.ctypeslib.as_array(ptr, shape=(self._llm.n_vocab(),)).copy()
            self._llm.reset()
        return logits

    # ------------------------------------------------------------------ adapters

    def load_adapter(
        self, path: str | os.PathLike[str], *, scale: float = 1.0, wait: float = 0.0
    ) -> None:
        """Serve a GGUF LoRA adapter from now on, replacing the current one.

        The adapter is checked against the base (architecture, tensor shapes) before llama.cpp
        reads it. `wait` is how long to wait for a running generation; after that the swap is
        refused with `RuntimeBusyError`.
        """
        adapter_path = _adapter_file(Path(path))
        self._check_adapter(adapter_path)
        with self._swap_lock(wait):
            with llama_log.capture() as lines:
                handle = self._llama_cpp.llama_adapter_lora_init(
                    self._llm.model, str(adapter_path).encode()
                )
            if not handle:
                reason = LlamaLog.reason(lines) or "no reason logged"
                raise InvalidAdapterError(
                    f"{show_path(adapter_path)}: llama.cpp refused the adapter: {reason}"
                )
            try:
                self._activate(handle, scale)
            except Exception:
                self._llama_cpp.llama_adapter_lora_free(handle)
                raise
            old, self._adapter = self._adapter, _LoadedAdapter(adapter_path, handle, scale)
            if old is not None:
                self._llama_cpp.llama_adapter_lora_free(old.handle)
        log.info("serving adapter %s (scale %.3g)", adapter_path, scale)

    def remove_adapter(self, *, wait: float = 0.0) -> None:
        """Go back to the bare base model."""
        with self._swap_lock(wait):
            if self._adapter is None:
                return
            self._activate(None, 0.0)
            self._llama_cpp.llama_adapter_lora_free(self._adapter.handle)
            self._adapter = None
        log.info("adapter removed")

    def _activate(self, handle: Any, scale: float) -> None:
        lc = self._llama_cpp
        if handle is None:
            rc = lc.llama_set_adapters_lora(self._llm.ctx, None, 0, None)
        else:
            handles = (lc.llama_adapter_lora_p_ctypes * 1)(handle)
            scales = (ctypes.c_float * 1)(scale)
            rc = lc.llama_set_adapters_lora(self._llm.ctx, handles, 1, scales)
        if rc != 0:
            raise InvalidAdapterError(f"llama.cpp could not activate the adapter (code {rc})")
        # The KV cache holds activations computed with the previous adapter: drop it.
        self._llm.reset()

    def _check_adapter(self, adapter_path: Path) -> None:
        from edge_sdk.adapters.gguf_lora import check_adapter_compatible

        check_adapter_compatible(adapter_path, self.path)

    # ----------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Free the model and any adapter; safe to call twice."""
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        if self._adapter is not None:
            self._llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None)
            self._llama_cpp.llama_adapter_lora_free(self._adapter.handle)
            self._adapter = None
        llm.close()
        self._llm = None  # type: ignore[assignment]  # closed; `close` tests for None


def _adapter_file(path: Path) -> Path:
    """`path` itself, or a one-line hint when it is the directory `fedlm train` wrote."""
    if not path.is_dir():
        return path
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if ggufs:
        pick = "adapter.gguf" if "adapter.gguf" in ggufs else ggufs[0]
        raise InvalidAdapterError(
            f"{path}: is a directory; pass the GGUF adapter inside it: {path / pick}"
        )
    if (path / "adapter_config.json").is_file():
        raise InvalidAdapterError(
            f"{path}: is a PEFT directory, not a GGUF adapter; convert it with "
            f"`fedlm convert-adapter {path} --model MODEL --out adapter.gguf`"
        )
    raise InvalidAdapterError(f"{path}: is a directory; pass a GGUF LoRA adapter file (.gguf)")


def _config(config: GenerationConfig | None, overrides: dict[str, Any]) -> GenerationConfig:
    base = config or GenerationConfig()
    if not overrides:
        return base
    from dataclasses import replace

    if "stop" in overrides and overrides["stop"] is not None:
        overrides["stop"] = tuple(overrides["stop"])
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
