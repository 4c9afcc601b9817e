"""A shard frame that does not decode is held against the peer that sent it (the stream's
`misbehaved`, which on libp2p lowers its score and so the rate its bytes are read at,
p2p.inbound); a request a session refuses (a wrong position, an unknown session) is not:
honest clients can send those in a race."""

from __future__ import annotations

from typing import Any

import pytest
import trio

torch = pytest.importorskip("torch")

from daemon.shards import wire  # noqa: E402
from p2p.streams import stream_pair  # noqa: E402
from tests.daemon.shards import memory_cluster  # noqa: E402

cluster, model_dir = memory_cluster.cluster, memory_cluster.model_dir


class Scored:
    """The server's end of a stream, as a libp2p FramedStream is: it has `misbehaved`."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.garbage = 0

    def misbehaved(self) -> None:
        self.garbage += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


async def test_garbage_frames_are_held_against_the_sender_and_refusals_are_not(cluster, model_dir):
    server = await cluster.add("b", model_dir, 2, 6)
    client, server_end = stream_pair("attacker", "b", capacity=4)
    scored = Scored(server_end)

    async def ask(frame: bytes) -> str:
        await client.send(frame)
        reply, _ = wire.decode(await client.receive())
        return reply.code

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, scored)
        # refused by a session or the server, each something an honest client may send
        base = {"op": "open", "model": "tiny", "start": 2, "end": 6}
        assert await ask(wire.encode({**base, "model": "other", "max_length": 8})) == (
            "unknown_model"
        )
        forward = {"op": "forward", "session": "gone", "position": 0}
        assert await ask(wire.encode(forward)) == "unknown_session"
        assert scored.garbage == 0
        # frames that do not decode: garbage, each held against the peer
        assert await ask(b"\xff" * 100) == "malformed"
        assert await ask(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1") == "malformed"
        assert await ask(wire.encode({"op": "dance"})) == "bad_header"
        assert scored.garbage == 3
        await client.close()
        nursery.cancel_scope.cancel()
