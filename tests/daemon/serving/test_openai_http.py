"""The endpoint's HTTP layer (daemon.api.openai_http) against clients that misbehave at the
HTTP level, on in-memory streams and the virtual clock: a head or body that never completes,
garbage instead of HTTP, connections past the cap, keep-alive. No model is needed: the engine
serves an empty network."""

from __future__ import annotations

from types import SimpleNamespace

import trio
import trio.testing

from daemon.api.openai_http import REQUEST_TIMEOUT_S, OpenAIServer
from daemon.metrics import Metrics
from daemon.serving.access import Access
from daemon.serving.engine import Engine
from daemon.serving.settings import ServingConfig
from daemon.shards.jobs import JobTable
from registry.sync import Entries
from tests.daemon.serving.openai_helpers import Client, connect, request


def _server(**kw) -> tuple[OpenAIServer, Metrics]:
    metrics = Metrics()
    service = JobTable()
    service.replica = SimpleNamespace(entries=Entries())  # an empty network: no model announced
    service.local_block = lambda model: None
    engine = Engine(service, metrics)
    return OpenAIServer(engine, Access(ServingConfig(openai=True)), metrics, **kw), metrics


def _rejected(metrics: Metrics, reason: str) -> float:
    return metrics.rejected.labels("openai", reason)._value.get()


async def _closed(stream) -> bool:
    """Whether the server closes the stream (reading gives EOF, after any answer) within
    the request timeout and its linger."""
    with trio.move_on_after(REQUEST_TIMEOUT_S + 5):
        while await stream.receive_some(65536):
            pass
        return True
    return False


async def test_a_head_that_never_completes_is_dropped_others_are_served(autojump_clock):
    server, metrics = _server()
    async with trio.open_nursery() as nursery:
        slow = connect(server, nursery)
        await slow.send_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and no more
        reply = await request(server, "GET", "/v1/models")
        assert reply.status == 200 and reply.json() == {"data": [], "object": "list"}
        start = trio.current_time()
        assert await _closed(slow)
        assert trio.current_time() - start <= REQUEST_TIMEOUT_S + 1
    assert _rejected(metrics, "request_timeout") == 1


async def test_a_body_that_never_completes_is_408(autojump_clock):
    server, metrics = _server()
    async with trio.open_nursery() as nursery:
        client = Client(connect(server, nursery))
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        await client.stream.send_all(head + b'{"model":')
        reply = await client.rest(await client.head())
        assert reply.status == 408 and "error" in reply.json()
    assert _rejected(metrics, "request_timeout") == 1


async def test_garbage_is_a_400_in_openai_shape(autojump_clock):
    server, metrics = _server()
    async with trio.open_nursery() as nursery:
        client = Client(connect(server, nursery))
        await client.stream.send_all(b"\x16\x03\x01 this is not http\r\n\r\n")
        data = b""
        while chunk := await client.stream.receive_some(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 ") and b'"error":{"message":' in data
    assert _rejected(metrics, "bad_http") == 1


async def test_at_the_connection_cap_the_oldest_waiting_one_is_shed(autojump_clock):
    server, metrics = _server(max_connections=2)
    async with trio.open_nursery() as nursery:
        idle = [connect(server, nursery) for _ in range(2)]
        await trio.sleep(1)
        assert server.connections == 2
        reply = await request(server, "GET", "/v1/models")  # a third: the oldest goes
        assert reply.status == 200
        assert await _closed(idle[0])
        assert _rejected(metrics, "shed_slow_connection") == 1
        for stream in idle[1:]:
            await stream.aclose()


async def test_keep_alive_serves_requests_one_after_another(autojump_clock):
    server, _ = _server()
    async with trio.open_nursery() as nursery:
        client = Client(connect(server, nursery))
        for _ in range(3):
            await client.send("GET", "/v1/models")
            assert (await client.rest(await client.head())).status == 200
            client.conn.start_next_cycle()
        await client.send("POST", "/v1/chat/completions", {"model": "x", "messages": []})
        reply = await client.rest(await client.head())
        assert reply.status == 400 and reply.json()["error"]["param"] == "messages"
        await client.stream.aclose()


async def test_a_bug_while_planning_is_a_500_and_the_endpoint_serves_on(autojump_clock):
    server, metrics = _server()

    async def broken(request):
        raise RuntimeError("a bug")

    server.engine.plan_completion = broken
    reply = await request(server, "POST", "/v1/completions", {"model": "x", "prompt": "a"})
    assert reply.status == 500 and reply.json()["error"]["type"] == "server_error"
    assert _rejected(metrics, "internal_error") == 1
    assert (await request(server, "GET", "/v1/models")).status == 200


async def test_a_client_beyond_loopback_needs_a_key(autojump_clock):
    server, _ = _server()  # keys not required on loopback, and none configured
    async with trio.open_nursery() as nursery:
        client_end, served = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_connection, served, "192.0.2.7:5000")
        client = Client(client_end)
        await client.send("GET", "/v1/models")
        reply = await client.rest(await client.head())
        assert reply.status == 401 and reply.headers["www-authenticate"] == "Bearer"
        await client_end.aclose()
