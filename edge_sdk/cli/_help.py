"""`--help` that shows every default: argparse's defaults formatter, minus its noise."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from typing import Any


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, unless the help already says its default
    in words ("default: ...", e.g. for an environment variable) or it is an off-by-default flag."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default:" in text or "%(default)" in text:
            return text
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


@dataclasses.dataclass(frozen=True)
class ConfigDefault:
    """An option's default that lives in a config dataclass field, so it is declared once.

    The CLI's option modules must not import their config modules while the parser is built
    (that would load numpy and aiohttp for every command, and the coordinator must set its BLAS
    threads before numpy loads), so the field is read only when needed: by `--help` (through
    `str`) and by `resolve` when the command runs.
    """

    module: str
    """Dotted module path, e.g. "edge_sdk.client.loop"."""
    cls: str
    """The dataclass in `module`."""
    field: str
    """The field whose default this is."""

    def value(self) -> Any:
        config = getattr(importlib.import_module(self.module), self.cls)
        spec = {f.name: f for f in dataclasses.fields(config)}[self.field]
        if spec.default is not dataclasses.MISSING:
            return spec.default
        if spec.default_factory is not dataclasses.MISSING:
            return spec.default_factory()
        raise TypeError(f"{self.module}.{self.cls}.{self.field} has no default")

    def __str__(self) -> str:
        return str(self.value())


def resolve(value: Any) -> Any:
    """An option's parsed value, with a `ConfigDefault` (the option was not given) resolved."""
    return value.value() if isinstance(value, ConfigDefault) else value


@dataclasses.dataclass(frozen=True)
class CommaListDefault(ConfigDefault):
    """A tuple or set field's default as its comma-separated flag spells it (a set sorted,
    enum members by their value), e.g. `LicenceClass.UNKNOWN` -> "unknown"."""

    def value(self) -> str:
        items = super().value()
        texts = [str(getattr(item, "value", item)) for item in items]
        return ",".join(sorted(texts) if isinstance(items, (set, frozenset)) else texts)
