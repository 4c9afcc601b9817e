"""Run one step of a hop again on another server: the IO of a check or a canary.

A fresh session on the server, and the hop's earlier inputs with the step's own in one pass
(the step's rows of its output are the step's; see `daemon.verify.compare` for why they may
differ from the provider's in the last bits). Past MAX_STEP_TOKENS positions the earlier
inputs go first, in pieces, then the step's. To the server this is
an ordinary session: its `max_length` is the generation's, as every session of it asks, and a
generation's first chunk followed by one-token steps is what every generation sends.
"""

from __future__ import annotations

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
    full: bool = False  # the output of every position (one pass only), not the step's alone

    @property
    def position(self) -> int:
        return 0 if self.prefix is None else int(self.prefix.shape[1])


async def run_on(opener: StreamOpener, peer: str, replay: Replay, timeout_s: float) -> torch.Tensor:
    """The output of `replay` computed by `peer`; ReplicaUnavailable if it gives none."""
    try:
        with trio.fail_after(timeout_s):
            stream = await opener.open_stream(peer, SHARD_PROTOCOL)
    except (NetworkError, trio.TooSlowError) as exc:
        raise ReplicaUnavailable(f"{peer}: {exc!r}") from None
    hop = Hop(peer, replay.start, replay.end, stream, session="")
    try:
        opened, _ = await hop.call(
            wire.Open(
                model=replay.model_id,
                start=replay.start,
                end=replay.end,
                max_length=replay.max_length,
                depth=1,
            ),
            None,
            timeout_s,
        )
        if not isinstance(opened, wire.Opened):
            raise ReplicaUnavailable(f"{peer}: {type(opened).__name__} answers an open")
        hop.session = opened.session
        x, position, prefix = replay.x, replay.position, replay.prefix
        if prefix is not None and position + x.shape[1] <= MAX_STEP_TOKENS:
            x, position, prefix = torch.cat((prefix, x), dim=1), 0, None  # one pass
        if prefix is not None:  # too long for one step: catch up first, then the step
            for first in range(0, prefix.shape[1], MAX_STEP_TOKENS):
                piece = prefix[:, first : first + MAX_STEP_TOKENS]
                await hop.call(
                    wire.Forward(session=hop.session, position=first, last_only=True),
                    piece,
                    timeout_s,
                )
        reply, out = await hop.call(
            wire.Forward(session=hop.session, position=position, last_only=replay.last_only),
            x,
            timeout_s,
        )
        if out is None or not isinstance(reply, wire.Result):
            raise ReplicaUnavailable(f"{peer}: a forward reply without a tensor")
        if replay.last_only or (replay.full and prefix is None):
            return out
        return out[:, -replay.x.shape[1] :]
    except (HopFailed, GenerationError) as exc:
        raise ReplicaUnavailable(str(exc)) from None
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.close()
