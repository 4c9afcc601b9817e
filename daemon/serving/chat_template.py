"""Chat templates: a checkpoint's Jinja2 `chat_template` rendered as transformers renders it,
in a sandbox bounded in time, output size and value sizes.

The environment matches transformers' (`ImmutableSandboxedEnvironment` with `trim_blocks`
and `lstrip_blocks`, the `loopcontrols` extension, a `{% generation %}` block, the globals
`raise_exception`, `strftime_now`, `dict` and `namespace`, and its `tojson` filter that does
not escape HTML), so a template renders the same text. A template comes with a checkpoint,
so it is treated as untrusted code: the sandbox refuses attribute access to internals
(`''.__class__`), and on top of it every `*`, `**`, `+` and `%`, every call, attribute and
item access, and the filters that can grow text (`center`, `indent`, `replace`, `format`,
`tojson(indent=)`) are checked against `MAX_RENDERED_CHARS` and a deadline of
`RENDER_SECONDS`; the parsed template is rewritten so that every `for` iterates through a
guard that checks the deadline and every `~` through one that checks the size. The deadline
is checked, not enforced: one long step between two checks (sorting a long list, one filter
over a big string) runs to its end.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from daemon.shards.model.config import ModelError

MAX_TEMPLATE_CHARS = 256 * 1024
MAX_RENDERED_CHARS = 8 * 1024 * 1024
MAX_INT_BITS = 1 << 16
RENDER_SECONDS = 2.0
MAX_MESSAGES = 100_000
MAX_ROLE_CHARS = 64

# the deadline of the render running in this thread or task, monotonic seconds
_deadline: ContextVar[float] = ContextVar("chat_template_deadline", default=float("inf"))
# calls (macros, filters, methods) nested in the render running here, and their bound
MAX_CALL_DEPTH = 64
_call_depth: ContextVar[int] = ContextVar("chat_template_call_depth", default=0)

# a %-format or str.format width or precision this long could allocate gigabytes
_HUGE_FORMAT = re.compile(r"\d{7,}|%[^a-zA-Z%]*\*")


class TemplateRaised(ModelError):
    """The template itself refused the messages (`raise_exception`), e.g. an unknown role."""


def _tick() -> None:
    if time.monotonic() > _deadline.get():
        raise SecurityError(f"rendering took longer than {RENDER_SECONDS} s")


def _check_size(value: Any) -> Any:
    if isinstance(value, str | bytes | list | tuple | dict) and len(value) > MAX_RENDERED_CHARS:
        raise SecurityError(f"a value of {len(value)} items, over {MAX_RENDERED_CHARS}")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise SecurityError(f"an integer of {value.bit_length()} bits, over {MAX_INT_BITS}")
    return value


def _is_seq(value: Any) -> bool:
    return isinstance(value, str | list | tuple)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        if _is_seq(left) and _is_int(right) or _is_seq(right) and _is_int(left):
            seq, times = (left, right) if _is_seq(left) else (right, left)
            if len(seq) * max(times, 0) > MAX_RENDERED_CHARS:
                raise SecurityError(f"a repetition of {len(seq)} x {times}, too long")
        elif (
            _is_int(left)
            and _is_int(right)
            and left.bit_length() + right.bit_length() > MAX_INT_BITS
        ):
            raise SecurityError("an integer product too large")
    elif operator == "**":
        if (
            _is_int(left)
            and _is_int(right)
            and right > 0
            and abs(left) > 1
            and left.bit_length() * right > MAX_INT_BITS
        ):
            raise SecurityError(f"a power {left} ** {right} too large")
    elif operator == "+":
        if _is_seq(left) and _is_seq(right) and len(left) + len(right) > MAX_RENDERED_CHARS:
            raise SecurityError("a concatenation too long")
    elif operator == "%" and isinstance(left, str) and _HUGE_FORMAT.search(left):
        raise SecurityError(f"a format with a huge or computed width: {left[:40]!r}")


class _Sandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, with sizes and the deadline checked at every hook."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        _check_binop(operator, left, right)
        return _check_size(super().call_binop(context, operator, left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return _check_size(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return _check_size(super().getitem(obj, argument))

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _tick()
        depth = _call_depth.get()
        if depth >= MAX_CALL_DEPTH:  # a macro calling itself: refused long before the
            # interpreter's own limit, whose C stack can overflow first in a worker thread
            raise SecurityError(f"calls nested deeper than {MAX_CALL_DEPTH}")
        token = _call_depth.set(depth + 1)
        try:
            return _check_size(super().call(context, obj, *args, **kwargs))
        finally:
            _call_depth.reset(token)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = _Guards().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree

    def wrap_str_format(self, value: Any) -> Any:
        """`'...'.format`: refused when the format string asks for a huge width."""
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            text = getattr(value, "__self__", "")
            if isinstance(text, str) and _HUGE_FORMAT.search(text):
                raise SecurityError(f"a format with a huge width: {text[:40]!r}")
        return wrapped


_LOOP_GUARD = "gridmesh_loop_guard"
_SIZE_GUARD = "gridmesh_size_guard"


def _loop_guard(iterable: Any) -> Any:
    """Every `for` of a template iterates through this: the deadline is checked every 256
    items, so that nested loops that neither call nor look anything up still end."""
    for count, item in enumerate(iterable):
        if not count & 255:
            _tick()
        yield item


def _size_guard(value: Any) -> Any:
    """Every `~` of a template goes through this: a doubling chain stops at the limit."""
    _tick()
    return _check_size(value)


def _guarded(name: str, node: nodes.Expr) -> nodes.Expr:
    return nodes.Call(
        nodes.Name(name, "load", lineno=node.lineno), [node], [], None, None, lineno=node.lineno
    )


class _Guards(NodeTransformer):
    """Rewrites a parsed template: `for x in E` -> `for x in guard(E)`, `a ~ b` ->
    `guard(a ~ b)`."""

    def visit_For(self, node: nodes.For) -> nodes.Node:  # noqa: N802 (the visitor's naming)
        node = self.generic_visit(node)
        node.iter = _guarded(_LOOP_GUARD, node.iter)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:  # noqa: N802
        return _guarded(_SIZE_GUARD, self.generic_visit(node))


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant tokens with it;
    here the body is rendered as it is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Namespace(Namespace):
    """`namespace()` that refuses underscore names, as transformers' does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Namespace's own trick)
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace attribute may not start with '_': {name!r}")


