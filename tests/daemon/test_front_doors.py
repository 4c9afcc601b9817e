"""JSON-RPC `generate` and gRPC `Generate` / `Forward` accept and refuse the same values, with
the same message: both validate through the types in `daemon.api.generation`."""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import trio

from daemon.api.generation import ForwardInput, GenerateInput
from daemon.api.grpc_server import HOST, serve_grpc
from daemon.api.jsonrpc import INVALID_PARAMS, Dispatcher
from daemon.api.proto import gridmesh_inference_pb2 as pb2
from daemon.api.proto import gridmesh_inference_pb2_grpc as pb2_grpc
from daemon.shard_methods import BUSY, register_shard_methods
from daemon.shards.jobs import ShardServiceError
from p2p.aio import open_bridge

TOKEN = "front-door-token"
DEADLINE = 30  # seconds for every gRPC call

# (the arguments, as JSON-RPC names them; whether both doors accept them)
GENERATE_BOUNDARIES: list[tuple[dict[str, Any], bool]] = [
    ({"token_ids": [1]}, True),
    ({"token_ids": [1], "temperature": 0.0}, True),
    ({"token_ids": [1], "temperature": 10.0}, True),
    ({"token_ids": [1], "temperature": 10.5}, False),
    ({"token_ids": [1], "temperature": 100.0}, False),  # gRPC took this before
    ({"token_ids": [1], "temperature": -0.5}, False),
    ({"token_ids": [1], "max_tokens": 1}, True),
    ({"token_ids": [1], "max_tokens": 4096}, True),
    ({"token_ids": [1], "max_tokens": 0}, False),
    ({"token_ids": [1], "max_tokens": 4097}, False),
    ({"token_ids": [1], "model": "m" * 256}, True),
    ({"token_ids": [1], "model": "m" * 257}, False),
    ({"token_ids": [1], "model": ""}, False),
    ({"token_ids": [0, (1 << 31) - 1]}, True),
    ({"token_ids": [1 << 31]}, False),  # gRPC's uint32 took this before
    ({"token_ids": []}, False),
    ({"token_ids": [1] * 32768}, True),
    ({"token_ids": [1] * 32769}, False),
    ({"token_ids": [1], "seed": (1 << 63) - 1}, True),
    ({"prompt": "a" * (1 << 20)}, True),
    ({"prompt": "a" * ((1 << 20) + 1)}, False),
    ({"prompt": ""}, False),  # gRPC: the prompt text is empty; JSON-RPC: the same now
    ({}, False),  # no prompt at all
]
FORWARD_BOUNDARIES: list[tuple[dict[str, Any], bool]] = [
    ({"token_ids": [1]}, True),
    ({"token_ids": [1] * 4096}, True),
    ({"token_ids": [1] * 4097}, False),
    ({"token_ids": []}, False),
    ({"token_ids": [1 << 31]}, False),
    ({"token_ids": [1], "model": ""}, False),
    ({"token_ids": [1], "model": "m" * 257}, False),
]


class FullShards:
    """A shard service that only ever says busy: JSON-RPC arguments that pass validation
    end in BUSY, those that do not in INVALID_PARAMS."""

    ident = SimpleNamespace(peer_id="me")

    async def encode_prompt(self, model: str, prompt: str) -> list[int]:
        return [1]

    def new_job(self, owner: str = "") -> Any:
        raise ShardServiceError("busy", "every slot is taken")


class RecordingBackend:
    """An `InferenceBackend` that accepts every generation and forward it is handed."""

    def __init__(self) -> None:
        self.started = 0

    async def start_generation(self, *args: Any) -> str:
        self.started += 1
        return "job"

    def poll(self, job_id: str, since: int) -> dict[str, Any]:
        return {"tokens": [], "text": "", "done": True, "error": None, "route": []}

    def cancel(self, job_id: str) -> None:
        pass

    async def forward(self, model: str, token_ids: list[int]) -> tuple[Sequence[float], int]:
        return [0.0, 1.0], 1


async def jsonrpc_generate(arguments: dict[str, Any]) -> dict[str, Any]:
    d = Dispatcher()
    register_shard_methods(d, FullShards(), SimpleNamespace())  # type: ignore[arg-type]
    params = {"model": "m", **arguments}
    body = json.dumps({"jsonrpc": "2.0", "method": "generate", "params": params, "id": 1})
    out = await d.handle(body.encode())
    assert out is not None
    return json.loads(out)["error"]


