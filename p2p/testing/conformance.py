"""The conformance suite of the `p2p.network` seam: what every transport must do alike.

A transport's test gives `make_pair`, which opens two connected nodes (`Pair`): `a` dials,
`b` serves, and `vanish_b` makes `b` leave as a stopped or killed process does. Each check
runs on a fresh pair:

    async def test_streams():
        await check_streams(make_pair)

`check_requests`, `check_streams`, `check_gossip` and `check_dht` each cover one part of the
seam (`Requests`, `Streams`, `Gossip`, `DHT`); `check_network` runs them all, for transports
that implement the whole `Network`. What takes three nodes (gossip forwarding) is in
`p2p.testing.gossip_line`. `REQUEST_CHECKS`, `STREAM_CHECKS`, `GOSSIP_CHECKS` and
`DHT_CHECKS` name each check, for a test parametrized over them.
Checks wait with deadlines (`Pair.timeout_s`), never fixed sleeps, so they run on a real
clock (libp2p, sockets) and on trio's virtual clock (the in-memory network) alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import trio

from p2p.network import NetworkError, Stream, StreamClosed

ECHO = "/conformance/echo/1.0.0"
SLOW = "/conformance/slow/1.0.0"
FAILING = "/conformance/failing/1.0.0"
BOUNDED = "/conformance/bounded/1.0.0"
STALLED = "/conformance/stalled/1.0.0"
HALF_CLOSE = "/conformance/half-close/1.0.0"
UNKNOWN = "/conformance/unknown/1.0.0"
LARGE_REQUEST_BYTES = 3 << 20  # under the libp2p request frame limit (4 MiB)
LARGE_FRAME_BYTES = 8 << 20
BOUND_BYTES = 1 << 20
FLOW_CONTROL_BYTES = 64 << 20  # a send must block before this much is buffered unread


@dataclass
class Pair:
    """Two connected nodes of one transport."""

    a: Any  # the dialing side
    b: Any  # the serving side
    vanish_b: Callable[[], Awaitable[None]]  # b leaves the network (its process ends)
    timeout_s: float = 10.0  # how long a check waits for what must happen "promptly"


MakePair = Callable[[], AbstractAsyncContextManager[Pair]]
Check = Callable[[Pair], Awaitable[None]]


class ConformanceError(AssertionError):
    """A transport broke the contract of `p2p.network`."""


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise ConformanceError(what)


async def _raises_network_error(call: Awaitable[Any], within_s: float, what: str) -> Exception:
    """Await `call`, which must raise NetworkError within `within_s`; returns the error."""
    try:
        with trio.fail_after(within_s):
            result = await call
    except NetworkError as exc:
        return exc
    except trio.TooSlowError:
        raise ConformanceError(f"{what}: still waiting after {within_s} s") from None
    raise ConformanceError(f"{what}: returned {str(result)[:80]!r} instead of failing")


# -- requests ----------------------------------------------------------------------------


async def _echo_request(sender: str, payload: bytes) -> bytes:
    return sender.encode() + b"|" + payload[::-1]


async def request_response(pair: Pair) -> None:
    """A request reaches the peer's handler, which sees the sender; both ways."""
    pair.b.set_request_handler(ECHO, _echo_request)
    pair.a.set_request_handler(ECHO, _echo_request)
    with trio.fail_after(pair.timeout_s):
        answer = await pair.a.request(pair.b.peer_id, ECHO, b"hello")
        _expect(answer == pair.a.peer_id.encode() + b"|olleh", f"a->b answered {answer[:80]!r}")
        answer = await pair.b.request(pair.a.peer_id, ECHO, b"")
        _expect(answer == pair.b.peer_id.encode() + b"|", f"b->a answered {answer[:80]!r}")


