"""Shard servers and the client in one process, over in-memory streams: exact generation
through a chain, failover with replay, and refusals of bad input."""

from __future__ import annotations

import math

import pytest
import trio

torch = pytest.importorskip("torch")

from daemon.shards import wire  # noqa: E402
from daemon.shards.client import GenerationError, RemoteModel, generate  # noqa: E402
from daemon.shards.model import greedy_generate, load_model, make_tiny  # noqa: E402
from daemon.shards.server import ShardServer  # noqa: E402
from p2p.memnet import ChannelStream, stream_pair  # noqa: E402
from p2p.network import NetworkError  # noqa: E402
from scheduler.routing import Server  # noqa: E402

LAYERS = 6


class Cluster:
    """Shard servers reachable by peer id; `kill` drops one like a SIGKILLed process."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.servers: dict[str, ShardServer] = {}
        self.ranges: dict[str, tuple[int, int]] = {}
        self.scopes: dict[str, list[trio.CancelScope]] = {}
        self.dead: set[str] = set()

    async def add(self, peer_id: str, model_dir, start: int, end: int) -> ShardServer:
        server = ShardServer()
        await server.load("tiny", model_dir, start, end)
        self.servers[peer_id] = server
        self.ranges[peer_id] = (start, end)
        self.scopes[peer_id] = []
        return server

    async def open_stream(self, peer_id: str, protocol: str) -> ChannelStream:
        if peer_id in self.dead or peer_id not in self.servers:
            raise NetworkError(f"cannot reach {peer_id}")
        client_end, server_end = stream_pair("client", peer_id)
        scope = trio.CancelScope()
        self.scopes[peer_id].append(scope)

        async def serve() -> None:
            with scope:
                await self.servers[peer_id].handle_stream(server_end)
            await server_end.close()

        self.nursery.start_soon(serve)
        return client_end

    def kill(self, peer_id: str) -> None:
        self.dead.add(peer_id)
        for scope in self.scopes[peer_id]:
            scope.cancel()

    async def announced(self) -> list[Server]:
        return [
            Server(peer, start, end, ms_per_layer=1.0, rtt_ms=1.0, alive=peer not in self.dead)
            for peer, (start, end) in self.ranges.items()
        ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "m", layers=LAYERS, seed=3)


@pytest.fixture(scope="module")
def reference(model_dir):
    whole = load_model(model_dir)
    prompt = list(b"gridmesh splits models")
    return prompt, greedy_generate([whole], prompt, 24)


def remote(cluster: Cluster, **kw) -> RemoteModel:
    return RemoteModel(
        cluster, cluster.announced, model_id="tiny", num_layers=LAYERS, max_length=128, **kw
    )


async def collect(model: RemoteModel, prompt, n, on_token=None) -> list[int]:
    out = []
    async for token in generate(model, prompt, n):
        out.append(token)
        if on_token:
            on_token(len(out))
    return out


async def test_chain_of_three_generates_exactly_the_single_process_tokens(model_dir, reference):
    prompt, expected = reference
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery)
        for peer, (a, b) in {"s1": (0, 2), "s2": (2, 4), "s3": (4, 6)}.items():
            await cluster.add(peer, model_dir, a, b)
        model = remote(cluster)
        await model.open()
        assert [h["peer_id"] for h in model.route] == ["s1", "s2", "s3"]
        assert await collect(model, prompt, 24) == expected
        await model.close()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("hop", [0, 1, 2])
async def test_killed_server_mid_generation_gives_the_same_tokens(model_dir, reference, hop):
    prompt, expected = reference
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery)
        for name, (a, b) in {"a": (0, 2), "m": (2, 4), "z": (4, 6)}.items():
            await cluster.add(f"{name}1", model_dir, a, b)
            await cluster.add(f"{name}2", model_dir, a, b)  # a replica of each range
        model = remote(cluster)
        await model.open()
        victim = model.route[hop]["peer_id"]

        def maybe_kill(count: int) -> None:
            if count == 10:
                cluster.kill(victim)

        assert await collect(model, prompt, 24, maybe_kill) == expected
        assert [r["peer_id"] for r in model.recoveries] == [victim]
        assert victim not in [h["peer_id"] for h in model.route]
        nursery.cancel_scope.cancel()


async def test_no_replica_is_a_clear_error(model_dir, reference):
    prompt, _ = reference
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery)
        await cluster.add("a", model_dir, 0, 3)
        await cluster.add("b", model_dir, 3, 6)
        model = remote(cluster)
        await model.open()

        def kill_b(count: int) -> None:
            if count == 3:
                cluster.kill("b")

        with pytest.raises(GenerationError, match="3"):
            await collect(model, prompt, 10, kill_b)
        nursery.cancel_scope.cancel()


async def test_bad_requests_are_refused_and_the_server_keeps_serving(model_dir):
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery)
        server = await cluster.add("b", model_dir, 2, 6)
        stream = await cluster.open_stream("b", "shard")

        async def ask(header, tensor=None):
            await stream.send(wire.encode(header, tensor))
            return wire.decode(await stream.receive())

        base = {"op": "open", "model": "tiny", "start": 2, "end": 6}
        assert (await ask({**base, "max_length": 10**9}))[0]["code"] == "bad_length"
        assert (await ask({**base, "model": "other", "max_length": 8}))[0][
            "code"
        ] == "unknown_model"
        reply, _ = await ask({**base, "max_length": 8})
        session = reply["session"]
        fwd = {"op": "forward", "session": session, "position": 0}
        hidden = server.blocks["tiny"].config.hidden_size
        cases = [
            ({**fwd, "session": "nope"}, torch.zeros(1, 1, hidden), "unknown_session"),
            (fwd, torch.zeros(1, 1, hidden + 1), "bad_input"),  # wrong shape
            (fwd, torch.zeros(1, 1, hidden, dtype=torch.float16), "bad_input"),  # wrong dtype
            (fwd, torch.zeros(1, 2), "bad_input"),  # token ids to a middle shard
            ({**fwd, "position": 5}, torch.zeros(1, 1, hidden), "bad_position"),
            (fwd, torch.zeros(1, 9, hidden), "too_long"),  # over the session's max_length
            ({"op": "dance", "session": session}, None, "bad_op"),
        ]
        for header, tensor, code in cases:
            reply, _ = await ask(header, tensor)
            assert reply["code"] == code, (header, reply)
        await stream.send(b"\xff" * 100)  # garbage frame
        assert wire.decode(await stream.receive())[0]["code"] == "malformed"
        reply, out = await ask(fwd, torch.zeros(1, 3, hidden))
        assert reply["op"] == "result" and out.shape == (1, 3, 258)
        assert not math.isnan(float(out.sum()))
        nursery.cancel_scope.cancel()


async def test_prompt_over_the_context_length_is_refused(model_dir):
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery)
        await cluster.add("a", model_dir, 0, 6)
        model = remote(cluster)
        await model.open()
        with pytest.raises(GenerationError, match="exceed"):
            await model.step(list(range(200)))
        nursery.cancel_scope.cancel()


async def test_idle_sessions_expire(model_dir):
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery)
        server = await cluster.add("a", model_dir, 0, 6)
        stream = await cluster.open_stream("a", "shard")
        await stream.send(
            wire.encode({"op": "open", "model": "tiny", "start": 0, "end": 6, "max_length": 8})
        )
        session = wire.decode(await stream.receive())[0]["session"]
        server.session_idle_s = 0.0
        assert server.reap_idle() == 1 and not server.sessions
        await stream.send(
            wire.encode(
                {"op": "forward", "session": session, "position": 0},
                torch.tensor([[1, 2]], dtype=torch.int64),
            )
        )
        assert wire.decode(await stream.receive())[0]["code"] == "unknown_session"
        nursery.cancel_scope.cancel()
