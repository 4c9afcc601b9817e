"""A client that leaves is counted once (rejected `client_gone` and a 499), at every point it
can leave and however the endpoint sees it: the connection watcher sees it close, a write
finds it closed, a write fails and the watcher sees the close while the generations unwind
(a group of both), while queued (streamed after its first notice, or not streamed), while a
non-streamed answer is computed or written. A client that leaves after its whole answer was
written is a 200, not a 499.

Deterministic cases run on `Wire`, a scripted connection (virtual clock); the same points
are then hit over real sockets on 127.0.0.1, closed with a FIN or a reset."""

from __future__ import annotations

import math
import socket
import struct
from functools import partial

import pytest
import trio

from daemon.api.openai_http import serve_openai
from tests.daemon.serving.openai_helpers import Client
from tests.daemon.serving.scripted_engine import (
    MODEL,
    ScriptedEngine,
    answered,
    rejected,
    scripted_server,
    until,
)

STREAMED = {"model": MODEL, "prompt": "a", "max_tokens": 400, "stream": True}
PLAIN = {"model": MODEL, "prompt": "a", "max_tokens": 400}


class Wire(trio.abc.HalfCloseableStream):
    """The server's end of a client connection the test drives: `feed` is what the client
    sends, `hang_up` makes the server's reads see EOF, `cut` makes its writes fail as a
    socket's do once the client is gone (BrokenResourceError)."""

    def __init__(self) -> None:
        self._feed, self._incoming = trio.open_memory_channel[bytes](math.inf)
        self.written = b""
        self.cut = False
        self.fail_on: bytes | None = None  # the write that holds this fails (and all after)

    def feed(self, data: bytes) -> None:
        self._feed.send_nowait(data)

    def hang_up(self) -> None:
        self._feed.close()

    async def send_all(self, data) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.fail_on is not None and self.fail_on in bytes(data):
            self.cut = True
        if self.cut:
            raise trio.BrokenResourceError("the client is gone")
        self.written += bytes(data)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes=None) -> bytes:
        try:
            return await self._incoming.receive()
        except trio.EndOfChannel:
            return b""

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._incoming.close()
        await trio.lowlevel.checkpoint()


def _request(body: dict) -> bytes:
    import json

    raw = json.dumps(body).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {len(raw)}\r\n\r\n"
    return head.encode() + raw


async def _counted_once(server, engine: ScriptedEngine, timeout_s: float = 30) -> None:
    """Wait for the request to be over (its generations and its connection ended), then
    check it was counted as a client gone exactly once and as nothing else."""

    def over() -> bool:
        counted = sum(answered(engine, status) for status in (200, 499, 500, 503))
        return counted >= 1 and server.connections == 0 and engine.running == 0

    await until(over, timeout_s, "the request and its connection to end")
    assert rejected(engine, "client_gone") == 1
    assert answered(engine, 499) == 1
    assert answered(engine, 200) == 0 and answered(engine, 503) == 0
    assert rejected(engine, "internal_error") == 0
    assert engine.admission.waiting == 0
    assert all(job.owner.startswith("holder") for job in engine.table.jobs.values())
    assert engine.metrics.serving_queued.labels(MODEL)._value.get() == 0


async def _serve_wire(server, nursery, body: dict) -> Wire:
    wire = Wire()
    nursery.start_soon(server.handle_connection, wire, "127.0.0.1:40000")
    wire.feed(_request(body))
    return wire


async def test_the_watcher_sees_the_client_leave_mid_stream(autojump_clock):
    server, engine = scripted_server()
    async with trio.open_nursery() as nursery:
        wire = await _serve_wire(server, nursery, STREAMED)
        engine.allow(2)
        await until(lambda: wire.written.count(b"data: ") >= 2, 5, "two pieces written")
        wire.hang_up()  # writes would still succeed: only the watcher can see it
        await _counted_once(server, engine)


async def test_a_write_finds_the_client_gone_and_the_watcher_never_does(autojump_clock):
    server, engine = scripted_server()
    async with trio.open_nursery() as nursery:
        wire = await _serve_wire(server, nursery, STREAMED)
        engine.allow(1)
        await until(lambda: b"data: " in wire.written, 5, "the first piece written")
        wire.cut = True
        engine.allow(1)
        await _counted_once(server, engine)


async def test_a_failed_write_and_the_watcher_while_the_generations_unwind_count_once(
    autojump_clock,
):
    # the write fails first; while the generation closes its sessions (shielded, as
    # run_generation does) the watcher sees the close too: both end the request together
    server, engine = scripted_server()
    async with trio.open_nursery() as nursery:
        wire = await _serve_wire(server, nursery, STREAMED)
        engine.allow(1)
        await until(lambda: b"data: " in wire.written, 5, "the first piece written")
        engine.cleanup_s = 0.5
        engine.on_cleanup = wire.hang_up
        wire.cut = True
        engine.allow(1)
        await _counted_once(server, engine)