async def request_large(pair: Pair) -> None:
    """A request and a response of several MiB arrive whole."""
    pair.b.set_request_handler(ECHO, _echo_request)
    payload = bytes(range(256)) * (LARGE_REQUEST_BYTES // 256)
    with trio.fail_after(pair.timeout_s * 3):
        answer = await pair.a.request(pair.b.peer_id, ECHO, payload)
    _expect(answer == pair.a.peer_id.encode() + b"|" + payload[::-1], "large answer differs")


async def request_timeout(pair: Pair) -> None:
    """`timeout_s` bounds a request whose handler never answers; the peer still serves."""

    async def never(sender: str, payload: bytes) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    pair.b.set_request_handler(SLOW, never)
    pair.b.set_request_handler(ECHO, _echo_request)
    started = trio.current_time()
    await _raises_network_error(
        pair.a.request(pair.b.peer_id, SLOW, b"x", timeout_s=0.5),
        pair.timeout_s,
        "a request with timeout_s=0.5 to a handler that never answers",
    )
    waited = trio.current_time() - started
    _expect(waited >= 0.5, f"the request gave up after {waited:.3f} s, before its timeout")
    with trio.fail_after(pair.timeout_s):
        await pair.a.request(pair.b.peer_id, ECHO, b"again")


async def request_handler_fails(pair: Pair) -> None:
    """A handler that raises fails the request (NetworkError); the peer still serves."""

    async def broken(sender: str, payload: bytes) -> bytes:
        raise ValueError("a bug in the handler")

    pair.b.set_request_handler(FAILING, broken)
    pair.b.set_request_handler(ECHO, _echo_request)
    await _raises_network_error(
        pair.a.request(pair.b.peer_id, FAILING, b"x"), pair.timeout_s, "a failing handler"
    )
    with trio.fail_after(pair.timeout_s):
        await pair.a.request(pair.b.peer_id, ECHO, b"again")


async def request_unknown_protocol(pair: Pair) -> None:
    """A protocol the peer does not serve is refused with NetworkError."""
    await _raises_network_error(
        pair.a.request(pair.b.peer_id, UNKNOWN, b"x"), pair.timeout_s, "an unknown protocol"
    )


async def request_peer_vanished(pair: Pair) -> None:
    """A request to a peer that left fails (bounded by `timeout_s`), never hangs past it."""
    pair.b.set_request_handler(ECHO, _echo_request)
    with trio.fail_after(pair.timeout_s):
        await pair.a.request(pair.b.peer_id, ECHO, b"x")
    await pair.vanish_b()
    await _raises_network_error(
        pair.a.request(pair.b.peer_id, ECHO, b"x", timeout_s=2.0),
        pair.timeout_s,
        "a request to a peer that left",
    )


REQUEST_CHECKS: list[Check] = [
    request_response,
    request_large,
    request_timeout,
    request_handler_fails,
    request_unknown_protocol,
    request_peer_vanished,
]


# -- streams -----------------------------------------------------------------------------


async def _echo_stream(stream: Stream) -> None:
    """Answer each frame reversed, with the peer id it came from first; end at its end."""
    await stream.send(stream.peer_id.encode())
    while True:
        try:
            frame = await stream.receive()
        except NetworkError:
            return
        await stream.send(frame[::-1])


async def _open_echo(pair: Pair, opener: Any, target: Any) -> Stream:
    with trio.fail_after(pair.timeout_s):
        stream = await opener.open_stream(target.peer_id, ECHO)
        first = await stream.receive()
    _expect(first == opener.peer_id.encode(), f"the handler saw peer {first[:80]!r}")
    _expect(stream.peer_id == target.peer_id, f"the stream names peer {stream.peer_id!r}")
    return stream


async def streams_both_ways(pair: Pair) -> None:
    """Frames go both ways, whole and in order, on streams opened by either side."""
    pair.b.set_stream_handler(ECHO, _echo_stream)
    pair.a.set_stream_handler(ECHO, _echo_stream)
    for opener, target in ((pair.a, pair.b), (pair.b, pair.a)):
        stream = await _open_echo(pair, opener, target)
        frames = [b"", b"x", *(bytes([i]) * (i * 997) for i in range(1, 40))]
        with trio.fail_after(pair.timeout_s):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_all, stream, frames)  # while receiving: no deadlock
                for frame in frames:
                    got = await stream.receive()
                    _expect(got == frame[::-1], f"frame of {len(frame)} bytes came back changed")
        await stream.close()


