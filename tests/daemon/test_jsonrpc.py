"""The JSON-RPC 2.0 dispatcher, without any transport."""

from __future__ import annotations

import inspect
import json
import logging
from typing import Annotated, Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.api.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_JSON_DEPTH,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    Dispatcher,
    RPCError,
    invalid_params,
    json_too_deep,
)


class Recorder:
    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str]] = []
        self.notes: list[Any] = []

    def __call__(self, method: str, outcome: str) -> None:
        self.outcomes.append((method, outcome))


def make_dispatcher(**kwargs: Any) -> tuple[Dispatcher, Recorder]:
    rec = Recorder()
    d = Dispatcher(on_outcome=rec, **kwargs)

    async def add(a: int, b: int = 0) -> int:
        """Add numbers."""
        return a + b

    async def scale(
        x: Annotated[int | float, msgspec.Meta(description="a number")], label: str | None = None
    ) -> dict[str, Any]:
        """Double x."""
        return {"x": x * 2, "label": label}

    async def flag(on: bool) -> bool:
        return not on

    async def note(text: str) -> None:
        """Record a note."""
        rec.notes.append(text)

    async def fail_app() -> None:
        raise invalid_params("amount must be positive", data={"field": "amount"})

    async def fail_custom() -> None:
        raise RPCError(-32050, "shard not loaded")

    async def crash() -> None:
        raise ZeroDivisionError("boom")

    async def unserializable() -> Any:
        return {1, 2}

    async def echo(value: dict[str, Any] | list[Any] | None = None) -> Any:
        return value

    for handler in (add, scale, flag, note, fail_app, fail_custom, crash, unserializable, echo):
        d.register(handler.__name__, handler)
    return d, rec


async def rpc(d: Dispatcher, payload: Any) -> Any:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    out = await d.handle(body)
    return None if out is None else json.loads(out)


def req(method: str, params: Any = None, id: Any = 1) -> dict[str, Any]:
    r: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        r["params"] = params
    return r


def error_code(resp: dict[str, Any]) -> int:
    assert "result" not in resp, resp
    return resp["error"]["code"]


async def test_ok_positional_and_named():
    d, rec = make_dispatcher()
    assert await rpc(d, req("add", [2, 3], id=7)) == {"jsonrpc": "2.0", "result": 5, "id": 7}
    assert (await rpc(d, req("add", {"b": 4, "a": 1})))["result"] == 5
    assert (await rpc(d, req("add", {"a": 1})))["result"] == 1  # optional omitted
    assert (await rpc(d, req("add", [1])))["result"] == 1
    assert (await rpc(d, req("scale", [1.5, "l"])))["result"] == {"x": 3.0, "label": "l"}
    assert (await rpc(d, req("scale", {"x": 2})))["result"] == {"x": 4, "label": None}
    assert (await rpc(d, req("flag", [True])))["result"] is False
    assert rec.outcomes == [("add", "ok")] * 4 + [("scale", "ok")] * 2 + [("flag", "ok")]


@pytest.mark.parametrize(
    "body",
    [b"{", b"not json", b"", b'{"jsonrpc": "2.0", "method": "add", "id": 1', b"\xff\xfe{}", b"NaN"],
)
async def test_parse_error(body: bytes):
    d, rec = make_dispatcher()
    resp = await rpc(d, body)
    assert resp["id"] is None
    assert error_code(resp) == PARSE_ERROR
    assert rec.outcomes == [("-", "parse_error")]


async def test_deeply_nested_json_is_parse_error():
    d, _ = make_dispatcher()
    resp = await rpc(d, b"[" * 100_000 + b"]" * 100_000)
    assert error_code(resp) == PARSE_ERROR


