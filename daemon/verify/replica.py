"""Run a hop's steps again on another server: the IO of a check or a canary.

Two ways, both ordinary sessions to the server (its `max_length` is the generation's, as every
session of it asks):
- `ReplicaSession`: a session on a replica that follows one provider hop of a generation
  lazily. A check sends it only the hop's inputs it has not seen yet, the step's included, in
  one pass (in pieces past MAX_STEP_TOKENS), so that a check costs about one pass, not a
  replay of the whole prefix; the session stays open for the hop's next check.
- `run_on`: a fresh session, the hop's earlier inputs with the step's in one pass (a third
  replica's tie-break, a canary).

The step's rows of the output are the step's; see `daemon.verify.compare` for why they may
differ from the provider's in the last bits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import trio

from daemon.shards import SHARD_PROTOCOL, wire
from daemon.shards.client import GenerationError, Hop, HopFailed
from daemon.shards.session import MAX_STEP_TOKENS
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


class ReplicaSession:
    """An open session on `peer` over one range; `fed`: the positions it holds."""

    def __init__(self, peer: str, hop: Hop, timeout_s: float) -> None:
        self.peer = peer
        self.hop = hop
        self.timeout_s = timeout_s
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
    ) -> ReplicaSession:
        """A new session on `peer` (ReplicaUnavailable if it gives none)."""
        try:
            with trio.fail_after(timeout_s):
                stream = await opener.open_stream(peer, SHARD_PROTOCOL)
        except (NetworkError, trio.TooSlowError) as exc:
            raise ReplicaUnavailable(f"{peer}: {exc!r}") from None
        session = cls(peer, Hop(peer, start, end, stream, session=""), timeout_s)
        try:
            opened, _ = await session.hop.call(
                wire.Open(model=model_id, start=start, end=end, max_length=max_length, depth=1),
                None,
                timeout_s,
            )
            if not isinstance(opened, wire.Opened):
                raise ReplicaUnavailable(f"{peer}: {type(opened).__name__} answers an open")
        except BaseException as exc:
            await session.close()
            if isinstance(exc, HopFailed | GenerationError):
                raise ReplicaUnavailable(str(exc)) from None
            raise
        session.hop.session = opened.session
        return session

    async def forward(self, x: torch.Tensor, *, last_only: bool, keep: int) -> torch.Tensor:
        """Run `x` (the inputs of positions `fed` on) through the range. Returns the output of
        its last `keep` rows, or with `last_only` the last row's (what the last range gives).
        ReplicaUnavailable (and `broken`) if the replica gives no answer."""
        if self.broken:
            raise ReplicaUnavailable(f"{self.peer}: the session broke earlier")
        n = int(x.shape[1])
        keep = min(max(keep, 1), n)
        kept: list[torch.Tensor] = []
        self.broken = self.in_use = True  # (broken until every piece is in)
        try:
            for first in range(0, n, MAX_STEP_TOKENS):
                piece = x[:, first : first + MAX_STEP_TOKENS]
                rows = int(piece.shape[1])
                final = first + rows == n
                wanted = not last_only and first + rows > n - keep
                reply, out = await self.hop.call(
                    wire.Forward(
                        session=self.hop.session,
                        position=self.fed,
                        last_only=last_only or not wanted,
                    ),
                    piece,
                    self.timeout_s,
                )
                if out is None or not isinstance(reply, wire.Result):
                    raise ReplicaUnavailable(f"{self.peer}: a forward reply without a tensor")
                self.fed += rows
                if final and last_only:
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
        self.broken = True
        # (a stream that broke already has nothing to close; this runs in the background too)
        with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(Exception):
            await self.hop.stream.close()


async def run_on(
    opener: StreamOpener, peer: str, replay: Replay, timeout_s: float, keep: int | None = None
) -> torch.Tensor:
    """The output of `replay` computed by `peer` in a fresh session: the step's rows (or with
    `replay.full`, or `keep`, that many last rows of every position up to the step's end);
    ReplicaUnavailable if it gives none."""
    session = await ReplicaSession.open(
        opener, peer, replay.model_id, replay.start, replay.end, replay.max_length, timeout_s
    )
    try:
        x = replay.x if replay.prefix is None else torch.cat((replay.prefix, replay.x), dim=1)
        if keep is None:
            keep = int(x.shape[1]) if replay.full else int(replay.x.shape[1])
        return await session.forward(x, last_only=replay.last_only, keep=keep)
    finally:
        await session.close()
