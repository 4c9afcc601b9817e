"""The requester's checks of the steps it gets back (driven by the shard client's hooks).

`Verifier` lives as long as the requester (its providers' reputations, its canaries, its
counters); `Verifier.generation()` gives one generation its `GenerationChecks`, which the
`RemoteModel` calls (`verifier=`) at these points:
- `routable(servers)`: excluded providers are left out, and among routes of equal latency the
  one of better reputation wins (`daemon.verify.policy.RANK_PENALTY_MS`);
- `before_step(model, position)`: every hop of the step about to run is drawn for a check (at
  its provider's rate, one independent draw per step and hop). A checked hop's step runs again
  on a replica of the same range (another provider, another payout key), beside the step
  itself: the replica's session is made ready at once, and
- `input_known(hop, position, x)`: as soon as the hop's input is known (sent to the first hop,
  or pushed on by the hop before: the client gets a copy), it goes to the replica too, so
  that the replica computes while the provider does and the check adds little or nothing to
  the step's time (the token loop waits only for what is left of it at the step's end);
- `after_step(model, position, logits)`: the drawn hops' outputs are compared with their
  replicas' (and, on probation, a canary may be sent); a difference goes to a third replica
  and the minority fails the check. A provider that fails makes the step fail over
  (`HopFailed`): the client re-routes without it and runs the step again on an honest route,
  before any token is drawn from it.
- `after_step_speculative(model, position, logits)` (a free generation, `speculate` on:
  `daemon.shards.token_loop` speculates): the same checks judged in the background
  (`Pending`), while the generation goes on; it lets no token of the step out before the
  verdicts, and rolls back to the step if a hop was found wrong. Verdicts apply in step order,
  and those of a step rolled back over are dropped (as if it had never run). Such a step's
  checks gather with others for up to `gather_s` (`daemon.verify.gather`) so that a replica
  runs several in one pass.
The replica keeps one session per provider hop for the generation (`ReplicaSession`), fed
only the hop's inputs it has not seen yet, so that a check costs one pass over the steps since
the hop's last check instead of a replay of the whole prefix. The provider sees nothing of
this: nothing it receives depends on the draw (the replica is another server, and its work
runs beside the step; only a check slower than the provider's step delays the next step, after
the provider answered, and past draws say nothing about the next one).

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
from daemon.verify.compare import Agreement, judge, tolerance
from daemon.verify.deferred import DeferredPayments
from daemon.verify.followers import Followers
from daemon.verify.gather import Gather
from daemon.verify.links import ReplicaLinks
from daemon.verify.policy import RANK_PENALTY_MS, Reputation, VerifyConfig
from daemon.verify.replica import Plan, Replay, ReplicaSession, ReplicaUnavailable, run_on

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
    # what it earns when applied (`GenerationChecks._apply`): the peers that passed, and the
    # step as a canary
    passed: list[str] = dataclasses.field(default_factory=list)
    canary: Canary | None = None


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
        self.links = ReplicaLinks()  # streams to replicas, kept for the checks to come
        self.gather = Gather(self.config.gather_s)  # speculating checks go in rounds

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
            "replica_links_open": len(self.links),
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


@dataclass(eq=False)
class Pending:
    """A step's checks judged in the background while the generation goes on (speculation):
    `done` once judged; `failure`: the hop found wrong, which the step fails over from after
    a roll-back to it (None: every check passed, or none had a verdict)."""

    position: int
    before: Pending | None = None  # the generation's step judged before it
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    failure: HopFailed | None = None
    error: Exception | None = None  # (a bug in the judging: raised where it is settled)
    # settled by the generation (its verdicts stand) or dropped (`discard`): the next step's
    # verdicts may apply
    released: trio.Event = dataclasses.field(default_factory=trio.Event)
    discarded: bool = False

    def release(self) -> None:
        self.before = None
        self.released.set()

    def discard(self) -> None:
        """The step is gone (rolled back over, or the generation ended first): its verdicts
        are dropped unapplied, as if it had never run."""
        self.discarded = True
        self.release()


def _with_rtt(server: Any, rtt_ms: float) -> Any:
    return dataclasses.replace(server, rtt_ms=rtt_ms)


class GenerationChecks(Followers):
    """One generation's side of the checks (the `RemoteModel`'s `verifier`)."""

    def __init__(self, verifier: Verifier, paid: Any) -> None:
        super().__init__()  # per provider hop, its replica session (`Followers`)
        self.verifier = verifier
        self.payments = DeferredPayments(paid) if paid is not None else None
        self.checked_steps = 0
        # per hop (by identity), its draw for the step now running: (hop, position, plan or
        # None: not drawn for a check)
        self._drawn: dict[int, tuple[Any, int, Plan | None]] = {}
        # per hop (by identity), its newest plan: the next one's replica side waits for it
        # (speculation lets one hop's checks overlap; its replica session takes them in turn)
        self._last_plan: dict[int, Plan] = {}
        # speculative steps judged and not yet released by the generation, oldest first: a
        # step's verdicts apply (reputations, records) only once the step before it is
        # released, so that a step rolled back over counts for nothing, as if it never ran
        self._pending: list[Pending] = []

    @property
    def speculative(self) -> bool:
        """Whether the token loop may go on while a step's checks run (free work only: a
        paid generation's receipts are held and released step by step as checks end)."""
        return self.payments is None and self.verifier.config.speculate

    def routable(self, servers: list[Any]) -> list[Any]:
        return self.verifier.routable(servers)

    def hurry(self) -> None:
        """The generation waits for its verdicts: the checks gathering go now."""
        self.verifier.gather.hurry()

    def flush(self) -> None:
        """Acknowledge what is still held and end the replica sessions (the generation
        ends; `aclose` where the caller can wait, else they end in the background)."""
        if self.payments is not None:
            self.payments.release(set())
        self._cancel_plans()
        if self._followers:
            trio.lowlevel.spawn_system_task(self.aclose, name="verify replica sessions")

    def before_step(self, model: Any, position: int) -> None:
        """The step at `position` starts: every hop of the route is drawn for a check (at its
        provider's rate, once per step and hop: a step run again after a failover keeps the
        draws of the hops it kept); a drawn hop's replica side starts now, beside the step.
        Nothing the provider receives depends on the draw."""
        v = self.verifier
        now = v.clock()
        hops = model.hops
        for i, hop in enumerate(hops):
            held = self._drawn.get(id(hop))
            if held is not None and held[0] is hop and held[1] == position:
                continue  # drawn already
            plan = None
            if v.reputation.should_check(hop.peer_id, now):
                plan = Plan(hop, position, last=i == len(hops) - 1)
                self._start(model, plan)
            self._keep_draw(hop, position, plan)
        if len(self._drawn) == len(hops):  # a draw per hop of the route, none of another
            return
        for key, (hop, _, plan) in list(self._drawn.items()):
            if not any(hop is h for h in hops):  # replaced by a failover
                del self._drawn[key]
                if plan is not None and not plan.collected:  # (a collected one is judged)
                    plan.scope.cancel()

    def input_known(self, hop: Any, position: int, x: torch.Tensor) -> None:
        """`hop`'s input at `position` is known (sent, or pushed to it): a check of it goes
        to its replica now."""
        held = self._drawn.get(id(hop))
        if held is not None and held[0] is hop and held[1] == position and held[2] is not None:
            held[2].give(x)

    def _keep_draw(self, hop: Any, position: int, plan: Plan | None) -> None:
        old = self._drawn.get(id(hop))
        if old is not None and old[2] is not None and old[2] is not plan and not old[2].collected:
            old[2].scope.cancel()  # (a plan never collected: its step did not finish)
        self._drawn[id(hop)] = (hop, position, plan)

    def _cancel_plans(self) -> None:
        for pending in self._pending:
            pending.discard()
        self._pending.clear()
        for _, _, plan in self._drawn.values():
            if plan is not None:
                plan.scope.cancel()
        for plan in self._last_plan.values():
            plan.scope.cancel()
        self._drawn.clear()
        self._last_plan.clear()

    def _start(self, model: Any, plan: Plan) -> None:
        # a step the generation does not wait for: its check may gather with others
        plan.gather = (
            bool(getattr(model, "ahead_step", False)) and self.verifier.gather.gather_s > 0
        )
        before = self._last_plan.get(id(plan.hop))
        if before is not None and before.hop is plan.hop and not before.done.is_set():
            plan.after = before
        self._last_plan[id(plan.hop)] = plan
        trio.lowlevel.spawn_system_task(self._run, model, plan, name="verify check")

    async def _run(self, model: Any, plan: Plan) -> None:
        """A plan's replica side; never raises (its error is the plan's)."""
        try:
            with plan.scope:
                if plan.after is not None:  # the hop's check before it goes first (it
                    await plan.after.done.wait()  # gathered: this one goes at once, and a
                    plan.after = None  # round that went meanwhile does not hold it up)
                elif plan.gather:
                    plan.round = await self.verifier.gather.wait()
                servers = await model._servers()
                plan.result = await self._follower_output(model, servers, plan)
        except Exception as exc:  # (a bug: after_step raises it in the generation's task)
            plan.error = exc
        finally:
            plan.done.set()

    async def after_step(self, model: Any, position: int, logits: torch.Tensor) -> None:
        """The step at `position` ended: its checks are judged now (the token loop waits);
        a hop found wrong raises HopFailed (the step fails over from it)."""
        hops = list(model.hops)
        if self._followers:  # hops replaced by a failover: their replica sessions end
            await self._drop_followers(lambda hop: not any(hop is h for h in hops))
        drawn, canaries = self._collect(model, hops, position, logits)
        failure = await self._judge(model, hops, drawn, canaries)
        if failure is not None:
            raise failure

    def after_step_speculative(
        self, model: Any, position: int, logits: torch.Tensor
    ) -> Pending | None:
        """The step at `position` ended and the token loop goes on at once: its checks are
        judged in the background (`Pending`; None: nothing drawn). The caller must not let
        the step's tokens out before `Pending.done`, and rolls back to the step if it has a
        `failure` (`daemon.shards.client.RemoteModel.settle`)."""
        hops = list(model.hops)
        if any(not any(hop is h for h in hops) for hop, _ in self._followers.values()):
            trio.lowlevel.spawn_system_task(  # replaced by a failover: they end
                self._drop_followers,
                lambda hop: not any(hop is h for h in hops),
                name="verify replica sessions",
            )
        drawn, canaries = self._collect(model, hops, position, logits)
        if not drawn and not canaries:
            return None
        self._pending = [p for p in self._pending if not p.released.is_set()]
        pending = Pending(position, self._pending[-1] if self._pending else None)
        self._pending.append(pending)
        trio.lowlevel.spawn_system_task(
            self._judge_pending, model, hops, drawn, canaries, pending, name="verify judge"
        )
        return pending

    async def _judge_pending(
        self,
        model: Any,
        hops: list[Any],
        drawn: list[tuple[_Drawn, Plan]],
        canaries: list[tuple[int, Canary]],
        pending: Pending,
    ) -> None:
        """`_judge` in the background: never raises (a bug's error is the pending's)."""
        try:
            pending.failure = await self._judge(model, hops, drawn, canaries, pending)
        except Exception as exc:
            pending.error = exc
        finally:
            pending.done.set()

    def _collect(
        self, model: Any, hops: list[Any], position: int, logits: torch.Tensor
    ) -> tuple[list[tuple[_Drawn, Plan]], list[tuple[int, Canary]]]:
        """The step's hops drawn for a check (with their plans) and its canaries to send."""
        v = self.verifier
        now = v.clock()
        drawn: list[tuple[_Drawn, Plan]] = []
        canaries: list[tuple[int, Canary]] = []
        for i, hop in enumerate(hops):
            held = self._drawn.get(id(hop))
            if held is not None and held[0] is hop and held[1] == position:
                plan = held[2]
                if plan is not None and plan.collected:  # the step ran again after a
                    plan = None  # failover further on: this hop's part was checked
            else:  # not drawn when the step started (no `before_step`): drawn now
                plan = None
                if v.reputation.should_check(hop.peer_id, now):
                    plan = Plan(hop, position, last=i == len(hops) - 1)
                    self._start(model, plan)
                self._keep_draw(hop, position, plan)
            if plan is not None:
                # what it got and gave is gathered only for the hops drawn
                step = self._step_of(model, hops, i, position, logits)
                if step is None:
                    plan.scope.cancel()
                else:
                    plan.give(step.replay.x)  # (known since the hop ran)
                    plan.collected = True
                    drawn.append((step, plan))
            if v.reputation.should_canary(hop.peer_id, now):
                kept = v.canaries.get(model.model_id, hop.start, hop.end)
                if kept:
                    canaries.append((i, v.rng.choice(kept)))
        return drawn, canaries

    async def _judge(
        self,
        model: Any,
        hops: list[Any],
        drawn: list[tuple[_Drawn, Plan]],
        canaries: list[tuple[int, Canary]],
        pending: Pending | None = None,
    ) -> HopFailed | None:
        """The verdicts of one step's checks and their consequences; the earliest hop found
        wrong (or whose receipt was refused) as the HopFailed that fails it over, or None.
        `pending` (a speculative step): the consequences wait for the step before it to be
        released, and a step discarded meanwhile has none."""
        v = self.verifier
        verdicts: list[Verdict] = []
        if drawn or canaries:

            async def check(step: _Drawn, plan: Plan) -> None:
                await plan.done.wait()
                if plan.error is not None:
                    raise plan.error
                verdicts.append(await self._check(model, step, plan.result))

            async def canary(i: int, canary: Canary) -> None:
                verdicts.append(await self._canary(model, hops[i].peer_id, i, canary))

            async with trio.open_nursery() as nursery:
                for step, plan in drawn:
                    nursery.start_soon(check, step, plan)
                for c_args in canaries:
                    nursery.start_soon(canary, *c_args)
            self.checked_steps += 1
        if pending is not None:
            if pending.before is not None:
                await pending.before.released.wait()
            if pending.discarded:
                return None
        now = v.clock()
        for verdict in verdicts:
            self._apply(verdict, now)
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
                return HopFailed(*refused)
        if bad:  # the earliest wrong hop: the step fails over from there
            d = bad[0]
            reason = "no majority among replicas" if d.outcome == "unresolved" else "wrong output"
            return HopFailed(d.peer, f"failed a check: {reason}")
        return None

    def _apply(self, verdict: Verdict, now: float) -> None:
        """A verdict's gains: the peers that passed, the step as a canary, the record (a
        skipped check has none)."""
        v = self.verifier
        for peer in verdict.passed:
            v.reputation.passed(peer, now)
        if verdict.canary is not None:
            v.canaries.add(verdict.canary)
        if verdict.outcome != "skipped":
            v.record(verdict)

    async def aclose(self) -> None:
        """End the checks and replica sessions (the generation ends); never raises."""
        self._cancel_plans()
        await self._drop_followers(lambda hop: True)

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

    def _provider_rows(
        self, step: _Drawn, first: int, theirs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """What the provider gave from position `first` to the step's end, the replica's rows
        to compare with it, and the first position compared (the step's alone where the
        provider's earlier outputs are not all recorded)."""
        position = step.replay.position
        if first == position:
            return step.out, theirs, first
        gave = [c for p, c in step.given if first <= p <= position]
        if not gave or sum(int(c.shape[1]) for c in gave) != int(theirs.shape[1]):
            return step.out, theirs[:, -int(step.out.shape[1]) :], position
        return torch.cat(gave, dim=1), theirs, first

    def _agree(self, got: torch.Tensor, want: torch.Tensor, replay: Replay) -> bool:
        v = self.verifier
        dtype = replay.x.dtype if replay.x.is_floating_point() else want.dtype
        how, worst = judge(got, want, v.rtol if v.rtol is not None else tolerance(dtype))
        v.counters[f"compare_{how.value}"] += 1
        if how is Agreement.CLOSE:
            v.spread_max = max(v.spread_max, worst)
        return how is not Agreement.DIFFER

    async def _check(
        self,
        model: Any,
        step: _Drawn,
        first: tuple[str, torch.Tensor, int] | None,
    ) -> Verdict:
        """The verdict on `step`, given its replica's output (`first`, from its plan); the
        servers announced are asked for only where a third replica must decide."""
        v, i, replay = self.verifier, step.i, step.replay
        provider = step.hop.peer_id
        if first is None:
            v.counters["checks_skipped"] += 1  # no replica: not a verdict
            return Verdict(i, provider, "skipped", [])
        checker, theirs, since = first
        out, theirs, since = self._provider_rows(step, since, theirs)
        keep = replay.position + int(replay.x.shape[1]) - since
        if self._agree(out, theirs, replay):
            verdict = Verdict(i, provider, "pass", [], [provider, checker], _canary(replay, theirs))
        else:
            avoid = {provider, checker}
            servers = await model._servers()
            third = await self._replica_output(model, servers, replay, avoid, keep)
            if third is None:
                verdict = Verdict(i, provider, "unresolved", [])
            else:
                referee, ref = third
                provider_ok = self._agree(out, ref, replay)
                checker_ok = self._agree(theirs, ref, replay)
                known = _canary(replay, ref)
                if checker_ok and not provider_ok:
                    verdict = Verdict(i, provider, "fail", [provider], [checker, referee], known)
                elif provider_ok and not checker_ok:
                    verdict = Verdict(i, provider, "pass", [checker], [provider, referee], known)
                else:
                    verdict = Verdict(i, provider, "unresolved", [])
            if checker in verdict.failed or verdict.outcome == "unresolved":
                await self._drop_followers(lambda hop: hop is step.hop)  # not this one again
        return verdict

    async def _canary(self, model: Any, peer: str, i: int, canary: Canary) -> Verdict:
        v = self.verifier
        try:
            # (a stream of its own, as an ordinary generation's: not one of the checks' links)
            got = await run_on(
                model._opener, peer, canary.replay, model.step_timeout_s, ordinary=True
            )
        except ReplicaUnavailable:
            v.counters["canaries_unanswered"] += 1
            return Verdict(i, peer, "skipped", [])
        v.counters["canaries_sent"] += 1
        if self._agree(got, canary.output, canary.replay):
            return Verdict(i, peer, "pass", [], [peer])
        return Verdict(i, peer, "canary-fail", [peer])
