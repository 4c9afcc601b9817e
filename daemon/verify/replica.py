"""Run a hop's steps again on another server: the IO of a check or a canary.

Two ways, both ordinary sessions to the server (its `max_length` is the generation's, as every
session of it asks):
- `ReplicaSession`: a session on a replica that follows one provider hop of a generation
  lazily. A check sends it only the hop's inputs it has not seen yet, the step's included, in
  one pass (in pieces past MAX_STEP_TOKENS), so that a check costs about one pass, not a
  replay of the whole prefix; the session stays open for the hop's next check.
- `run_on`: a fresh session, the hop's earlier inputs with the step's in one pass (a third
  replica's tie-break, a canary).
A session goes on a stream the requester keeps to the replica (`daemon.verify.links`; a
canary's on a stream of its own, as an ordinary generation's). `Plan`: a hop's step drawn for
a check when the step starts, whose replica side runs beside the step.

The step's rows of the output are the step's; see `daemon.verify.compare` for why they may
differ from the provider's in the last bits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from daemon.shards import SHARD_PROTOCOL, wire
from daemon.shards.client import GenerationError, Hop, HopFailed
from daemon.shards.session import MAX_STEP_TOKENS
from daemon.verify.links import Link, LinkUnavailable, ReplicaLinks
from p2p.network import NetworkError, StreamOpener


class ReplicaUnavailable(Exception):
    """The replica could not run the step (down, busy, refused): no verdict."""


@dataclass(frozen=True)
class Replay:
    """A hop's step as a replica gets it: the inputs before it, and its own."""

    model_id: str
    start: int
    end: int
    max_length: int
    prefix: torch.Tensor | None  # positions 0 .. position - 1 (None at position 0)
    x: torch.Tensor
    last_only: bool
    full: bool = False  # the output of every position, not the step's alone

    @property
    def position(self) -> int:
        return 0 if self.prefix is None else int(self.prefix.shape[1])


@dataclass(eq=False)
class Plan:
    """A hop's step drawn for a check when the step started (`daemon.verify.verifier.
    GenerationChecks.before_step`). Its replica side runs beside the step: the replica
    session is made ready at once, and the hop's inputs go to it as soon as the step's is
    known (`give`), while the provider computes the same; the step's end then only waits
    for what is left of it and compares."""

    hop: Any
    position: int
    last: bool  # the route's last hop (its output: the last position's logits)
    x: torch.Tensor | None = None  # the hop's input at `position`, once known
    ready: trio.Event = field(default_factory=trio.Event)  # `x` is known
    done: trio.Event = field(default_factory=trio.Event)
    result: tuple[str, torch.Tensor, int] | None = None  # (replica, its rows, first row's pos)
    error: BaseException | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    collected: bool = False  # its verdict was drawn (a step run again is not checked twice)
    after: Plan | None = None  # the hop's check still running before it (it goes first)
    gather: bool = False  # waits for other checks to go with (`daemon.verify.gather`)
    round: Any = None  # the gather's round it went with (its replica per range)

    def give(self, x: torch.Tensor) -> None:
        if not self.ready.is_set():
            self.x = x
            self.ready.set()

    def unseen(self, fed: int, audit: bool) -> tuple[torch.Tensor, int] | None:
        """The hop's inputs from position `fed` (what a replica session holds) to the step's
        end, and the first position whose output is compared: with `audit` (audit_history,
        a hop that is not the last) `fed` (the provider's outputs since then are recorded by
        then), else the step's. None: the recorded inputs do not fit."""
        position, x = self.position, self.x
        assert x is not None
        if fed > position:
            return None
        inputs = [c for p, c in self.hop.chunks if fed <= p < position] + [x]
        if sum(int(c.shape[1]) for c in inputs) != position + int(x.shape[1]) - fed:
            return None
        first = fed if audit and not self.last else position
        return (inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)), first