async def _send_all(stream: Stream, frames: list[bytes]) -> None:
    for frame in frames:
        await stream.send(frame)


async def stream_large_frames(pair: Pair) -> None:
    """Frames of several MiB arrive whole, both ways."""
    pair.b.set_stream_handler(ECHO, _echo_stream)
    stream = await _open_echo(pair, pair.a, pair.b)
    frame = bytes(range(251)) * (LARGE_FRAME_BYTES // 251)
    with trio.fail_after(pair.timeout_s * 3):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send, frame)
            got = await stream.receive()
    _expect(got == frame[::-1], "a large frame came back changed")
    await stream.close()


async def stream_frame_bound(pair: Pair) -> None:
    """A frame over the receiver's `max_frame_bytes` breaks the stream; the peer serves on."""
    over = trio.Event()

    async def bounded(stream: Stream) -> None:
        try:
            await stream.receive()
        except NetworkError:
            over.set()
            raise  # the transport resets the stream

    pair.b.set_stream_handler(BOUNDED, bounded, max_frame_bytes=BOUND_BYTES)
    pair.b.set_stream_handler(ECHO, _echo_stream)
    with trio.fail_after(pair.timeout_s):
        stream = await pair.a.open_stream(pair.b.peer_id, BOUNDED)
        # refused while still sending is fine too
        with trio.move_on_after(pair.timeout_s / 2), contextlib.suppress(NetworkError):
            await stream.send(b"y" * (2 * BOUND_BYTES))
        await over.wait()
    await _raises_network_error(stream.receive(), pair.timeout_s, "receive after a long frame")
    await stream.close()
    stream = await _open_echo(pair, pair.a, pair.b)
    await stream.close()


async def stream_half_close(pair: Pair) -> None:
    """`close_write` ends one direction only: the peer reads every frame, then StreamClosed,
    and can still answer; the answer and then the end of the stream arrive."""

    async def count_then_answer(stream: Stream) -> None:
        count = 0
        while True:
            try:
                await stream.receive()
            except StreamClosed:
                break
            count += 1
        await stream.send(b"count %d" % count)
        await stream.send(b"bye")

    pair.b.set_stream_handler(HALF_CLOSE, count_then_answer)
    with trio.fail_after(pair.timeout_s):
        stream = await pair.a.open_stream(pair.b.peer_id, HALF_CLOSE)
        for _ in range(5):
            await stream.send(b"frame")
        await stream.close_write()
        _expect(await stream.receive() == b"count 5", "the peer did not read 5 frames")
        _expect(await stream.receive() == b"bye", "the answer after the half-close is lost")
        try:
            extra = await stream.receive()
        except StreamClosed:
            pass
        else:
            raise ConformanceError(f"a frame after the handler ended: {extra[:80]!r}")
    await stream.close()


async def stream_reset_by_opener(pair: Pair) -> None:
    """A reset by the opener ends the handler's receive promptly."""
    ended = trio.Event()

    async def wait_for_end(stream: Stream) -> None:
        await stream.send(b"ready")
        try:
            while True:
                await stream.receive()
        except NetworkError:
            ended.set()

    pair.b.set_stream_handler(STALLED, wait_for_end)
    with trio.fail_after(pair.timeout_s):
        stream = await pair.a.open_stream(pair.b.peer_id, STALLED)
        await stream.receive()
        await stream.reset()
        await ended.wait()
    await _raises_network_error(stream.receive(), pair.timeout_s, "receive after our reset")


