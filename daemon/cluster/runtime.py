"""Runs the cluster cores of `scheduler/` for every cluster this node is an active member of.

Per cluster (from the membership registry, re-read whenever the replica changes): SWIM
(`scheduler.swim_driver`) over the cluster's members and, on a voter, the cluster's election
(`scheduler.election_driver.ElectionDriver`) over its voters, whose changes reach the core one
at a time. Per node: one `SwimDriver`, one `ElectionRouter` and one `FenceKeeper`, whose
voters are the registry's, so that a worker checks a command as strictly as a voter does.

Workers take no part in the election and get no heartbeats: a new coordinator tells them of
itself with a fenced `coordinator` command (accepting it records the term's coordinator in
their fence), and repeats it to members it could not reach and to members that join later.
It tells the other voters too: a fence learns a term's coordinator only from a command that
proves the term (`scheduler.fencing`), never from the election's unsigned heartbeats, so
this proves the term to every member at once rather than with the first real command.

Commands (`command`) are encoded (msgpack, bounded), signed and fenced by the election
driver; a member that accepts one hands its body to the handler registered for its action
(`on_command`). Everything refused is counted by reason (`snapshot`, read by /metrics).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from daemon.cluster.loop_lag import LoopLag
from p2p import codec, identity
from p2p.network import Requests
from registry import clusters as registry_clusters
from scheduler import election_wire
from scheduler import swim_driver as swim_runner
from scheduler.election import ElectionSettings
from scheduler.election_driver import (
    ElectionDriver,
    ElectionRouter,
    ElectionStore,
    NotCoordinatorError,
)
from scheduler.fencing import REASONS as FENCE_REASONS
from scheduler.fencing import FenceError, FenceKeeper, FenceStore
from scheduler.swim import State, StateChanged, Swim, SwimSettings

if TYPE_CHECKING:
    from registry.replica import Replica

__all__ = ["ANNOUNCE", "ClusterRuntime", "Membership", "NotCoordinatorError", "RuntimeSettings"]

log = logging.getLogger(__name__)

ANNOUNCE = "coordinator"  # the action a new coordinator tells workers of itself with
STATES = ("alive", "suspect", "dead")
RETRY_S = 5.0  # a cluster that failed (its vote could not be stored) is retried after this
MAX_CLUSTER_NAME = 64  # scheduler.election_wire.ClusterName and swim_wire's

CommandHandler = Callable[[str, str, dict[str, Any]], Awaitable[None]]
DeathHandler = Callable[[str, str], None]


class ViewLike(Protocol):
    """What the runtime reads of `registry.clusters.ClusterView`."""

    name: str

    @property
    def members(self) -> Mapping[str, Any]: ...

    @property
    def voters(self) -> frozenset[str]: ...


class Membership(Protocol):
    """The membership registry, as the runtime reads it."""

    def version(self) -> int:
        """Changes whenever the answers below may have changed."""
        ...

    def clusters_of(self, peer_id: str) -> list[str]: ...

    def view(self, name: str) -> ViewLike | None: ...


class RegistryMembership:
    """`Membership` over a replica, through `registry.clusters` (active members only).

    Its version moves only when a `clusters` or `members` entry changed: the replica's
    change counter is cheap to read, but other kinds change far more often (announcements)
    and reading the views scans the whole replica."""

    KINDS = frozenset({"clusters", "members"})

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self._applied = -1
        self._marks: frozenset[tuple[Any, bytes]] = frozenset()
        self._version = 0

    def version(self) -> int:
        applied = self.replica.applied
        if applied != self._applied:
            self._applied = applied
            marks = frozenset(
                (entry.id, entry.signature)  # an entry is replaced whole, never changed
                for kind in self.KINDS
                for entry in self.replica.entries.of_kind(kind)
            )
            if marks != self._marks:
                self._marks = marks
                self._version += 1
        return self._version

    def clusters_of(self, peer_id: str) -> list[str]:
        return registry_clusters.clusters_of(self.replica, peer_id)

    def view(self, name: str) -> ViewLike | None:
        return registry_clusters.cluster_view(self.replica, name)


@dataclass(frozen=True)
class RuntimeSettings:
    swim: SwimSettings = SwimSettings()
    election: ElectionSettings = ElectionSettings()
    watch_interval_s: float = 0.25  # how often the replica's change counter is looked at
    command_timeout_s: float = 1.0  # one command's delivery to one member
    announce_retry_s: float = 1.0  # a coordinator retries workers it could not tell
    max_clusters: int = 16  # clusters run at once; more are left out (counted)


@dataclass
class _Run:
    """One cluster on this node."""

    name: str
    members: frozenset[str]
    voters: frozenset[str]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    nursery: trio.Nursery | None = None
    swim: Swim | None = None
    election: ElectionDriver | None = None
    election_scope: trio.CancelScope | None = None
    changed: trio.Event = field(default_factory=trio.Event)
    announced_term: int = -1
    announced: set[str] = field(default_factory=set)
    seen: tuple[int, str | None] = (0, None)  # (term, leader) last observed

    def poke(self) -> None:
        self.changed.set()


class ClusterRuntime:
    """This node's part in every cluster it belongs to. `run()` until cancelled."""

    def __init__(
        self,
        ident: identity.NodeIdentity,
        net: Requests,
        membership: Membership,
        *,
        election_store: ElectionStore,
        fence_store: FenceStore,
        settings: RuntimeSettings | None = None,
    ) -> None:
        self.ident = ident
        self.peer_id = ident.peer_id
        self.net = net
        self.membership = membership
        self.settings = settings or RuntimeSettings()
        self.election_store = election_store
        self.fence = FenceKeeper(fence_store, self._fence_voters)
        self.router = ElectionRouter(net, self.fence, on_command=self._accepted)
        self.swim = swim_runner.SwimDriver(net)
        self.stats: Counter[str] = Counter()
        self.loop_lag = LoopLag()
        self._runs: dict[str, _Run] = {}
        self._handlers: dict[str, CommandHandler] = {}
        self._death_handlers: list[DeathHandler] = []
        self._nursery: trio.Nursery | None = None
        self._version: int | None = None
        self._retry_at = 0.0  # a failed cluster is started again from then on

    # -- the API other services use --------------------------------------------------------

    def clusters(self) -> list[str]:
        """The clusters this node runs (is an active member of)."""
        return sorted(self._runs)

    def election_driver(self, cluster: str) -> ElectionDriver | None:
        """This node's election driver of `cluster` (None on a worker); for fault tests."""
        run = self._runs.get(cluster)
        return None if run is None else run.election

    def coordinator(self, cluster: str) -> tuple[str | None, int]:
        """(the coordinator's peer id, its term) as known here; (None, term) when none is.
        Another node is named only once it proved its term to this node's fence."""
        run = self._runs.get(cluster)
        if run is None:
            return None, self.fence.highest(cluster)
        driver = run.election
        if driver is not None and driver.ready:
            core = driver.core
            leader, term = core.leader, core.term
            if leader == self.peer_id and not driver.is_coordinator():
                return None, term  # the lease ran out; the core steps down on its tick
            fence = self.fence.state(cluster)
            if leader not in (None, self.peer_id) and (fence.term, fence.coordinator) != (
                term,
                leader,
            ):
                # heard of by heartbeat (unsigned) only: named once it proved its term here
                # (its announcement), so no voter names one that could not command it
                leader = None
        else:  # a worker: the coordinator that last told it of itself
            fence = self.fence.state(cluster)
            leader, term = fence.coordinator, fence.term
        if leader is not None and run.swim is not None and run.swim.state_of(leader) == State.DEAD:
            leader = None  # declared dead here: not named until the next one is known
        return leader, term

    def is_coordinator(self, cluster: str) -> bool:
        run = self._runs.get(cluster)
        return run is not None and run.election is not None and run.election.is_coordinator()

    def member_states(self, cluster: str) -> dict[str, str]:
        """Every member of `cluster` (this node included) -> alive, suspect or dead, as this
        node's SWIM sees them; {} if this node is not a member."""
        run = self._runs.get(cluster)
        if run is None:
            return {}
        states = {self.peer_id: "alive"}
        core = run.swim
        for peer in run.members - {self.peer_id}:
            state = None if core is None else core.state_of(peer)
            states[peer] = (State.ALIVE if state is None else state).name.lower()
        return dict(sorted(states.items()))

    def describe(self, cluster: str) -> dict[str, Any]:
        """What this node knows of `cluster`: its coordinator and term, whether this node
        coordinates it, its voters and every member's state."""
        run = self._runs.get(cluster)
        leader, term = self.coordinator(cluster)
        return {
            "cluster": cluster,
            "member": run is not None,
            "coordinator": leader,
            "term": term,
            "coordinating": self.is_coordinator(cluster),
            "voter": run is not None and self.peer_id in run.voters,
            "voters": sorted(run.voters) if run is not None else [],
            "members": self.member_states(cluster),
        }

    async def command(
        self,
        cluster: str,
        action: str,
        body: dict[str, Any],
        to: Iterable[str] | None = None,
    ) -> dict[str, str | None]:
        """Sign the next command of this coordinator's term and send it to `to` (default:
        every other member); per member, None if it accepted it, else why not
        (`scheduler.fencing` reasons, `unreachable`). This node, if named in `to`, hands the
        command to its own handler through its own fence. NotCoordinatorError unless this
        node holds the cluster's lease now; ValueError for a body too large to send."""
        run = self._runs.get(cluster)
        if run is None or run.election is None:
            raise NotCoordinatorError(f"this node is not a voter of {cluster!r}")
        payload = codec.encode(body)
        if len(payload) > election_wire.MAX_COMMAND_BODY:
            raise ValueError(
                f"a command body is at most {election_wire.MAX_COMMAND_BODY} bytes encoded "
                f"(got {len(payload)})"
            )
        cmd = run.election.sign_next_command(action, payload)
        targets = set(run.members - {self.peer_id} if to is None else to)
        self.stats["commands_sent"] += 1
        results = await run.election.send_command(cmd, to=targets - {self.peer_id})
        if self.peer_id in targets:
            results[self.peer_id] = self._deliver_local(cmd)
        return results

    def on_command(self, action: str, handler: CommandHandler) -> None:
        """`handler(cluster, coordinator, body)` runs for every command of `action` that this
        node accepts (fenced); one handler per action."""
        if action == ANNOUNCE:
            raise ValueError(f"{ANNOUNCE!r} is the runtime's own action")
        self._handlers[action] = handler

    def on_member_dead(self, handler: DeathHandler) -> None:
        """`handler(cluster, peer)` runs when this node declares a member dead."""
        self._death_handlers.append(handler)

    # -- what /metrics reads -----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Counters and gauges for /metrics (`daemon.metrics.Metrics.watch_clusters`)."""
        clusters = {}
        refused: Counter[tuple[str, str]] = Counter()
        for key, count in self.swim.stats.items():
            if key.startswith("refused_"):
                refused[("swim", key.removeprefix("refused_"))] += count
        for key, count in self.router.stats.items():
            protocol, _, reason = key.partition("_")
            # fence refusals are commands_refused; here what did not decode or had no place
            if key != "command_accepted" and reason not in FENCE_REASONS:
                refused[(protocol, reason)] += count
        for name, run in sorted(self._runs.items()):
            states = Counter(self.member_states(name).values())
            started = won = lapses = 0
            if run.election is not None and run.election.ready:
                core_stats = run.election.core.stats
                started, won = core_stats["elections_started"], core_stats["elections_won"]
                lapses = core_stats["lease_lapsed"]
                for reason in ("not_voter", "wrong_cluster"):
                    refused[("election", reason)] += core_stats[reason]
                refused[("election", "inbox_full")] += run.election.stats["inbox_full"]
            if run.swim is not None:
                for key, count in run.swim.stats.items():
                    if key.startswith("refused_") and key != "refused_non_member":
                        refused[("swim", key.removeprefix("refused_"))] += count
            clusters[name] = {
                "term": self.coordinator(name)[1],
                "coordinating": self.is_coordinator(name),
                "elections_started": started,
                "elections_won": won,
                "lease_lapses": lapses,
                "members": {state: states[state] for state in STATES},
            }
        return {
            "clusters": clusters,
            "commands_refused": dict(self.fence.refused),
            "commands_accepted": self.fence.accepted,
            "messages_refused": {k: v for k, v in refused.items() if v},
            "runtime": dict(self.stats),
            "loop_lag": self.loop_lag.snapshot(),
        }

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.loop_lag.run)
            await self._reconcile()
            task_status.started()
            while True:
                await trio.sleep(self.settings.watch_interval_s)
                if (
                    self.membership.version() != self._version
                    and trio.current_time() >= self._retry_at
                ):
                    await self._reconcile()

    async def _reconcile(self) -> None:
        """Start, update and stop clusters to match the registry."""
        assert self._nursery is not None
        self._version = self.membership.version()
        wanted: dict[str, ViewLike] = {}
        for name in sorted(self.membership.clusters_of(self.peer_id)):
            if not 0 < len(name) <= MAX_CLUSTER_NAME:  # the wire's bound on a cluster name
                self.stats["cluster_name_too_long"] += 1
                continue
            view = self.membership.view(name)
            if view is None or self.peer_id not in view.members:
                continue
            if len(wanted) >= self.settings.max_clusters:
                self.stats["clusters_over_limit"] += 1
                log.warning(
                    "member of more than %d clusters: %s left out", self.settings.max_clusters, name
                )
                continue
            wanted[name] = view
        for name in list(self._runs):
            if name not in wanted:
                log.info("left cluster %s", name)
                self._runs.pop(name).scope.cancel()
        for name, view in wanted.items():
            members, voters = frozenset(view.members), frozenset(view.voters)
            run = self._runs.get(name)
            if run is None:
                run = _Run(name, members, voters)
                self._runs[name] = run
                await self._nursery.start(self._run_cluster, run)
                log.info("joined cluster %s (%d members)", name, len(members))
            else:
                await self._update(run, members, voters)

    async def _update(self, run: _Run, members: frozenset[str], voters: frozenset[str]) -> None:
        if members != run.members and run.swim is not None:
            run.swim.set_members(members, trio.current_time())
        run.members, run.voters = members, voters
        if self.peer_id not in voters:
            if run.election_scope is not None:  # no longer a voter: a worker now
                run.election_scope.cancel()
                run.election, run.election_scope = None, None
        elif run.election is None:
            await self._start_election(run)
        else:
            driver = run.election
            current = driver.core.voters
            # the core takes one change at a time
            for peer in sorted(voters - current):
                current = current | {peer}
                driver.set_voters(current)
            for peer in sorted(current - voters):
                current = current - {peer}
                driver.set_voters(current)
        run.poke()

    async def _run_cluster(self, run: _Run, *, task_status: Any) -> None:
        started = False
        try:
            with run.scope:
                async with trio.open_nursery() as nursery:
                    run.nursery = nursery
                    core = swim_runner.new_core(
                        self.ident, run.name, self.settings.swim, run.members
                    )
                    run.swim = core
                    await nursery.start(
                        self.swim.run, core, lambda change: self._on_swim(run, change)
                    )
                    if self.peer_id in run.voters:
                        await self._start_election(run)
                    nursery.start_soon(self._announcer, run)
                    task_status.started()
                    started = True
        except Exception:  # a disk that cannot keep a vote: this cluster stops, not the node
            self.stats["cluster_failed"] += 1
            log.exception("cluster %s stopped; retried in %.0f s", run.name, RETRY_S)
            if self._runs.get(run.name) is run:
                del self._runs[run.name]
            self._version = None  # reconciled again once the retry is due
            self._retry_at = trio.current_time() + RETRY_S
            if not started:
                task_status.started()
        finally:
            run.swim, run.election = None, None

    async def _start_election(self, run: _Run) -> None:
        assert run.nursery is not None
        driver = ElectionDriver(
            self.router,
            run.name,
            run.voters,
            self.election_store,
            ident=self.ident,
            settings=self.settings.election,
            observer=lambda d: self._observed(run, d),
            send_timeout_s=self.settings.command_timeout_s,
        )
        scope = trio.CancelScope()

        async def drive(task_status: Any) -> None:
            with scope:
                await driver.run(task_status=task_status)

        run.election, run.election_scope = driver, scope
        await run.nursery.start(drive)

    # -- events ----------------------------------------------------------------------------

    def _observed(self, run: _Run, driver: ElectionDriver) -> None:
        core = driver.core
        seen = (core.term, core.leader)
        if seen != run.seen:
            run.seen = seen
            if core.leader is not None:
                log.info("cluster %s: coordinator %s, term %d", run.name, core.leader, core.term)
            run.poke()

    def _on_swim(self, run: _Run, change: StateChanged) -> None:
        run.poke()
        if change.state != State.DEAD:
            log.info(
                "cluster %s: member %s %s (incarnation %d; loop lag %.2f s)",
                run.name,
                change.peer_id,
                change.state.name.lower(),
                change.incarnation,
                self.loop_lag.last_s,
            )
            return
        log.info("cluster %s: member %s declared dead", run.name, change.peer_id)
        for handler in list(self._death_handlers):
            try:
                handler(run.name, change.peer_id)
            except Exception:  # a listener's bug must not stop failure detection
                self.stats["death_handler_failed"] += 1
                log.exception("a member-dead handler failed")

    async def _announcer(self, run: _Run) -> None:
        """As coordinator: tell the members of this term, with its proof (workers get no
        heartbeats; voters' fences take no coordinator from heartbeats)."""
        while True:
            with trio.move_on_after(self.settings.announce_retry_s):
                await run.changed.wait()
            run.changed = trio.Event()
            driver = run.election
            if driver is None or not driver.is_coordinator():
                continue
            if driver.core.term != run.announced_term:
                run.announced_term, run.announced = driver.core.term, set()
            members = run.members - {self.peer_id} - run.announced
            if not members:
                continue
            try:
                results = await self.command(run.name, ANNOUNCE, {}, to=members)
            except NotCoordinatorError:
                continue
            run.announced |= {peer for peer, refused in results.items() if refused is None}

    def _fence_voters(self, cluster: str) -> frozenset[str]:
        run = self._runs.get(cluster)
        return run.voters if run is not None else frozenset()

    def _deliver_local(self, cmd: election_wire.Command) -> str | None:
        try:
            self.fence.check(cmd)
        except FenceError as exc:
            return exc.reason
        self._accepted(cmd)
        return None

    def _accepted(self, cmd: election_wire.Command) -> None:
        """A command this node's fence accepted: to its action's handler."""
        if cmd.action == ANNOUNCE:
            run = self._runs.get(cmd.cluster)
            if run is not None:
                run.poke()
            return
        handler = self._handlers.get(cmd.action)
        if handler is None:
            self.stats["command_unhandled"] += 1
            return
        try:
            body = codec.decode(cmd.body, max_bytes=election_wire.MAX_COMMAND_BODY)
        except codec.CodecError:
            body = None
        if not isinstance(body, dict):
            self.stats["command_malformed_body"] += 1
            return
        if self._nursery is None:
            return
        self._nursery.start_soon(self._handle, handler, cmd.cluster, cmd.signer, body)

    async def _handle(
        self, handler: CommandHandler, cluster: str, coordinator: str, body: dict[str, Any]
    ) -> None:
        try:
            await handler(cluster, coordinator, body)
            self.stats["command_handled"] += 1
        except Exception:  # one command's failure must not stop the node
            self.stats["command_handler_failed"] += 1
            log.exception("the handler of a %s command failed", cluster)