def grpc_generate_request(arguments: dict[str, Any]) -> pb2.GenerateRequest:
    fields: dict[str, Any] = {"model": "m", "max_tokens": 1}
    for name, value in arguments.items():
        if name == "prompt":
            fields["text"] = value
        elif name == "token_ids":
            fields["token_ids"] = pb2.TokenIds(ids=value)
        else:
            fields[name] = value
    return pb2.GenerateRequest(**fields)


def grpc_outcome(call: Callable[[], Any]) -> tuple[bool, str]:
    """(accepted, the refusal's details) of one blocking gRPC call."""
    try:
        call()
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
        return False, exc.details()
    return True, ""


async def test_both_doors_accept_and_refuse_the_same_values() -> None:
    backend = RecordingBackend()
    metadata = [("authorization", f"Bearer {TOKEN}")]
    async with open_bridge() as bridge, trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve_grpc(
                bridge, backend, port=0, token=TOKEN, task_status=task_status
            )
        )
        channel = grpc.insecure_channel(
            f"{HOST}:{port}", options=[("grpc.max_send_message_length", 8 << 20)]
        )
        stub = pb2_grpc.InferenceStub(channel)
        try:
            for arguments, accepted in GENERATE_BOUNDARIES:
                error = await jsonrpc_generate(arguments)
                request = grpc_generate_request(arguments)
                grpc_ok, details = await trio.to_thread.run_sync(
                    grpc_outcome,
                    lambda request=request: list(
                        stub.Generate(request, timeout=DEADLINE, metadata=metadata)
                    ),
                )
                case = f"{sorted(arguments)} {str(arguments)[:80]}"
                assert grpc_ok is accepted, case
                assert error["code"] == (BUSY if accepted else INVALID_PARAMS), (case, error)
                if not accepted:
                    assert details == error["message"], case  # the same words on both doors
            for arguments, accepted in FORWARD_BOUNDARIES:
                request = pb2.ForwardRequest(**{"model": "m", **arguments})
                grpc_ok, details = await trio.to_thread.run_sync(
                    grpc_outcome,
                    lambda request=request: stub.Forward(
                        request, timeout=DEADLINE, metadata=metadata
                    ),
                )
                assert grpc_ok is accepted, arguments
                if not accepted:
                    assert details.startswith("invalid params: ")
        finally:
            channel.close()
            nursery.cancel_scope.cancel()
    assert backend.started == sum(accepted for _, accepted in GENERATE_BOUNDARIES)


@pytest.mark.parametrize(
    ("arguments", "needle"),
    [
        ({"token_ids": [1], "temperature": 10.5}, "temperature must be 0 to 10"),
        ({"token_ids": [1], "max_tokens": 0}, "max_tokens must be 1 to 4096"),
        ({"token_ids": [1 << 31]}, "$.token_ids[0]"),
        ({"token_ids": [1], "model": ""}, "model must be 1 to 256 characters"),
        ({"prompt": "x", "token_ids": [1]}, "exactly one of prompt (text) or token_ids"),
    ],
)
async def test_refusals_name_the_parameter_and_its_bounds(
    arguments: dict[str, Any], needle: str
) -> None:
    error = await jsonrpc_generate(arguments)
    assert error["code"] == INVALID_PARAMS and needle in error["message"], error


def test_generate_takes_the_grpc_inputs_fields_with_their_types_and_defaults() -> None:
    """JSON-RPC `generate`'s parameters are `GenerateInput`'s fields, annotation for
    annotation: a bound changed in one place changes on both doors."""
    d = Dispatcher()
    register_shard_methods(d, FullShards(), SimpleNamespace())  # type: ignore[arg-type]
    handler = d._methods["generate"].handler
    handler_hints = typing.get_type_hints(handler, include_extras=True)
    signature = inspect.signature(handler).parameters
    for struct in (GenerateInput, ForwardInput):
        struct_hints = typing.get_type_hints(struct, include_extras=True)
        for name in struct.__struct_fields__:
            if struct is ForwardInput and name == "token_ids":
                continue  # Forward takes up to 4096 tokens, a prompt up to 32768
            assert handler_hints[name] == struct_hints[name], name
            default = getattr(struct(model="m", token_ids=[1]), name)
            if name not in ("model", "token_ids"):
                assert signature[name].default == default, name
