"""A nemesis for the election: one seeded random schedule of faults against a cluster of
voters running the real `ElectionDriver`s on the in-memory network, in trio's virtual time.

Faults mixed by the schedule: symmetric partitions, one-way cuts, message loss, delay (jitter
and slow links), pauses longer than the lease (a frozen driver, as under SIGSTOP, whose
coordinator had signed a command just before and sends it on waking), crashes and restarts
with the persisted term, vote and fences kept, and clock skew (each node's clock runs at a
rate off by up to ±5 % from an offset up to ±5 s, for the whole run).

A member that is not the coordinator now and then also forges: it signs a command for the
term above its own with a proof made of its own vote only (what a buggy or hostile voter
could send) and sends it to every other member.

Checked after every step of every core (the driver's observer):
- at most one coordinator per term (over the whole run, restarts included);
- no member accepts a command from a term lower than one it has seen (tracked here, apart
  from the FenceKeeper's own state);
- no member accepts a command from anyone but the coordinator elected in its term (the
  forgeries above, and any other command, need a proof of the term);
- no two members hold a coordinator's lease at the same moment.
Checked at the end: within `CONVERGE_S` of virtual time after the faults stop, exactly one
coordinator, known to every member. Then the coordinator is killed and the failover timed
(until every other member knows a new one), and the quiet cluster's messages counted.

`run_schedule(seed, size)` is what the test and `bench/election_nemesis.py` call; a failure's
message names its seed and size, and `python bench/election_nemesis.py --replay SEED SIZE`
runs that schedule again.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass, field

import msgspec
import trio
import trio.testing

from p2p.identity import NodeIdentity
from p2p.network import NetworkError
from p2p.testing.faults import FaultyNetwork, SkewedClock
from scheduler.election import ElectionSettings, Role
from scheduler.election_driver import (
    ElectionDriver,
    ElectionRouter,
    MemoryElectionStore,
    NotCoordinatorError,
)
from scheduler.election_wire import COMMAND_PROTOCOL, Command, TermProof, Vote, encode
from scheduler.fencing import FenceKeeper, MemoryFenceStore, sign_command, sign_vote

CLUSTER = "nemesis"
SETTINGS = ElectionSettings()
FAULT_S = 8.0  # virtual seconds of faults per schedule
CONVERGE_S = 3.0  # the Done-means bound after the faults stop
FAILOVER_LIMIT_S = 10.0  # how long a failover is waited for before it counts as failed
QUIET_S = 3.0  # the quiet cluster's messages are counted over this long
COMMAND_EVERY_S = 0.25  # a coordinator's command rate
FORGE_P = 0.1  # the chance that a member that is not the coordinator forges, every COMMAND_EVERY_S
LATENCY_S = 0.005
# the same keys in every schedule and process, so that a seed replays the same run
_IDENTS = [
    NodeIdentity(hashlib.sha256(b"nemesis node %d" % i).digest(), bytes(31) + b"\x01")
    for i in range(7)
]


class Violation(AssertionError):
    pass


@dataclass
class Member:
    index: int
    ident: NodeIdentity
    clock: SkewedClock
    rng: random.Random
    store: MemoryElectionStore = field(default_factory=MemoryElectionStore)
    fence_store: MemoryFenceStore = field(default_factory=MemoryFenceStore)
    max_term_seen: int = 0  # every term this member has seen, kept across restarts
    router: ElectionRouter | None = None
    driver: ElectionDriver | None = None
    scope: trio.CancelScope | None = None
    zombie: Command | None = None  # signed before a pause, sent after it
    starting: bool = False

    def __post_init__(self) -> None:
        self.peer_id = self.ident.peer_id  # derived from the key on every read: cache it

    @property
    def up(self) -> bool:
        return self.scope is not None and self.driver is not None and self.driver.ready


@dataclass
class Result:
    seed: int
    size: int
    converge_s: float | None = None
    failover_s: float | None = None
    quiet_msgs_per_member_s: float = 0.0
    commands_refused_stale: int = 0
    zombies_sent: int = 0
    forgeries_sent: int = 0
    elections: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


class CheckedFenceKeeper(FenceKeeper):
    """A FenceKeeper whose acceptances are checked against the terms its member has seen."""

    def __init__(self, member: Member, sim: Sim) -> None:
        super().__init__(member.fence_store, sim.voters)
        self.member = member
        self.sim = sim

    def check(self, cmd: Command) -> None:
        seen = self.member.max_term_seen
        super().check(cmd)
        if cmd.term < seen:
            self.sim.violate(
                f"member {self.member.index} accepted a command of term {cmd.term} "
                f"after seeing term {seen}"
            )
        winner = self.sim.leaders_by_term.get(cmd.term)
        if winner != cmd.signer:
            self.sim.violate(
                f"member {self.member.index} accepted a command of term {cmd.term} from "
                f"{cmd.signer[-8:]}, which did not win it (the winner: {str(winner)[-8:]})"
            )
        self.member.max_term_seen = max(seen, cmd.term)


class Sim:
    def __init__(self, seed: int, size: int) -> None:
        self.seed = seed
        self.size = size
        self.rng = random.Random(seed)
        self.hub = FaultyNetwork(seed=seed, latency_s=LATENCY_S)
        self.members = [
            Member(
                i,
                _IDENTS[i],
                SkewedClock(self.rng.uniform(0.95, 1.05), self.rng.uniform(-5.0, 5.0)),
                random.Random(self.rng.getrandbits(64)),
            )
            for i in range(size)
        ]
        self.voter_ids = frozenset(m.peer_id for m in self.members)
        self.leaders_by_term: dict[int, str] = {}
        # its own generator: forging does not change the draws of the fault schedule
        self.forge_rng = random.Random(f"forge {seed}")
        self.result = Result(seed, size)
        self.nursery: trio.Nursery | None = None

    def voters(self, cluster: str) -> frozenset[str]:
        return self.voter_ids if cluster == CLUSTER else frozenset()

    def violate(self, what: str) -> None:
        self.result.violations.append(f"t={trio.current_time():.3f}: {what}")

    # -- the per-step checks -----------------------------------------------------------

    def observe(self, member: Member, driver: ElectionDriver) -> None:
        core = driver.core
        member.max_term_seen = max(member.max_term_seen, core.term)
        if core.role is Role.LEADER:
            holder = self.leaders_by_term.setdefault(core.term, member.peer_id)
            if holder != member.peer_id:
                self.violate(f"two coordinators in term {core.term}: {holder} and {member.peer_id}")
            if driver.is_coordinator():
                for other in self.members:
                    if other is not member and other.up and other.driver.is_coordinator():
                        self.violate(
                            f"leases overlap: members {member.index} (term {core.term}) and "
                            f"{other.index} (term {other.driver.core.term})"
                        )

    # -- members -----------------------------------------------------------------------

    async def _run_member(self, member: Member, task_status=trio.TASK_STATUS_IGNORED) -> None:
        node = self.hub.add_node(member.peer_id)
        fence = CheckedFenceKeeper(member, self)
        member.router = ElectionRouter(node, fence)
        member.driver = ElectionDriver(
            member.router,
            CLUSTER,
            self.voter_ids,
            member.store,
            ident=member.ident,
            settings=SETTINGS,
            clock=member.clock,
            rng=member.rng,
            observer=lambda driver: self.observe(member, driver),
        )
        with trio.CancelScope() as scope:
            member.scope = scope
            async with trio.open_nursery() as nursery:
                await nursery.start(member.driver.run)
                nursery.start_soon(self._commands, member, member.driver)
                task_status.started()
        if member.scope is scope:  # returned by itself (not crashed): should not happen
            member.scope = None

    async def _commands(self, member: Member, driver: ElectionDriver) -> None:
        """A coordinator issues a command every COMMAND_EVERY_S."""
        while True:
            await trio.sleep(COMMAND_EVERY_S)
            if driver.frozen:
                continue
            try:
                command = driver.sign_next_command("assign", b"shard")
            except NotCoordinatorError:
                if self.forge_rng.random() < FORGE_P:
                    self.nursery.start_soon(self._forge, member, driver)
                continue
            self.nursery.start_soon(self._send_command, driver, command)

    async def _forge(self, member: Member, driver: ElectionDriver) -> None:
        """Claim the next term with nothing but this member's own vote."""
        term = driver.core.term + 1
        vote = Vote(member.peer_id, sign_vote(member.ident, CLUSTER, term, member.peer_id))
        command = sign_command(member.ident, CLUSTER, term, 1, "assign", b"forged")
        proof = TermProof(CLUSTER, term, member.peer_id, (vote,))
        payload = encode(msgspec.structs.replace(command, proof=proof))
        self.result.forgeries_sent += 1
        for other in self.members:
            if other is not member:
                with contextlib.suppress(NetworkError):
                    await driver.router.net.request(
                        other.peer_id, COMMAND_PROTOCOL, payload, timeout_s=1.0
                    )

    async def _send_command(self, driver: ElectionDriver, command: Command) -> None:
        results = await driver.send_command(command)
        self.result.commands_refused_stale += sum(r == "stale_term" for r in results.values())

    async def start(self, member: Member) -> None:
        if member.scope is None and not member.starting:
            member.starting = True
            try:
                await self.nursery.start(self._run_member, member)
            finally:
                member.starting = False

    def crash(self, member: Member) -> None:
        if member.scope is None:
            return
        member.scope.cancel()
        member.scope = None
        member.zombie = None
        self.hub.remove_node(member.peer_id)

    def pause(self, member: Member) -> None:
        if not member.up or member.driver.frozen:
            return
        try:  # a command decided just before the pause, sent just after it
            member.zombie = member.driver.sign_next_command("assign", b"zombie")
        except NotCoordinatorError:
            member.zombie = None
        member.driver.freeze()

    def resume(self, member: Member) -> None:
        if not member.up or not member.driver.frozen:
            return
        if member.zombie is not None:
            self.result.zombies_sent += 1
            self.nursery.start_soon(self._send_command, member.driver, member.zombie)
            member.zombie = None
        member.driver.thaw()

    # -- the schedule ------------------------------------------------------------------

    async def _later(self, delay: float, fn, *args) -> None:  # type: ignore[no-untyped-def]
        await trio.sleep(delay)
        fn(*args)

    async def _restart_later(self, member: Member, delay: float) -> None:
        await trio.sleep(delay)
        if self.faults_on:
            await self.start(member)

    def _random_groups(self) -> list[set[str]]:
        ids = [m.peer_id for m in self.members]
        self.rng.shuffle(ids)
        cut = self.rng.randint(1, len(ids) - 1)
        return [set(ids[:cut]), set(ids[cut:])]

    def _fault(self) -> None:
        rng, hub = self.rng, self.hub
        ids = [m.peer_id for m in self.members]
        kind = rng.choice(
            ["partition", "one_way", "loss", "delay", "slow", "pause", "crash", "heal"]
        )
        if kind == "partition":
            hub.partition(self._random_groups())
        elif kind == "one_way":
            for _ in range(rng.randint(1, len(ids))):
                src, dst = rng.sample(ids, 2)
                hub.block(src, dst)
        elif kind == "loss":
            hub.loss = rng.uniform(0.0, 0.4)
        elif kind == "delay":
            hub.jitter_s = rng.uniform(0.0, 0.4)
        elif kind == "slow":
            src, dst = rng.sample(ids, 2)
            hub.slow(src, dst, rng.uniform(0.05, 0.8))
        elif kind == "pause":
            leaders = [m for m in self.members if m.up and m.driver.core.role is Role.LEADER]
            member = rng.choice(leaders if leaders and rng.random() < 0.6 else self.members)
            self.pause(member)
            delay = rng.uniform(SETTINGS.lease_s + 0.1, 3.0)
            self.nursery.start_soon(self._later, delay, self.resume, member)
        elif kind == "crash":
            leaders = [m for m in self.members if m.up and m.driver.core.role is Role.LEADER]
            member = rng.choice(leaders if leaders and rng.random() < 0.5 else self.members)
            self.crash(member)
            self.nursery.start_soon(self._restart_later, member, rng.uniform(0.1, 3.0))
        else:
            hub.heal()
            hub.clear_faults()
            hub.loss = 0.0
            hub.jitter_s = 0.0

    async def _stop_faults(self) -> None:
        self.faults_on = False
        self.hub.heal()
        self.hub.clear_faults()
        self.hub.loss = 0.0
        self.hub.jitter_s = 0.0
        for member in self.members:
            await self.start(member)
            self.resume(member)

    def states(self) -> str:
        """Each member's view, for a failure's message."""
        out = []
        for m in self.members:
            if not m.up:
                out.append(f"{m.index}: down")
                continue
            core = m.driver.core
            leader = next((o.index for o in self.members if o.peer_id == core.leader), None)
            out.append(
                f"{m.index}: {core.role.value} term {core.term} leader {leader}"
                f"{' frozen' if m.driver.frozen else ''}"
            )
        return "; ".join(out)

    def _agreed(self, exclude: Member | None = None) -> Member | None:
        """The coordinator every member (but `exclude`) knows, if there is exactly one."""
        live = [m for m in self.members if m is not exclude]
        if not all(m.up for m in live):
            return None
        leaders = [m for m in live if m.driver.core.role is Role.LEADER]
        if len(leaders) != 1:
            return None
        leader = leaders[0]
        if not leader.driver.is_coordinator():  # elected, and holding its lease
            return None
        term = leader.driver.core.term
        for m in live:
            if m.driver.core.term != term or m.driver.core.leader != leader.peer_id:
                return None
        return leader

    async def _wait_agreed(self, limit_s: float, exclude: Member | None = None) -> float | None:
        start = trio.current_time()
        while trio.current_time() - start <= limit_s:
            if self._agreed(exclude) is not None:
                return trio.current_time() - start
            await trio.sleep(0.005)
        return None

    async def run(self) -> Result:
        self.faults_on = True
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            for member in self.members:
                await self.start(member)
            start = trio.current_time()
            while trio.current_time() - start < FAULT_S:
                await trio.sleep(self.rng.uniform(0.1, 0.8))
                self._fault()
            await self._stop_faults()
            self.result.converge_s = await self._wait_agreed(CONVERGE_S)
            if self.result.converge_s is None:
                self.violate(
                    f"no single coordinator known to all {CONVERGE_S} s after the faults: "
                    + self.states()
                )
            else:
                await self._failover_and_quiet()
            self.result.elections = sum(
                m.driver.core.stats["elections_started"] for m in self.members if m.up
            )
            nursery.cancel_scope.cancel()
        return self.result

    async def _failover_and_quiet(self) -> None:
        # a quiet cluster: messages per member per second
        await trio.sleep(1.0)
        sent = sum(m.driver.stats["sent"] for m in self.members)
        await trio.sleep(QUIET_S)
        sent = sum(m.driver.stats["sent"] for m in self.members) - sent
        self.result.quiet_msgs_per_member_s = sent / self.size / QUIET_S
        # kill the coordinator: how long until every other member knows a new one
        leader = self._agreed()
        if leader is None:
            self.violate("the coordinator changed in a quiet cluster")
            return
        old_term = leader.driver.core.term
        self.crash(leader)
        self.result.failover_s = await self._wait_agreed(FAILOVER_LIMIT_S, exclude=leader)
        if self.result.failover_s is None:
            self.violate(f"no failover within {FAILOVER_LIMIT_S} s of killing the coordinator")
        elif self._agreed(exclude=leader).driver.core.term <= old_term:
            self.violate("the new coordinator's term is not above the old one's")


def run_schedule(seed: int, size: int) -> Result:
    """One schedule in a fresh trio run on a virtual clock."""
    sim = Sim(seed, size)
    clock = trio.testing.MockClock(autojump_threshold=0)
    # trio breaks ties between runnable tasks with its own random generator: seed it too, so
    # that `--replay` repeats the schedule exactly (a private attribute; replay is best effort
    # should it go away)
    scheduler_rng = getattr(getattr(trio, "_core", None), "_run", None)
    if isinstance(getattr(scheduler_rng, "_r", None), random.Random):
        scheduler_rng._r.seed(seed)
    try:
        return trio.run(sim.run, clock=clock)
    except Exception as exc:
        raise AssertionError(f"seed {seed} size {size} raised {exc!r}") from exc


def describe(result: Result) -> str:
    return (
        f"seed {result.seed} size {result.size} failed (replay: python "
        f"bench/election_nemesis.py --replay {result.seed} {result.size}):\n  "
        + "\n  ".join(result.violations[:10])
    )
