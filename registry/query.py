"""The filter language of `registry_list` and `gridmesh get --filter`.

A filter is a boolean expression over one registry record, in the style of AIOS search::

    minInstances >= 2 AND (author == "12D3KooW..." OR labels.team IN ('ml', 'infra'))
    NOT kind == 'blocks' or value.model LIKE 'llama-%'

Grammar (keywords are case-insensitive; AND binds tighter than OR, NOT tighter than both)::

    filter     := or_expr
    or_expr    := and_expr ("OR" and_expr)*
    and_expr   := not_expr ("AND" not_expr)*
    not_expr   := "NOT" not_expr | "(" or_expr ")" | comparison
    comparison := FIELD ("==" | "!=" | "<" | "<=" | ">" | ">=") VALUE
                | FIELD ["NOT"] "IN" "(" VALUE ("," VALUE)* ")"
                | FIELD ["NOT"] "LIKE" STRING
    FIELD      := identifier ("." segment)*      e.g. minInstances, value.parameters.gpu, layers.0
    VALUE      := NUMBER | STRING | true | false | null

Strings take single or double quotes and the escapes ``\\\\ \\' \\" \\n \\t \\r \\uXXXX``;
``\\%`` and ``\\_`` stay in the string as written, so that LIKE sees an escaped wildcard.
LIKE is case-sensitive: ``%`` matches any run of characters, ``_`` exactly one, and a
backslash makes the next character literal. Matching never backtracks exponentially: it
costs at most O(len(text) * len(pattern)).

Semantics (SQL-like, so that a filter never raises on odd data):

- A field is looked up by its dotted path in the record; if the path's first segment is not
  a key of the record and the record has a dict ``value``, it is looked up there instead
  (``minInstances`` means ``value.minInstances`` for an entry record). A numeric segment
  also indexes a list.
- A missing field makes every comparison false, whatever the operator (``!=``, ``NOT IN``
  and ``NOT LIKE`` included); ``NOT (comparison)`` of it is therefore true.
- Equality never raises: values of different types are unequal, so ``==`` is false and
  ``!=`` true. Booleans are not numbers (``true != 1``); ints and floats compare by value.
- Ordering (``< <= > >=``) only holds between two numbers or two strings; any other pair
  is false. LIKE and NOT LIKE are false for non-strings.

Errors are `QueryError` (a ValueError) naming what was expected and the 0-based character
position, e.g. ``expected a value after '==' at position 16``.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_COMPARISONS",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "And",
    "Compare",
    "Expr",
    "In",
    "Like",
    "Not",
    "Or",
    "QueryError",
    "Scalar",
    "compile_filter",
    "evaluate",
    "parse",
]

MAX_LENGTH = 4096
MAX_DEPTH = 32
MAX_COMPARISONS = 256

Scalar = str | int | float | bool | None

COMPARISON_OPS = ("==", "!=", "<", "<=", ">", ">=")
_KEYWORDS = frozenset({"AND", "OR", "NOT", "IN", "LIKE", "TRUE", "FALSE", "NULL"})
_LITERAL_KEYWORDS: dict[str, Scalar] = {"TRUE": True, "FALSE": False, "NULL": None}
_OP_CHARS = frozenset("=!<>~")
_OP_HINTS = {"=": "'=='", "<>": "'!='", "=<": "'<='", "=>": "'>='", "===": "'=='"}
_EXPECTED_OPS = "==, !=, <, <=, >, >=, IN, NOT IN, LIKE or NOT LIKE"

_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*")
_NUMBER_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_SIMPLE_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t", "r": "\r"}
_HEX = frozenset("0123456789abcdefABCDEF")


class QueryError(ValueError):
    """A filter that cannot be parsed. `position` is a 0-based character offset or None."""

    def __init__(self, message: str, position: int | None = None, note: str = "") -> None:
        if position is not None:
            message = f"{message} at position {position}"
        if note:
            message = f"{message} ({note})"
        super().__init__(message)
        self.position = position


# --------------------------------------------------------------------------- the AST


def _render_path(path: tuple[str, ...]) -> str:
    return ".".join(path)


def _render_literal(value: Scalar) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    out = ['"']
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


@dataclass(frozen=True)
class Compare:
    """``field <op> value`` with op one of ``== != < <= > >=``."""

    path: tuple[str, ...]
    op: str
    value: Scalar

    def __str__(self) -> str:
        return f"{_render_path(self.path)} {self.op} {_render_literal(self.value)}"


@dataclass(frozen=True)
class In:
    """``field [NOT] IN (v1, v2, ...)``."""

    path: tuple[str, ...]
    values: tuple[Scalar, ...]
    negated: bool = False

    def __str__(self) -> str:
        word = "NOT IN" if self.negated else "IN"
        items = ", ".join(_render_literal(v) for v in self.values)
        return f"{_render_path(self.path)} {word} ({items})"


@dataclass(frozen=True)
class Like:
    """``field [NOT] LIKE 'pattern'``; the pattern is checked and compiled on creation."""

    path: tuple[str, ...]
    pattern: str
    negated: bool = False
    _matcher: _LikeMatcher = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_matcher", _LikeMatcher(self.pattern))

    def matches(self, text: str) -> bool:
        return self._matcher.match(text)

    def __str__(self) -> str:
        word = "NOT LIKE" if self.negated else "LIKE"
        return f"{_render_path(self.path)} {word} {_render_literal(self.pattern)}"


@dataclass(frozen=True)
class Not:
    operand: Expr

    def __str__(self) -> str:
        if isinstance(self.operand, And | Or):
            return f"NOT ({self.operand})"
        return f"NOT {self.operand}"


@dataclass(frozen=True)
class And:
    operands: tuple[Expr, ...]

    def __str__(self) -> str:
        return " AND ".join(
            f"({op})" if isinstance(op, And | Or) else str(op) for op in self.operands
        )


@dataclass(frozen=True)
class Or:
    operands: tuple[Expr, ...]

    def __str__(self) -> str:
        return " OR ".join(f"({op})" if isinstance(op, Or) else str(op) for op in self.operands)


Expr = Compare | In | Like | Not | And | Or


# --------------------------------------------------------------------------- LIKE


class _LikeMatcher:
    """SQL LIKE without building a backtracking regex from user text.

    The pattern is split at unescaped ``%`` into fixed-length segments (literals and ``_``).
    The first segment must match at the start, the last at the end, and the ones between are
    found left to right, each at its leftmost place: that greedy choice is always correct for
    ``%``-separated segments, so there is no backtracking. A segment becomes a regex only of
    escaped literals and ``.`` (no quantifiers).
    """

    __slots__ = ("_segments",)

    def __init__(self, pattern: str) -> None:
        segments: list[list[str | None]] = [[]]
        i = 0
        while i < len(pattern):
            ch = pattern[i]
            if ch == "\\":
                if i + 1 >= len(pattern):
                    raise QueryError("LIKE pattern ends with a lone escape '\\'")
                segments[-1].append(pattern[i + 1])
                i += 2
                continue
            if ch == "%":
                segments.append([])
            elif ch == "_":
                segments[-1].append(None)
            else:
                segments[-1].append(ch)
            i += 1
        self._segments = tuple(_Segment(s) for s in segments)

    def match(self, text: str) -> bool:
        segs = self._segments
        n = len(text)
        if len(segs) == 1:
            return n == segs[0].length and segs[0].match_at(text, 0)
        first, last = segs[0], segs[-1]
        end = n - last.length
        if first.length > end or not first.match_at(text, 0):
            return False
        pos = first.length
        for seg in segs[1:-1]:
            if seg.length == 0:
                continue
            found = seg.search(text, pos, end)
            if found < 0:
                return False
            pos = found + seg.length
        return pos <= end and last.match_at(text, end)


class _Segment:
    __slots__ = ("length", "literal", "regex")

    def __init__(self, items: list[str | None]) -> None:
        self.length = len(items)
        if all(item is not None for item in items):
            self.literal: str | None = "".join(items)  # type: ignore[arg-type]
            self.regex: re.Pattern[str] | None = None
        else:
            self.literal = None
            body = "".join("." if item is None else re.escape(item) for item in items)
            self.regex = re.compile(body, re.DOTALL)

    def match_at(self, text: str, pos: int) -> bool:
        if self.literal is not None:
            return text.startswith(self.literal, pos)
        assert self.regex is not None
        return self.regex.match(text, pos) is not None

    def search(self, text: str, start: int, end: int) -> int:
        """Leftmost index >= start where the segment fits wholly before `end`, or -1."""
        if self.literal is not None:
            return text.find(self.literal, start, end)
        assert self.regex is not None
        found = self.regex.search(text, start, end)
        return -1 if found is None else found.start()


# --------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class _Tok:
    kind: str  # FIELD NUM STR LIT OP KW LP RP COMMA END
    pos: int
    raw: str
    value: Any = None

    def show(self) -> str:
        if self.kind == "END":
            return "the end of the filter"
        raw = self.raw if len(self.raw) <= 32 else self.raw[:29] + "..."
        return repr(raw)


def _tokenize(text: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    n = len(text)
    i = 0
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
            continue
        start = i
        if ch == "(":
            tokens.append(_Tok("LP", i, ch))
            i += 1
        elif ch == ")":
            tokens.append(_Tok("RP", i, ch))
            i += 1
        elif ch == ",":
            tokens.append(_Tok("COMMA", i, ch))
            i += 1
        elif ch in _OP_CHARS:
            while i < n and text[i] in _OP_CHARS:
                i += 1
            op = text[start:i]
            if op not in COMPARISON_OPS:
                hint = f"; did you mean {_OP_HINTS[op]}?" if op in _OP_HINTS else ""
                raise QueryError(
                    f"unknown operator {op!r}", start, f"expected one of {_EXPECTED_OPS}{hint}"
                )
            tokens.append(_Tok("OP", start, op, op))
        elif ch in "'\"":
            value, i = _read_string(text, i)
            tokens.append(_Tok("STR", start, text[start:i], value))
        elif ch.isascii() and (
            ch.isdigit() or (ch == "-" and i + 1 < n and text[i + 1] in "0123456789")
        ):
            m = _NUMBER_RE.match(text, i)
            assert m is not None
            i = m.end()
            if i < n and _is_word_char(text[i]):
                while i < n and _is_word_char(text[i]):
                    i += 1
                raise QueryError(f"malformed number {text[start:i][:32]!r}", start)
            tokens.append(_Tok("NUM", start, m.group(), _number(m.group(), start)))
        elif ch == "_" or (ch.isascii() and ch.isalpha()):
            m = _IDENT_RE.match(text, i)
            assert m is not None
            i = m.end()
            if i < n and text[i] == ".":
                raise QueryError(f"expected a field name after '{m.group()}.'", i + 1)
            word = m.group()
            upper = word.upper()
            if upper in _LITERAL_KEYWORDS:
                tokens.append(_Tok("LIT", start, word, _LITERAL_KEYWORDS[upper]))
            elif upper in _KEYWORDS:
                tokens.append(_Tok("KW", start, word, upper))
            else:
                tokens.append(_Tok("FIELD", start, word, tuple(word.split("."))))
        else:
            hint = ""
            if ch in "&|":
                hint = "use AND / OR"
            elif ch == "`":
                hint = "quote strings with ' or \""
            raise QueryError(f"unexpected character {ch!r}", start, hint)
    tokens.append(_Tok("END", n, ""))
    return tokens


def _is_word_char(ch: str) -> bool:
    return ch in "._" or (ch.isascii() and ch.isalnum())


def _number(raw: str, pos: int) -> int | float:
    if "." in raw or "e" in raw or "E" in raw:
        value = float(raw)
        if not math.isfinite(value):
            raise QueryError(f"number {raw[:32]!r} is out of range", pos)
        return value
    return int(raw)


def _read_string(text: str, start: int) -> tuple[str, int]:
    """Read the quoted string at `start`; return its value and the index after it."""
    quote = text[start]
    n = len(text)
    out: list[str] = []
    i = start + 1
    while i < n:
        ch = text[i]
        if ch == quote:
            return "".join(out), i + 1
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= n:
            break
        esc = text[i + 1]
        if esc in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[esc])
            i += 2
        elif esc in "%_":
            out.append("\\" + esc)  # kept for LIKE: an escaped wildcard
            i += 2
        elif esc == "u":
            digits = text[i + 2 : i + 6]
            if len(digits) != 4 or not all(d in _HEX for d in digits):
                raise QueryError("expected 4 hex digits after '\\u'", i)
            code = int(digits, 16)
            if 0xD800 <= code <= 0xDFFF:
                raise QueryError(f"invalid character '\\u{digits}' (a surrogate)", i)
            out.append(chr(code))
            i += 6
        else:
            raise QueryError(f"unknown escape '\\{esc}' in string", i)
    raise QueryError("unterminated string starting", start, f"expected a closing {quote}")


# --------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, tokens: list[_Tok]) -> None:
        self.tokens = tokens
        self.i = 0
        self.depth = 0
        self.comparisons = 0

    def peek(self) -> _Tok:
        return self.tokens[self.i]

    def advance(self) -> _Tok:
        tok = self.tokens[self.i]
        if tok.kind != "END":
            self.i += 1
        return tok

    def previous(self) -> _Tok | None:
        return self.tokens[self.i - 1] if self.i > 0 else None

    def is_kw(self, word: str) -> bool:
        tok = self.peek()
        return tok.kind == "KW" and tok.value == word

    def enter(self, pos: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise QueryError(f"filter nests too deeply (limit {MAX_DEPTH})", pos)

    def fail(self, expected: str, note: str = "") -> QueryError:
        """`expected ... after 'X' at position N, found 'Y'` for the current token."""
        tok = self.peek()
        prev = self.previous()
        msg = f"expected {expected}"
        if prev is not None:
            msg += f" after {prev.show()}"
        if tok.kind != "END":
            return QueryError(f"{msg}, found {tok.show()}", tok.pos, note)
        return QueryError(msg, tok.pos, note)

    def parse(self) -> Expr:
        expr = self.or_expr()
        tok = self.peek()
        if tok.kind == "RP":
            raise QueryError("unbalanced ')'", tok.pos, "no '(' to close")
        if tok.kind != "END":
            raise QueryError(
                f"expected AND, OR or the end of the filter, found {tok.show()}", tok.pos
            )
        return expr

    def or_expr(self) -> Expr:
        items = [self.and_expr()]
        while self.is_kw("OR"):
            self.advance()
            items.append(self.and_expr())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def and_expr(self) -> Expr:
        items = [self.not_expr()]
        while self.is_kw("AND"):
            self.advance()
            items.append(self.not_expr())
        return items[0] if len(items) == 1 else And(tuple(items))

    def not_expr(self) -> Expr:
        tok = self.peek()
        if tok.kind == "KW" and tok.value == "NOT":
            self.advance()
            self.enter(tok.pos)
            inner = self.not_expr()
            self.depth -= 1
            return Not(inner)
        if tok.kind == "LP":
            self.advance()
            self.enter(tok.pos)
            inner = self.or_expr()
            if self.peek().kind != "RP":
                raise self.fail("')'", f"to close the '(' at position {tok.pos}")
            self.advance()
            self.depth -= 1
            return inner
        if tok.kind == "FIELD":
            return self.comparison()
        if tok.kind in ("NUM", "STR", "LIT"):
            raise QueryError(
                f"expected a field name before {tok.show()}", tok.pos, "the field goes on the left"
            )
        raise self.fail("a comparison, NOT or '('")

    def comparison(self) -> Expr:
        field_tok = self.advance()
        path: tuple[str, ...] = field_tok.value
        self.comparisons += 1
        if self.comparisons > MAX_COMPARISONS:
            raise QueryError(f"too many comparisons (limit {MAX_COMPARISONS})", field_tok.pos)
        tok = self.peek()
        if tok.kind == "OP":
            self.advance()
            return Compare(path, tok.value, self.literal())
        negated = False
        if self.is_kw("NOT"):
            self.advance()
            negated = True
            if not (self.is_kw("IN") or self.is_kw("LIKE")):
                raise self.fail("IN or LIKE")
        if self.is_kw("IN"):
            self.advance()
            return In(path, self.literal_list(), negated)
        if self.is_kw("LIKE"):
            self.advance()
            pat = self.peek()
            if pat.kind != "STR":
                raise self.fail("a quoted pattern")
            self.advance()
            try:
                return Like(path, pat.value, negated)
            except QueryError as exc:
                raise QueryError(str(exc), pat.pos) from None
        raise self.fail(f"an operator ({_EXPECTED_OPS})")

    def literal(self) -> Scalar:
        tok = self.peek()
        if tok.kind in ("NUM", "STR", "LIT"):
            self.advance()
            return tok.value  # type: ignore[no-any-return]
        if tok.kind == "FIELD":
            prev = self.previous()
            after = f" after {prev.show()}" if prev is not None else ""
            raise QueryError(
                f"expected a value{after}, found field name {tok.show()}",
                tok.pos,
                "quote strings; a field is compared with a value, not another field",
            )
        raise self.fail("a value")

    def literal_list(self) -> tuple[Scalar, ...]:
        if self.peek().kind != "LP":
            raise self.fail("'(' to start the IN list")
        self.advance()
        items = [self.literal()]
        while True:
            tok = self.peek()
            if tok.kind == "RP":
                self.advance()
                return tuple(items)
            if tok.kind != "COMMA":
                raise self.fail("',' or ')' in the IN list")
            self.advance()
            items.append(self.literal())


def parse(text: str) -> Expr:
    """Parse a filter into an immutable AST; raise QueryError on anything malformed."""
    if not isinstance(text, str):
        raise QueryError(f"a filter must be a string, not {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise QueryError(f"filter is too long: {len(text)} characters (limit {MAX_LENGTH})")
    return _Parser(_tokenize(text)).parse()


# --------------------------------------------------------------------------- evaluation

_MISSING = object()
_ORDER_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _resolve(record: Any, path: tuple[str, ...]) -> Any:
    if not isinstance(record, dict) or not path:
        return _MISSING
    current: Any = record
    if path[0] not in record:
        inner = record.get("value")
        if not isinstance(inner, dict):
            return _MISSING
        current = inner
    for seg in path:
        if isinstance(current, dict):
            if seg not in current:
                return _MISSING
            current = current[seg]
        elif isinstance(current, list) and seg.isascii() and seg.isdigit() and len(seg) <= 18:
            index = int(seg)
            if index >= len(current):
                return _MISSING
            current = current[index]
        else:
            return _MISSING
    return current


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _equal(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return False


def evaluate(expr: Expr, record: dict[str, Any]) -> bool:
    """True if `record` satisfies `expr` (see the module docstring for the semantics)."""
    if isinstance(expr, And):
        return all(evaluate(e, record) for e in expr.operands)
    if isinstance(expr, Or):
        return any(evaluate(e, record) for e in expr.operands)
    if isinstance(expr, Not):
        return not evaluate(expr.operand, record)
    value = _resolve(record, expr.path)
    if value is _MISSING:
        return False
    if isinstance(expr, Compare):
        if expr.op == "==":
            return _equal(value, expr.value)
        if expr.op == "!=":
            return not _equal(value, expr.value)
        compare = _ORDER_OPS[expr.op]
        if _is_number(value) and _is_number(expr.value):
            return compare(value, expr.value)
        if isinstance(value, str) and isinstance(expr.value, str):
            return compare(value, expr.value)
        return False
    if isinstance(expr, In):
        found = any(_equal(value, v) for v in expr.values)
        return found != expr.negated
    if isinstance(expr, Like):
        if not isinstance(value, str):
            return False
        return expr.matches(value) != expr.negated
    raise TypeError(f"not a filter expression: {type(expr).__name__}")


def compile_filter(text: str | None) -> Callable[[dict[str, Any]], bool]:
    """A predicate for `text`; None or a blank filter accepts every record."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return _accept_all
    expr = parse(text)

    def predicate(record: dict[str, Any]) -> bool:
        return evaluate(expr, record)

    return predicate


def _accept_all(record: dict[str, Any]) -> bool:
    return True
