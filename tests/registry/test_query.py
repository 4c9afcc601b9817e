"""The registry filter language: parsing, evaluation, errors, and fuzzing."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from registry import query
from registry.query import (
    And,
    Compare,
    In,
    Like,
    Not,
    Or,
    QueryError,
    compile_filter,
    evaluate,
    parse,
)

ENTRY: dict[str, Any] = {
    "kind": "blocks",
    "key": "llama-shard-0",
    "author": "12D3KooWAuthor",
    "updated_at": 1700000000.5,
    "value": {
        "blockId": "llama-shard-0",
        "minInstances": 2,
        "maxInstances": 8,
        "model": "llama-3-8b",
        "ratio": 0.75,
        "enabled": True,
        "note": None,
        "layers": [0, 16],
        "parameters": {"gpu": "H100", "vram_gb": 24},
        "labels": {"team": "ml"},
        "path": "50%_off\\x",
    },
}


def matches(text: str, record: dict[str, Any] = ENTRY) -> bool:
    return compile_filter(text)(record)


# --------------------------------------------------------------------------- operators


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("minInstances == 2", True),
        ("minInstances == 2.0", True),
        ("minInstances == 3", False),
        ("minInstances != 3", True),
        ("minInstances != 2", False),
        ("minInstances < 3", True),
        ("minInstances < 2", False),
        ("minInstances <= 2", True),
        ("minInstances > 1", True),
        ("minInstances > 2", False),
        ("minInstances >= 2", True),
        ("minInstances >= 2.5", False),
        ("ratio > 0.5", True),
        ("ratio < -1", False),
        ("minInstances > -10", True),
        ("updated_at >= 1.7e9", True),
        ("model == 'llama-3-8b'", True),
        ('model == "llama-3-8b"', True),
        ("model < 'm'", True),
        ("model >= 'm'", False),
        ("enabled == true", True),
        ("enabled != false", True),
        ("note == null", True),
        ("note != null", False),
        ("kind == 'blocks'", True),
        ("key == 'llama-shard-0'", True),
        ("author == '12D3KooWAuthor'", True),
    ],
)
def test_comparisons(text: str, expected: bool) -> None:
    assert matches(text) is expected


def test_in_lists() -> None:
    assert matches("model IN ('mistral', 'llama-3-8b')")
    assert not matches("model IN ('mistral', 'phi')")
    assert matches("minInstances IN (1, 2, 3)")
    assert matches("minInstances in (2.0)")
    assert matches("model NOT IN ('mistral', 3, null)")
    assert not matches("model not in ('llama-3-8b')")
    assert matches("note IN (1, null)")
    assert matches("enabled IN (true)")
    assert not matches("enabled IN (1)")  # booleans are not numbers
    assert matches("minInstances IN ('2', 2)")
    assert not matches("minInstances IN ('2')")


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("llama%", True),
        ("%8b", True),
        ("%-3-%", True),
        ("llama-3-8b", True),
        ("llama-_-8b", True),
        ("llama-__-8b", False),
        ("_lama%", True),
        ("Llama%", False),  # case-sensitive
        ("%", True),
        ("%%", True),
        ("llama", False),
        ("%llama", False),
        ("l%a%a%8b", True),
        ("l%z%", False),
        ("____________", False),
        ("__________", True),
    ],
)
def test_like(pattern: str, expected: bool) -> None:
    assert matches(f"model LIKE '{pattern}'") is expected
    assert matches(f"model NOT LIKE '{pattern}'") is (not expected)


def test_like_escaping() -> None:
    # ENTRY path is the 9 characters: 5 0 % _ o f f \ x
    assert matches(r"path LIKE '50\%\_off%'")
    assert not matches(r"path LIKE '5\%%'")
    assert matches(r"path LIKE '%\\\\x'")  # \\\\ in the string is \\ in LIKE: one backslash
    assert matches(r"path LIKE '%off_x'")
    assert not matches(r"path LIKE '50\%\_of'")
    # regex metacharacters in a pattern are plain characters
    rec = {"value": {"s": "a.b*c[d]+(e)?$^|"}}
    assert matches("s LIKE 'a.b*c[d]+(e)?$^|'", rec)
    assert not matches("s LIKE 'a.b*c[d]+(e)?$^'", rec)
    assert not matches("s LIKE 'axb%'", rec)
    assert matches("s LIKE 'a_b%'", {"value": {"s": "a\nb"}})


def test_like_is_not_catastrophic() -> None:
    text = "a" * 200_000
    record = {"s": text}
    pattern = "%a" * 60 + "%b"
    start = time.perf_counter()
    assert not matches(f"s LIKE '{pattern}'", record)
    assert not matches("s LIKE '%" + "_" * 50 + "b%'", record)
    assert matches("s LIKE '" + "%a_" * 100 + "%'", record)
    assert time.perf_counter() - start < 5


def test_like_on_non_strings_is_false() -> None:
    assert not matches("minInstances LIKE '2'")
    assert not matches("minInstances NOT LIKE '2'")
    assert not matches("parameters LIKE '%'")


# --------------------------------------------------------------------------- structure


def test_precedence_and_binds_tighter_than_or() -> None:
    assert parse("a == 1 OR b == 2 AND c == 3") == Or(
        (Compare(("a",), "==", 1), And((Compare(("b",), "==", 2), Compare(("c",), "==", 3))))
    )
    rec = {"a": 1, "b": 0, "c": 0}
    assert matches("a == 1 OR b == 2 AND c == 3", rec)
    assert not matches("(a == 1 OR b == 2) AND c == 3", rec)


def test_not_binds_tightest() -> None:
    assert parse("NOT a == 1 AND b == 2") == And(
        (Not(Compare(("a",), "==", 1)), Compare(("b",), "==", 2))
    )
    assert parse("NOT (a == 1 AND b == 2)") == Not(
        And((Compare(("a",), "==", 1), Compare(("b",), "==", 2)))
    )
    assert parse("not not a == 1") == Not(Not(Compare(("a",), "==", 1)))
    rec = {"a": 1, "b": 3}
    assert not matches("NOT a == 1 AND b == 2", rec)
    assert matches("NOT (a == 1 AND b == 2)", rec)


def test_parentheses_nest() -> None:
    assert parse("((a == 1))") == Compare(("a",), "==", 1)
    expr = parse("(a == 1 OR (b == 2 AND (c == 3 OR d == 4)))")
    assert isinstance(expr, Or)
    assert matches("(a == 0 OR (b == 2 AND (c == 0 OR d == 4)))", {"b": 2, "d": 4})


def test_keywords_are_case_insensitive() -> None:
    for text in (
        "model like 'llama%' and minInstances in (2) or not enabled == FALSE",
        "model LiKe 'llama%' AnD minInstances In (2) oR NoT enabled == False",
    ):
        assert matches(text)
    assert parse("a == TRUE") == parse("a == true") == Compare(("a",), "==", True)
    assert parse("a == Null") == Compare(("a",), "==", None)
    assert parse("a nOt In (1)") == In(("a",), (1,), negated=True)


def test_ast_is_immutable_and_hashable() -> None:
    expr = parse("a == 1 AND b LIKE 'x%'")
    with pytest.raises(AttributeError):
        expr.operands = ()  # type: ignore[misc]
    assert hash(expr) == hash(parse("a == 1 AND b LIKE 'x%'"))


def test_literals() -> None:
    assert parse("a == -5") == Compare(("a",), "==", -5)
    assert parse("a == -0.5e-3").value == -0.0005  # type: ignore[union-attr]
    assert parse("a == 1E3").value == 1000.0  # type: ignore[union-attr]
    assert parse(r"a == 'it\'s'").value == "it's"  # type: ignore[union-attr]
    assert parse(r'a == "say \"hi\""').value == 'say "hi"'  # type: ignore[union-attr]
    assert parse(r"a == 'tab\there\nnl \\ \u00e9'").value == "tab\there\nnl \\ é"  # type: ignore[union-attr]
    assert parse("a == 'ünï ✓'").value == "ünï ✓"  # type: ignore[union-attr]
    assert parse("a IN ('x', \"y\", 3, -1.5, true, false, null)") == In(
        ("a",), ("x", "y", 3, -1.5, True, False, None)
    )
    assert parse("a==1").value == 1  # type: ignore[union-attr]
    assert parse("a>=-1") == Compare(("a",), ">=", -1)


# --------------------------------------------------------------------------- fields


def test_nested_paths_and_value_fallback() -> None:
    assert matches("parameters.gpu == 'H100'")
    assert matches("value.parameters.gpu == 'H100'")
    assert matches("value.parameters.vram_gb >= 16")
    assert matches("labels.team == 'ml'")
    assert matches("layers.1 == 16")
    assert matches("layers.0 == 0")
    assert not matches("layers.2 == 16")
    assert not matches("parameters.gpu.x == 1")
    # a top-level field wins over one inside value
    rec = {"key": "outer", "value": {"key": "inner", "only": 1}}
    assert matches("key == 'outer'", rec)
    assert matches("only == 1", rec)
    assert matches("value.key == 'inner'", rec)
    # without a dict value there is nothing to fall back to
    assert not matches("only == 1", {"value": [1]})
    assert not matches("only == 1", {"value": None})
    assert matches("x.y == 1", {"x": {"y": 1}})


def test_missing_fields_are_false_for_every_operator() -> None:
    for op in ("==", "!=", "<", "<=", ">", ">="):
        assert not matches(f"nosuch {op} 1")
        assert matches(f"NOT nosuch {op} 1")
    assert not matches("nosuch IN (1)")
    assert not matches("nosuch NOT IN (1)")
    assert not matches("nosuch LIKE '%'")
    assert not matches("nosuch NOT LIKE 'x'")
    assert not matches("nosuch == null")
    assert not matches("parameters.nosuch == 1")
    assert matches("nosuch == 1 OR minInstances == 2")


def test_type_mismatches_never_raise() -> None:
    assert not matches("model < 5")
    assert not matches("minInstances > 'a'")
    assert not matches("minInstances == '2'")
    assert matches("minInstances != '2'")
    assert not matches("enabled == 1")
    assert matches("enabled != 1")
    assert not matches("enabled > 0")
    assert not matches("note < 1")
    assert not matches("parameters == 'x'")
    assert not matches("layers >= 0")
    assert matches("layers != 0")
    assert matches("ratio == 0.75")
    assert not matches("minInstances < true")


def test_odd_records_never_raise() -> None:
    expr = parse("a.b == 1 OR value.x LIKE '%' OR a.0 IN (1)")
    for record in ({}, {"a": None}, {"a": [2]}, {"a": {"b": [1]}}, {1: 2}, [], None, "x"):
        assert evaluate(expr, record) is False  # type: ignore[arg-type]


def test_compile_filter_empty_accepts_all() -> None:
    for text in (None, "", "   \n\t"):
        predicate = compile_filter(text)
        assert predicate({}) and predicate(ENTRY)


def test_compile_filter_raises_on_bad_text() -> None:
    with pytest.raises(QueryError):
        compile_filter("a ==")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "message", "position"),
    [
        ("model == 'llama", "unterminated string", 9),
        ('model == "llama\\"', "unterminated string", 9),
        ("minInstances == ", "expected a value after '=='", 16),
        ("minInstances == )", "expected a value after '==', found ')'", 16),
        ("a == 1 AND", "expected a comparison, NOT or '(' after 'AND'", 10),
        ("a == 1 AND OR b == 2", "expected a comparison", 11),
        ("== 1", "expected a comparison", 0),
        ("a", "expected an operator", 1),
        ("a b", "expected an operator", 2),
        ("a = 1", "unknown operator '='", 2),
        ("a <> 1", "unknown operator '<>'", 2),
        ("a === 1", "unknown operator '==='", 2),
        ("a ~ 1", "unknown operator '~'", 2),
        ("(a == 1", "expected ')'", 7),
        ("((a == 1) OR b == 2", "expected ')'", 19),
        ("a == 1)", "unbalanced ')'", 6),
        ("a == 1 b == 2", "expected AND, OR or the end of the filter, found 'b'", 7),
        ("a == 1 2", "expected AND, OR or the end", 7),
        ("a == b", "found field name 'b'", 5),
        ("1 == a", "expected a field name", 0),
        ("a IN 1", "expected '(' to start the IN list", 5),
        ("a IN ()", "expected a value", 6),
        ("a IN (1, 2", "expected ',' or ')' in the IN list", 10),
        ("a IN (1 2)", "expected ',' or ')'", 8),
        ("a NOT == 1", "expected IN or LIKE after 'NOT'", 6),
        ("a LIKE 5", "expected a quoted pattern", 7),
        ("a LIKE 'x\\\\'", "lone escape", 7),
        ("a == 'x\\q'", "unknown escape", 7),
        ("a == '\\u12'", "4 hex digits", 6),
        ("a == 1e400", "out of range", 5),
        ("a == 12abc", "malformed number '12abc'", 5),
        ("a == 1.2.3", "malformed number", 5),
        ("a. == 1", "expected a field name after 'a.'", 2),
        ("a && b", "unexpected character '&'", 2),
        ("a == 1 ; drop", "unexpected character ';'", 7),
        ("a == $1", "unexpected character '$'", 5),
        ("", "expected a comparison", 0),
        ("NOT", "expected a comparison", 3),
        ("()", "expected a comparison", 1),
    ],
)
def test_errors_say_what_and_where(text: str, message: str, position: int) -> None:
    with pytest.raises(QueryError) as info:
        parse(text)
    assert message in str(info.value)
    assert info.value.position == position
    assert f"at position {position}" in str(info.value)


def test_error_message_example() -> None:
    with pytest.raises(QueryError, match=r"^expected a value after '==' at position 14$"):
        parse("minInstances==")


def test_too_long() -> None:
    text = "a == 1 OR " * 500 + "a == 1"
    assert len(text) > query.MAX_LENGTH
    with pytest.raises(QueryError, match="too long"):
        parse(text)
    parse("a == '" + "x" * (query.MAX_LENGTH - 7) + "'")  # exactly at the limit


def test_too_deep() -> None:
    ok = "(" * query.MAX_DEPTH + "a == 1" + ")" * query.MAX_DEPTH
    assert parse(ok) == Compare(("a",), "==", 1)
    with pytest.raises(QueryError, match="nests too deeply") as info:
        parse("(" * (query.MAX_DEPTH + 1) + "a == 1" + ")" * (query.MAX_DEPTH + 1))
    assert info.value.position == query.MAX_DEPTH
    with pytest.raises(QueryError, match="nests too deeply"):
        parse("NOT " * (query.MAX_DEPTH + 1) + "a == 1")
    with pytest.raises(QueryError, match="nests too deeply"):
        parse("NOT (" * 17 + "a == 1" + ")" * 17)
    with pytest.raises(QueryError):  # deep and unbalanced: still a QueryError, no RecursionError
        parse("(" * 4000)


def test_too_many_comparisons() -> None:
    ok = " OR ".join(["a==1"] * query.MAX_COMPARISONS)
    assert len(parse(ok).operands) == query.MAX_COMPARISONS  # type: ignore[union-attr]
    with pytest.raises(QueryError, match="too many comparisons"):
        parse(" OR ".join(["a==1"] * (query.MAX_COMPARISONS + 1)))


def test_not_a_string() -> None:
    with pytest.raises(QueryError, match="must be a string"):
        parse(123)  # type: ignore[arg-type]


def test_like_node_checks_its_pattern() -> None:
    with pytest.raises(QueryError, match="lone escape"):
        Like(("a",), "abc\\")


# --------------------------------------------------------------------------- rendering


def test_str_renders_canonical_text() -> None:
    assert str(parse("a==1 and (b!='x' or not c in (1,2)) or d not like 'p%'")) == (
        'a == 1 AND (b != "x" OR NOT c IN (1, 2)) OR d NOT LIKE "p%"'
    )
    assert str(parse("NOT (a == 1 OR b == 2)")) == "NOT (a == 1 OR b == 2)"
    assert str(parse(r"a == 'q\"\\\n'")) == r'a == "q\"\\\n"'
    assert str(parse("(a == 1 AND b == 2) AND c == 3")) == "(a == 1 AND b == 2) AND c == 3"


# --------------------------------------------------------------------------- properties

_KEYWORDS = {"and", "or", "not", "in", "like", "true", "false", "null"}
_first = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True).filter(
    lambda s: s.lower() not in _KEYWORDS
)
_paths = st.tuples(
    _first, st.lists(st.from_regex(r"[A-Za-z0-9_]{1,6}", fullmatch=True), max_size=3)
)
paths = _paths.map(lambda p: (p[0], *p[1]))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)


def _valid_pattern(p: str) -> bool:
    try:
        Like(("x",), p)
    except QueryError:
        return False
    return True


leaves = st.one_of(
    st.builds(Compare, paths, st.sampled_from(query.COMPARISON_OPS), scalars),
    st.builds(In, paths, st.lists(scalars, min_size=1, max_size=4).map(tuple), st.booleans()),
    st.builds(
        Like, paths, st.text(alphabet="ab%_\\.x", max_size=10).filter(_valid_pattern), st.booleans()
    ),
)
exprs = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.builds(Not, inner),
        st.builds(And, st.lists(inner, min_size=2, max_size=3).map(tuple)),
        st.builds(Or, st.lists(inner, min_size=2, max_size=3).map(tuple)),
    ),
    max_leaves=12,
)


def _depth(expr: query.Expr) -> int:
    if isinstance(expr, Not):
        return 1 + _depth(expr.operand)
    if isinstance(expr, And | Or):
        return 1 + max(_depth(e) for e in expr.operands)
    return 0


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(exprs)
def test_rendered_ast_round_trips(expr: query.Expr) -> None:
    assume(_depth(expr) < query.MAX_DEPTH // 2)
    text = str(expr)
    assume(len(text) <= query.MAX_LENGTH)
    assert parse(text) == expr
    assert str(parse(text)) == text


@settings(max_examples=500)
@given(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80) | st.text())
def test_random_printable_text_parses_or_raises_query_error(text: str) -> None:
    try:
        expr = parse(text)
    except QueryError:
        return
    assert parse(str(expr)) == expr


_TOKENS = [
    "a", "b.c", "x.0", "==", "!=", "<", "<=", ">", ">=", "=", "IN", "NOT", "LIKE", "AND",
    "OR", "(", ")", ",", "1", "-2.5", "'s'", '"t%"', "true", "null", "'", "\\", "1e999",
]  # fmt: skip


@settings(max_examples=500)
@given(st.lists(st.sampled_from(_TOKENS), max_size=25))
def test_token_soup_parses_or_raises_query_error(tokens: list[str]) -> None:
    text = " ".join(tokens)
    try:
        expr = parse(text)
    except QueryError:
        return
    assert parse(str(expr)) == expr
    evaluate(expr, ENTRY)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from("abcx0"), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300)
@given(exprs, st.dictionaries(st.sampled_from(["a", "b", "x", "value"]), json_values))
def test_evaluate_never_raises(expr: query.Expr, record: dict[str, Any]) -> None:
    result = evaluate(expr, record)
    assert result is True or result is False
    if isinstance(expr, Not):
        assert result is not evaluate(expr.operand, record)
