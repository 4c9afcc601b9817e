"""The requester's checks of the steps it gets back (driven by the shard client's hooks).

`Verifier` lives as long as the requester (its providers' reputations, its canaries, its
counters); `Verifier.generation()` gives one generation its `GenerationChecks`, which the
`RemoteModel` calls (`verifier=`) at two points:
- `routable(servers)`: excluded providers are left out, and among routes of equal latency the
  one of better reputation wins (`daemon.verify.policy.RANK_PENALTY_MS`);
- `after_step(model, position, logits)`: every hop of the step that just ran is drawn for a
  check (at its provider's rate) and, on probation, for a canary. A checked hop's step runs
  again on a replica of the same range (another provider, another payout key); a difference
  goes to a third replica and the minority fails the check. The replica keeps one session per
  provider hop for the generation (`ReplicaSession`), fed only the hop's inputs it has not seen
  yet, so that a check costs one pass over the steps since the hop's last check instead of a
  replay of the whole prefix. The provider sees nothing of this: the draw is made after it
  answered, and the replica is another server. A provider that fails makes the
  step fail over (`HopFailed`): the client re-routes without it and runs the step again on an
  honest route, before any token is drawn from it.

In a paid generation the receipts of a step are held until its checks are done (`payments`):
the receipt of a step found wrong is never acknowledged, the others are checked and
acknowledged as before, in the order they came.

The replica sessions end with the generation: `aclose()` (or `flush()`, which closes them in
the background); a hop replaced by a failover loses its session at the next step; and one
requester holds at most `max_replica_sessions` of them (the least recently used idle one ends
first), so a generation that is never closed holds no replica's memory for long. What a
replica can see: a session whose chunks after the first are the steps since the last check,
several positions at once, which an ordinary generation does not send; it may guess that it
is checking someone, not whom nor which step, and a replica that answers wrong loses to the
third one.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import torch
import trio

from daemon.shards.client import HopFailed
from daemon.verify.canaries import Canary, CanaryStore
from daemon.verify.compare import Agreement, compare, tolerance
from daemon.verify.policy import RANK_PENALTY_MS, Reputation, VerifyConfig
from daemon.verify.replica import Replay, ReplicaSession, ReplicaUnavailable, run_on

_BAD = ("fail", "unresolved", "canary-fail")  # outcomes that fail the step over
# replica sessions held open at once by one requester (a server takes 32 of one peer)
MAX_REPLICA_SESSIONS = 32

PayoutOf = Callable[[str], "str | None"]


@dataclass
class Verdict:
    """One check's outcome: `failed` names who lost (the provider, or the replica)."""

    hop: int
    peer: str
    outcome: str  # "pass", "fail", "unresolved" (no majority or no replica), "canary-fail"
    failed: list[str]


class Verifier:
    """Checks, reputations and canaries of one requester."""

    def __init__(
        self,
        config: VerifyConfig | None = None,
        *,
        rng: random.Random | None = None,
        payout_of: PayoutOf | None = None,
        clock: Callable[[], float] = trio.current_time,
        rtol: float | None = None,
        canaries: CanaryStore | None = None,
        max_replica_sessions: int = MAX_REPLICA_SESSIONS,
    ) -> None:
        """`payout_of(peer)`: the payout key a provider announced (None: unknown, the peer
        id stands for it). `rtol`: the comparison's bound (default: by the dtype).
        `max_replica_sessions`: the checks' replica sessions held open at once, over all
        generations (a generation that is never flushed cannot hold replicas' memory)."""
        self.config = config or VerifyConfig()
        self.rng = rng or random.SystemRandom()
        self.reputation = Reputation(self.config, self.rng)
        self.payout_of = payout_of or (lambda peer: None)
        self.clock = clock
        self.rtol = rtol
        self.canaries = canaries if canaries is not None else CanaryStore()
        self.counters: Counter[str] = Counter()
        self.verdicts: list[Verdict] = []  # the newest 1000
        self.spread_max = 0.0  # the largest honest difference seen (agreements only)
        self.max_replica_sessions = max_replica_sessions
        # the open replica sessions, least recently used first, and whose they are
        self._held: OrderedDict[ReplicaSession, GenerationChecks] = OrderedDict()

    def generation(self, payments: Any = None) -> GenerationChecks:
        return GenerationChecks(self, payments)

    def payout(self, peer: str) -> str:
        return self.payout_of(peer) or f"peer:{peer}"

    def routable(self, servers: list[Any]) -> list[Any]:
        now = self.clock()
        kept = [s for s in servers if not self.reputation.excluded(s.peer_id, now)]
        if len(kept) < len(servers):
            self.counters["excluded_from_route"] += len(servers) - len(kept)
        ranks = self.reputation.ranks(sorted({s.peer_id for s in kept}), now)
        out = []
        for s in kept:
            rank = ranks.get(s.peer_id, 0)
            out.append(_with_rtt(s, s.rtt_ms + rank * RANK_PENALTY_MS) if rank else s)
        return out

    def to_json(self) -> dict[str, Any]:
        """What the local APIs and /metrics can show: counters, providers, canaries."""
        return {
            "config": msgspec.to_builtins(self.config),
            "counters": dict(self.counters),
            "providers": self.reputation.to_json(self.clock()),
            "canaries": len(self.canaries),
            "replica_sessions_open": len(self._held),
            "max_honest_spread": self.spread_max,
        }

    def record(self, verdict: Verdict) -> None:
        self.verdicts.append(verdict)
        del self.verdicts[:-1000]
        self.counters[f"checks_{verdict.outcome}"] += 1


