"""The chat template sandbox: transformers' environment (globals, filters, extensions), and
hostile templates refused, bounded in time and size, leaking nothing."""

from __future__ import annotations

import pytest

pytest.importorskip("jinja2")

from daemon.serving import chat_template as ct  # noqa: E402
from daemon.serving.text import ModelText  # noqa: E402
from daemon.shards.model import ModelError  # noqa: E402
from tests.daemon.serving.text_helpers import (  # noqa: E402
    make_checkpoints,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("text"))


# -- the sandbox --------------------------------------------------------------------------------


def _render(source, **variables):
    return ct.ChatTemplate(source).render(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, variables=variables
    )


@pytest.mark.parametrize(
    "source,match",
    [
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{{ cycler.__init__.__globals__['os'] }}", "unsafe"),
        ("{% set x = messages.append(1) %}", "unsafe|modif"),
        ("{{ 'a' * 100000000 }}", "repetition"),
        ("{{ [1] * 100000000 }}", "repetition"),
        ("{{ 2 ** 1000000000 }}", "power"),
        ("{{ '%100000000d' % 1 }}", "huge"),
        ("{{ '%*d' % (100000000, 1) }}", "huge"),
        ("{{ '{:>100000000}'.format(1) }}", "huge"),
        ("{{ '%100000000d' | format(1) }}", "huge"),
        ("{{ 'a' | center(100000000) }}", "width"),
        ("{{ 'a' | indent(100000000) }}", "width"),
        ("{{ messages | tojson(indent=100000000) }}", "indent"),
        ("{{ lipsum(100000) }}", "undefined|not callable|lipsum"),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
            "items",
        ),
        ("{{ ('a' * 4000000) | replace('a', 'aaaa') }}", "replace"),
        ("{% set s = 'ab' %}" + "{% set s = s ~ s %}" * 40 + "{{ s | length }}", "items"),
        ("{% set ns = namespace(_x=1) %}", "may not start"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "nested deeper than 64"),
        ("{% macro f(n) %}{{ f(n) ~ f(n) }}{% endmacro %}{{ f(1) }}", "nested deeper than 64"),
        ("{{ undefined_thing.attr }}", "undefined"),
        ("{% include 'x.txt' %}", "loader|not found"),
        ("{% import 'os' as os %}", "loader|not found"),
    ],
)
def test_sandbox_refuses(source, match):
    with pytest.raises(ModelError, match=match):
        _render(source)


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ namespace.__init__ }}",
        "{{ dict.__call__.__globals__ }}",
        "{{ ''.format.__self__.__class__ }}",
        "{{ strftime_now.__code__ }}",
        "{{ messages | map(attribute='__class__') | list }}",
        "{{ messages | attr('__class__') }}",
        "{{ self.__init__ }}",
    ],
)
def test_sandbox_leaks_nothing(source):
    """Internals are either refused or read as undefined (empty), never rendered."""
    try:
        out = _render(source)
    except ModelError as exc:
        assert "unsafe" in str(exc) or "undefined" in str(exc)
    else:
        assert "<" not in out and "function" not in out and "class" not in out, out


def test_sandbox_bounds_time_and_output(monkeypatch):
    monkeypatch.setattr(ct, "RENDER_SECONDS", 0.2)
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(ModelError, match="longer than 0.2 s"):
        _render(slow)
    # loops that call nothing: the loop guard checks the deadline
    quiet = (
        "{% set s = 'a' * 10000 %}{% for a in s %}{% for b in s %}{% for c in s %}"
        "{% endfor %}{% endfor %}{% endfor %}"
    )
    with pytest.raises(ModelError, match="longer than 0.2 s"):
        _render(quiet)
    monkeypatch.setattr(ct, "MAX_RENDERED_CHARS", 1000)
    with pytest.raises(ModelError, match="output over 1000"):
        _render("{% for i in range(100) %}{{ 'x' * 20 }}{% endfor %}")


def test_template_globals_as_transformers(checkpoints):
    from datetime import datetime

    year = datetime.now().strftime("%Y")
    assert _render("{{ strftime_now('%Y') }}") in (year, str(int(year) + 1))
    assert _render("{{ {'a': '<é>'} | tojson }}") == '{"a": "<é>"}'
    assert _render("{{ dict(a=1) | tojson }}") == '{"a": 1}'
    assert _render("{{ bos_token }}|{{ tools }}", bos_token="<s>") == "<s>|None"
    assert _render("{% for m in messages %}{{ m.role }}{% break %}{% endfor %}") == "user"
    text = ModelText.load(checkpoints["chatml"])
    out = text.render_chat(
        [{"role": "user", "content": "x"}],
        template_kwargs={"add_generation_prompt": False},
    )
    assert "<|im_start|>assistant" in out  # add_generation_prompt is ours to set
