"""A request that waits in the endpoint's fair queue is told its position: a streamed one in
SSE comments (`: queued position=N`, sent when it changes at most every notice period, and
repeated as a keep-alive), a non-streamed one in its reply's `x-queue-position` header; a
wait past the queue's time after the head went out is an error event; and the official
`openai` client reads a stream that had such comments as if it had none."""

from __future__ import annotations

import json

import pytest
import trio

from daemon.api.openai_sse import QUEUE_KEEPALIVE_S, QUEUE_NOTICE_S
from daemon.serving.admission import POLL_S
from tests.daemon.serving.openai_helpers import Client, connect
from tests.daemon.serving.scripted_engine import MODEL, answered, scripted_server, until

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat(**extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


async def next_record(client: Client, reply) -> bytes:
    """The next SSE record of a streamed reply, raw (a comment or a `data:` line)."""
    while b"\n\n" not in reply.body:
        event = await client.event()
        assert not isinstance(event, trio.EndOfChannel), event
        reply.body += bytes(event.data)
    one, reply.body = reply.body.split(b"\n\n", 1)
    return one


async def test_a_streamed_request_in_the_queue_is_told_its_position(autojump_clock):
    server, engine = scripted_server(gated=False)
    held = engine.hold_every_slot()
    async with trio.open_nursery() as nursery:
        ahead = trio.CancelScope()

        async def first_in_line() -> None:
            with ahead:
                await engine.admission.acquire("someone", 1, MODEL)

        nursery.start_soon(first_in_line)
        await until(lambda: engine.admission.waiting == 1, 1, "the first request to queue")
        client = Client(connect(server, nursery))
        await client.send("POST", CHAT, chat(max_tokens=3, stream=True))
        reply = await client.head()  # the head goes out with the first notice
        assert reply.status == 200 and reply.headers["content-type"] == "text/event-stream"
        assert await next_record(client, reply) == b": queued position=2"
        ahead.cancel()  # the one ahead leaves: this one is next
        left = trio.current_time()
        assert await next_record(client, reply) == b": queued position=1"
        assert trio.current_time() - left <= QUEUE_NOTICE_S + POLL_S + 0.01
        # unchanged: said again only as a keep-alive
        told = trio.current_time()
        assert await next_record(client, reply) == b": queued position=1"
        assert trio.current_time() - told == pytest.approx(QUEUE_KEEPALIVE_S, abs=POLL_S + 0.01)
        engine.free(held)  # admitted: the answer follows in the same stream
        events = []
        while (record := await next_record(client, reply)) != b"data: [DONE]":
            assert record.startswith(b"data: "), record
            events.append(json.loads(record[6:]))
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        assert text == "t0 t1 t2 " and events[-1]["choices"][0]["finish_reason"] == "length"
        await client.stream.aclose()
    assert engine.metrics.serving_queued.labels(MODEL)._value.get() == 0


async def test_notices_are_rate_bounded_however_often_the_position_changes(autojump_clock):
    server, engine = scripted_server(gated=False)
    held = engine.hold_every_slot()
    async with trio.open_nursery() as nursery:
        scopes = [trio.CancelScope() for _ in range(20)]

        async def waiter(scope: trio.CancelScope, i: int) -> None:
            with scope:
                await engine.admission.acquire(f"w{i}", 1, MODEL)

        for i, scope in enumerate(scopes):
            nursery.start_soon(waiter, scope, i)
        await until(lambda: engine.admission.waiting == 20, 1, "20 requests to queue")
        client = Client(connect(server, nursery))
        await client.send("POST", COMPLETIONS, {"model": MODEL, "prompt": "a", "stream": True})
        reply = await client.head()
        start = trio.current_time()
        assert await next_record(client, reply) == b": queued position=21"
        for scope in scopes:  # one leaves every POLL_S: the position changes 20 times
            scope.cancel()
            await trio.sleep(POLL_S)  # virtual time (autojump_clock): the pace of leaving
        notices = [b": queued position=21"]
        while (record := await next_record(client, reply)) != b": queued position=1":
            notices.append(record)
        notices.append(record)
        took = trio.current_time() - start
        assert len(notices) <= took / QUEUE_NOTICE_S + 1  # at most one per notice period
        positions = [int(n.rsplit(b"=", 1)[1]) for n in notices]
        assert positions == sorted(positions, reverse=True) and len(positions) >= 4
        engine.free(held)
        await client.stream.aclose()


async def test_a_wait_past_the_queues_time_after_the_head_is_an_error_event(autojump_clock):
    server, engine = scripted_server(gated=False, queue_timeout_s=5.0)
    engine.hold_every_slot()
    async with trio.open_nursery() as nursery:
        client = Client(connect(server, nursery))
        await client.send("POST", CHAT, chat(stream=True))
        reply = await client.head()
        assert reply.status == 200
        assert await next_record(client, reply) == b": queued position=1"
        records = []
        while (record := await next_record(client, reply)) != b"data: [DONE]":
            records.append(record)
        errors = [json.loads(r[6:]) for r in records if r.startswith(b"data: ")]
        assert [e["error"]["code"] for e in errors] == ["server_busy"]
        await client.stream.aclose()
    assert answered(engine, 503) == 1 and answered(engine, 200) == 0
    assert engine.admission.waiting == 0


async def test_a_full_queue_is_still_a_plain_429_and_a_request_that_never_waits_gets_no_notice(
    autojump_clock,
):
    server, engine = scripted_server(gated=False, max_queue=1)
    body = {"model": MODEL, "prompt": "a", "max_tokens": 2}
    async with trio.open_nursery() as nursery:
        client = Client(connect(server, nursery))  # nothing queued: an answer at once
        await client.send("POST", COMPLETIONS, {**body, "stream": True})
        reply = await client.rest(await client.head())
        assert reply.status == 200 and all(b"queued" not in e for e in [reply.body])
        await client.stream.aclose()
        held = engine.hold_every_slot()
        waiting = Client(connect(server, nursery))
        await waiting.send("POST", COMPLETIONS, body)  # not streamed: waits, then a header
        await until(lambda: engine.admission.waiting == 1, 1, "the request to queue")
        full = Client(connect(server, nursery))
        await full.send("POST", COMPLETIONS, {**body, "stream": True})
        refused = await full.rest(await full.head())
        assert refused.status == 429 and refused.json()["error"]["code"] == "queue_full"
        assert refused.headers["retry-after"] == "1"
        engine.free(held)
        answer = await waiting.rest(await waiting.head())
        assert answer.status == 200 and answer.headers["x-queue-position"] == "1"
        assert answer.json()["choices"][0]["text"] == "t0 t1 "
        again = Client(connect(server, nursery))  # not queued: no header
        await again.send("POST", COMPLETIONS, body)
        assert "x-queue-position" not in (await again.rest(await again.head())).headers
        for stream in (full.stream, waiting.stream, again.stream):
            await stream.aclose()


class _Recording(trio.abc.HalfCloseableStream):
    """A served connection that keeps a copy of every byte the server writes."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.sent = b""

    async def send_all(self, data) -> None:
        self.sent += bytes(data)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_the_openai_client_reads_a_stream_that_had_queue_notices():
    openai = pytest.importorskip("openai")
    server, engine = scripted_server(gated=False, queue_notice_s=0.05)
    served: list[_Recording] = []

    async def handler(stream: trio.SocketStream) -> None:
        recording = _Recording(stream)
        served.append(recording)
        await server.handle_connection(recording, "127.0.0.1:1")

    def sent() -> bytes:
        return b"".join(r.sent for r in served)

    held = engine.hold_every_slot()
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, handler, listeners)
        ahead = trio.CancelScope()

        async def first_in_line() -> None:
            with ahead:
                await engine.admission.acquire("someone", 1, MODEL)

        nursery.start_soon(first_in_line)
        await until(lambda: engine.admission.waiting == 1, 5, "the first request to queue")

        def client_streams() -> tuple[list[str], str | None]:
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30
            )
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
            )
            chunks = list(stream)
            pieces = [c.choices[0].delta.content or "" for c in chunks]
            return pieces, chunks[-1].choices[0].finish_reason

        result = {}

        async def run_client() -> None:
            result["got"] = await trio.to_thread.run_sync(client_streams)

        nursery.start_soon(run_client)
        await until(lambda: b": queued position=2" in sent(), 10, "the client to be told 2")
        ahead.cancel()
        await until(lambda: b": queued position=1" in sent(), 10, "the client to be told 1")
        engine.free(held)
        await until(lambda: "got" in result, 10, "the client's stream to end")
        nursery.cancel_scope.cancel()
    pieces, finish = result["got"]
    assert "".join(pieces) == "t0 t1 t2 " and finish == "length"
    assert pieces[0] == ""  # the role chunk: the comments before it were skipped