def _canary(replay: Replay, output: torch.Tensor) -> Canary:
    """A verified step as a canary: its own rows (an audit's earlier rows are left out)."""
    if replay.last_only:
        return Canary(replay, output)
    return Canary(replay, output[:, -replay.x.shape[1] :])


@dataclass
class _Drawn:
    """A hop's step drawn for a check: the hop, the step as a replica gets it, what the
    provider gave, and (for `audit_history`) the next hop's recorded inputs."""

    i: int
    hop: Any
    replay: Replay
    out: torch.Tensor
    given: list[tuple[int, torch.Tensor]]


def _with_rtt(server: Any, rtt_ms: float) -> Any:
    return dataclasses.replace(server, rtt_ms=rtt_ms)


class DeferredPayments:
    """A paid generation's receipt checks, held until the step's checks are done."""

    def __init__(self, paid: Any) -> None:
        self.paid = paid
        self.held: list[tuple[str, str, Any, bytes, bytes]] = []
        self.withheld = 0

    def __getattr__(self, name: str) -> Any:  # job_id, max_price_per_unit, opened, ...
        return getattr(self.paid, name)

    def check(
        self, peer_id: str, session_id: str, receipt: bytes | None, given: bytes, got: bytes
    ) -> str | None:
        self.held.append((peer_id, session_id, receipt, given, got))
        return None

    def release(self, withhold: set[str]) -> tuple[str, str] | None:
        """Check and acknowledge the held receipts except those of `withhold`'s peers; the
        first refused one's (peer, reason), or None."""
        held, self.held = self.held, []
        refused: tuple[str, str] | None = None
        for peer, session, receipt, given, got in held:
            if peer in withhold:
                self.withheld += 1
                continue
            why = self.paid.check(peer, session, receipt, given, got)
            if why is not None and refused is None:
                refused = (peer, why)
        return refused


