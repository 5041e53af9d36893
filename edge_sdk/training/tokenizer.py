"""The model's own tokenizer and chat template, taken from its GGUF through llama.cpp.

Training must see the tokens that inference sees, so this loads llama.cpp's vocabulary
(`llama_cpp.Llama(path, vocab_only=True)`: no weights, a fraction of a second) and renders
chats with the GGUF's `tokenizer.chat_template` through llama-cpp-python's own
`Jinja2ChatFormatter`: the renderer `Llama.create_chat_completion` uses. Like llama-cpp-python,
a rendered chat is tokenized with special tokens parsed and no BOS added (the template writes
its own), and plain text gets the BOS when the vocabulary asks for one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from edge_sdk.training.errors import TokenizerError

logger = logging.getLogger(__name__)

Message = Mapping[str, Any]


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    bos_id: int | None
    """Token prepended to plain text (None when the vocabulary adds none)."""
    eos_id: int
    """End-of-sequence token appended to plain text and completions."""
    has_chat_template: bool

    def encode(self, text: str, *, add_bos: bool) -> list[int]:
        """Token ids of `text`, special tokens parsed; BOS only when asked and the vocab uses
        one."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def render_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        """The chat as the model's template writes it."""
        ...


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Drop what C code writes to fd 2 meanwhile: llama.cpp warns that a vocab-only context
    has no training length even with verbose=False. Errors still surface as exceptions."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class LlamaCppTokenizer:
    """llama.cpp's vocabulary and the GGUF chat template of one model file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            import llama_cpp
        except ImportError as exc:  # pragma: no cover - a hard dependency
            raise TokenizerError(f"llama-cpp-python is required for tokenization ({exc})") from exc
        from edge_sdk._llama_log import LlamaLog, llama_log
        from edge_sdk.models.chat_template import budgeted_formatter, model_templates
        from edge_sdk.models.gguf_check import check_runnable, open_model
        from edge_sdk.models.gguf_meta import show_path

        llama_log.install()  # its warnings reach sys.stderr from Python, past the fd-2 silencing
        self.path = Path(path)
        # Checked before llama.cpp reads it (InvalidModelError names the file and the reason).
        checked = open_model(self.path)
        check_runnable(checked)
        templates = model_templates(checked)
        try:
            with _native_stderr_silenced(), llama_log.capture() as lines:
                self._llm = llama_cpp.Llama(
                    model_path=str(self.path), vocab_only=True, verbose=False
                )
        except (ValueError, RuntimeError, OSError) as exc:
            reason = LlamaLog.reason(lines) or str(exc)
            raise TokenizerError(
                f"{show_path(self.path)}: llama.cpp refused the vocabulary: {reason}"
            ) from None
        meta: dict[str, str] = dict(self._llm.metadata)
        bos, eos = self._llm.token_bos(), self._llm.token_eos()
        if eos < 0:
            raise TokenizerError(
                f"{show_path(self.path)}: the vocabulary has no end-of-sequence token"
            )
        self.eos_id: int = eos
        # llama.cpp adds BOS on `add_bos=True` only when the vocab says so; mirror that here so
        # that `bos_id is None` means "plain text starts without BOS".
        add_bos = meta.get("tokenizer.ggml.add_bos_token", "true" if bos >= 0 else "false")
        self.bos_id: int | None = bos if bos >= 0 and add_bos.lower() == "true" else None
        self.vocab_size: int = self._llm.n_vocab()
        self.chat_template: str | None = templates.get("chat_template.default") or None
        self.has_chat_template = self.chat_template is not None
        self._formatters: dict[bool, Any] = {}
        if self.chat_template is not None:
            model = self._llm._model
            bos_text = model.token_get_text(bos) if bos >= 0 else ""
            eos_text = model.token_get_text(eos)
            # Rendered within the operation/time/output budget of edge_sdk.models.chat_template.
            for gen in (False, True):
                self._formatters[gen] = budgeted_formatter(
                    self.chat_template, eos_text, bos_text, add_generation_prompt=gen
                )

    def encode(self, text: str, *, add_bos: bool) -> list[int]:
        if not text:
            return [self.bos_id] if add_bos and self.bos_id is not None else []
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def decode(self, ids: Sequence[int]) -> str:
        return self._llm.detokenize(list(ids), special=True).decode("utf-8", errors="replace")

    def render_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        if not self._formatters:
            raise TokenizerError(f"{self.path}: the model has no chat template")
        from edge_sdk.models.chat_template import ChatTemplateError
        from edge_sdk.models.gguf_meta import quote, show_path

        try:
            result = self._formatters[add_generation_prompt](messages=[dict(m) for m in messages])
        except ChatTemplateError as exc:  # over the budget: the template, not this example
            raise ChatTemplateError(f"{show_path(self.path)}: {exc}") from None
        except Exception as exc:  # jinja2 errors and the template's raise_exception()
            raise TokenizerError(
                f"{show_path(self.path)}: chat template failed to render ({quote(str(exc), 200)})"
            ) from exc
        return str(result.prompt)


def load_tokenizer(path: str | os.PathLike[str]) -> LlamaCppTokenizer:
    """The tokenizer of the GGUF at `path`."""
    return LlamaCppTokenizer(path)
