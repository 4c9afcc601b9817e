"""The `p2p.network` seam's conformance suite (p2p.testing.conformance) against every
transport: the libp2p host (two real hosts on 127.0.0.1), the in-memory network, and the
same-host Unix socket (streams only: it carries no requests, gossip or DHT)."""

from __future__ import annotations

import contextlib
import inspect
import typing
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio

from p2p import identity, localsock, records
from p2p.host import Libp2pNetwork
from p2p.network import Network, Streams
from p2p.testing import conformance
from p2p.testing.conformance import Pair
from p2p.testing.gossip_line import Line, check_gossip_line
from p2p.testing.memnet import MemoryNetwork


class _AcceptAll:
    def validate(self, key: str, value: bytes) -> None:
        pass

    def select(self, key: str, values: list[bytes]) -> int:
        return len(values) - 1


def _libp2p_node() -> Libp2pNetwork:
    return Libp2pNetwork(
        identity.NodeIdentity.generate(),
        network_id="conformance",
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht_namespace=records.NAMESPACE,
        dht_validator=_AcceptAll(),
    )


@asynccontextmanager
async def _running_until(
    context: AbstractAsyncContextManager[object], nursery: trio.Nursery
) -> AsyncIterator[Callable[[], object]]:
    """Enter `context` in a task of `nursery`; yields a function that exits it (and waits)."""
    stop, stopped = trio.Event(), trio.Event()

    async def hold(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with context:
                task_status.started()
                await stop.wait()
        finally:
            stopped.set()

    await nursery.start(hold)

    async def leave() -> None:
        stop.set()
        await stopped.wait()

    try:
        yield leave
    finally:
        await leave()


@asynccontextmanager
async def libp2p_pair() -> AsyncIterator[Pair]:
    a, b = _libp2p_node(), _libp2p_node()
    async with a.run(), trio.open_nursery() as nursery:
        async with _running_until(b.run(), nursery) as stop_b:
            await a.connect(b.listen_addrs()[0])

            async def vanish_b() -> None:
                await stop_b()

            yield Pair(a, b, vanish_b)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def memory_pair() -> AsyncIterator[Pair]:
    hub = MemoryNetwork(latency_s=0.001)
    a, b = hub.add_node("peer-a"), hub.add_node("peer-b")
    await a.connect(b.listen_addrs()[0])

    async def vanish_b() -> None:
        hub.remove_node(b.peer_id, refuse=True)  # a killed process on a live machine
        await trio.lowlevel.checkpoint()

    yield Pair(a, b, vanish_b)


@asynccontextmanager
async def localsock_pair() -> AsyncIterator[Pair]:
    a = localsock.LocalStreams(identity.NodeIdentity.generate())
    b = localsock.LocalStreams(identity.NodeIdentity.generate())
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        b_scope = trio.CancelScope()
        b_stopped = trio.Event()

        async def serve_b(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with b_scope:
                    await b.serve(task_status=task_status)
            finally:
                b_stopped.set()

        await nursery.start(serve_b)

        async def vanish_b() -> None:
            b_scope.cancel()
            await b_stopped.wait()

        yield Pair(a, b, vanish_b)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def libp2p_line() -> AsyncIterator[Line]:
    a, b, c = _libp2p_node(), _libp2p_node(), _libp2p_node()
    async with a.run(), b.run(), c.run():
        await a.connect(b.listen_addrs()[0])
        await c.connect(b.listen_addrs()[0])
        yield Line(a, b, c)


@asynccontextmanager
async def memory_line() -> AsyncIterator[Line]:
    hub = MemoryNetwork(latency_s=0.001)
    a, b, c = hub.add_node("peer-a"), hub.add_node("peer-b"), hub.add_node("peer-c")
    await a.connect(b.listen_addrs()[0])
    await c.connect(b.listen_addrs()[0])
    yield Line(a, b, c)
    assert b.gossip_refused >= 2 and b.gossip_validator_errors >= 1


@pytest.mark.parametrize("make_line", [libp2p_line, memory_line], ids=["libp2p", "memory"])
async def test_gossip_line(make_line) -> None:
    """Three nodes in a line: what the middle one's validator refuses goes no further."""
    await check_gossip_line(make_line)


async def test_the_line_check_fails_a_transport_that_forwards_refused_gossip() -> None:
    """The line check can fail: a middle node whose validator is ignored forwards all."""

    @asynccontextmanager
    async def ignoring_line() -> AsyncIterator[Line]:
        async with memory_line() as line:
            subscribe = line.b.subscribe

            async def no_validator(topic, handler, validator=None) -> None:
                def record_only(origin: str, data: bytes) -> bool:
                    with contextlib.suppress(ValueError):
                        validator(origin, data)
                    return True

                await subscribe(topic, handler, record_only)

            line.b.subscribe = no_validator
            line.timeout_s = 5.0
            yield line

    with pytest.raises(conformance.ConformanceError, match="gossip_refused_not_forwarded"):
        await check_gossip_line(ignoring_line)


MAKERS = {"libp2p": libp2p_pair, "memory": memory_pair, "localsock": localsock_pair}
# what each transport implements of the seam
PARTS = {
    "libp2p": conformance.ALL_CHECKS,
    "memory": conformance.ALL_CHECKS,
    "localsock": conformance.STREAM_CHECKS,
}
CASES = [
    pytest.param(
        transport,
        check,
        id=f"{transport}-{check.__name__}",
        marks=pytest.mark.skipif(
            transport == "localsock" and localsock.HOST_ID is None,
            reason="abstract Unix sockets need Linux",
        ),
    )
    for transport, checks in PARTS.items()
    for check in checks
]


@pytest.mark.parametrize(("transport", "check"), CASES)
async def test_conformance(transport: str, check: conformance.Check) -> None:
    async with MAKERS[transport]() as pair:
        await check(pair)


async def test_check_network_runs_every_check_on_the_memory_network() -> None:
    """The one-call form a new transport's test uses."""
    await conformance.check_network(memory_pair)
    await conformance.check_requests(memory_pair)


async def test_a_broken_transport_fails_the_suite() -> None:
    """The suite can fail: a stream whose reset never reaches the peer is caught."""

    @asynccontextmanager
    async def broken_pair() -> AsyncIterator[Pair]:
        async with memory_pair() as pair:
            opened = pair.a.open_stream

            async def open_stream(peer_id: str, protocol: str) -> object:
                stream = await opened(peer_id, protocol)

                async def no_reset() -> None:
                    pass

                stream.reset = no_reset  # type: ignore[method-assign]
                return stream

            pair.a.open_stream = open_stream
            pair.timeout_s = 1.0
            yield pair

    with pytest.raises(conformance.ConformanceError, match="stream_reset_by_opener"):
        await conformance.run_checks(broken_pair, [conformance.stream_reset_by_opener])


def _members(protocol: type) -> set[str]:
    """The public members a Protocol declares, its bases' included."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if cls in (object, typing.Protocol, typing.Generic):
            continue
        names |= {name for name in vars(cls) if not name.startswith("_")}
    return names


def _accepts(impl: inspect.Signature, declared: inspect.Signature) -> str | None:
    """Why a method with signature `impl` cannot be called as `declared` says, or None."""
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for name, param in declared.parameters.items():
        if name == "self":
            continue
        mine = impl.parameters.get(name)
        if mine is None:
            return f"no parameter {name!r}"
        if param.kind in positional and mine.kind not in positional:
            return f"{name!r} is not positional"
        if param.default is not inspect.Parameter.empty and mine.default is inspect.Parameter.empty:
            return f"{name!r} has no default"
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    for name, mine in impl.parameters.items():
        required = mine.default is inspect.Parameter.empty and mine.kind not in variadic
        if name not in declared.parameters and required:
            return f"extra parameter {name!r} without a default"
    return None


@pytest.mark.parametrize("transport", ["libp2p", "memory", "localsock"])
def test_each_transport_has_every_member_of_its_part_of_the_seam(transport: str) -> None:
    """The seam is complete: every member the daemon may use exists, callable as declared."""
    if transport == "libp2p":
        node, protocol = _libp2p_node(), Network
    elif transport == "memory":
        node, protocol = MemoryNetwork().add_node("x"), Network
    else:
        node, protocol = localsock.LocalStreams(identity.NodeIdentity.generate()), Streams
    problems = []
    for name in sorted(_members(protocol)):
        if not hasattr(node, name):
            problems.append(f"{name}: missing")
            continue
        declared = inspect.getattr_static(protocol, name)
        if callable(declared):
            why = _accepts(inspect.signature(getattr(node, name)), inspect.signature(declared))
            if why is not None:
                problems.append(f"{name}: {why}")
    assert problems == []
    assert {"open_stream", "set_stream_handler", "request", "connect", "listen_addrs"} <= (
        _members(Network)
    )
