"""A write cancelled half-way must not break the libp2p connection it was written on.

Noise encrypts each message with the next nonce of its connection before trio sends it; a
deadline that cancels the send after that (or between the chunks of a large frame) leaves
the two sides out of step, the peer fails to authenticate the next message and the whole
connection, with every stream on it, goes down. Deadlines around writes are everywhere
(request timeouts, sync rounds, pushes), so under load connections died mid-deploy.
"""

from __future__ import annotations

import random

import trio

from p2p import identity, records
from p2p.host import Libp2pNetwork

ECHO = "/gridmesh/test/echo/1.0.0"
SINK = "/gridmesh/test/sink/1.0.0"


class _AcceptAll:
    def validate(self, key: str, value: bytes) -> None:
        pass

    def select(self, key: str, values: list[bytes]) -> int:
        return len(values) - 1


def _node() -> Libp2pNetwork:
    return Libp2pNetwork(
        identity.NodeIdentity.generate(),
        network_id="writes",
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht_namespace=records.NAMESPACE,
        dht_validator=_AcceptAll(),
    )


async def test_writes_cancelled_mid_frame_leave_the_connection_usable() -> None:
    a, b = _node(), _node()
    received = 0

    async def echo(sender: str, payload: bytes) -> bytes:
        return payload

    async def sink(stream: object) -> None:
        nonlocal received
        while True:
            await stream.receive()  # type: ignore[attr-defined]
            received += 1

    b.set_request_handler(ECHO, echo)
    b.set_stream_handler(SINK, sink, max_frame_bytes=lambda: 1 << 20)
    async with a.run(), b.run():
        await a.connect(b.listen_addrs()[0])
        assert await a.request(b.peer_id, ECHO, b"before") == b"before"
        rng = random.Random(5)
        cancelled = 0
        with trio.fail_after(60):
            for _ in range(20):
                stream = await a.open_stream(b.peer_id, SINK)
                for _ in range(10):
                    # 300 KB frames go out as several Noise messages: deadlines of a few
                    # milliseconds land before, between and after them
                    with trio.move_on_after(rng.uniform(0, 0.004)) as scope:
                        await stream.send(rng.randbytes(300_000))
                    cancelled += scope.cancelled_caught
                    if scope.cancelled_caught:
                        break  # a stream whose frame was cut is abandoned, as callers do
                await stream.reset()
        assert cancelled >= 5, "the deadlines never cut a write: the test proves nothing"
        assert b.peer_id in a.connected_peers()
        # the connection the cut writes went over still carries traffic both ways
        assert await a.request(b.peer_id, ECHO, b"after") == b"after"
        assert received > 0