async def stream_reset_by_handler(pair: Pair) -> None:
    """A reset by the handler ends the opener's receive promptly; its sends fail soon."""
    done = trio.Event()

    async def reset_at_once(stream: Stream) -> None:
        await stream.receive()
        await stream.reset()
        done.set()

    pair.b.set_stream_handler(STALLED, reset_at_once)
    with trio.fail_after(pair.timeout_s):
        stream = await pair.a.open_stream(pair.b.peer_id, STALLED)
        await stream.send(b"go")
        await done.wait()
    await _raises_network_error(stream.receive(), pair.timeout_s, "receive after a peer's reset")
    await _sends_fail(stream, pair.timeout_s, "send after a peer's reset")
    await stream.close()


async def _sends_fail(stream: Stream, within_s: float, what: str) -> None:
    """Within `within_s`, a send raises NetworkError (the first few may still be buffered)."""
    with trio.move_on_after(within_s):
        for _ in range(64):
            try:
                await stream.send(b"z" * 1024)
            except NetworkError:
                return
            await trio.sleep(0.01)
    raise ConformanceError(f"{what}: sends still succeed")


async def stream_handler_fails(pair: Pair) -> None:
    """A handler that raises breaks its stream (the opener's receive fails promptly); the
    peer goes on serving new streams."""

    async def broken(stream: Stream) -> None:
        await stream.receive()
        raise ValueError("a bug in the handler")

    pair.b.set_stream_handler(FAILING, broken)
    pair.b.set_stream_handler(ECHO, _echo_stream)
    with trio.fail_after(pair.timeout_s):
        stream = await pair.a.open_stream(pair.b.peer_id, FAILING)
        await stream.send(b"boom")
    await _raises_network_error(stream.receive(), pair.timeout_s, "receive from a failed handler")
    await stream.close()
    stream = await _open_echo(pair, pair.a, pair.b)
    await stream.close()


async def stream_flow_control(pair: Pair) -> None:
    """A sender whose peer does not read waits: sends block before FLOW_CONTROL_BYTES."""
    release = trio.Event()

    async def never_reads(stream: Stream) -> None:
        await release.wait()

    pair.b.set_stream_handler(STALLED, never_reads)
    with trio.fail_after(pair.timeout_s):
        stream = await pair.a.open_stream(pair.b.peer_id, STALLED)
    chunk = b"f" * (64 << 10)
    sent = 0
    blocked = False
    while sent < FLOW_CONTROL_BYTES:
        with trio.move_on_after(min(1.0, pair.timeout_s)) as scope:
            await stream.send(chunk)
        if scope.cancelled_caught:
            blocked = True
            break
        sent += len(chunk)
    release.set()
    await stream.reset()
    _expect(blocked, f"{sent} bytes were sent to a peer that reads nothing, none waited")


async def stream_unknown_protocol(pair: Pair) -> None:
    """Opening a stream of a protocol the peer does not serve fails; the peer serves on."""
    pair.b.set_stream_handler(ECHO, _echo_stream)
    await _raises_network_error(
        _open_and_use(pair.a, pair.b.peer_id, UNKNOWN), pair.timeout_s, "an unknown protocol"
    )
    stream = await _open_echo(pair, pair.a, pair.b)
    await stream.close()


async def _open_and_use(node: Any, peer_id: str, protocol: str) -> bytes:
    """Open, send and receive: some transports refuse a protocol only at the first use."""
    stream = await node.open_stream(peer_id, protocol)
    try:
        await stream.send(b"x")
        return await stream.receive()
    finally:
        await stream.close()


