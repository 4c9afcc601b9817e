"""A cap on the memory held for inbound stream data that nobody has read yet.

py-libp2p 0.8.1's yamux appends every DATA frame to its stream's buffer, and when a peer sends
past the receive window it grants, only logs a warning: a peer that ignores flow control can
pile up any number of bytes on a stream whose handler is not reading (one waiting for the
peer's hello, one holding a session open), and the host's memory with them.

Here each yamux connection's stream buffers (`Yamux.stream_buffers`) are replaced, when the
connection joins the swarm, by `BoundedBuffers`, whose buffers count what they hold:
- one stream holds at most yamux's largest receive window (MAX_WINDOW_SIZE, 16 MiB): an
  honest sender never has more in flight. More is a flow-control violation: refused, a strike
  and a penalty against the peer (`stream`/`window_exceeded`);
- one connection's streams hold at most `HostLimits.max_buffered_bytes_per_connection`
  together (`stream`/`connection_buffer_limit`, a penalty);
- all connections together hold at most `HostLimits.max_buffered_bytes`
  (`stream`/`buffer_limit`: no penalty, the peer that meets the limit need not be the one
  that filled it).
Refused bytes are dropped, with the bytes the stream held unread (it is broken: they are of
no use), and yamux closes the stream for reading (its handler sees the stream end); a buffer
that refused once refuses all that follows, uncounted. Bytes come back as the handler reads
them or the stream's buffer is dropped. Buffers that existed before the swarm's notifee ran
(the connection's first streams) are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from libp2p.stream_muxer.yamux.yamux import MAX_WINDOW_SIZE

from p2p.bans import PeerBans
from p2p.limits import HostLimits, RejectHook

# (peer, reason) -> None: what a refusal holds against the peer (p2p.bans)
Penalty = Callable[[str, str], None]


def host_budget(limits: HostLimits, on_reject: RejectHook, bans: PeerBans) -> BufferBudget:
    """The budget of one host, from its limits; refusals held against peers by `bans`."""
    return BufferBudget(
        limits.max_buffered_bytes_per_connection,
        limits.max_buffered_bytes,
        on_reject,
        bans.penalize,
    )


class BufferLimitError(Exception):
    """Inbound bytes refused: a buffer, its connection or the host is full."""


class BufferBudget:
    """Bytes held unread in the bounded buffers of one host, in total."""

    def __init__(
        self,
        per_connection: int,
        total: int,
        on_reject: RejectHook,
        penalize: Penalty | None = None,
        per_stream: int = MAX_WINDOW_SIZE,
    ) -> None:
        self.per_stream = per_stream
        self.per_connection = per_connection
        self.total = total
        self.held = 0
        self.refused = 0
        self._on_reject = on_reject
        self._penalize = penalize or (lambda peer, reason: None)

    def install(self, muxed_conn: Any, peer: str) -> bool:
        """Bound `muxed_conn`'s stream buffers (a yamux connection's); False for others."""
        buffers = getattr(muxed_conn, "stream_buffers", None)
        if not isinstance(buffers, dict) or isinstance(buffers, BoundedBuffers):
            return False
        bounded = BoundedBuffers(self, peer)
        dict.update(bounded, buffers)  # the first streams' buffers stay as they are
        muxed_conn.stream_buffers = bounded
        return True

    def refuse(self, peer: str, reason: str) -> None:
        self.refused += 1
        self._on_reject("stream", reason)
        if reason == "window_exceeded":
            self._penalize(peer, "rate_limited")
        elif reason == "connection_buffer_limit":
            self._penalize(peer, "malformed")


class BoundedBuffers(dict[int, bytearray]):
    """One connection's stream buffers: each new one bounded, dropped ones given back."""

    def __init__(self, budget: BufferBudget, peer: str) -> None:
        super().__init__()
        self.budget = budget
        self.peer = peer
        self.held = 0  # this connection's

    def __setitem__(self, stream_id: int, buffer: bytearray) -> None:
        self._release(super().get(stream_id))
        if not isinstance(buffer, BoundedBuffer):
            bounded = BoundedBuffer(self)
            bounded.extend(buffer)
            buffer = bounded
        super().__setitem__(stream_id, buffer)

    def __delitem__(self, stream_id: int) -> None:
        self._release(super().get(stream_id))
        super().__delitem__(stream_id)

    def pop(self, stream_id: int, *default: Any) -> Any:
        self._release(super().get(stream_id))
        return super().pop(stream_id, *default)

    def clear(self) -> None:
        for buffer in list(self.values()):
            self._release(buffer)
        super().clear()

    def _release(self, buffer: bytearray | None) -> None:
        if isinstance(buffer, BoundedBuffer):
            buffer.release()

    def _account(self, delta: int) -> None:
        self.held += delta
        self.budget.held += delta


class BoundedBuffer(bytearray):
    """A stream's unread bytes, counted in its connection's and the host's budget."""

    def __init__(self, owner: BoundedBuffers) -> None:
        super().__init__()
        self._owner: BoundedBuffers | None = owner
        self._refused = False

    def extend(self, data: Any) -> None:
        owner = self._owner
        if owner is None:  # dropped from its connection: nobody reads it any more
            raise BufferLimitError("the stream's buffer was dropped")
        if self._refused:  # bytes were lost: what follows them is of no use either
            raise BufferLimitError("the stream's earlier bytes were refused")
        size = len(data)
        budget = owner.budget
        reason = None
        if len(self) + size > budget.per_stream:
            reason = "window_exceeded"
        elif owner.held + size > budget.per_connection:
            reason = "connection_buffer_limit"
        elif budget.held + size > budget.total:
            reason = "buffer_limit"
        if reason is not None:
            self._refused = True
            budget.refuse(owner.peer, reason)
            self.clear()  # the stream is broken: what it held is given back at once
            raise BufferLimitError(f"{reason}: {size} bytes refused")
        super().extend(data)
        owner._account(size)

    def __delitem__(self, key: Any) -> None:
        before = len(self)
        super().__delitem__(key)
        if self._owner is not None:
            self._owner._account(len(self) - before)

    def clear(self) -> None:
        before = len(self)
        super().clear()
        if self._owner is not None:
            self._owner._account(-before)

    def release(self) -> None:
        """Dropped by its connection: what it holds no longer counts (nor will it grow)."""
        if self._owner is not None:
            self._owner._account(-len(self))
            self._owner = None