class _Dict:
    """`dict(...)` in templates, without exposing the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: Any) -> None:
    raise TemplateRaised(f"the chat template refused these messages: {message}")


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > 256:
        raise SecurityError("strftime_now takes a format string of at most 256 characters")
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson`: json.dumps, no HTML escaping; the indent is bounded."""
    size = len(indent) if isinstance(indent, str) else indent
    if _is_int(size) and size > 64:
        raise SecurityError("tojson: indent over 64")
    text = json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    return _check_size(text)


def _bounded_width(name: str, width: Any) -> None:
    size = len(width) if isinstance(width, str) else width
    if _is_int(size) and size > MAX_RENDERED_CHARS // 64:
        raise SecurityError(f"{name}: width {size} too large")


def _wrap_filters(env: jinja2.Environment) -> None:
    center, indent, replace, fmt = (
        env.filters[n] for n in ("center", "indent", "replace", "format")
    )

    def bounded_center(value: Any, width: int = 80) -> str:
        _bounded_width("center", width)
        return center(value, width)

    def bounded_indent(value: Any, width: int | str = 4, *args: Any, **kwargs: Any) -> str:
        _bounded_width("indent", width)
        return _check_size(indent(value, width, *args, **kwargs))

    def bounded_replace(ctx: Any, value: Any, old: Any, new: Any, count: Any = None) -> Any:
        text, old_s, new_s = str(value), str(old), str(new)
        times = text.count(old_s) if old_s else len(text) + 1
        if _is_int(count) and count >= 0:
            times = min(times, count)
        if len(text) + times * max(len(new_s) - len(old_s), 0) > MAX_RENDERED_CHARS:
            raise SecurityError("replace: the result would be too long")
        return replace(ctx, value, old, new, count)

    def bounded_format(value: Any, *args: Any, **kwargs: Any) -> str:
        if isinstance(value, str) and _HUGE_FORMAT.search(value):
            raise SecurityError(f"format: a huge width in {value[:40]!r}")
        return _check_size(fmt(value, *args, **kwargs))

    bounded_replace.jinja_pass_arg = replace.jinja_pass_arg  # type: ignore[attr-defined]
    env.filters.update(
        center=bounded_center, indent=bounded_indent, replace=bounded_replace, format=bounded_format
    )