async def stream_peer_vanished(pair: Pair) -> None:
    """When the peer leaves, its streams end at once for us (receive raises NetworkError)
    and new streams to it fail."""
    pair.b.set_stream_handler(ECHO, _echo_stream)
    stream = await _open_echo(pair, pair.a, pair.b)
    with trio.fail_after(pair.timeout_s):
        await stream.send(b"ping")
        _expect(await stream.receive() == b"gnip", "the echo before leaving")
    await pair.vanish_b()
    await _raises_network_error(stream.receive(), pair.timeout_s, "receive from a peer that left")
    await stream.close()
    await _raises_network_error(
        _open_and_use(pair.a, pair.b.peer_id, ECHO),
        pair.timeout_s,
        "a new stream to a peer that left",
    )


STREAM_CHECKS: list[Check] = [
    streams_both_ways,
    stream_large_frames,
    stream_frame_bound,
    stream_half_close,
    stream_reset_by_opener,
    stream_reset_by_handler,
    stream_handler_fails,
    stream_flow_control,
    stream_unknown_protocol,
    stream_peer_vanished,
]


# -- gossip and the DHT ------------------------------------------------------------------

TOPIC = "conformance/topic"


async def publish_until(
    node: Any, data: bytes, got: list[tuple[str, bytes]], timeout_s: float
) -> None:
    """`node` publishes `data` (again: gossip is best effort, and a mesh forms in its own
    time) until it is in `got` (a handler's or a validator's record)."""
    with trio.fail_after(timeout_s):
        while not any(item[1] == data for item in got):
            await node.publish(TOPIC, data)
            with trio.move_on_after(0.5):
                while not any(item[1] == data for item in got):  # noqa: ASYNC110
                    await trio.sleep(0.01)


async def _publish_until(pair: Pair, data: bytes, got: list[tuple[str, bytes]]) -> None:
    await publish_until(pair.a, data, got, pair.timeout_s)


async def gossip_delivered(pair: Pair) -> None:
    """A message published by `a` reaches `b`'s handler with `a` as its origin, and is not
    echoed to `a`."""
    got_b: list[tuple[str, bytes]] = []
    got_a: list[tuple[str, bytes]] = []

    async def on_b(origin: str, data: bytes) -> None:
        got_b.append((origin, data))

    async def on_a(origin: str, data: bytes) -> None:
        got_a.append((origin, data))

    await pair.b.subscribe(TOPIC, on_b)
    await pair.a.subscribe(TOPIC, on_a)
    await _publish_until(pair, b"news", got_b)
    _expect({origin for origin, _ in got_b} == {pair.a.peer_id}, f"origins {got_b[:3]!r}")
    _expect(got_a == [], f"a received its own message: {got_a[:3]!r}")


async def gossip_handler_fails(pair: Pair) -> None:
    """A handler that raises does not end the subscription: later messages still arrive."""
    got: list[tuple[str, bytes]] = []

    async def flaky(origin: str, data: bytes) -> None:
        got.append((origin, data))
        if data == b"first":
            raise ValueError("a bug in the handler")

    await pair.b.subscribe(TOPIC, flaky)
    await _publish_until(pair, b"first", got)
    await _publish_until(pair, b"second", got)


def refusing_validator(seen: list[tuple[str, bytes]]) -> Callable[[str, bytes], bool]:
    """A validator that records each call, refuses data starting with b"refused" and raises
    on b"raises"."""

    def validate(origin: str, data: bytes) -> bool:
        seen.append((origin, data))
        if data == b"raises":
            raise ValueError("a bug in the validator")
        return not data.startswith(b"refused")

    return validate


async def gossip_validated(pair: Pair) -> None:
    """What `b`'s validator refuses (or raises on) never reaches `b`'s handler, and later
    messages still do; the validator sees each message's origin, and never `b`'s own."""
    seen: list[tuple[str, bytes]] = []
    got_b: list[tuple[str, bytes]] = []
    got_a: list[tuple[str, bytes]] = []

    async def on_b(origin: str, data: bytes) -> None:
        got_b.append((origin, data))

    async def on_a(origin: str, data: bytes) -> None:
        got_a.append((origin, data))

    await pair.b.subscribe(TOPIC, on_b, refusing_validator(seen))
    await pair.a.subscribe(TOPIC, on_a)
    await _publish_until(pair, b"refused", seen)
    await _publish_until(pair, b"raises", seen)
    await _publish_until(pair, b"accepted", got_b)
    _expect([data for _, data in got_b] == [b"accepted"] * len(got_b), f"b got {got_b[:3]!r}")
    await publish_until(pair.b, b"from b", got_a, pair.timeout_s)
    _expect({origin for origin, _ in seen} == {pair.a.peer_id}, f"validated {seen[:3]!r}")