class GenerationChecks:
    """One generation's side of the checks (the `RemoteModel`'s `verifier`)."""

    def __init__(self, verifier: Verifier, paid: Any) -> None:
        self.verifier = verifier
        self.payments = DeferredPayments(paid) if paid is not None else None
        self.checked_steps = 0
        # per provider hop (by identity), its replica session: (hop, session)
        self._followers: dict[int, tuple[Any, ReplicaSession]] = {}

    def routable(self, servers: list[Any]) -> list[Any]:
        return self.verifier.routable(servers)

    def flush(self) -> None:
        """Acknowledge what is still held and end the replica sessions (the generation
        ends; `aclose` where the caller can wait, else they end in the background)."""
        if self.payments is not None:
            self.payments.release(set())
        if self._followers:
            trio.lowlevel.spawn_system_task(self.aclose, name="verify replica sessions")

    async def after_step(self, model: Any, position: int, logits: torch.Tensor) -> None:
        v = self.verifier
        now = v.clock()
        hops = list(model.hops)
        if self._followers:  # hops replaced by a failover: their replica sessions end
            await self._drop_followers(lambda hop: not any(hop is h for h in hops))
        drawn: list[_Drawn] = []
        canaries: list[tuple[int, Canary]] = []
        for i, hop in enumerate(hops):
            check = v.reputation.should_check(hop.peer_id, now)
            if check:  # (what it got and gave is gathered only for the hops drawn)
                step = self._step_of(model, hops, i, position, logits)
                if step is not None:
                    drawn.append(step)
            if v.reputation.should_canary(hop.peer_id, now):
                kept = v.canaries.get(model.model_id, hop.start, hop.end)
                if kept:
                    canaries.append((i, v.rng.choice(kept)))
        verdicts: list[Verdict] = []
        if drawn or canaries:
            servers = await model._servers()

            async def check(step: _Drawn) -> None:
                verdicts.append(await self._check(model, servers, step))

            async def canary(i: int, canary: Canary) -> None:
                verdicts.append(await self._canary(model, hops[i].peer_id, i, canary))

            async with trio.open_nursery() as nursery:
                for step in drawn:
                    nursery.start_soon(check, step)
                for c_args in canaries:
                    nursery.start_soon(canary, *c_args)
            self.checked_steps += 1
        lost = {peer for d in verdicts for peer in d.failed}
        for peer in lost:
            if v.reputation.failed(peer, now):
                v.counters["exclusions"] += 1
        route = {h.peer_id for h in hops}
        bad = sorted(
            (d for d in verdicts if d.outcome in _BAD and d.peer in route), key=lambda d: d.hop
        )
        if self.payments is not None:
            refused = self.payments.release(lost & route)
            if refused is not None and not bad:
                raise HopFailed(*refused)
        if bad:  # the earliest wrong hop: the step fails over from there
            d = bad[0]
            reason = "no majority among replicas" if d.outcome == "unresolved" else "wrong output"
            raise HopFailed(d.peer, f"failed a check: {reason}")

    async def aclose(self) -> None:
        """End the replica sessions (the generation ends); never raises."""
        await self._drop_followers(lambda hop: True)

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

    def _step_of(
        self, model: Any, hops: list[Any], i: int, position: int, logits: torch.Tensor
    ) -> _Drawn | None:
        """Hop `i`'s part of the step at `position`: what it got (and before) and gave (and,
        for `audit_history`, the next hop's inputs: what it gave at every earlier position)."""
        hop = hops[i]
        if not hop.chunks or hop.chunks[-1][0] != position:
            return None
        chunks = [c for p, c in hop.chunks if p < position]
        if sum(c.shape[1] for c in chunks) != position:
            return None  # the inputs before it are not all recorded
        last = i == len(hops) - 1
        given: list[tuple[int, torch.Tensor]] = []
        if last:
            out = logits
        else:
            after = hops[i + 1].chunks
            if not after or after[-1][0] != position:
                return None
            out = after[-1][1]
            if self.verifier.config.audit_history:
                given = list(after)
        x = hop.chunks[-1][1]
        replay = Replay(
            model.model_id,
            hop.start,
            hop.end,
            model.max_length,
            torch.cat(chunks, dim=1) if chunks else None,
            x,
            last,
        )
        return _Drawn(i, hop, replay, out, given)

    def _replicas(
        self, model: Any, servers: list[Any], replay: Replay, avoid: set[str], shuffle: bool = True
    ) -> list[str]:
        """Servers of exactly the range, not excluded, failed or sharing a payout key."""
        v, now = self.verifier, self.verifier.clock()
        payouts = {v.payout(p) for p in avoid}
        peers = sorted(
            {
                s.peer_id
                for s in servers
                if s.start == replay.start
                and s.end == replay.end
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
        for peer in self._replicas(model, servers, replay, avoid)[:3]:
            try:
                out = await run_on(model._opener, peer, replay, model.step_timeout_s, keep)
            except ReplicaUnavailable:
                v.counters["replica_unavailable"] += 1
                avoid = avoid | {peer}
                continue
            v.counters["replica_steps"] += 1
            v.counters["replica_positions"] += replay.position + int(replay.x.shape[1])
            return peer, out
        return None

    def _follows(self, model: Any, servers: list[Any], step: _Drawn, peer: str) -> bool:
        """Whether `peer` may still check the hop (as `_replicas` would choose it)."""
        avoid = {step.hop.peer_id}
        return peer in self._replicas(model, servers, step.replay, avoid, shuffle=False)

    async def _follower_output(
        self, model: Any, servers: list[Any], step: _Drawn
    ) -> tuple[str, torch.Tensor, int] | None:
        """The step run on the hop's replica session (opened at the hop's first check, on a
        replica tried in a random order): its output from the first position compared on,
        which it returns too; None: no replica could run it."""
        v, hop, replay = self.verifier, step.hop, step.replay
        held = self._followers.get(id(hop))
        if held is not None and not (
            held[0] is hop and self._follows(model, servers, step, held[1].peer)
        ):
            await self._forget(*held)
            held = None
        avoid = {hop.peer_id}
        for _ in range(3):
            if held is None:
                peers = self._replicas(model, servers, replay, avoid)
                if not peers:
                    return None
                try:
                    session = await ReplicaSession.open(
                        model._opener,
                        peers[0],
                        replay.model_id,
                        replay.start,
                        replay.end,
                        replay.max_length,
                        model.step_timeout_s,
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
            feed = self._unseen(step, session.fed)
            if feed is None:  # (cannot happen: a hop's inputs are only ever appended)
                await self._forget(hop, session)
                held = None
                continue
            x, first = feed
            end = replay.position + int(replay.x.shape[1])
            try:
                out = await session.forward(x, last_only=replay.last_only, keep=end - first)
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

    def _unseen(self, step: _Drawn, fed: int) -> tuple[torch.Tensor, int] | None:
        """The hop's inputs from position `fed` to the step's end, and the first position
        whose output is compared: with `audit_history` (a hop that is not the last) `fed`,
        where the provider's outputs since then are recorded, else the step's."""
        position = step.replay.position
        if fed > position:
            return None
        inputs = [c for p, c in step.hop.chunks if fed <= p <= position]
        if sum(int(c.shape[1]) for c in inputs) != position + int(step.replay.x.shape[1]) - fed:
            return None
        first = position
        if step.given and fed < position:
            gave = [c for p, c in step.given if fed <= p <= position]
            if sum(int(c.shape[1]) for c in gave) == sum(int(c.shape[1]) for c in inputs):
                first = fed
        return (inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)), first

    def _provider_rows(self, step: _Drawn, first: int) -> torch.Tensor:
        """What the provider gave from position `first` to the step's end."""
        if first == step.replay.position:
            return step.out
        gave = [c for p, c in step.given if first <= p <= step.replay.position]
        return torch.cat(gave, dim=1)

    def _agree(self, got: torch.Tensor, want: torch.Tensor, replay: Replay) -> bool:
        v = self.verifier
        dtype = replay.x.dtype if replay.x.is_floating_point() else want.dtype
        how = compare(got, want, v.rtol if v.rtol is not None else tolerance(dtype))
        v.counters[f"compare_{how.value}"] += 1
        if how is Agreement.CLOSE:
            from daemon.verify.compare import spread

            v.spread_max = max(v.spread_max, spread(got, want))
        return how is not Agreement.DIFFER

    async def _check(self, model: Any, servers: list[Any], step: _Drawn) -> Verdict:
        v, i, replay = self.verifier, step.i, step.replay
        provider = step.hop.peer_id
        first = await self._follower_output(model, servers, step)
        if first is None:
            v.counters["checks_skipped"] += 1  # no replica: not a verdict
            return Verdict(i, provider, "skipped", [])
        checker, theirs, since = first
        out = self._provider_rows(step, since)
        keep = replay.position + int(replay.x.shape[1]) - since
        now = v.clock()
        if self._agree(out, theirs, replay):
            verdict = Verdict(i, provider, "pass", [])
            v.reputation.passed(provider, now)
            v.reputation.passed(checker, now)
            v.canaries.add(_canary(replay, theirs))
        else:
            avoid = {provider, checker}
            third = await self._replica_output(model, servers, replay, avoid, keep)
            if third is None:
                verdict = Verdict(i, provider, "unresolved", [])
            else:
                referee, ref = third
                provider_ok = self._agree(out, ref, replay)
                checker_ok = self._agree(theirs, ref, replay)
                if checker_ok and not provider_ok:
                    verdict = Verdict(i, provider, "fail", [provider])
                    v.reputation.passed(checker, now)
                    v.reputation.passed(referee, now)
                    v.canaries.add(_canary(replay, ref))
                elif provider_ok and not checker_ok:
                    verdict = Verdict(i, provider, "pass", [checker])
                    v.reputation.passed(provider, now)
                    v.reputation.passed(referee, now)
                    v.canaries.add(_canary(replay, ref))
                else:
                    verdict = Verdict(i, provider, "unresolved", [])
            if checker in verdict.failed or verdict.outcome == "unresolved":
                await self._drop_followers(lambda hop: hop is step.hop)  # not this one again
        v.record(verdict)
        return verdict

    async def _canary(self, model: Any, peer: str, i: int, canary: Canary) -> Verdict:
        v = self.verifier
        try:
            got = await run_on(model._opener, peer, canary.replay, model.step_timeout_s)
        except ReplicaUnavailable:
            v.counters["canaries_unanswered"] += 1
            return Verdict(i, peer, "skipped", [])
        v.counters["canaries_sent"] += 1
        if self._agree(got, canary.output, canary.replay):
            v.reputation.passed(peer, v.clock())
            verdict = Verdict(i, peer, "pass", [])
        else:
            verdict = Verdict(i, peer, "canary-fail", [peer])
        v.record(verdict)
        return verdict
