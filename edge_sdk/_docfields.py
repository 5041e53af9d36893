"""Make the per-field docstrings of a config dataclass visible to `help()`.

Config fields are documented where they are declared, as attribute docstrings (a string
literal right after the field; PEP 257 / Sphinx autodoc). Python keeps those nowhere at run
time, so `help(ClientConfig)` showed no field at all. `document_fields` reads them from the
class's source once, at import, and appends an "Attributes" section (name, type, default and
the docstring) to the class docstring: the declaration stays the one source of truth.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
from typing import TypeVar

T = TypeVar("T", bound=type)


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring, read from the class body; {} without source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped (frozen app, REPL): leave help() as is
        return {}
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f" = {f.default!r}"
    if f.default_factory is not dataclasses.MISSING:
        factory = getattr(f.default_factory, "__name__", repr(f.default_factory))
        return f" = {factory}()"
    return " (required)"


def document_fields(cls: T) -> T:
    """Class decorator (above `@dataclass`): append an Attributes section built from the fields."""
    docs = field_docs(cls)
    if not docs:
        return cls
    lines = ["", "Attributes:"]
    for f in dataclasses.fields(cls):
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lines.append(f"    {f.name}: {type_name}{_default(f)}")
        lines.extend(
            f"        {line}" if line else "" for line in docs.get(f.name, "").splitlines()
        )
    cls.__doc__ = (inspect.cleandoc(cls.__doc__ or cls.__name__)) + "\n" + "\n".join(lines)
    return cls