def _environment() -> jinja2.Environment:
    env = _Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    _wrap_filters(env)
    env.globals.pop("lipsum", None)  # writes as much text as asked
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_Dict(),
        namespace=_Namespace,
        **{_LOOP_GUARD: _loop_guard, _SIZE_GUARD: _size_guard},
    )
    return env


_ENV = _environment()


def _plain(value: Any, where: str, depth: int = 0) -> Any:
    """A JSON-plain copy (str, int, float, bool, None, lists, str-keyed dicts) of what a
    caller passes into a template, so nothing with methods reaches it."""
    if depth > 32:
        raise ModelError(f"{where}: nested too deeply")
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ModelError(f"{where}: keys must be strings, got {key!r}")
            out[key] = _plain(item, where, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_plain(item, where, depth + 1) for item in value]
    raise ModelError(f"{where}: unsupported value of type {type(value).__name__}")


def _content(content: Any, index: int) -> str | None:
    """A message's content: a string, None, or OpenAI text parts (joined with newlines, as
    vLLM does for text-only templates)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list | tuple):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ModelError(
                    f"messages[{index}].content: only text parts are supported, got {kind!r}"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise ModelError(f"messages[{index}].content: a text part needs a string 'text'")
            texts.append(text)
        return "\n".join(texts)
    raise ModelError(
        f"messages[{index}].content must be a string or a list of text parts, "
        f"got {type(content).__name__}"
    )


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validated chat messages as a template sees them: `role` a non-empty string, `content`
    a string (text parts joined), other fields JSON-plain; None values dropped as
    transformers drops them."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ModelError("messages must be a non-empty list")
    if len(messages) > MAX_MESSAGES:
        raise ModelError(f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ModelError(f"messages[{index}] must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role or len(role) > MAX_ROLE_CHARS:
            raise ModelError(
                f"messages[{index}].role must be a non-empty string of at most "
                f"{MAX_ROLE_CHARS} characters, got {role!r}"
            )
        clean = _plain(
            {k: v for k, v in message.items() if k not in ("role", "content") and v is not None},
            f"messages[{index}]",
        )
        clean["role"] = role
        content = _content(message.get("content"), index)
        if content is not None:
            clean["content"] = content
        out.append(clean)
    return out


class ChatTemplate:
    """One compiled chat template; `render` is safe to call from several threads."""

    def __init__(self, source: str) -> None:
        if not isinstance(source, str):
            raise ModelError(f"chat template must be a string, got {type(source).__name__}")
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ModelError(
                f"chat template of {len(source)} characters, over the limit of {MAX_TEMPLATE_CHARS}"
            )
        self.source = source
        try:
            self._template = _ENV.from_string(source)
        except TemplateError as exc:
            raise ModelError(f"chat template does not compile: {exc}") from None
        except (RecursionError, MemoryError, ValueError) as exc:
            raise ModelError(f"chat template does not compile: {exc!r}") from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        """The template's text for `messages` (normalised here) with `variables` (the special
        tokens, chat_template_kwargs); every failure is a `ModelError` (`TemplateRaised`
        when the template called `raise_exception`)."""
        context = {
            **_plain(dict(variables or {}), "template variables"),
            "messages": normalize_messages(messages),
            "tools": None,
            "documents": None,
            "add_generation_prompt": bool(add_generation_prompt),
        }
        token = _deadline.set(time.monotonic() + RENDER_SECONDS)
        try:
            parts: list[str] = []
            total = 0
            for chunk in self._template.generate(**context):
                total += len(chunk)
                if total > MAX_RENDERED_CHARS:
                    raise SecurityError(f"output over {MAX_RENDERED_CHARS} characters")
                parts.append(chunk)
                _tick()
            return "".join(parts)
        except TemplateRaised:
            raise
        except ModelError:
            raise
        except TemplateError as exc:
            raise ModelError(f"chat template failed: {exc}") from None
        except (RecursionError, MemoryError) as exc:
            raise ModelError(f"chat template failed: {type(exc).__name__}") from None
        except Exception as exc:  # a template is code: any error it makes is its own
            raise ModelError(f"chat template failed: {type(exc).__name__}: {exc}") from None
        finally:
            _deadline.reset(token)
