"""Checks that gather before they go to their replicas, so that several share a replica's pass
(a requester's, held by its `Verifier`).

Why: where the replicas have no traffic of their own, each check was a forward pass of its
own on an idle replica (its weights cold), about as much CPU as the route's pass of several
generations' steps. A generation that speculates (the token loop goes on while a step's
checks run) does not need a check's verdict at once, only before it lets the step's tokens
out; so a check drawn there waits up to `gather_s` (off by default: see
`policy.VerifyConfig.gather_s` for when it pays) for others (of any generation of this
requester), and then they all go at once, each range's to one replica drawn for the round:
the replica's batching (`daemon.shards.batching`) runs their catch-ups as one pass. A
generation that must have its verdicts now (its end, or too many tokens held) hurries the
round. A check of a step that waits for it (no speculation, a paid generation) never gathers.

The replica drawn for a round is drawn at random among those that may check the first check
of the range to get there (a later check that may not use it takes its own draw): each check
still goes to a replica drawn at random, not one the provider could pick.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio


@dataclass(eq=False)
class Round:
    """Checks gathering together: `go` once they may start; per model and range, its
    replica."""

    go: trio.Event = field(default_factory=trio.Event)
    replicas: dict[tuple[str, int, int], str] = field(default_factory=dict)  # (model, range)
    checks: int = 0


class Gather:
    """The round now gathering, and when it goes."""

    def __init__(self, gather_s: float) -> None:
        if gather_s < 0:
            raise ValueError("gather_s must be >= 0")
        self.gather_s = gather_s
        self._round = Round()
        self.rounds = 0  # rounds that went, and the checks in them (for the bench)
        self.checks = 0

    async def wait(self) -> Round:
        """Join the round gathering now and wait until it goes (a cancelled check leaves)."""
        round_ = self._round
        round_.checks += 1
        if round_.checks == 1:  # the first one times the round
            trio.lowlevel.spawn_system_task(self._go_later, round_, name="verify gather")
        await round_.go.wait()
        return round_

    def hurry(self) -> None:
        """The round gathering now goes at once (a generation waits for its verdicts)."""
        self._go(self._round)

    async def _go_later(self, round_: Round) -> None:
        await trio.sleep(self.gather_s)
        self._go(round_)

    def _go(self, round_: Round) -> None:
        if round_ is self._round and round_.checks:
            self._round = Round()
            self.rounds += 1
            self.checks += round_.checks
            round_.go.set()
