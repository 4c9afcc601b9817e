"""One hop of a route: a session on one shard server over one stream, and how it fails.

A hop sends a request and reads replies on its stream; everything that goes wrong there
becomes HopFailed (the client routes around the server, see daemon.shards.client) or, when
the request itself is at fault and any server would refuse it, RequestRefused. A server at
one of its caps answers `busy`: a HopFailed with `busy` set, from which the client may end
with ServersBusyError.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import trio

from daemon.shards import wire
from p2p.network import NetworkError, Stream

# server error codes that no other server would answer differently
REQUEST_ERRORS = {"bad_length", "too_long", "bad_input", "bad_position", "bad_range", "model"}
# a paid job no server would take (daemon.payments.provider)
REQUEST_ERRORS |= {"unknown_job", "job_refunded", "job_expired", "job_spent", "not_payer"}


class HopFailed(Exception):
    def __init__(
        self, peer_id: str, reason: str, *, transient: bool = False, busy: bool = False
    ) -> None:
        """`transient`: the hop's stream broke (reset or EOF), could not be opened, or gave
        no answer in time, which a reconnecting peer or a slow link may survive; it gets one
        more chance when no route avoids it. `busy`: the server
        refused a session at one of its caps (it is alive, only full)."""
        super().__init__(f"{peer_id}: {reason}")
        self.peer_id = peer_id
        self.reason = reason
        self.transient = transient
        self.busy = busy


class GenerationError(RuntimeError):
    """A generation cannot go on; `code` says why, for the local APIs (daemon.errors)."""

    code = "failed"


class RequestRefused(GenerationError):
    """A server refused the request itself: another server would refuse it too."""

    code = "refused"


class ServersBusyError(GenerationError):
    """No route, only because servers on it answered `busy` (at their session or cache
    caps): retrying later may succeed. Its message starts with "busy:", which the local
    APIs map to their busy errors."""

    code = "busy"


@dataclass
class Hop:
    peer_id: str
    start: int
    end: int
    stream: Stream
    session: str
    link: str = ""  # the token the previous hop's server shows when it pushes to us
    chunks: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def record(self, position: int, x: torch.Tensor) -> None:
        """Keep an input for replay (once: a chained step may have recorded it already)."""
        if not self.chunks or self.chunks[-1][0] < position:
            self.chunks.append((position, x))

    @property
    def next_hop(self) -> wire.NextHop:
        """How the previous hop's server reaches this hop's session."""
        return wire.NextHop(peer=self.peer_id, session=self.session, link=self.link)

    async def send(self, header: wire.Request, tensor: torch.Tensor | None = None) -> None:
        try:
            await self.stream.send(wire.encode(header, tensor))
        except NetworkError as exc:
            raise HopFailed(self.peer_id, str(exc), transient=True) from None

    async def receive(self) -> tuple[wire.Message, torch.Tensor | None]:
        try:
            return wire.decode(await self.stream.receive())
        except NetworkError as exc:
            raise HopFailed(self.peer_id, str(exc), transient=True) from None
        except wire.WireError as exc:
            raise HopFailed(self.peer_id, str(exc)) from None

    async def call(
        self, header: wire.Request, tensor: torch.Tensor | None, timeout_s: float
    ) -> tuple[wire.Message, torch.Tensor | None]:
        try:
            with trio.fail_after(timeout_s):
                await self.send(header, tensor)
                reply, out = await self.receive()
                while getattr(reply, "step", None) is not None:  # a late message of an
                    reply, out = await self.receive()  # abandoned chained step
        except trio.TooSlowError:  # a slow link (a loaded relay) may answer the next time
            raise HopFailed(
                self.peer_id, f"no answer within {timeout_s:.1f} s", transient=True
            ) from None
        self.check(reply)
        return reply, out

    def check(self, reply: wire.Message) -> None:
        """Raise for an error reply: GenerationError if our request is at fault."""
        if isinstance(reply, wire.Error):
            message = f"{reply.code}: {reply.message[:300]}"
            if reply.code in REQUEST_ERRORS:  # another server would refuse it too
                raise RequestRefused(f"{self.peer_id} refused: {message}")
            raise HopFailed(self.peer_id, message, busy=reply.code == "busy")


async def close_all(hops: list[Hop]) -> None:
    """Close hop streams (their servers free the sessions), whatever is being cancelled."""
    with trio.CancelScope(shield=True):
        for hop in hops:
            with trio.move_on_after(1):
                await hop.stream.close()