@pytest.mark.parametrize(
    "payload",
    [
        1,
        "x",
        None,
        {"method": "add", "params": [1], "id": 1},  # no jsonrpc member
        {"jsonrpc": "1.0", "method": "add", "params": [1], "id": 1},
        {"jsonrpc": 2.0, "method": "add", "params": [1], "id": 1},
        {"jsonrpc": "2.0", "params": [1], "id": 1},  # no method
        {"jsonrpc": "2.0", "method": 5, "id": 1},
        {"jsonrpc": "2.0", "method": None, "id": 1},
        {"jsonrpc": "2.0", "method": "add", "params": 3, "id": 1},
        {"jsonrpc": "2.0", "method": "add", "params": "1,2", "id": 1},
        {"jsonrpc": "2.0", "method": "add", "params": None, "id": 1},
    ],
)
async def test_invalid_request(payload: Any):
    d, rec = make_dispatcher()
    resp = await rpc(d, payload)
    assert error_code(resp) == INVALID_REQUEST
    assert resp["jsonrpc"] == "2.0"
    assert rec.outcomes == [("-", "invalid_request")]


@pytest.mark.parametrize("bad_id", [True, False, 1.5, {"a": 1}, [1]])
async def test_bad_id_type_is_invalid_request(bad_id: Any):
    d, _ = make_dispatcher()
    resp = await rpc(d, req("add", [1], id=bad_id))
    assert error_code(resp) == INVALID_REQUEST
    assert resp["id"] is None


@pytest.mark.parametrize("the_id", ["abc", "", 0, -3, 2**70, None, "\u00e9\u4e2d"])
async def test_ids_echoed_exactly(the_id: Any):
    d, _ = make_dispatcher()
    resp = await rpc(d, req("add", [1, 1], id=the_id))
    assert resp == {"jsonrpc": "2.0", "result": 2, "id": the_id}
    # errors echo the id too
    resp = await rpc(d, req("nope", id=the_id))
    assert resp["id"] == the_id
    assert error_code(resp) == METHOD_NOT_FOUND


async def test_unknown_method_names_it_and_truncates():
    d, rec = make_dispatcher()
    resp = await rpc(d, req("no_such_method"))
    assert error_code(resp) == METHOD_NOT_FOUND
    assert "no_such_method" in resp["error"]["message"]
    long_name = "m" * 10_000
    resp = await rpc(d, req(long_name))
    assert error_code(resp) == METHOD_NOT_FOUND
    assert len(resp["error"]["message"]) < 200
    # unknown names are not used as metric labels
    assert rec.outcomes == [("-", "method_not_found")] * 2


@pytest.mark.parametrize(
    ("method", "params", "needle"),
    [
        ("add", [], "'a'"),  # missing required
        ("add", {}, "'a'"),
        ("add", {"b": 1}, "'a'"),
        ("add", {"a": 1, "c": 2}, "'c'"),  # unknown name
        ("add", [1, 2, 3], "too many"),
        ("add", ["1"], "'a' must be int"),
        ("add", [1.0], "'a' must be int"),
        ("add", [True], "'a' must be int, got bool"),  # bool is not an int
        ("add", {"a": None}, "'a' must be int, got null"),
        ("scale", [False], "'x' must be int|float"),
        ("scale", ["2.0"], "'x' must be int|float"),
        ("scale", [1, 2], "'label' must be str"),
        ("flag", [1], "'on' must be bool"),
        ("echo", ["s"], "'value' must be dict|list"),
        ("fail_app", [1], "too many"),
    ],
)
async def test_invalid_params(method: str, params: Any, needle: str):
    d, rec = make_dispatcher()
    resp = await rpc(d, req(method, params))
    assert error_code(resp) == INVALID_PARAMS
    assert needle in resp["error"]["message"]
    assert rec.outcomes == [(method, "invalid_params")]


async def test_handler_rpc_error_passthrough():
    d, rec = make_dispatcher()
    resp = await rpc(d, req("fail_app", id="x"))
    assert resp == {
        "jsonrpc": "2.0",
        "error": {
            "code": INVALID_PARAMS,
            "message": "amount must be positive",
            "data": {"field": "amount"},
        },
        "id": "x",
    }
    resp = await rpc(d, req("fail_custom"))
    assert resp["error"] == {"code": -32050, "message": "shard not loaded"}
    assert rec.outcomes == [("fail_app", "app_error"), ("fail_custom", "app_error")]