async def test_the_client_leaving_and_a_write_failing_at_once_count_once(autojump_clock):
    server, engine = scripted_server()
    async with trio.open_nursery() as nursery:
        wire = await _serve_wire(server, nursery, STREAMED)
        engine.allow(1)
        await until(lambda: b"data: " in wire.written, 5, "the first piece written")
        wire.cut = True
        wire.hang_up()
        engine.allow(1)
        await _counted_once(server, engine)


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "plain"])
async def test_a_client_that_leaves_while_queued_is_counted_once(autojump_clock, streamed):
    server, engine = scripted_server()
    held = engine.hold_every_slot()
    async with trio.open_nursery() as nursery:
        wire = await _serve_wire(server, nursery, STREAMED if streamed else PLAIN)
        await until(lambda: engine.admission.waiting == 1, 5, "the request to queue")
        if streamed:
            await until(lambda: b": queued position=1" in wire.written, 5, "its first notice")
        wire.hang_up()
        await _counted_once(server, engine)
        engine.free(held)


async def test_a_client_that_leaves_while_its_plain_answer_is_computed_is_counted_once(
    autojump_clock,
):
    server, engine = scripted_server()
    async with trio.open_nursery() as nursery:
        wire = await _serve_wire(server, nursery, PLAIN)
        engine.allow(3)
        await until(lambda: engine.running == 1, 5, "the generation to run")
        wire.hang_up()
        await _counted_once(server, engine)


async def test_a_plain_answer_whose_write_fails_is_counted_once(autojump_clock):
    server, engine = scripted_server(gated=False)
    async with trio.open_nursery() as nursery:
        wire = await _serve_wire(server, nursery, {**PLAIN, "max_tokens": 3})
        wire.cut = True  # the answer is computed, and cannot be delivered
        await _counted_once(server, engine)


async def test_a_stream_whose_last_write_fails_is_counted_once(autojump_clock):
    server, engine = scripted_server(gated=False)
    async with trio.open_nursery() as nursery:
        wire = Wire()
        wire.fail_on = b"data: [DONE]"  # [DONE] and the reply's end go in one write
        nursery.start_soon(server.handle_connection, wire, "127.0.0.1:40000")
        wire.feed(_request({**STREAMED, "max_tokens": 2}))
        await _counted_once(server, engine)


async def test_a_client_that_leaves_after_its_whole_answer_is_a_200(autojump_clock):
    server, engine = scripted_server(gated=False)
    async with trio.open_nursery() as nursery:
        wire = await _serve_wire(server, nursery, {**STREAMED, "max_tokens": 2})
        await until(lambda: wire.written.endswith(b"0\r\n\r\n"), 5, "the whole stream")
        wire.hang_up()
        await until(lambda: server.connections == 0, 5, "the connection to close")
    assert answered(engine, 200) == 1 and answered(engine, 499) == 0
    assert rejected(engine, "client_gone") == 0


# -- the same points over real sockets ---------------------------------------------------


async def _dial(port: int, how: str) -> Client:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    if how == "reset":  # close() sends a RST instead of a FIN
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return Client(stream)


@pytest.mark.parametrize("how", ["fin", "reset"])
@pytest.mark.parametrize("where", ["mid_stream", "queued_stream", "queued_plain", "mid_plain"])
async def test_a_client_that_leaves_over_a_real_socket_is_counted_once(how, where):
    server, engine = scripted_server(queue_notice_s=0.05)
    held = engine.hold_every_slot() if where.startswith("queued") else []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_openai, server, host="127.0.0.1", port=0))
        client = await _dial(port, how)
        streamed = where.endswith("stream")
        await client.send("POST", "/v1/completions", STREAMED if streamed else PLAIN)
        if where == "mid_stream":
            engine.allow(1)
            reply = await client.head()
            assert (await client.next_sse(reply))["choices"][0]["text"] == "t0 "
        elif where == "queued_stream":
            reply = await client.head()
            while b": queued position=1\n\n" not in reply.body:
                reply.body += bytes((await client.event()).data)
        elif where == "queued_plain":
            await until(lambda: engine.admission.waiting == 1, 10, "the request to queue")
        else:
            engine.allow(1)
            await until(lambda: engine.running == 1, 10, "the generation to run")
        await client.stream.aclose()
        await _counted_once(server, engine, timeout_s=10)
        engine.free(held)
        nursery.cancel_scope.cancel()
