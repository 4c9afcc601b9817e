"""Shard servers and clients on the in-memory network, for the shard session tests
(`test_session.py`, `test_session_guards.py`): `MemoryCluster` and its fixtures. Tests take
the fixtures by importing them."""

from __future__ import annotations

import pytest
import trio

from daemon.shards import SHARD_PROTOCOL
from daemon.shards.client import RemoteModel, generate
from daemon.shards.model import greedy_generate, load_model, make_tiny
from daemon.shards.server import ShardServer
from p2p.network import Stream, StreamHandler
from p2p.testing.memnet import MemoryNetwork, MemoryNode
from scheduler.routing import Server
from tests.daemon.harness import inline_threads

LAYERS = 6


class MemoryCluster:
    """Shard servers and their clients on the in-memory network, wired as the daemon wires
    them: each server is a `MemoryNode` serving `SHARD_PROTOCOL` with its `ShardServer`
    (frames bounded by what the server takes) and pushing chained steps to the others through
    that node; clients (`client`, and peers such as `mallory`) open streams through nodes of
    their own. `kill` removes a server's node as a killed daemon: its streams reset, dials to
    it refused. Servers whose dials to each other hang are cut apart by the hub's partition.
    Every node's stream handlers must end without raising (`check`, at teardown).
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.hub = MemoryNetwork()
        self.servers: dict[str, ShardServer] = {}
        self.ranges: dict[str, tuple[int, int]] = {}
        self.dead: set[str] = set()
        self.nodes: list[MemoryNode] = []  # every node ever added (for `check`)
        self.client = self.node("client")

    def node(self, peer_id: str) -> MemoryNode:
        """The node of `peer_id`, added to the network on first use."""
        if peer_id not in self.hub.peer_ids():
            self.nodes.append(self.hub.add_node(peer_id))
        return self.hub.node(peer_id)

    async def add(self, peer_id: str, model_dir, start: int, end: int, **kw) -> ShardServer:
        """A server of layers [start, end) on its own node (`opener`: how it pushes, by
        default through that node)."""
        kw.setdefault("opener", self.node(peer_id))
        server = ShardServer(**kw)
        await server.load("tiny", model_dir, start, end)
        self.servers[peer_id] = server
        self.ranges[peer_id] = (start, end)
        self.serve(peer_id)
        return server

    def serve(self, peer_id: str, handler: StreamHandler | None = None) -> None:
        """`peer_id`'s node serves the shard protocol with its server (or `handler`)."""
        server = self.servers[peer_id]
        self.node(peer_id).set_stream_handler(
            SHARD_PROTOCOL,
            handler or server.handle_stream,
            max_frame_bytes=lambda: server.max_frame_bytes,
        )

    async def dial(self, peer_id: str, origin: str = "client") -> Stream:
        """A shard stream from `origin`'s node to `peer_id`."""
        return await self.node(origin).open_stream(peer_id, SHARD_PROTOCOL)

    def kill(self, peer_id: str) -> None:
        """The server's daemon is killed: its streams reset, dials to it refused, and it is
        announced as dead."""
        self.dead.add(peer_id)
        self.hub.remove_node(peer_id, refuse=True)

    def bounce(self, peer_id: str, down_s: float) -> None:
        """The server's streams reset and dials to it are refused for `down_s` seconds (its
        daemon reconnecting, still announced as alive), then the same server serves again."""
        self.hub.remove_node(peer_id, refuse=True)

        async def back() -> None:
            await trio.sleep(down_s)  # the downtime itself; bouncing tests run on autojump
            self.servers[peer_id].pushes.opener = self.node(peer_id)
            self.serve(peer_id)

        self.nursery.start_soon(back)

    async def announced(self) -> list[Server]:
        return [
            Server(peer, start, end, ms_per_layer=1.0, rtt_ms=1.0, alive=peer not in self.dead)
            for peer, (start, end) in self.ranges.items()
        ]

    def check(self) -> None:
        """No stream handler raised: the network counts and resets a failing handler, where
        a test should fail."""
        failed = {n.peer_id: n.stream_handler_errors for n in self.nodes}
        assert not any(failed.values()), f"stream handlers raised: {failed}"


@pytest.fixture
async def cluster(nursery):
    cluster = MemoryCluster(nursery)
    yield cluster
    cluster.check()


@pytest.fixture
def virtual_time(autojump_clock, monkeypatch):
    """Trio's virtual clock for tests that wait on timeouts (a test's own argument: pytest-trio
    takes the clock from those only), with `trio.to_thread` run inline (a computing thread
    would let the clock jump past every deadline meanwhile). The other tests keep real time
    and worker threads: on this 2-core machine torch computing on the event loop's thread is
    several times slower (OpenMP's workers spin between steps)."""
    inline_threads(monkeypatch)
    return autojump_clock


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "m", layers=LAYERS, seed=3)


@pytest.fixture(scope="module")
def reference(model_dir):
    whole = load_model(model_dir)
    prompt = list(b"gridmesh splits models")
    return prompt, greedy_generate([whole], prompt, 24)


def remote(cluster: MemoryCluster, **kw) -> RemoteModel:
    return RemoteModel(
        cluster.client, cluster.announced, model_id="tiny", num_layers=LAYERS, max_length=128, **kw
    )


async def collect(model: RemoteModel, prompt, n, on_token=None) -> list[int]:
    out = []
    async for token in generate(model, prompt, n):
        out.append(token)
        if on_token:
            on_token(len(out))
    return out
