"""The requester's checks of the steps it gets back (driven by the shard client's hooks).

`Verifier` lives as long as the requester (its providers' reputations, its canaries, its
counters); `Verifier.generation()` gives one generation its `GenerationChecks`, which the
`RemoteModel` calls (`verifier=`) at two points:
- `routable(servers)`: excluded providers are left out, and among routes of equal latency the
  one of better reputation wins (`daemon.verify.policy.RANK_PENALTY_MS`);
- `after_step(model, position, logits)`: every hop of the step that just ran is drawn for a
  check (at its provider's rate) and, on probation, for a canary. A checked hop's step runs
  again on a replica of the same range (another provider, another payout key); a difference
  goes to a third replica and the minority fails the check. A provider that fails makes the
  step fail over (`HopFailed`): the client re-routes without it and runs the step again on an
  honest route, before any token is drawn from it.

In a paid generation the receipts of a step are held until its checks are done (`payments`):
the receipt of a step found wrong is never acknowledged, the others are checked and
acknowledged as before, in the order they came.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import torch
import trio

from daemon.shards.client import HopFailed
from daemon.shards.session import MAX_STEP_TOKENS
from daemon.verify.canaries import Canary, CanaryStore
from daemon.verify.compare import Agreement, compare, tolerance
from daemon.verify.policy import RANK_PENALTY_MS, Reputation, VerifyConfig
from daemon.verify.replica import Replay, ReplicaUnavailable, run_on

_BAD = ("fail", "unresolved", "canary-fail")  # outcomes that fail the step over

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
    ) -> None:
        """`payout_of(peer)`: the payout key a provider announced (None: unknown, the peer
        id stands for it). `rtol`: the comparison's bound (default: by the dtype)."""
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
            "max_honest_spread": self.spread_max,
        }

    def record(self, verdict: Verdict) -> None:
        self.verdicts.append(verdict)
        del self.verdicts[:-1000]
        self.counters[f"checks_{verdict.outcome}"] += 1


def _canary(replay: Replay, output: torch.Tensor) -> Canary:
    """A verified step as a canary: its own rows (an audit's earlier rows are left out)."""
    if not replay.full:
        return Canary(replay, output)
    return Canary(dataclasses.replace(replay, full=False), output[:, -replay.x.shape[1] :])


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

    def routable(self, servers: list[Any]) -> list[Any]:
        return self.verifier.routable(servers)

    def flush(self) -> None:
        """Acknowledge what is still held (the generation ends)."""
        if self.payments is not None:
            self.payments.release(set())

    async def after_step(self, model: Any, position: int, logits: torch.Tensor) -> None:
        v = self.verifier
        now = v.clock()
        hops = list(model.hops)
        drawn: list[tuple[int, Replay, torch.Tensor]] = []
        canaries: list[tuple[int, Canary]] = []
        for i, hop in enumerate(hops):
            check = v.reputation.should_check(hop.peer_id, now)
            if check:  # (what it got and gave is gathered only for the hops drawn)
                replay, out = self._step_of(model, hops, i, position, logits)
                if replay is not None and out is not None:
                    drawn.append((i, replay, out))
            if v.reputation.should_canary(hop.peer_id, now):
                kept = v.canaries.get(model.model_id, hop.start, hop.end)
                if kept:
                    canaries.append((i, v.rng.choice(kept)))
        verdicts: list[Verdict] = []
        if drawn or canaries:
            servers = await model._servers()

            async def check(i: int, replay: Replay, out: torch.Tensor) -> None:
                verdicts.append(await self._check(model, servers, i, replay, out))

            async def canary(i: int, canary: Canary) -> None:
                verdicts.append(await self._canary(model, hops[i].peer_id, i, canary))

            async with trio.open_nursery() as nursery:
                for args in drawn:
                    nursery.start_soon(check, *args)
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

    def _step_of(
        self, model: Any, hops: list[Any], i: int, position: int, logits: torch.Tensor
    ) -> tuple[Replay | None, torch.Tensor | None]:
        """Hop `i`'s part of the step at `position`: what it got (and before) and gave (with
        `audit_history`, what it gave at every earlier position too, where recorded: the
        next hop's inputs)."""
        hop = hops[i]
        if not hop.chunks or hop.chunks[-1][0] != position:
            return None, None
        chunks = [c for p, c in hop.chunks if p < position]
        if sum(c.shape[1] for c in chunks) != position:
            return None, None  # the inputs before it are not all recorded
        last = i == len(hops) - 1
        if last:
            out = logits
        else:
            after = hops[i + 1].chunks
            if not after or after[-1][0] != position:
                return None, None
            out = after[-1][1]
        x = hop.chunks[-1][1]
        full = False
        if self.verifier.config.audit_history and not last and chunks:
            given = [c for _, c in after]
            if sum(c.shape[1] for c in given) == position + x.shape[1] <= MAX_STEP_TOKENS:
                out, full = torch.cat(given, dim=1), True
        replay = Replay(
            model.model_id,
            hop.start,
            hop.end,
            model.max_length,
            torch.cat(chunks, dim=1) if chunks else None,
            x,
            last,
            full,
        )
        return replay, out

    def _replicas(
        self, model: Any, servers: list[Any], replay: Replay, avoid: set[str]
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
        v.rng.shuffle(peers)
        return peers

    async def _replica_output(
        self, model: Any, servers: list[Any], replay: Replay, avoid: set[str]
    ) -> tuple[str, torch.Tensor] | None:
        """The step run on one replica (tried in a random order; None: none could)."""
        v = self.verifier
        for peer in self._replicas(model, servers, replay, avoid)[:3]:
            try:
                out = await run_on(model._opener, peer, replay, model.step_timeout_s)
            except ReplicaUnavailable:
                v.counters["replica_unavailable"] += 1
                avoid = avoid | {peer}
                continue
            v.counters["replica_steps"] += 1
            return peer, out
        return None

    def _agree(self, got: torch.Tensor, want: torch.Tensor, replay: Replay) -> bool:
        v = self.verifier
        dtype = replay.x.dtype if replay.x.is_floating_point() else want.dtype
        how = compare(got, want, v.rtol if v.rtol is not None else tolerance(dtype))
        v.counters[f"compare_{how.value}"] += 1
        if how is Agreement.CLOSE:
            from daemon.verify.compare import spread

            v.spread_max = max(v.spread_max, spread(got, want))
        return how is not Agreement.DIFFER

    async def _check(
        self, model: Any, servers: list[Any], i: int, replay: Replay, out: torch.Tensor
    ) -> Verdict:
        v = self.verifier
        provider = model.hops[i].peer_id if i < len(model.hops) else ""
        first = await self._replica_output(model, servers, replay, {provider})
        if first is None:
            v.counters["checks_skipped"] += 1  # no replica: not a verdict
            return Verdict(i, provider, "skipped", [])
        checker, theirs = first
        now = v.clock()
        if self._agree(out, theirs, replay):
            verdict = Verdict(i, provider, "pass", [])
            v.reputation.passed(provider, now)
            v.reputation.passed(checker, now)
            v.canaries.add(_canary(replay, theirs))
        else:
            third = await self._replica_output(model, servers, replay, {provider, checker})
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
