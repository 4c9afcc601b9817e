"""The error root and its one table: every kind has its codes on every front door."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from daemon import errors
from daemon.api.jsonrpc import Dispatcher
from daemon.errors import STATUS, GridmeshError, status_of

# the codes clients saw before the table, which the table must keep
KEPT = [
    (errors.InvalidParams, -32602, "INVALID_ARGUMENT"),
    (errors.NotFound, -32004, "NOT_FOUND"),
    (errors.Unauthorized, -32001, "UNAUTHENTICATED"),
    (errors.Busy, -32031, "RESOURCE_EXHAUSTED"),
    (errors.NetworkFailure, -32010, "UNAVAILABLE"),
    (errors.ShuttingDown, -32010, "UNAVAILABLE"),
    (errors.RegistryRefused, -32020, "FAILED_PRECONDITION"),
    (errors.ShardFailure, -32030, "ABORTED"),
    (errors.ModelNotServed, -32030, "NOT_FOUND"),
    (errors.ShardRefused, -32030, "INVALID_ARGUMENT"),
    (errors.RouteUnavailable, -32030, "UNAVAILABLE"),
    (errors.Cancelled, -32030, "CANCELLED"),
    (errors.FailedPrecondition, -32602, "FAILED_PRECONDITION"),
    (GridmeshError, -32603, "INTERNAL"),
]


@pytest.mark.parametrize(("cls", "jsonrpc", "grpc_name"), KEPT)
async def test_each_kind_reaches_jsonrpc_with_its_code(
    cls: type[GridmeshError], jsonrpc: int, grpc_name: str
) -> None:
    d = Dispatcher()

    async def fail() -> None:
        raise cls("it failed", {"reason": "x"})

    d.register("fail", fail)
    out = await d.handle(b'{"jsonrpc":"2.0","method":"fail","id":1}')
    assert out is not None
    error = json.loads(out)["error"]
    assert error == {"code": jsonrpc, "message": "it failed", "data": {"reason": "x"}}
    assert status_of(cls).grpc == grpc_name
    assert status_of(cls("m")).jsonrpc == jsonrpc


def test_the_table_is_complete_and_valid() -> None:
    kinds = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert set(kinds) == set(STATUS)  # every kind has its own row
    assert len({c.code for c in STATUS}) == len(STATUS)  # codes name one kind each
    for cls, status in STATUS.items():
        assert grpc.StatusCode[status.grpc]  # a real gRPC status
        assert 400 <= status.http <= 599
        assert errors.BY_CODE[cls.code] is cls


def test_a_subclass_without_a_row_gets_its_parents() -> None:
    class Overloaded(errors.Busy):
        pass

    assert status_of(Overloaded("x")) == STATUS[errors.Busy]


class _Coded(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Rejected(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@pytest.mark.parametrize(
    ("error", "cls", "message", "data"),
    [
        (errors.from_network(OSError("dial failed")), errors.NetworkFailure, "dial failed", None),
        (
            errors.from_rejected(_Rejected("quota", "over quota")),
            errors.RegistryRefused,
            "quota: over quota",
            {"reason": "quota"},
        ),
        (
            errors.from_rejected(_Rejected("not_found", "k")),
            errors.NotFound,
            "not_found: k",
            {"reason": "not_found"},
        ),
        (
            errors.from_shard_service(_Coded("busy", "32 running")),
            errors.Busy,
            "busy: 32 running",
            {"reason": "busy"},
        ),
        (
            errors.from_shard_service(_Coded("bad_model", "no config")),
            errors.ShardFailure,
            "bad_model: no config",
            {"reason": "bad_model"},
        ),
        (errors.from_encoding(_Coded("empty_prompt", "e")), errors.InvalidParams, "e", None),
        (errors.from_encoding(_Coded("no_tokenizer", "t")), errors.FailedPrecondition, "t", None),
        (errors.from_generation(_Coded("busy", "busy: full")), errors.Busy, "busy: full", None),
        (
            errors.from_generation(_Coded("refused", "p1 refused: shape")),
            errors.ShardRefused,
            "p1 refused: shape",
            None,
        ),
        (
            errors.from_generation(RuntimeError("no route")),
            errors.RouteUnavailable,
            "no route",
            None,
        ),
    ],
)
def test_errors_from_below_are_translated(
    error: GridmeshError, cls: type[GridmeshError], message: str, data: Any
) -> None:
    assert type(error) is cls
    assert error.message == message and error.data == data


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (_Coded("busy", "busy: every server is full"), errors.Busy),
        (_Coded("refused", "p1 refused: bad shape"), errors.ShardRefused),
        (_Coded("failed", "peerB: stream reset"), errors.ShardFailure),
        (RuntimeError("p1 refused: busy"), errors.ShardFailure),  # by code, never by text
    ],
)
def test_a_failed_generation_has_the_kind_of_its_error(exc: Exception, cls: type) -> None:
    assert errors.generation_failure(exc) is cls


def test_a_job_reports_the_kind_it_failed_with() -> None:
    """Jobs record their error's kind when they fail; the APIs report that kind's code
    (JSON-RPC) and status (gRPC), whatever the message says."""
    pytest.importorskip("trio")
    from daemon.shards.jobs import Job

    job = Job("j", done=True)
    assert job.to_json()["error_code"] is None
    job.fail("cancelled", errors.Cancelled)
    error = job.failure()
    assert type(error) is errors.Cancelled and error.message == "cancelled"
    assert error.data["job"] == "j" and error.data["error_code"] == "cancelled"
    busy = Job("k", done=True)
    busy.fail("no route: everything refused")  # default kind: a shard failure
    assert type(busy.failure()) is errors.ShardFailure