DHT_KEY = "/gridmesh/" + "c0" * 16  # in the gridmesh namespace, under py-libp2p's 50 bytes


async def dht_put_get(pair: Pair) -> None:
    """A value one node puts, the other gets; a key nobody put gives None."""
    with trio.fail_after(pair.timeout_s):
        await pair.a.dht_put(DHT_KEY, b"value")
        _expect(await pair.b.dht_get(DHT_KEY) == b"value", "b did not get a's value")
        _expect(await pair.b.dht_get(DHT_KEY[:-2] + "ff") is None, "a value for a missing key")


async def dht_get_from_holder(pair: Pair) -> None:
    """A value asked of the node that put it comes back; a key it never held gives None."""
    with trio.fail_after(pair.timeout_s):
        await pair.a.dht_put(DHT_KEY, b"value")
        got = await pair.b.dht_get_from(pair.a.peer_id, DHT_KEY)
        _expect(got == b"value", f"b asked a for its value and got {got!r}")
        missing = await pair.b.dht_get_from(pair.a.peer_id, DHT_KEY[:-2] + "ff")
        _expect(missing is None, f"a value for a missing key: {missing!r}")
        _expect(await pair.a.dht_get_from(pair.a.peer_id, DHT_KEY) == b"value", "own value")


async def dht_find_peers_walks(pair: Pair) -> None:
    """A walk toward any target returns the other node (the only one there is), never the
    walker itself; both ways."""
    with trio.fail_after(pair.timeout_s):
        for walker, other in ((pair.a, pair.b), (pair.b, pair.a)):
            for target in (other.peer_id.encode(), walker.peer_id.encode(), b"\x5a" * 32):
                found = await walker.dht_find_peers(target)
                _expect(found == [other.peer_id], f"a walk to {target[:8]!r} met {found!r}")


GOSSIP_CHECKS: list[Check] = [gossip_delivered, gossip_handler_fails, gossip_validated]
DHT_CHECKS: list[Check] = [dht_put_get, dht_get_from_holder, dht_find_peers_walks]


async def run_checks(make_pair: MakePair, checks: list[Check]) -> None:
    """Run each check on a fresh pair; the first failure names its check."""
    for check in checks:
        async with make_pair() as pair:
            try:
                await check(pair)
            except Exception as exc:
                raise ConformanceError(f"{check.__name__}: {exc}") from exc


async def check_requests(make_pair: MakePair) -> None:
    """The `Requests` part of the seam."""
    await run_checks(make_pair, REQUEST_CHECKS)


async def check_streams(make_pair: MakePair) -> None:
    """The `Streams` part of the seam."""
    await run_checks(make_pair, STREAM_CHECKS)


async def check_gossip(make_pair: MakePair) -> None:
    """The `Gossip` part of the seam."""
    await run_checks(make_pair, GOSSIP_CHECKS)


async def check_dht(make_pair: MakePair) -> None:
    """The `DHT` part of the seam."""
    await run_checks(make_pair, DHT_CHECKS)


ALL_CHECKS: list[Check] = REQUEST_CHECKS + STREAM_CHECKS + GOSSIP_CHECKS + DHT_CHECKS


async def check_network(make_pair: MakePair) -> None:
    """Every check, for a transport that implements the whole `Network`."""
    await run_checks(make_pair, ALL_CHECKS)
