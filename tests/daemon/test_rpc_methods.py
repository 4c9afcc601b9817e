"""The daemon's JSON-RPC methods, registered over stubs: what `rpc_methods` says of each is its
handler's signature, and each failure reaches the client with the code of its kind."""

from __future__ import annotations

import inspect
import json
import typing
from types import SimpleNamespace
from typing import Any

import pytest

from daemon.api.jsonrpc import INVALID_PARAMS, Dispatcher
from daemon.api.params import json_types
from daemon.errors import STATUS, Busy, NetworkFailure, NotFound, RegistryRefused, ShardFailure
from daemon.registry_methods import register_registry_methods
from daemon.rpc_methods import register_node_methods
from daemon.shard_methods import register_shard_methods
from daemon.shards.jobs import ShardServiceError
from p2p.network import NetworkError
from registry.replica import Rejected

PEER = "12D3KooWStub"


class StubNet:
    async def connect(self, multiaddr: str) -> str:
        raise NetworkError(f"cannot dial {multiaddr}")


class StubReplica:
    def get(self, kind: str, key: str) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return {}


class StubReplicator:
    """Refuses every write with the reason it is given."""

    def __init__(self) -> None:
        self.replica = StubReplica()
        self.stats: dict[str, int] = {}
        self.reason = "quota"

    async def write(self, kind: str, key: str, value: Any) -> Any:
        raise Rejected(self.reason, "refused by the stub")


class StubShards:
    ident = SimpleNamespace(peer_id=PEER)

    async def ensure_torch(self) -> None:
        pass

    async def load(self, *args: Any) -> dict[str, Any]:
        raise ShardServiceError("bad_model", "no config.json")

    def new_job(self, owner: str = "") -> Any:
        raise ShardServiceError("busy", "32 generations are already running")


def dispatcher() -> tuple[Dispatcher, StubReplicator]:
    d = Dispatcher()
    replicator = StubReplicator()
    register_node_methods(
        d,
        ident=SimpleNamespace(peer_id=PEER, payout_address="0x0"),  # type: ignore[arg-type]
        network_id="stub",
        net=StubNet(),  # type: ignore[arg-type]
        directory=SimpleNamespace(),  # type: ignore[arg-type]
        local_state=dict,
        request_shutdown=lambda: None,
    )
    register_registry_methods(d, replicator)  # type: ignore[arg-type]
    register_shard_methods(d, StubShards(), SimpleNamespace())  # type: ignore[arg-type]
    return d, replicator


async def call(d: Dispatcher, method: str, params: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
    out = await d.handle(body.encode())
    assert out is not None
    return json.loads(out)


def test_every_description_is_its_handlers_signature() -> None:
    d, _ = dispatcher()
    described = d.describe()
    assert {m["name"] for m in described} >= {
        "node_connect",
        "rpc_methods",
        "registry_put",
        "registry_list",
        "generate",
        "generate_poll",
        "block_deploy",
    }
    for method in described:
        handler = d._methods[method["name"]].handler
        signature = inspect.signature(handler).parameters
        hints = typing.get_type_hints(handler, include_extras=True)
        assert method["description"], method["name"]  # every method says what it does
        assert [p["name"] for p in method["params"]] == list(signature), method["name"]
        for p in method["params"]:
            param = signature[p["name"]]
            assert p["required"] == (param.default is inspect.Parameter.empty)
            types = json_types(hints[p["name"]])
            assert p["type"] == "|".join("null" if t is type(None) else t.__name__ for t in types)
    generate = {
        p["name"]: p for p in next(m for m in described if m["name"] == "generate")["params"]
    }
    assert generate["temperature"] == {
        "name": "temperature",
        "type": "float",
        "required": False,
        "description": "0 (default) is greedy",
    }
    connect = next(m for m in described if m["name"] == "node_connect")
    assert connect["params"][0]["name"] == "multiaddr" and connect["params"][0]["required"]


@pytest.mark.parametrize(
    ("method", "params", "reason", "kind", "data"),
    [
        ("node_connect", {"multiaddr": "/ip4/1.2.3.4/tcp/1"}, None, None, None),
        (
            "node_connect",
            {"multiaddr": f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}"},
            None,
            NetworkFailure,
            None,
        ),
        (
            "registry_put",
            {"kind": "blocks", "key": "k", "value": {}},
            "quota",
            RegistryRefused,
            "quota",
        ),
        ("registry_delete", {"kind": "blocks", "key": "k"}, "not_found", NotFound, "not_found"),
        ("registry_get", {"kind": "blocks", "key": "k"}, None, NotFound, None),
        ("registry_put", {"kind": "nope", "key": "k", "value": {}}, None, None, None),
        ("registry_list", {"limit": 0}, None, None, None),
        ("registry_list", {"limit": 1001}, None, None, None),
        ("shard_plan", {"model_dir": "/nowhere", "nodes": 0}, None, None, None),
        (
            "block_load",
            {"model": "m", "model_dir": "/nowhere", "start": 0, "end": 1},
            None,
            ShardFailure,
            "bad_model",
        ),
        ("generate", {"model": "m", "token_ids": [1]}, None, Busy, "busy"),
    ],
)
async def test_failures_reach_the_client_with_their_kinds_code(
    method: str, params: dict[str, Any], reason: str | None, kind: Any, data: str | None
) -> None:
    d, replicator = dispatcher()
    if reason is not None:
        replicator.reason = reason
    error = (await call(d, method, params))["error"]
    code = INVALID_PARAMS if kind is None else STATUS[kind].jsonrpc
    assert error["code"] == code, error
    assert error.get("data", {}).get("reason") == data
