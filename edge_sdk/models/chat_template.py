"""Chat templates from GGUF files, rendered with bounded work, memory and output.

A chat template is Jinja code from an untrusted file. llama-cpp-python renders it in Jinja's
`ImmutableSandboxedEnvironment`, which stops attribute escapes and caps one `range()` at
100 000 items, but not the total work: nested `range(100000)` loops made `generate --chat` and
`train` hang at 4.4 GB. `BudgetedChatFormatter` renders the same templates (it is a
`Jinja2ChatFormatter`, the renderer `Llama.create_chat_completion` uses) in a sandbox that
counts operations:

- every call, attribute and item look-up, filter, test, arithmetic operator and `range()` step
  ticks a counter, refused past `TEMPLATE_MAX_OPERATIONS`;
- at most every 5 ms of ticking, the wall clock (`TEMPLATE_MAX_SECONDS`) and the process's
  resident memory (at most `TEMPLATE_MAX_OUTPUT_CHARS` x 8 bytes above where it started) are
  checked, which also catches strings doubled with `~` in a loop;
- `*`, `+` and `**` refuse results larger than the output budget before computing them, and
  filters that pad to a width (`center`, `indent`, ...) refuse widths past it;
- the output is streamed and refused past `TEMPLATE_MAX_OUTPUT_CHARS`.

A template that exceeds the budget raises `ChatTemplateError` (an `InvalidModelError`), as does
one that does not compile (`check_template`, run on every template of a model before llama.cpp
loads it: the Jinja compiler recurses, so a deeply nested template would otherwise raise
`RecursionError` inside llama-cpp-python).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_sdk.errors import ChatTemplateError
from edge_sdk.models import gguf_limits as L

__all__ = ["ChatTemplateError", "budgeted_formatter", "check_template", "model_templates"]


_WIDTH_FILTERS = ("center", "indent", "wordwrap", "truncate", "format", "filesizeformat")
_OVER = "chat template exceeds the rendering budget"
_MAX_RANGE = 100_000  # jinja2.sandbox.MAX_RANGE
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class _Budget:
    """Operation count, deadline and memory growth of one rendering."""

    def __init__(self) -> None:
        self.ops = 0
        self.start = time.monotonic()
        self.last_check = self.start
        self.rss0 = _rss_bytes()

    def tick(self, n: int = 1) -> None:
        self.ops += n
        if self.ops > L.TEMPLATE_MAX_OPERATIONS:
            raise ChatTemplateError(f"{_OVER} ({L.TEMPLATE_MAX_OPERATIONS} operations)")
        now = time.monotonic()
        if now - self.last_check < 0.005:
            return
        self.last_check = now
        if now - self.start > L.TEMPLATE_MAX_SECONDS:
            raise ChatTemplateError(f"{_OVER} ({L.TEMPLATE_MAX_SECONDS:g} s)")
        if self.rss0 and _rss_bytes() - self.rss0 > 8 * L.TEMPLATE_MAX_OUTPUT_CHARS:
            raise ChatTemplateError(f"{_OVER} (memory)")

    def size(self, n: int) -> None:
        if n > L.TEMPLATE_MAX_OUTPUT_CHARS:
            raise ChatTemplateError(
                f"{_OVER} (a value of {n} items, limit {L.TEMPLATE_MAX_OUTPUT_CHARS})"
            )


class BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """A sandbox whose every operation ticks the current `_Budget` (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "//", "%"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.budget = _Budget()
        self.globals["range"] = self._range
        self.filters = {name: self._wrap_filter(name, fn) for name, fn in self.filters.items()}
        self.tests = {name: self._wrap(fn) for name, fn in self.tests.items()}

    def _range(self, *args: int) -> Iterator[int]:
        items = range(*args)
        if len(items) > _MAX_RANGE:
            raise ChatTemplateError(f"{_OVER} (a range of {len(items)} items)")
        for i in items:
            self.budget.tick()
            yield i

    def _wrap(self, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.budget.tick()
            return fn(*args, **kwargs)

        return wrapped

    def _wrap_filter(self, name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.budget.tick()
            if name in _WIDTH_FILTERS:
                for a in (*args[1:], *kwargs.values()):
                    if isinstance(a, int) and not isinstance(a, bool):
                        self.budget.size(abs(a))
            out = fn(*args, **kwargs)
            if isinstance(out, (str, list, tuple)):
                self.budget.size(len(out))
            return out

        return wrapped

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.budget.tick()
        out = super().call(context, obj, *args, **kwargs)
        if isinstance(out, (str, list, tuple)):
            self.budget.size(len(out))
        return out

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.budget.tick()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self.budget.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    self.budget.size(len(seq) * max(n, 0))
        elif (
            operator == "+"
            and isinstance(left, (str, list, tuple))
            and isinstance(right, type(left))
        ):
            self.budget.size(len(left) + len(right))
        elif (
            operator == "**"
            and isinstance(right, (int, float))
            and right > 64
            and isinstance(left, (int, float))
            and abs(left) > 1
        ):
            raise ChatTemplateError(f"{_OVER} (a power of {right!r})")
        return super().call_binop(context, operator, left, right)


def _environment() -> BudgetedEnvironment:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    env = BudgetedEnvironment(
        loader=jinja2.BaseLoader(),
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[Jinja2ChatFormatter.IgnoreGenerationTags, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = env._wrap_filter("tojson", Jinja2ChatFormatter.tojson)
    return env


def _compile(template: str) -> tuple[BudgetedEnvironment, jinja2.Template]:
    env = _environment()
    try:
        return env, env.from_string(template)
    except RecursionError:
        raise ChatTemplateError("chat template is nested too deeply to compile") from None
    except (jinja2.TemplateError, ValueError, TypeError, MemoryError) as exc:
        raise ChatTemplateError(f"chat template does not compile ({str(exc)[:200]})") from None


def check_template(template: str) -> None:
    """Raise `ChatTemplateError` unless `template` compiles (before llama.cpp's own compile)."""
    if len(template) > L.MAX_STRING_BYTES:
        raise ChatTemplateError(f"chat template is longer than {L.MAX_STRING_BYTES} characters")
    _compile(template)


class _BudgetedTemplate:
    """Stands in for the compiled template inside `Jinja2ChatFormatter.__call__`."""

    def __init__(self, env: BudgetedEnvironment, template: jinja2.Template) -> None:
        self.env = env
        self.template = template

    def render(self, **context: Any) -> str:
        self.env.budget = budget = _Budget()
        pieces: list[str] = []
        total = 0
        try:
            for piece in self.template.generate(**context):
                total += len(piece)
                budget.size(total)
                budget.tick()
                pieces.append(piece)
        except RecursionError:
            raise ChatTemplateError(f"{_OVER} (recursion)") from None
        except MemoryError:
            raise ChatTemplateError(f"{_OVER} (memory)") from None
        return "".join(pieces)


def budgeted_formatter(
    template: str,
    eos_token: str,
    bos_token: str,
    *,
    add_generation_prompt: bool = True,
    stop_token_ids: list[int] | None = None,
) -> Any:
    """A `Jinja2ChatFormatter` for `template` that renders within the budget."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    class BudgetedChatFormatter(Jinja2ChatFormatter):
        def __init__(self) -> None:  # the parent's compile is replaced by the budgeted one
            self.template = template
            self.eos_token = eos_token
            self.bos_token = bos_token
            self.add_generation_prompt = add_generation_prompt
            self.stop_token_ids = set(stop_token_ids) if stop_token_ids is not None else None
            # A duck-typed stand-in for the jinja Template the parent holds.
            self._environment = _BudgetedTemplate(*_compile(template))  # type: ignore[assignment]

    return BudgetedChatFormatter()


def model_templates(f: Any) -> dict[str, str]:
    """{llama-cpp-python handler name: template} of a checked `GGUFFile`, each compiled once.

    llama-cpp-python registers `tokenizer.chat_template` as `chat_template.default` and each
    `tokenizer.chat_template.NAME` as `chat_template.NAME`, and compiles them all while loading.
    """
    from edge_sdk.models.gguf_check import STR, refuse, value

    out: dict[str, str] = {}
    for key in f.fields:
        if key != "tokenizer.chat_template" and not key.startswith("tokenizer.chat_template."):
            continue
        text = value(f, key, STR)
        try:
            check_template(text)
        except ChatTemplateError as exc:
            raise refuse(f, f"{key}: {exc}") from None
        out["chat_template.default" if key == "tokenizer.chat_template" else key[10:]] = text
    return out
