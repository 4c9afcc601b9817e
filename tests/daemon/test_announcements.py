"""Routing and `block_list` read `blocks` entries through their typed form: only a server's
own announcement counts, and an entry that cannot be read is skipped and counted.

A hostile peer (its own identity, on the in-memory network) gossips a bad-typed announcement
and one naming another peer as the server; the node applies the configs/samples block spec;
and entries that an older version stored unchecked are put straight into the replica. The
node's `block_list` (over JSON-RPC) and route finding see the honest server only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio

from daemon.api.jsonrpc import Dispatcher
from daemon.metrics import Metrics
from daemon.shard_methods import register_shard_methods
from daemon.shards.service import ShardService
from daemon.specs import load_documents, substitute_self
from p2p import codec
from p2p.identity import NodeIdentity
from p2p.testing.memnet import MemoryNetwork
from registry.blocks import announcement_key
from registry.entry import sign_entry
from registry.hlc import HybridClock, Timestamp
from registry.replica import Replica
from registry.replication import ReplicationSettings, Replicator, topic_for

SAMPLES = Path(__file__).resolve().parents[2] / "configs" / "samples"
SETTINGS = ReplicationSettings(network_id="ann")


def announcement(peer_id: str, key: str, start: int, end: int, ms: Any = 2.0) -> dict[str, Any]:
    return {
        "blockId": key,
        "blockComponentURI": "m",
        "model": "m",
        "layers": [start, end],
        "served_by": [peer_id],
        "parameters": {"ms_per_layer": ms, "cache_tokens_free": 500},
    }


async def call(dispatcher: Dispatcher, method: str, params: dict[str, Any]) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    reply = json.loads(await dispatcher.handle(body.encode()))
    assert "error" not in reply, reply
    return reply["result"]


def rejected(metrics: Metrics, source: str, reason: str) -> float:
    return metrics.rejected.labels(source, reason)._value.get()


async def test_only_servers_own_readable_announcements_are_routed(autojump_clock):
    hub = MemoryNetwork(seed=1, fanout=8)
    ident = NodeIdentity(node_seed=hub.rng.randbytes(32), payout_key=hub.rng.randbytes(32))
    node = hub.add_node(ident.peer_id)
    metrics = Metrics()
    replica = Replica(
        ident, clock=HybridClock(lambda: int(hub.now() * 1000)), on_reject=metrics.reject
    )
    replicator = Replicator(node, replica, SETTINGS, rng=random.Random(1), on_reject=metrics.reject)
    await replicator.start()

    # this node serves layers 0-2 and announces them
    key = announcement_key("m", 0, 2, ident.peer_id)
    await replicator.write("blocks", key, announcement(ident.peer_id, key, 0, 2))
    # and applies the sample cluster and block spec (served_by: [$SELF]): not a server
    for path in ("cluster.yaml", "block.yaml"):
        for doc in load_documents(str(SAMPLES / path)):
            value = substitute_self(doc["value"], ident.peer_id)
            await replicator.write(doc["kind"], doc["key"], value)

    # a hostile peer gossips a bad-typed announcement and one naming this node as the server
    mallory = NodeIdentity.generate()
    attacker = hub.add_node(mallory.peer_id)
    await attacker.connect(ident.peer_id)
    now = Timestamp(int(hub.now() * 1000), 0)
    own_key = announcement_key("m", 2, 4, mallory.peer_id)
    poisoned = [
        sign_entry(
            mallory,
            kind="blocks",
            key=own_key,
            value=announcement(mallory.peer_id, own_key, 2, 4, ms="fast"),
            ts=now,
            created=now,
            owner=mallory.peer_id,
        ),
        sign_entry(
            mallory,
            kind="blocks",
            key="m-2-4",
            value=announcement(ident.peer_id, "m-2-4", 2, 4),
            ts=now,
            created=now,
            owner=mallory.peer_id,
        ),
    ]
    message = codec.encode({"v": 1, "entries": [e.to_wire() for e in poisoned]})
    await attacker.publish(topic_for(SETTINGS.network_id), message)
    refused = ("schema", "admission")
    with trio.fail_after(5):  # a metric has no event to wait on: poll it under a deadline
        while sum(rejected(metrics, "gossip", r) for r in refused) < 2:  # noqa: ASYNC110
            await trio.sleep(0.01)  # virtual: this test runs on the autojump clock
    assert rejected(metrics, "gossip", "schema") == 1
    assert rejected(metrics, "gossip", "admission") == 1
    assert len(replica.entries) == 3  # the announcement, the cluster, the block spec

    # as an older version would have stored them: both straight into the replica, unchecked
    for entry in poisoned:
        replica.entries.put(entry)

    daemon = SimpleNamespace(
        ident=ident, replica=replica, metrics=metrics, net=SimpleNamespace(peers={})
    )
    service = ShardService(
        ident=ident,
        net=daemon.net,
        replica=replica,
        replicator=SimpleNamespace(),  # type: ignore[arg-type]
        metrics=metrics,
        allow_remote_deploy=False,
    )
    dispatcher = Dispatcher()
    register_shard_methods(dispatcher, service, SimpleNamespace())  # type: ignore[arg-type]

    listed = await call(dispatcher, "block_list", {})
    assert listed["announced"] == {
        "m": [
            {
                "peer_id": ident.peer_id,
                "start": 0,
                "end": 2,
                "ms_per_layer": 2.0,
                "cache_tokens_free": 500,
                "price_per_unit": None,  # an announcement without a price: declares none
            }
        ]
    }
    assert await call(dispatcher, "block_list", {"model": "llama-3-8b"}) == {
        "local": [],
        "announced": {"llama-3-8b": []},
    }
    servers = await service.servers("m")
    assert [(s.peer_id, s.start, s.end) for s in servers] == [(ident.peer_id, 0, 2)]
    assert rejected(metrics, "registry", "bad_entry") >= 2
