"""Every field of the user-facing configs has a docstring, and `help()` shows it."""

from __future__ import annotations

import dataclasses
import pydoc
from dataclasses import dataclass

import pytest

from edge_sdk._docfields import document_fields, field_docs
from edge_sdk.client.loop import ClientConfig
from edge_sdk.training.data import DataConfig
from edge_sdk.training.trainer import TrainConfig


@pytest.mark.parametrize("cls", [ClientConfig, TrainConfig, DataConfig])
def test_every_config_field_has_a_docstring(cls: type) -> None:
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


@pytest.mark.parametrize("cls", [ClientConfig, TrainConfig])
def test_help_shows_every_field_with_its_docstring(cls: type) -> None:
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert "Attributes:" in text
    for name, doc in field_docs(cls).items():
        assert f"{name}: " in text
        assert doc.splitlines()[0] in text, name


def test_decorator_lists_type_default_and_doc() -> None:
    @document_fields
    @dataclass
    class Example:
        """An example."""

        a: int
        """First line.

        Second paragraph."""
        b: str = "x"
        c: list = dataclasses.field(default_factory=list)
        """A list."""

    assert Example.__doc__ == (
        "An example.\n\nAttributes:\n"
        "    a: int (required)\n        First line.\n\n        Second paragraph.\n"
        "    b: str = 'x'\n"
        "    c: list = list()\n        A list."
    )
