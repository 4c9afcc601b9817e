"""The replica side of a generation's checks (a part of `daemon.verify.verifier.
GenerationChecks`): the replica session that follows each provider hop, opened on a replica
at the hop's first check and fed only the inputs it has not seen; the requester's cap on such
sessions; and fresh sessions for a third replica's tie-break."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import trio

from daemon.verify.replica import Plan, Replay, ReplicaSession, ReplicaUnavailable, run_on

# a check drawn when its step started waits this many step timeouts at most for the hop's
# input (a generation dropped half-way without `flush`: its checks end by themselves)
READY_TIMEOUT_STEPS = 4


class Followers:
    """Per provider hop (by identity) of one generation, its replica session."""

    # the generation's daemon.verify.verifier.Verifier (not imported: that module imports this
    # one, and an import circle fails daemon.tools.deps even for type checking alone)
    verifier: Any

    def __init__(self) -> None:
        self._followers: dict[int, tuple[Any, ReplicaSession]] = {}

    async def _drop_followers(self, which: Callable[[Any], bool]) -> None:
        for hop, session in list(self._followers.values()):
            if which(hop):
                await self._forget(hop, session)

    async def _hold(self, hop: Any, session: ReplicaSession) -> None:
        """Keep `session` as the hop's; past the requester's cap on open replica sessions,
        the least recently used one (of any generation) ends."""
        v = self.verifier
        self._followers[id(hop)] = (hop, session)
        v._held[session] = self
        while len(v._held) > v.max_replica_sessions:
            idle = [(s, o) for s, o in v._held.items() if not s.in_use and s is not session]
            if not idle:  # every other one is checking a step just now
                break
            old, owner = idle[0]
            v.counters["replica_sessions_evicted"] += 1
            held = [h for h, s in owner._followers.values() if s is old]
            await owner._forget(held[0] if held else None, old)

    async def _forget(self, hop: Any, session: ReplicaSession) -> None:
        if hop is not None and self._followers.get(id(hop), (None, None))[1] is session:
            del self._followers[id(hop)]
        self.verifier._held.pop(session, None)
        await session.close()

    def _replicas(
        self,
        model: Any,
        servers: list[Any],
        span: tuple[int, int],
        avoid: set[str],
        shuffle: bool = True,
    ) -> list[str]:
        """Servers of exactly the range `span`, not excluded, failed or sharing a payout
        key with `avoid`."""
        v, now = self.verifier, self.verifier.clock()
        payouts = {v.payout(p) for p in avoid}
        peers = sorted(
            {
                s.peer_id
                for s in servers
                if (s.start, s.end) == span
                and s.alive
                and s.peer_id not in avoid
                and s.peer_id not in model.failed
                and v.payout(s.peer_id) not in payouts
                and not v.reputation.excluded(s.peer_id, now)
            }
        )
        if shuffle:
            v.rng.shuffle(peers)
        return peers

    async def _replica_output(
        self, model: Any, servers: list[Any], replay: Replay, avoid: set[str], keep: int
    ) -> tuple[str, torch.Tensor] | None:
        """The step run on one replica in a fresh session (tried in a random order; None:
        none could); its last `keep` rows."""
        v = self.verifier
        for peer in self._replicas(model, servers, (replay.start, replay.end), avoid)[:3]:
            try:
                out = await run_on(model._opener, peer, replay, model.step_timeout_s, keep, v.links)
            except ReplicaUnavailable:
                v.counters["replica_unavailable"] += 1
                avoid = avoid | {peer}
                continue
            v.counters["replica_steps"] += 1
            v.counters["replica_positions"] += replay.position + int(replay.x.shape[1])
            return peer, out
        return None

    def _follows(self, model: Any, servers: list[Any], hop: Any, peer: str) -> bool:
        """Whether `peer` may still check the hop (as `_replicas` would choose it)."""
        span = (hop.start, hop.end)
        return peer in self._replicas(model, servers, span, {hop.peer_id}, shuffle=False)

    async def _follower_output(
        self, model: Any, servers: list[Any], plan: Plan
    ) -> tuple[str, torch.Tensor, int] | None:
        """The plan's step run on the hop's replica session (opened at the hop's first check,
        on a replica tried in a random order), once the step's input is known: its output
        from the first position compared on, which it returns too; None: no replica could
        run it."""
        v, hop = self.verifier, plan.hop
        held = self._followers.get(id(hop))
        if held is not None and not (
            held[0] is hop and self._follows(model, servers, hop, held[1].peer)
        ):
            await self._forget(*held)
            held = None
        avoid = {hop.peer_id}
        for _ in range(3):
            if held is None:
                span = (hop.start, hop.end)
                peers = self._replicas(model, servers, span, avoid)
                if not peers:
                    return None
                if plan.round is not None:  # the round's replica of the range, where it may
                    key = (model.model_id, *span)
                    drawn = plan.round.replicas.setdefault(key, peers[0])
                    if drawn in peers:
                        peers.remove(drawn)
                        peers.insert(0, drawn)
                try:
                    session = await ReplicaSession.open(
                        model._opener,
                        peers[0],
                        model.model_id,
                        hop.start,
                        hop.end,
                        model.max_length,
                        model.step_timeout_s,
                        v.links,
                    )
                except ReplicaUnavailable:
                    v.counters["replica_unavailable"] += 1
                    avoid.add(peers[0])
                    continue
                v.counters["replica_sessions"] += 1
                held = (hop, session)
                await self._hold(hop, session)
            session = held[1]
            if session in v._held:
                v._held.move_to_end(session)  # recently used
            # the step's input (a step that never gets there is given up: no verdict);
            # meanwhile the session counts as in use (the cap on sessions spares it)
            session.in_use = True
            try:
                with trio.move_on_after(READY_TIMEOUT_STEPS * model.step_timeout_s):
                    await plan.ready.wait()
            finally:
                session.in_use = False
            if not plan.ready.is_set():
                v.counters["checks_abandoned"] += 1
                return None
            feed = plan.unseen(session.fed, self.verifier.config.audit_history)
            if feed is None:  # (cannot happen: a hop's inputs are only ever appended)
                await self._forget(hop, session)
                held = None
                continue
            x, first = feed
            assert plan.x is not None
            end = plan.position + int(plan.x.shape[1])
            try:
                out = await session.forward(x, last_only=plan.last, keep=end - first)
            except ReplicaUnavailable:
                v.counters["replica_unavailable"] += 1
                await self._forget(hop, session)
                avoid.add(session.peer)
                held = None
                continue
            v.counters["replica_steps"] += 1
            v.counters["replica_positions"] += int(x.shape[1])
            return session.peer, out, first
        return None
