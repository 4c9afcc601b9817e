"""Same-host streams over abstract Unix sockets: framing, the mutual signed hello, limits,
and refusals."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p import codec, localsock
from p2p.identity import NodeIdentity
from p2p.network import NetworkError

pytestmark = pytest.mark.skipif(
    localsock.HOST_ID is None, reason="abstract Unix sockets need Linux"
)

PROTOCOL = "/test/echo/1"
ME = NodeIdentity.generate()  # the dialing daemon


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


def _framed(message: dict) -> bytes:
    packed = codec.encode(message)
    return localsock._LEN.pack(len(packed)) + packed


async def test_frames_go_both_ways_to_the_peer_that_signed():
    server, rejects = NodeIdentity.generate(), []
    async with trio.open_nursery() as nursery:
        await start(nursery, server, rejects)
        stream = await localsock.dial(ME, server.peer_id, PROTOCOL)
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
            await localsock.dial(ME, wanted.peer_id, PROTOCOL)
        nursery.cancel_scope.cancel()


async def test_no_daemon_there_is_a_network_error():
    with pytest.raises(NetworkError, match="no local daemon"):
        await localsock.dial(ME, NodeIdentity.generate().peer_id, PROTOCOL)


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
        hello = codec.encode({"protocol": "/nope", "nonce": b"n" * 32, "peer": ME.peer_id})
        await unknown.send(localsock._LEN.pack(len(hello)) + hello)
        with trio.fail_after(5):
            assert await unknown.recv(100) == b""
        unknown.close()
        assert len(rejects) == 5 and set(rejects) == {"local_hello"}
        stream = await localsock.dial(ME, server.peer_id, PROTOCOL)  # still serving
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
        stream = await localsock.dial(ME, server.peer_id, PROTOCOL)
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
        stream = await localsock.dial(ME, server.peer_id, "/broken")
        with pytest.raises(NetworkError):
            await stream.receive()
        assert rejects == ["handler_error"]
        stream = await localsock.dial(ME, server.peer_id, PROTOCOL)  # still serving
        await stream.send(b"ab")
        assert await stream.receive() == b"ba"
        nursery.cancel_scope.cancel()


async def _raw_hello(name: bytes, claimed: str) -> tuple[trio.SocketStream, dict]:
    """Connect and send a hello claiming `claimed`; the listener's challenge."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(name)
    stream = trio.SocketStream(sock)
    await stream.send_all(_framed({"protocol": PROTOCOL, "nonce": b"n" * 32, "peer": claimed}))
    data = b""
    while len(data) < 4 or len(data) < 4 + localsock._LEN.unpack(data[:4])[0]:
        data += await stream.receive_some(4096)
    return stream, codec.decode(data[4:])


async def test_the_dialer_proves_its_peer_id_and_handlers_see_it(monkeypatch):
    monkeypatch.setattr(localsock, "HELLO_TIMEOUT_S", 0.3)
    server, rejects, seen = NodeIdentity.generate(), [], []

    async def who(stream) -> None:
        seen.append((stream.peer_id, stream.credentials))
        await stream.send(b"hi")

    async with trio.open_nursery() as nursery:
        listener = localsock.Listener(server, {PROTOCOL: who}, on_reject=rejects.append)
        await nursery.start(listener.serve)
        name = localsock.socket_name(server.peer_id)
        # mallory claims to be ME but signs the challenge with her own key
        mallory = NodeIdentity.generate()
        stream, challenge = await _raw_hello(name, ME.peer_id)
        forged = mallory.sign(
            localsock._signed(localsock._DIALER_SIGNS, challenge["nonce"], PROTOCOL, server.peer_id)
        )
        await stream.send_all(_framed({"signature": forged}))
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""  # hung up, no handler ran
        # a dialer that never sends its proof is hung up on at the hello deadline
        stream, _ = await _raw_hello(name, ME.peer_id)
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""
        assert rejects == ["local_peer_unproven", "local_hello"] and not seen
        # an honest dialer: the handler sees its peer id and its process's credentials
        honest = await localsock.dial(ME, server.peer_id, PROTOCOL)
        assert await honest.receive() == b"hi"
        assert seen == [(ME.peer_id, (os.getpid(), os.getuid(), os.getgid()))]
        nursery.cancel_scope.cancel()