async def test_handler_crash_is_internal_error_and_logged(caplog: pytest.LogCaptureFixture):
    d, rec = make_dispatcher()
    with caplog.at_level(logging.ERROR, logger="daemon.api.jsonrpc"):
        resp = await rpc(d, req("crash", id=9))
    assert resp["id"] == 9
    assert error_code(resp) == INTERNAL_ERROR
    assert resp["error"]["message"] == "internal error: ZeroDivisionError: boom"
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)
    # the dispatcher still works afterwards
    assert (await rpc(d, req("add", [1, 2])))["result"] == 3
    assert rec.outcomes == [("crash", "internal_error"), ("add", "ok")]


async def test_unserializable_result_is_internal_error():
    d, rec = make_dispatcher()
    resp = await rpc(d, req("unserializable", id=4))
    assert resp["id"] == 4
    assert error_code(resp) == INTERNAL_ERROR
    assert rec.outcomes == [("unserializable", "internal_error")]


async def test_notification_runs_without_response():
    d, rec = make_dispatcher()
    n = {"jsonrpc": "2.0", "method": "note", "params": ["hello"]}
    assert await d.handle(json.dumps(n).encode()) is None
    assert rec.notes == ["hello"]
    # errors in notifications are not reported either
    bad = {"jsonrpc": "2.0", "method": "note", "params": [1]}
    assert await d.handle(json.dumps(bad).encode()) is None
    unknown = {"jsonrpc": "2.0", "method": "nope"}
    assert await d.handle(json.dumps(unknown).encode()) is None
    crash = {"jsonrpc": "2.0", "method": "crash"}
    assert await d.handle(json.dumps(crash).encode()) is None
    assert rec.outcomes == [
        ("note", "ok"),
        ("note", "invalid_params"),
        ("-", "method_not_found"),
        ("crash", "internal_error"),
    ]
    # a broken envelope without an id is not a notification: it gets an error
    resp = await rpc(d, {"jsonrpc": "2.0", "method": 1})
    assert error_code(resp) == INVALID_REQUEST
    assert resp["id"] is None


async def test_batch_mixed():
    d, rec = make_dispatcher()
    batch = [
        req("add", [1, 2], id=1),
        {"jsonrpc": "2.0", "method": "note", "params": ["n1"]},  # notification
        req("add", ["x"], id="two"),
        req("nope", id=3),
        5,
        {"foo": "bar"},
        req("crash", id=None),
        req("scale", {"x": 1}, id=4),
    ]
    resp = await rpc(d, batch)
    assert isinstance(resp, list)
    assert len(resp) == 7
    assert resp[0] == {"jsonrpc": "2.0", "result": 3, "id": 1}
    assert (resp[1]["id"], error_code(resp[1])) == ("two", INVALID_PARAMS)
    assert (resp[2]["id"], error_code(resp[2])) == (3, METHOD_NOT_FOUND)
    assert (resp[3]["id"], error_code(resp[3])) == (None, INVALID_REQUEST)
    assert (resp[4]["id"], error_code(resp[4])) == (None, INVALID_REQUEST)
    assert (resp[5]["id"], error_code(resp[5])) == (None, INTERNAL_ERROR)
    assert resp[6] == {"jsonrpc": "2.0", "result": {"x": 2, "label": None}, "id": 4}
    assert rec.notes == ["n1"]
    assert [o for _, o in rec.outcomes] == [
        "ok",
        "ok",
        "invalid_params",
        "method_not_found",
        "invalid_request",
        "invalid_request",
        "internal_error",
        "ok",
    ]


async def test_batch_runs_sequentially_in_order():
    d, rec = make_dispatcher()
    batch = [{"jsonrpc": "2.0", "method": "note", "params": [str(i)]} for i in range(20)]
    assert await rpc(d, batch) is None  # only notifications: nothing to send
    assert rec.notes == [str(i) for i in range(20)]


