"""The conformance checks of gossip that take three nodes in a line, `a` - `b` - `c`, where
`a` and `c` are not connected: what `c` gets from `a`, `b` forwarded (`Gossip.subscribe`).

A transport's test gives `make_line`, which opens such a line (`Line`):

    async def test_gossip_line():
        await check_gossip_line(make_line)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from p2p.testing.conformance import (
    TOPIC,
    ConformanceError,
    _expect,
    publish_until,
    refusing_validator,
)


@dataclass
class Line:
    """Three nodes of one transport: `b` connected to `a` and to `c`, `a` and `c` not."""

    a: Any
    b: Any
    c: Any
    timeout_s: float = 10.0


MakeLine = Callable[[], AbstractAsyncContextManager[Line]]
LineCheck = Callable[[Line], Awaitable[None]]


async def gossip_refused_not_forwarded(line: Line) -> None:
    """A message `b`'s validator refuses never reaches `c` (b does not forward it); one it
    accepts does, over two hops."""
    seen: list[tuple[str, bytes]] = []
    got_c: list[tuple[str, bytes]] = []

    async def on_c(origin: str, data: bytes) -> None:
        got_c.append((origin, data))

    async def ignore(origin: str, data: bytes) -> None:
        pass

    await line.c.subscribe(TOPIC, on_c)
    await line.b.subscribe(TOPIC, ignore, refusing_validator(seen))
    await line.a.subscribe(TOPIC, ignore)
    await publish_until(line.a, b"refused", seen, line.timeout_s)
    await publish_until(line.a, b"raises", seen, line.timeout_s)
    await publish_until(line.a, b"accepted", got_c, line.timeout_s)
    _expect(got_c[0] == (line.a.peer_id, b"accepted"), f"c got {got_c[:3]!r}")
    _expect({data for _, data in got_c} == {b"accepted"}, f"c got {got_c[:3]!r}")


LINE_CHECKS: list[LineCheck] = [gossip_refused_not_forwarded]


async def check_gossip_line(make_line: MakeLine) -> None:
    """Each line check on a fresh line; the first failure names its check."""
    for check in LINE_CHECKS:
        async with make_line() as line:
            try:
                await check(line)
            except Exception as exc:
                raise ConformanceError(f"{check.__name__}: {exc}") from exc
