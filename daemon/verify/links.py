"""Streams to replica servers, kept open for the checks to come (a requester's, held by its
`Verifier`).

Why: a check's replica session used to open a stream of its own and close it at the end.
Opening a stream costs a round trip (on libp2p a few milliseconds and a protocol negotiation,
in the in-memory network its simulated latency), and the server sets up and tears down its
side each time; at a 2 % rate almost every check is its hop's first in the generation, so
that was paid at nearly every check, on the step's critical path. A session on a kept stream
costs one frame each way to open (`open`) and to end (`close`). A server binds a session to
the stream that opened it, so a session stays on its link; a link carries several sessions,
one call at a time (`Link.call`); a new session takes the link of its peer with the fewest
sessions, and a new link while every link has one, up to `per_peer`.

A link whose call failed or was interrupted is broken (what the stream carries next is
unknown): its sessions fail their next call, and it is closed. A link with no session for
`idle_s` is closed (a server closes a stream that holds no session after 30 s).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from daemon.shards import SHARD_PROTOCOL, wire
from daemon.shards.client import GenerationError, Hop, HopFailed
from p2p.network import NetworkError, Stream, StreamOpener

LINKS_PER_PEER = 8
LINK_IDLE_S = 20.0


class LinkUnavailable(Exception):
    """No stream to the replica could be opened."""


@dataclass(eq=False)
class Link:
    """A kept stream to one replica server."""

    peer: str
    stream: Stream
    lock: trio.Lock = field(default_factory=trio.Lock)
    sessions: int = 0  # sessions on it (and sessions being opened)
    broken: bool = False
    calls: int = 0  # calls that went through it
    idle_since: float = 0.0

    async def call(
        self, hop: Hop, header: wire.Request, tensor: torch.Tensor | None, timeout_s: float
    ) -> tuple[wire.Message, torch.Tensor | None]:
        """One request of `hop`'s session and its reply, alone on the stream; raises as
        `Hop.call`. Anything but a refusal breaks the link."""
        async with self.lock:
            if self.broken:
                raise HopFailed(self.peer, "its stream broke earlier", transient=True)
            try:
                return await hop.call(header, tensor, timeout_s)
            except GenerationError:  # refused, in a well-formed reply
                raise
            except BaseException:
                self.broken = True
                raise
            finally:
                self.calls += 1


class ReplicaLinks:
    """One requester's links, per replica peer."""

    def __init__(self, per_peer: int = LINKS_PER_PEER, idle_s: float = LINK_IDLE_S) -> None:
        if per_peer < 1 or idle_s < 0:
            raise ValueError("per_peer must be >= 1 and idle_s >= 0")
        self.per_peer = per_peer
        self.idle_s = idle_s
        self.opened = 0  # streams opened so far
        self._links: dict[str, list[Link]] = {}

    def __len__(self) -> int:
        return sum(len(links) for links in self._links.values())

    async def take(
        self, opener: StreamOpener, peer: str, timeout_s: float, *, new: bool = False
    ) -> Link:
        """A link to `peer` for one more session (`release` it when the session ends): a
        kept one, or a new stream (`new`: always); LinkUnavailable if none opens."""
        self._tidy(trio.current_time())
        links = self._links.setdefault(peer, [])
        best = min(links, key=lambda link: link.sessions, default=None)
        if not new and best is not None and (best.sessions == 0 or len(links) >= self.per_peer):
            best.sessions += 1
            return best
        try:
            with trio.fail_after(timeout_s):
                stream = await opener.open_stream(peer, SHARD_PROTOCOL)
        except (NetworkError, trio.TooSlowError) as exc:
            raise LinkUnavailable(f"{peer}: {exc!r}") from None
        self.opened += 1
        link = Link(peer, stream, sessions=1)
        self._links.setdefault(peer, []).append(link)
        return link

    def release(self, link: Link) -> None:
        link.sessions = max(0, link.sessions - 1)
        if not link.sessions:
            link.idle_since = trio.current_time()
        if link.broken:
            self._drop(link)

    def _tidy(self, now: float) -> None:
        """Close the broken links, and those without a session for `idle_s`."""
        for links in list(self._links.values()):
            for link in list(links):
                if link.broken or (not link.sessions and now - link.idle_since > self.idle_s):
                    self._drop(link)

    def _drop(self, link: Link) -> None:
        links = self._links.get(link.peer, [])
        if link in links:
            links.remove(link)
            if not links:
                del self._links[link.peer]
        link.broken = True
        trio.lowlevel.spawn_system_task(_close, link.stream, name="verify replica link")

    async def aclose(self) -> None:
        """Close every link (the requester ends)."""
        links = [link for links in self._links.values() for link in links]
        self._links.clear()
        for link in links:
            link.broken = True
            await _close(link.stream)


async def _close(stream: Any) -> None:
    # (a stream that broke already has nothing to close; this may run in the background)
    with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(Exception):
        await stream.close()