async def test_connections_are_capped_and_one_user_cannot_take_them_all():
    server, rejects = NodeIdentity.generate(), []
    release = trio.Event()

    async def hold(stream) -> None:
        await stream.send(b"in")
        await release.wait()

    async with trio.open_nursery() as nursery:
        listener = localsock.Listener(
            server, {PROTOCOL: hold}, on_reject=rejects.append, max_connections=4
        )
        await nursery.start(listener.serve)
        held = []
        for _ in range(2):  # one uid (ours): half of the connections
            stream = await localsock.dial(ME, server.peer_id, PROTOCOL)
            assert await stream.receive() == b"in"
            held.append(stream)
        with pytest.raises(NetworkError):
            await localsock.dial(ME, server.peer_id, PROTOCOL)
        assert rejects == ["too_many_connections_of_user"]
        listener.max_connections = 2  # a full listener refuses anyone
        with pytest.raises(NetworkError):
            await localsock.dial(ME, server.peer_id, PROTOCOL)
        assert rejects[-1] == "too_many_connections"
        release.set()  # the handlers end: their connections free their places
        for stream in held:
            await stream.close()
        listener.max_connections = 4
        await trio.testing.wait_all_tasks_blocked()
        assert listener.connections == 0 and not listener._per_uid
        stream = await localsock.dial(ME, server.peer_id, PROTOCOL)
        assert await stream.receive() == b"in"
        nursery.cancel_scope.cancel()


async def test_frames_are_bounded_by_the_listener_and_must_be_finished_in_time(monkeypatch):
    monkeypatch.setattr(localsock, "FRAME_TIMEOUT_S", 0.3)
    server, rejects, outcomes = NodeIdentity.generate(), [], []
    limit = {"bytes": 1000}

    heard = trio.Semaphore(0)

    async def record(stream) -> None:
        while True:
            try:
                frame = await stream.receive()
            except NetworkError as exc:
                outcomes.append(str(exc))
                heard.release()
                return
            outcomes.append(len(frame))
            heard.release()

    async with trio.open_nursery() as nursery:
        listener = localsock.Listener(
            server,
            {PROTOCOL: record},
            on_reject=rejects.append,
            max_frame_bytes=lambda: limit["bytes"],  # asked at every frame
        )
        await nursery.start(listener.serve)
        stream = await localsock.dial(ME, server.peer_id, PROTOCOL)
        with trio.fail_after(5):
            await stream.send(b"x" * 1000)
            await heard.acquire()
            limit["bytes"] = 10
            await stream.send(b"x" * 11)  # refused from its length prefix
            await heard.acquire()
            # a frame begun and never finished: the stream ends at the frame deadline
            slow = await localsock.dial(ME, server.peer_id, PROTOCOL)
            await slow._stream.send_all(localsock._LEN.pack(5) + b"ab")
            await heard.acquire()
        assert outcomes[0] == 1000 and "exceeds 10" in outcomes[1]
        assert "not finished in time" in outcomes[2]
        nursery.cancel_scope.cancel()


@settings(max_examples=150, deadline=None)
@given(
    st.binary(max_size=300),
    st.sampled_from([localsock.Hello, localsock.Challenge, localsock.Proof]),
)
def test_hello_decoding_raises_only_network_errors(data, kind):
    with contextlib.suppress(NetworkError):
        localsock._decode(data, kind)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["protocol", "nonce", "peer", "signature", "x"]),
        st.none()
        | st.integers(-(1 << 63), (1 << 64) - 1)
        | st.text(max_size=40)
        | st.binary(max_size=40)
        | st.lists(st.integers(-(1 << 63), (1 << 63) - 1), max_size=3),
        max_size=5,
    )
)
def test_hello_structures_raise_only_network_errors(message):
    for kind in (localsock.Hello, localsock.Challenge, localsock.Proof):
        with contextlib.suppress(NetworkError):
            localsock._decode(codec.encode(message), kind)