class ReplicaSession:
    """An open session on `peer` over one range; `fed`: the positions it holds."""

    def __init__(
        self,
        peer: str,
        hop: Hop,
        timeout_s: float,
        link: Link | None = None,
        links: ReplicaLinks | None = None,
    ) -> None:
        self.peer = peer
        self.hop = hop
        self.timeout_s = timeout_s
        self.link = link  # the kept stream it is on (None: a stream of its own)
        self.links = links
        self.fed = 0
        self.broken = False  # a forward failed half-way: what it holds is unknown
        self.in_use = False  # a forward is in flight

    @classmethod
    async def open(
        cls,
        opener: StreamOpener,
        peer: str,
        model_id: str,
        start: int,
        end: int,
        max_length: int,
        timeout_s: float,
        links: ReplicaLinks | None = None,
    ) -> ReplicaSession:
        """A new session on `peer` (ReplicaUnavailable if it gives none), on one of `links`
        (a kept stream; a new one if a kept one fails at once), or on a stream of its own."""
        for again in (False, True) if links is not None else (True,):
            try:
                if links is not None:
                    link: Link | None = await links.take(opener, peer, timeout_s, new=again)
                    stream = link.stream
                else:
                    link = None
                    with trio.fail_after(timeout_s):
                        stream = await opener.open_stream(peer, SHARD_PROTOCOL)
            except (NetworkError, trio.TooSlowError, LinkUnavailable) as exc:
                raise ReplicaUnavailable(f"{peer}: {exc!r}") from None
            reused = link is not None and link.calls > 0
            session = cls(peer, Hop(peer, start, end, stream, session=""), timeout_s, link, links)
            header = wire.Open(model=model_id, start=start, end=end, max_length=max_length, depth=1)
            try:
                opened, _ = await session._call(header, None)
                if not isinstance(opened, wire.Opened):
                    raise ReplicaUnavailable(f"{peer}: {type(opened).__name__} answers an open")
            except BaseException as exc:
                await session.close()
                if isinstance(exc, HopFailed) and exc.transient and reused and not again:
                    continue  # a kept stream the server may have closed: a new one
                if isinstance(exc, HopFailed | GenerationError):
                    raise ReplicaUnavailable(str(exc)) from None
                raise
            session.hop.session = opened.session
            return session
        raise AssertionError("unreachable")  # (the last attempt returns or raises)

    async def _call(
        self, header: wire.Request, tensor: torch.Tensor | None
    ) -> tuple[wire.Message, torch.Tensor | None]:
        if self.link is not None:
            return await self.link.call(self.hop, header, tensor, self.timeout_s)
        return await self.hop.call(header, tensor, self.timeout_s)

    async def forward(
        self, x: torch.Tensor, *, last_only: bool, keep: int, ordinary: bool = False
    ) -> torch.Tensor:
        """Run `x` (the inputs of positions `fed` on) through the range. Returns the output of
        its last `keep` rows, or with `last_only` the last row's (what the last range gives);
        ReplicaUnavailable (and `broken`) if the replica gives no answer. `ordinary`: ask as
        an ordinary generation's client does (a canary's: every row of a range that is not
        the last, cut here); else a one-row `keep` asks the server for that row alone (a
        check's replica, which may know it checks someone)."""
        if self.broken:
            raise ReplicaUnavailable(f"{self.peer}: the session broke earlier")
        n = int(x.shape[1])
        keep = min(max(keep, 1), n)
        # only the last row wanted (the route's last hop, or one step's position): the
        # server sends that row alone, not every row of the piece to be cut here
        tail = last_only or (keep == 1 and not ordinary)
        kept: list[torch.Tensor] = []
        self.broken = self.in_use = True  # (broken until every piece is in)
        try:
            for first in range(0, n, MAX_STEP_TOKENS):
                piece = x[:, first : first + MAX_STEP_TOKENS]
                rows = int(piece.shape[1])
                final = first + rows == n
                wanted = not tail and first + rows > n - keep
                reply, out = await self._call(
                    wire.Forward(
                        session=self.hop.session,
                        position=self.fed,
                        last_only=tail or not wanted,
                    ),
                    piece,
                )
                if out is None or not isinstance(reply, wire.Result):
                    raise ReplicaUnavailable(f"{self.peer}: a forward reply without a tensor")
                self.fed += rows
                if final and tail:
                    if out.dim() != 3 or out.shape[1] != 1:
                        raise ReplicaUnavailable(f"{self.peer}: {tuple(out.shape)} for one row")
                    kept.append(out)
                elif wanted:
                    if out.dim() != 3 or out.shape[1] != rows:
                        raise ReplicaUnavailable(f"{self.peer}: {out.shape[1]} rows for {rows}")
                    kept.append(out[:, max(0, n - keep - first) :])
        except (HopFailed, GenerationError) as exc:
            raise ReplicaUnavailable(str(exc)) from None
        finally:
            self.in_use = False
        self.broken = False
        return kept[0] if len(kept) == 1 else torch.cat(kept, dim=1)

    async def close(self) -> None:
        """End the session: on a kept stream a `close` frame (the stream stays), else its
        stream; never raises (this runs in the background too)."""
        self.broken = True
        link, self.link = self.link, None
        shielded = trio.CancelScope(shield=True)
        if link is None:  # (a stream that broke already has nothing to close)
            with shielded, trio.move_on_after(1), contextlib.suppress(Exception):
                await self.hop.stream.close()
            return
        try:  # (a call interrupted half-way broke the link already)
            if self.hop.session and not link.broken:
                close = wire.Close(session=self.hop.session)
                with shielded, trio.move_on_after(1) as late, contextlib.suppress(Exception):
                    await link.call(self.hop, close, None, 1.0)
                if late.cancelled_caught:  # (its reply may come later: the stream is unknown)
                    link.broken = True
        finally:
            if self.links is not None:
                self.links.release(link)


async def run_on(
    opener: StreamOpener,
    peer: str,
    replay: Replay,
    timeout_s: float,
    keep: int | None = None,
    links: ReplicaLinks | None = None,
    *,
    ordinary: bool = False,
) -> torch.Tensor:
    """The output of `replay` computed by `peer` in a fresh session: the step's rows (or with
    `replay.full`, or `keep`, that many last rows of every position up to the step's end);
    ReplicaUnavailable if it gives none. `ordinary`: asked as an ordinary generation's client
    asks (a canary: see `ReplicaSession.forward`)."""
    session = await ReplicaSession.open(
        opener,
        peer,
        replay.model_id,
        replay.start,
        replay.end,
        replay.max_length,
        timeout_s,
        links,
    )
    try:
        x = replay.x if replay.prefix is None else torch.cat((replay.prefix, replay.x), dim=1)
        if keep is None:
            keep = int(x.shape[1]) if replay.full else int(replay.x.shape[1])
        return await session.forward(x, last_only=replay.last_only, keep=keep, ordinary=ordinary)
    finally:
        await session.close()
