"""The budgeted chat-template renderer: same output as llama-cpp-python's, bounded work."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edge_sdk.errors import ChatTemplateError
from edge_sdk.models import gguf_limits as L
from edge_sdk.models.chat_template import budgeted_formatter, check_template
from edge_sdk.models.gguf_meta import read_gguf
from tests.tiny_models import CHATML_TEMPLATE

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


def _same_as_llama_cpp(template: str) -> None:
    for gen in (False, True):
        want = Jinja2ChatFormatter(template, "</s>", "<s>", add_generation_prompt=gen)(
            messages=CHAT
        ).prompt
        got = budgeted_formatter(template, "</s>", "<s>", add_generation_prompt=gen)(
            messages=CHAT
        ).prompt
        assert got == want


def test_renders_like_llama_cpp_python_tiny() -> None:
    _same_as_llama_cpp(CHATML_TEMPLATE)


def test_renders_like_llama_cpp_python_real_templates(smollm2_path: Path) -> None:
    template = read_gguf(smollm2_path).fields["tokenizer.chat_template"].contents()
    _same_as_llama_cpp(template)


@pytest.mark.parametrize(
    "template",
    [
        # silent loops
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{{ 'x' * 1000000000 }}",  # one huge repetition
        "{{ 'x' | center(1000000000) }}",  # a padding filter
        "{{ 2 ** 100000000 }}",  # a huge integer
        (
            "{% set ns = namespace(s=[1]) %}{% for i in range(40) %}"
            "{% set ns.s = ns.s + ns.s %}{% endfor %}"
        ),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
        ),
        "{% for i in range(1000001) %}{% endfor %}",  # a range past jinja's cap
    ],
)
def test_hostile_templates_exceed_the_budget_quickly(template: str) -> None:
    # CPU time of this process, not wall time: other processes on a busy machine do not count.
    t0 = time.process_time()
    with pytest.raises(ChatTemplateError, match="chat template exceeds the rendering budget"):
        budgeted_formatter(template, "</s>", "<s>")(messages=CHAT)
    assert time.process_time() - t0 < L.TEMPLATE_MAX_SECONDS + 1


def test_sandbox_still_blocks_attribute_escapes() -> None:
    from jinja2.exceptions import SecurityError

    with pytest.raises(
        SecurityError, match=r"access to attribute '__class__' of 'str' object is unsafe"
    ):
        budgeted_formatter("{{ ''.__class__.__mro__[1].__subclasses__() }}", "", "")(messages=CHAT)


def test_templates_that_do_not_compile_are_refused() -> None:
    with pytest.raises(ChatTemplateError, match="nested too deeply"):
        check_template("{% if 1 %}" * 3000 + "{% endif %}" * 3000)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        check_template("{% for m in messages %}")