async def test_empty_batch_is_single_error():
    d, rec = make_dispatcher()
    resp = await rpc(d, [])
    assert isinstance(resp, dict)
    assert error_code(resp) == INVALID_REQUEST
    assert resp["id"] is None
    assert rec.outcomes == [("-", "invalid_request")]


async def test_batch_over_limit_is_single_error():
    d, rec = make_dispatcher(max_batch=3)
    resp = await rpc(d, [req("add", [1], id=i) for i in range(4)])
    assert isinstance(resp, dict)
    assert error_code(resp) == INVALID_REQUEST
    assert rec.outcomes == [("-", "invalid_request")]
    resp = await rpc(d, [req("add", [1], id=i) for i in range(3)])
    assert [r["id"] for r in resp] == [0, 1, 2]


async def test_default_batch_limit():
    d, _ = make_dispatcher()
    assert d.max_batch == 100
    resp = await rpc(d, [req("add", [1], id=i) for i in range(101)])
    assert error_code(resp) == INVALID_REQUEST
    assert len(await rpc(d, [req("add", [1], id=i) for i in range(100)])) == 100


async def test_describe():
    d, _ = make_dispatcher()

    async def methods() -> list[dict[str, Any]]:
        return d.describe()

    d.register("rpc_methods", methods, description="List the methods.")
    resp = await rpc(d, req("rpc_methods"))
    by_name = {m["name"]: m for m in resp["result"]}
    assert [m["name"] for m in resp["result"]] == sorted(by_name)
    assert by_name["add"] == {
        "name": "add",
        "description": "Add numbers.",
        "params": [
            {"name": "a", "type": "int", "required": True, "description": ""},
            {"name": "b", "type": "int", "required": False, "description": ""},
        ],
    }
    assert by_name["scale"]["params"][0] == {
        "name": "x",
        "type": "int|float",
        "required": True,
        "description": "a number",
    }
    assert by_name["rpc_methods"]["params"] == []


class Opaque:
    pass


async def test_register_validation():
    d = Dispatcher()

    async def h() -> None:
        return None

    def sync_handler() -> None:
        return None

    async def star(*values: int) -> None:
        return None

    async def unannotated(x) -> None:  # type: ignore[no-untyped-def]
        return None

    async def unchecked(x: Opaque) -> None:  # msgspec cannot check a plain class
        return None

    d.register("m", h)
    with pytest.raises(ValueError):
        d.register("m", h)
    with pytest.raises(ValueError):
        d.register("rpc.discover", h)
    with pytest.raises(TypeError):
        d.register("s", sync_handler)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="plain named parameter"):
        d.register("star", star)
    with pytest.raises(ValueError, match="no type annotation"):
        d.register("unannotated", unannotated)
    with pytest.raises(TypeError):
        d.register("unchecked", unchecked)


async def test_outcome_hook_failure_does_not_break_dispatch():
    def bad_hook(method: str, outcome: str) -> None:
        raise RuntimeError("metrics down")

    d = Dispatcher(on_outcome=bad_hook)

    async def one() -> int:
        return 1

    d.register("one", one)
    assert json.loads(await d.handle(b'{"jsonrpc":"2.0","method":"one","id":1}'))["result"] == 1


# -- typed params (msgspec Structs) -----------------------------------------------------------


NonNegative = Annotated[int, msgspec.Meta(ge=0)]


async def window(
    start: NonNegative,
    ids: Annotated[tuple[NonNegative, ...], msgspec.Meta(max_length=4)] = (),
    scale: Annotated[float, msgspec.Meta(ge=0, le=10)] = 1.0,
) -> dict[str, Any]:
    return {"start": start, "ids": ids, "scale": scale}


def window_dispatcher() -> Dispatcher:
    d = Dispatcher()
    d.register("window", window)
    return d


