"""The multiplexed block stream (daemon.vdags.streams) on the in-memory network and trio's
virtual clock: calls to one peer share one stream and are answered out of order; a
caller's cancellation leaves the link usable; a broken link is replaced; malformed frames
from either side are refused, counted, and break only their own stream."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from daemon.vdags.protocol import (
    MAX_BATCH,
    BlockCall,
    BlockReply,
    MuxCall,
    MuxReply,
    ProtocolError,
    batch_frame,
    decode_mux_calls,
    decode_mux_replies,
    encode,
)
from daemon.vdags.streams import MAX_PENDING, MUX_PROTOCOL, BlockStreams, mux_handler
from p2p.codec import encode as encode_raw
from p2p.network import NetworkError
from p2p.testing.memnet import MemoryNetwork


class Server:
    """A block server whose calls take `input["sleep"]` seconds and answer their input."""

    def __init__(self) -> None:
        self.rejected: list[str] = []
        self.running = 0
        self.most = 0
        self.calls = 0

    async def run(self, call: BlockCall) -> BlockReply:
        self.calls += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await trio.sleep(call.input.get("sleep", 0))
        finally:
            self.running -= 1
        return BlockReply(True, output=call.input, load=self.running)


def pair(hub: MemoryNetwork, server: Server) -> tuple[Any, Any]:
    a, b = hub.add_node("a"), hub.add_node("b")
    b.set_stream_handler(MUX_PROTOCOL, mux_handler(server.run, server.rejected.append))
    return a, b


def call(n: int, sleep: float = 0.0) -> BlockCall:
    return BlockCall(block="blk", input={"n": n, "sleep": sleep}, timeout_s=10)


async def test_calls_share_one_stream_and_are_answered_out_of_order(autojump_clock):
    hub = MemoryNetwork(latency_s=0.01)
    server = Server()
    a, _ = pair(hub, server)
    streams = BlockStreams(a)
    done: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(streams.run)

        async def one(n: int) -> None:
            reply = await streams.call("b", call(n, sleep=(8 - n) * 0.1))
            assert reply.ok and reply.output["n"] == n
            done.append(n)

        started = trio.current_time()
        async with trio.open_nursery() as calls:
            for n in range(8):
                calls.start_soon(one, n)
        # side by side on the server (the slowest call's time, not the sum), the fastest
        # answered first; one stream opened for all of them
        assert trio.current_time() - started < 1.0
        assert server.most == 8 and done == list(range(7, -1, -1))
        assert hub.streams_opened == 1 and streams.opened == 1
        # the 8 calls, started together, went in fewer frames than calls
        sender = streams.links["b"].sender
        assert sender.items == 8 and sender.frames < 8
        assert (await streams.call("b", call(9))).output["n"] == 9
        assert hub.streams_opened == 1
        nursery.cancel_scope.cancel()
    assert streams.links == {}


async def test_a_cancelled_caller_leaves_the_link_usable(autojump_clock):
    hub = MemoryNetwork(latency_s=0.01)
    server = Server()
    a, _ = pair(hub, server)
    streams = BlockStreams(a)
    async with trio.open_nursery() as nursery:
        await nursery.start(streams.run)
        with trio.move_on_after(0.1) as scope:
            await streams.call("b", call(1, sleep=1.0))
        assert scope.cancelled_caught
        # its reply arrives later and is dropped; the next calls go on on the same stream
        assert (await streams.call("b", call(2))).output["n"] == 2
        await trio.sleep(2)
        assert (await streams.call("b", call(3))).output["n"] == 3
        assert hub.streams_opened == 1 and server.calls == 3
        nursery.cancel_scope.cancel()


async def test_a_broken_link_fails_its_calls_and_is_replaced(autojump_clock):
    hub = MemoryNetwork(latency_s=0.01)
    server = Server()
    a, _ = pair(hub, server)
    streams = BlockStreams(a)
    async with trio.open_nursery() as nursery:
        await nursery.start(streams.run)
        assert (await streams.call("b", call(1))).ok
        link = streams.links["b"]
        # the server goes away while a call waits: the call fails with NetworkError
        async with trio.open_nursery() as calls:

            async def waiting() -> None:
                with pytest.raises(NetworkError, match="broke"):
                    await streams.call("b", call(2, sleep=5))

            calls.start_soon(waiting)
            await trio.sleep(0.5)
            await link.stream.reset()  # as a restarted peer's connection would be
        assert "b" not in streams.links
        # the next call opens a fresh link
        assert (await streams.call("b", call(3))).output["n"] == 3
        assert streams.opened == 2
        nursery.cancel_scope.cancel()


async def test_a_kept_link_found_broken_is_retried_once_on_a_fresh_one(autojump_clock):
    hub = MemoryNetwork(latency_s=0.01)
    server = Server()
    a, _ = pair(hub, server)
    streams = BlockStreams(a)
    async with trio.open_nursery() as nursery:
        await nursery.start(streams.run)
        assert (await streams.call("b", call(1))).ok
        hub.remove_node("b", refuse=True)  # the peer restarts: its streams are reset
        b2 = hub.add_node("b")
        b2.set_stream_handler(MUX_PROTOCOL, mux_handler(server.run, server.rejected.append))
        await trio.sleep(1)
        assert (await streams.call("b", call(2))).output["n"] == 2
        nursery.cancel_scope.cancel()


async def test_calls_need_the_streams_running():
    hub = MemoryNetwork()
    a, _ = pair(hub, Server())
    with pytest.raises(NetworkError, match="not running"):
        await BlockStreams(a).call("b", call(1))


def raw_call(id_: Any = 1, **call: Any) -> dict[str, Any]:
    return {"id": id_, "call": {"block": "blk", "input": 1, "timeout_s": 1, **call}}


@pytest.mark.parametrize(
    "junk, reason",
    [
        (b"\xc1garbage", "malformed"),
        (encode_raw([raw_call(timeout_s=-1)]), "invalid"),
        (encode_raw([raw_call(block="../x")]), "invalid"),
        (encode_raw([raw_call(-1)]), "invalid"),
        (encode_raw([raw_call(1 << 40)]), "invalid"),
        (encode_raw([{**raw_call(), "x": 1}]), "invalid"),  # an unknown field
        (encode_raw([raw_call(), {"block": "blk", "input": 1, "timeout_s": 1}]), "invalid"),
        (encode_raw(raw_call()), "invalid"),  # not a batch
        (encode_raw([]), "invalid"),
        (encode_raw([raw_call(i) for i in range(MAX_BATCH + 1)]), "invalid"),
    ],
)
async def test_a_malformed_call_is_refused_counted_and_resets_the_stream(
    autojump_clock, junk, reason
):
    hub = MemoryNetwork(latency_s=0.01)
    server = Server()
    a, _ = pair(hub, server)
    stream = await a.open_stream("b", MUX_PROTOCOL)
    # a call in flight, then the junk: the stream is reset (the call with it)
    await stream.send(batch_frame([encode(MuxCall(7, call(1, sleep=0.5)))]))
    await stream.send(junk)
    with pytest.raises(NetworkError):
        while True:
            await stream.receive()
    assert server.rejected == [reason]
    # the server serves a new stream as before
    stream = await a.open_stream("b", MUX_PROTOCOL)
    await stream.send(batch_frame([encode(MuxCall(8, call(2)))]))
    assert [r.id for r in decode_mux_replies(await stream.receive())] == [8]


async def test_a_malformed_reply_breaks_the_link_with_a_clear_error(autojump_clock):
    hub = MemoryNetwork(latency_s=0.01)
    a, b = hub.add_node("a"), hub.add_node("b")

    async def liar(stream: Any) -> None:
        (message,) = decode_mux_calls(await stream.receive())
        await stream.send(encode_raw([{"id": message.id, "reply": {"ok": "yes"}}]))
        await trio.sleep_forever()

    b.set_stream_handler(MUX_PROTOCOL, liar)
    rejected: list[str] = []
    streams = BlockStreams(a, rejected.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(streams.run)
        with pytest.raises(NetworkError, match="Expected `bool`"):
            await streams.call("b", call(1))
        assert "b" not in streams.links and rejected == ["invalid"]
        nursery.cancel_scope.cancel()


async def test_the_server_runs_at_most_max_pending_calls_of_a_stream_at_once(autojump_clock):
    hub = MemoryNetwork(latency_s=0.001)
    server = Server()
    a, _ = pair(hub, server)
    stream = await a.open_stream("b", MUX_PROTOCOL)
    total = MAX_PENDING + 20
    async with trio.open_nursery() as nursery:

        async def send_all() -> None:
            for n in range(total):
                await stream.send(batch_frame([encode(MuxCall(n, call(n, sleep=1.0)))]))

        nursery.start_soon(send_all)
        ids: set[int] = set()
        while len(ids) < total:
            ids.update(r.id for r in decode_mux_replies(await stream.receive()))
    assert ids == set(range(total))
    assert server.most == MAX_PENDING


def test_ids_are_bounded_and_batches_round_trip():
    for n in (1, 15, 16, MAX_BATCH):
        messages = [MuxCall(i, call(i)) for i in range(n)]
        assert decode_mux_calls(batch_frame([encode(m) for m in messages])) == messages
    reply = MuxReply((1 << 32) - 1, BlockReply(True, output=[1, "x"]))
    assert decode_mux_replies(batch_frame([encode(reply)])) == [reply]
    for junk in (
        [{"id": 1 << 32, "reply": {"ok": True}}],  # id out of range
        [],  # an empty batch
        [{"id": 1, "reply": {"ok": True}}] * (MAX_BATCH + 1),  # too many
        {"id": 1, "reply": {"ok": True}},  # not a batch
    ):
        with pytest.raises(ProtocolError, match="invalid|Expected"):
            decode_mux_replies(encode_raw(junk))
    deep: Any = 1
    for _ in range(20):  # a value deeper than MAX_DEPTH inside its envelope
        deep = [deep]
    with pytest.raises(ProtocolError, match="deeper"):
        decode_mux_calls(
            encode_raw([{"id": 1, "call": {"block": "b", "input": deep, "timeout_s": 1}}])
        )
