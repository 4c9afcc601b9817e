"""Same-host streams over abstract Unix sockets: framing, the signed hello, and refusals."""

from __future__ import annotations

import socket

import pytest
import trio

from p2p import codec, localsock
from p2p.identity import NodeIdentity
from p2p.network import NetworkError

pytestmark = pytest.mark.skipif(
    localsock.HOST_ID is None, reason="abstract Unix sockets need Linux"
)

PROTOCOL = "/test/echo/1"


async def echo(stream) -> None:
    while True:
        try:
            frame = await stream.receive()
        except NetworkError:
            return
        await stream.send(frame[::-1])


async def start(nursery: trio.Nursery, ident: NodeIdentity, rejects: list[str]) -> None:
    listener = localsock.Listener(ident, {PROTOCOL: echo}, on_reject=rejects.append)
    await nursery.start(listener.serve)


async def test_frames_go_both_ways_to_the_peer_that_signed():
    server, rejects = NodeIdentity.generate(), []
    async with trio.open_nursery() as nursery:
        await start(nursery, server, rejects)
        stream = await localsock.dial(server.peer_id, PROTOCOL)
        for frame in (b"abc", b"", bytes(range(256)) * 4096):  # up to 1 MiB
            await stream.send(frame)
            assert await stream.receive() == frame[::-1]
        await stream.close()
        assert rejects == []
        nursery.cancel_scope.cancel()


async def test_a_socket_squatted_by_another_identity_is_refused():
    wanted, squatter = NodeIdentity.generate(), NodeIdentity.generate()
    async with trio.open_nursery() as nursery:
        # the squatter binds the name derived from `wanted`'s peer id
        listener = localsock.Listener(squatter, {PROTOCOL: echo})
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(localsock.socket_name(wanted.peer_id))
        sock.listen(4)
        nursery.start_soon(trio.serve_listeners, listener._accept, [trio.SocketListener(sock)])
        with pytest.raises(NetworkError, match="is not that peer"):
            await localsock.dial(wanted.peer_id, PROTOCOL)
        nursery.cancel_scope.cancel()


async def test_no_daemon_there_is_a_network_error():
    with pytest.raises(NetworkError, match="no local daemon"):
        await localsock.dial(NodeIdentity.generate().peer_id, PROTOCOL)


async def test_bad_hellos_are_counted_and_the_listener_keeps_serving():
    server, rejects = NodeIdentity.generate(), []
    async with trio.open_nursery() as nursery:
        await start(nursery, server, rejects)
        name = localsock.socket_name(server.peer_id)
        hellos = [
            b"\x00\x00\x00\x05junk!",  # not msgpack
            b"\x00\x00\x00\x01\x01",  # msgpack, not a map
            b"\xff\xff\xff\xff",  # a 4 GiB hello
            localsock._LEN.pack(20) + codec.encode({"protocol": PROTOCOL, "nonce": b"short"}),
        ]
        for raw in hellos:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.connect(name)
            await sock.send(raw)
            with trio.fail_after(5):
                assert await sock.recv(100) == b""  # the listener hangs up without an answer
            sock.close()
        unknown = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await unknown.connect(name)
        hello = codec.encode({"protocol": "/nope", "nonce": b"n" * 32})
        await unknown.send(localsock._LEN.pack(len(hello)) + hello)
        with trio.fail_after(5):
            assert await unknown.recv(100) == b""
        unknown.close()
        assert len(rejects) == 5 and set(rejects) == {"local_hello"}
        stream = await localsock.dial(server.peer_id, PROTOCOL)  # still serving
        await stream.send(b"ok")
        assert await stream.receive() == b"ko"
        nursery.cancel_scope.cancel()


async def test_a_second_listener_for_one_peer_id_fails_to_bind():
    server = NodeIdentity.generate()
    async with trio.open_nursery() as nursery:
        await start(nursery, server, [])
        with pytest.raises(OSError):
            await localsock.Listener(server, {}).serve()
        nursery.cancel_scope.cancel()


async def test_an_oversized_frame_breaks_the_stream_without_allocating_it():
    server = NodeIdentity.generate()

    async def send_huge_length(stream) -> None:
        await stream._stream.send_all(b"\xff\xff\xff\xf0")

    async with trio.open_nursery() as nursery:
        listener = localsock.Listener(server, {PROTOCOL: send_huge_length})
        await nursery.start(listener.serve)
        stream = await localsock.dial(server.peer_id, PROTOCOL)
        with pytest.raises(NetworkError, match="exceeds"):
            await stream.receive()
        nursery.cancel_scope.cancel()


async def test_a_failing_handler_ends_its_stream_not_the_listener():
    server, rejects = NodeIdentity.generate(), []

    async def broken(stream) -> None:
        raise RuntimeError("a bug in a handler")

    async with trio.open_nursery() as nursery:
        listener = localsock.Listener(
            server, {PROTOCOL: echo, "/broken": broken}, on_reject=rejects.append
        )
        await nursery.start(listener.serve)
        stream = await localsock.dial(server.peer_id, "/broken")
        with pytest.raises(NetworkError):
            await stream.receive()
        assert rejects == ["handler_error"]
        stream = await localsock.dial(server.peer_id, PROTOCOL)  # still serving
        await stream.send(b"ab")
        assert await stream.receive() == b"ba"
        nursery.cancel_scope.cancel()