async def test_struct_params_are_converted_with_defaults():
    d = window_dispatcher()
    resp = await rpc(d, req("window", {"start": 2, "scale": 3}))
    assert resp["result"] == {"start": 2, "ids": [], "scale": 3.0}
    resp = await rpc(d, req("window", [1, [5, 6]]))
    assert resp["result"] == {"start": 1, "ids": [5, 6], "scale": 1.0}


@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({"start": -1}, "$.start"),
        ({"start": 0, "ids": [1, -2]}, "$.ids[1]"),
        ({"start": 0, "ids": [True]}, "$.ids[0]"),
        ({"start": 0, "ids": ["1"]}, "$.ids[0]"),
        ({"start": 0, "ids": [1, 2, 3, 4, 5]}, "$.ids"),
        ({"start": 0, "scale": 10.5}, "$.scale"),
    ],
)
async def test_struct_bounds_are_invalid_params_naming_the_field(params: Any, where: str):
    resp = await rpc(window_dispatcher(), req("window", params))
    assert error_code(resp) == INVALID_PARAMS
    assert (
        resp["error"]["message"].startswith("invalid params:") and where in resp["error"]["message"]
    )


async def test_described_params_are_the_signature():
    d, _ = make_dispatcher()
    d.register("window", window)
    for method in d.describe():
        handler = d._methods[method["name"]].handler
        signature = inspect.signature(handler).parameters
        assert [p["name"] for p in method["params"]] == list(signature)
        for p in method["params"]:
            assert p["required"] == (signature[p["name"]].default is inspect.Parameter.empty)
    by_name = {m["name"]: m for m in d.describe()}
    assert by_name["window"]["params"][1]["type"] == "list"
    assert by_name["scale"]["params"][1]["type"] == "str|null"
    assert by_name["echo"]["params"][0]["type"] == "dict|list|null"


async def test_bounds_are_named_in_the_message():
    resp = await rpc(window_dispatcher(), req("window", {"start": 0, "scale": 10.5}))
    message = resp["error"]["message"]
    assert message.startswith("invalid params: scale must be 0 to 10 (Expected `float` <= 10")


# -- fuzz: nothing a client sends makes handle() raise or answer invalid JSON ----------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2]) | json_values,
        "method": st.sampled_from(["add", "scale", "flag", "echo", "window", "rpc.x"])
        | json_values,
        "params": json_values,
        "id": json_values,
    },
)


def check_answer(out: bytes | None) -> None:
    if out is None:
        return
    doc = json.loads(out)
    for item in doc if isinstance(doc, list) else [doc]:
        assert item["jsonrpc"] == "2.0" and ("result" in item) != ("error" in item)
        if "error" in item:
            assert isinstance(item["error"]["code"], int)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=512))
async def test_fuzz_random_bytes(body: bytes):
    d, _ = make_dispatcher()
    check_answer(await d.handle(body))


@settings(max_examples=300, deadline=None)
@given(doc=envelopes | st.lists(envelopes, max_size=5) | json_values)
async def test_fuzz_random_structures(doc: Any):
    d, _ = make_dispatcher()
    d.register("window", window)
    check_answer(await d.handle(json.dumps(doc).encode()))


@settings(max_examples=200, deadline=None)
@given(
    depth=st.integers(min_value=0, max_value=5000),
    opener=st.sampled_from([b"[", b'{"a":', b'["[",']),
)
async def test_fuzz_nesting_is_bounded(depth: int, opener: bytes):
    d, _ = make_dispatcher()
    body = opener * depth + b"1" + (b"]" if opener != b'{"a":' else b"}") * depth
    check_answer(await d.handle(body))


@given(text=st.text(max_size=200), depth=st.integers(0, 80))
def test_depth_scan_agrees_with_the_parser(text: str, depth: int):
    body = ("[" * depth + json.dumps(text) + "]" * depth).encode()
    assert json_too_deep(body) == (depth > MAX_JSON_DEPTH)
