"""A cluster's coordinator: it places blocks on the cluster's members, heals them when a member
dies, and scales them by the load their servers announce. Every node runs one
`ClusterCoordinator`; it acts for the clusters this node coordinates now
(`ClusterRuntime.is_coordinator`) and, as a member, carries out the commands of theirs.

A cluster's *deployment table* (model -> spec and target copies, `coordinator_wire.TableBody`)
is kept by its coordinator and sent to every member as a fenced `deployments` command (each
keeps it on disk, coordinator_member.TableFile), so that a newly elected coordinator (which
also asks the members for theirs and keeps the newest, by (term, version)) goes on where the
last one stopped. What is actually served is read from the members' announcements in the
`blocks` registry; the coordinator's loop (every `reconcile_interval_s`, at once when a member
is declared dead) compares the two:

- *placement* and *healing*: the runs of layers held fewer times than the target are placed
  by `scheduler.placement.place` on live members that serve none of the model, and sent to
  them as fenced `assign` commands (a member loads the range with its shard service and
  announces it as usual); an assignment the member reports it could not carry out
  (`load_failed`), or does not announce within `assign_timeout_s`, is given up (and released,
  so that a late load does not serve beside its replacement) and that member left out for
  the model for `failed_cooldown_s`. A new coordinator counts the ranges members report
  still loading on its predecessor's orders as assigned (coordinator_inflight), so a deploy
  asked again across a change of coordinator places no extra copies;
- *scaling*: `coordinator_state.Scaler` moves the target between the spec's
  `min_instances` and `max_instances` from the servers' announced `utilisation` and
  `queue_length`; copies beyond the target are `release`d (never below it).
Every change is logged with its reason and kept (the last `MAX_EVENTS`) for `placements`.

RPC: `cluster_deploy`, `cluster_plan`, `cluster_undeploy` (daemon.cluster.coordinator_methods,
which documents their params); `placements(cluster)` feeds `cluster_info`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from daemon.cluster import coordinator_view
from daemon.cluster import coordinator_wire as wire
from daemon.cluster.coordinator_facts import node_facts, served_ranges
from daemon.cluster.coordinator_inflight import InFlight, Loading, read_loading
from daemon.cluster.coordinator_member import MemberSide, Table, TableFile
from daemon.cluster.coordinator_state import (
    CoordinatorSettings,
    Scaler,
    ScalingSettings,
    Served,
    coverage,
    load_of,
    shortfalls,
    surplus,
)
from daemon.cluster.coordinator_view import MAX_SCORES_SHOWN
from daemon.errors import FailedPrecondition, GridmeshError, InvalidParams
from p2p import codec
from p2p.network import NetworkError
from registry.clusters import cluster_view
from scheduler.election_driver import NotCoordinatorError
from scheduler.election_wire import MAX_COMMAND_BODY
from scheduler.placement import (
    NodeFacts,
    PlacementError,
    PlacementRequest,
    PlacementWeights,
    place,
)

if TYPE_CHECKING:
    from daemon.cluster.runtime import ClusterRuntime
    from daemon.shards.service import ShardService
    from p2p.discovery import ResourceDirectory
    from registry.replica import Replica

log = logging.getLogger(__name__)

MAX_EVENTS = 50  # per cluster
MAX_HEAL_STEPS = 16  # ranges placed per deployment per round


@dataclass(frozen=True)
class _Pending:
    served: Served
    deadline: float


class ClusterCoordinator:
    """Deploy, heal and scale blocks for the clusters this node coordinates; carry out the
    commands of the coordinators of the clusters it is a member of. `run()` until cancelled."""

    def __init__(
        self,
        *,
        runtime: ClusterRuntime,
        shards: ShardService,
        directory: ResourceDirectory,
        replica: Replica,
        on_reject: Callable[[str], None],
        settings: CoordinatorSettings | None = None,
        weights: PlacementWeights | None = None,
        scaling: ScalingSettings | None = None,
        tables: TableFile | None = None,
    ) -> None:
        self.runtime = runtime
        self.shards = shards
        self.me = shards.ident.peer_id
        self.net = shards.net
        self.directory = directory
        self.replica = replica
        self._reject = on_reject
        self.settings = settings or CoordinatorSettings()
        self.weights = weights or PlacementWeights()
        self.scaling = scaling or ScalingSettings()
        self.member = MemberSide(
            shards, on_reject, lambda c: runtime.coordinator(c)[0], tables, self._tell
        )
        self.tables = self.member.tables  # this node's copy of each cluster's table
        self.inflight = InFlight(self.member, shards, lambda c: runtime.coordinator(c)[0])
        self._adopted: dict[str, int] = {}  # cluster -> the term whose tables were gathered
        self._pending: dict[tuple[str, str], dict[str, _Pending]] = {}
        self._given_up: dict[str, list[tuple[str, Served]]] = {}  # cluster -> to release
        self._failed: dict[tuple[str, str, str], float] = {}  # (cluster, model, peer) -> until
        self._scalers: dict[tuple[str, str], Scaler] = {}
        self._events: dict[str, deque[dict[str, Any]]] = {}
        self._placed: dict[tuple[str, str], dict[str, Any]] = {}  # the last placement shown
        self._locks: dict[str, trio.Lock] = {}
        self._wake = trio.Event()
        # cluster_deploy's handler (coordinator_methods), for block_deploy's `cluster` param
        self.rpc_deploy: Callable[..., Awaitable[dict[str, Any]]] | None = None
        runtime.on_command(wire.ASSIGN, self.inflight.on_assign)
        runtime.on_command(wire.RELEASE, self.inflight.on_release)
        runtime.on_command(wire.DEPLOYMENTS, self.member.on_table)
        runtime.on_member_dead(self._on_dead)
        self.net.set_request_handler(
            wire.COORDINATOR_PROTOCOL, self._on_request, timeout_s=wire.MAX_WAIT_S + 60.0
        )

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(self.settings.reconcile_interval_s):
                await self._wake.wait()
            self._wake = trio.Event()
            for cluster in self.runtime.clusters():
                if not self.runtime.is_coordinator(cluster):
                    continue
                try:
                    await self.reconcile(cluster)
                except NotCoordinatorError:
                    continue  # the lease ran out meanwhile: the next coordinator goes on
                except Exception:  # one cluster's failure must not stop the others
                    log.exception("cluster %s: reconciling failed", cluster)
                    self._reject("reconcile_failed")

    def _on_dead(self, cluster: str, peer: str) -> None:
        """A member declared dead: heal at once (if this node coordinates the cluster)."""
        self._wake.set()

    def _lock(self, cluster: str) -> trio.Lock:
        return self._locks.setdefault(cluster, trio.Lock())

    def _event(self, cluster: str, model: str, action: str, reason: str) -> None:
        log.info("cluster %s: %s %s: %s", cluster, action, model, reason)
        events = self._events.setdefault(cluster, deque(maxlen=MAX_EVENTS))
        at = round(trio.current_time(), 3)
        events.append({"at": at, "model": model, "action": action, "reason": reason})

    # -- requests members forward ------------------------------------------------------------

    async def _on_request(self, sender: str, payload: bytes) -> bytes:
        """A member's request, typed and bounded (coordinator_wire), from an active member of
        the cluster it names; refusals are answered with their reason and counted."""
        cluster = ""
        try:
            request = wire.decode_request(payload)
            cluster = request.cluster
            view = cluster_view(self.replica, cluster)
            if view is None or sender not in view.members:
                raise wire.WireError("not_member", f"not an active member of {cluster!r} here")
            if isinstance(request, wire.TableRequest):
                table = self.tables.get(cluster)
                body = None if table is None else wire.to_body(table.body())
                loading = self.inflight.report(cluster)
                return codec.encode({"ok": True, "table": body, "loading": loading})
            if isinstance(request, wire.LoadFailed):
                self._load_failed(sender, request)
                return codec.encode({"ok": True, "result": {}})
            return codec.encode({"ok": True, "result": await self.handle(request)})
        except wire.WireError as exc:
            self._reject(f"request_{exc.reason}")
            return codec.encode({"ok": False, "reason": exc.reason, "error": str(exc)})
        except NotCoordinatorError as exc:
            known = self.runtime.coordinator(cluster)[0] if cluster else None
            reply = {"ok": False, "reason": "not_coordinator", "error": str(exc)}
            return codec.encode({**reply, "coordinator": known})
        except GridmeshError as exc:
            return codec.encode({"ok": False, "reason": exc.code, "error": exc.message[:2000]})
        except Exception as exc:  # answered, logged and counted; never the node's end
            log.exception("cluster %s: a member's request failed", cluster)
            self._reject("request_failed")
            error = f"internal error: {type(exc).__name__}"
            return codec.encode({"ok": False, "reason": "internal", "error": error})

    async def _tell(self, peer: str, payload: bytes) -> None:
        """A member's report to its coordinator (this node's own handler when it is it)."""
        if peer == self.me:
            await self._on_request(peer, payload)
            return
        try:
            timeout_s = self.settings.adopt_timeout_s
            await self.net.request(peer, wire.COORDINATOR_PROTOCOL, payload, timeout_s=timeout_s)
        except NetworkError as exc:
            log.info("could not tell the coordinator %s: %s", peer, exc)

    def _load_failed(self, sender: str, report: wire.LoadFailed) -> None:
        """A member could not load what it was assigned: place it elsewhere now."""
        pending = self._pending.get((report.cluster, report.model), {})
        wait = pending.get(sender)
        if wait is None or (wait.served.start, wait.served.end) != (report.start, report.end):
            self._reject("request_unexpected")  # nothing of the kind was asked of it here
            return
        del pending[sender]
        now = trio.current_time()
        self._failed[(report.cluster, report.model, sender)] = now + self.settings.failed_cooldown_s
        self._event(
            report.cluster,
            report.model,
            "load_failed",
            f"{sender} could not load {report.start}..{report.end}: {report.error}",
        )
        self._wake.set()

    async def handle(
        self, request: wire.DeployRequest | wire.PlanRequest | wire.UndeployRequest
    ) -> dict[str, Any]:
        """A deploy, plan or undeploy, on this node as the cluster's coordinator."""
        self._term(request.cluster)
        if isinstance(request, wire.DeployRequest):
            return await self.deploy(request.cluster, request.spec, request.wait_s)
        if isinstance(request, wire.PlanRequest):
            return await self.plan(request.cluster, request.spec)
        return await self.undeploy(request.cluster, request.model)

    # -- what the coordinator does -----------------------------------------------------------

    def _term(self, cluster: str) -> int:
        if not self.runtime.is_coordinator(cluster):
            raise NotCoordinatorError(f"this node does not coordinate {cluster!r}")
        return self.runtime.coordinator(cluster)[1]

    async def deploy(self, cluster: str, spec: wire.DeploySpec, wait_s: float) -> dict[str, Any]:
        """Add or change a deployment, place it, and wait (at most `wait_s`) until every
        assigned range is announced."""
        if problem := spec.problem():
            raise InvalidParams(problem)
        async with self._lock(cluster):
            await self._adopt(cluster)
            table = self.tables[cluster]
            if spec.model not in table.deployments and len(table.deployments) >= (
                wire.MAX_DEPLOYMENTS
            ):
                raise FailedPrecondition(f"{cluster!r} has {wire.MAX_DEPLOYMENTS} deployments")
            before = table.deployments.get(spec.model)
            table.deployments[spec.model] = wire.Deployment(spec, spec.replicas)
            if len(codec.encode(wire.to_body(table.body()))) > MAX_COMMAND_BODY:
                if before is None:
                    del table.deployments[spec.model]
                else:
                    table.deployments[spec.model] = before
                raise FailedPrecondition(
                    f"{cluster!r}'s deployment table would not fit one command "
                    f"({MAX_COMMAND_BODY} bytes): undeploy a block first"
                )
            self._event(cluster, spec.model, "deploy", f"asked for {spec.replicas} instance(s)")
            await self._publish(cluster)
        try:
            await self.reconcile(cluster)
        except NotCoordinatorError:  # the table is out: whoever coordinates next places it
            self._event(cluster, spec.model, "handover", "lost the lease while placing")
        with trio.move_on_after(wait_s):
            while not self._settled(cluster, spec.model):  # noqa: ASYNC110 - polls the registry
                await trio.sleep(0.1)  # (the loop retries what was given up)
        return {**self.status(cluster, spec.model), "ok": self._settled(cluster, spec.model)}

    async def undeploy(self, cluster: str, model: str) -> dict[str, Any]:
        async with self._lock(cluster):
            await self._adopt(cluster)
            table = self.tables[cluster]
            if table.deployments.pop(model, None) is None:
                raise InvalidParams(f"{model!r} is not deployed through {cluster!r}")
            self._event(cluster, model, "undeploy", "asked to")
            await self._publish(cluster)
            self._pending.pop((cluster, model), None)
            self._scalers.pop((cluster, model), None)
            servers = self._served(cluster, model, set(self.runtime.member_states(cluster)))
            body = wire.to_body(wire.ReleaseBody(model))
            results = await self.runtime.command(
                cluster, wire.RELEASE, body, to={s.peer_id for s in servers}
            )
        return {"cluster": cluster, "model": model, "released": results}

    async def plan(self, cluster: str, spec: wire.DeploySpec) -> dict[str, Any]:
        """Dry run: how a fresh deploy would be placed on the live members now."""
        term = self._term(cluster)
        alive = self._alive(cluster)
        facts, excluded = await self._facts(cluster, alive, spec.model)
        try:
            placement = place(
                PlacementRequest(spec.model_spec(), replicas=spec.replicas), facts, self.weights
            )
        except PlacementError as exc:
            raise FailedPrecondition(f"no placement: {exc}", {"excluded": excluded}) from None
        shown = placement.to_json()
        shown["excluded"] = {**excluded, **shown["excluded"]}
        shown["scores"] = shown["scores"][:MAX_SCORES_SHOWN]
        return {"cluster": cluster, "coordinator": self.me, "term": term, **shown}

    async def reconcile(self, cluster: str) -> None:
        """One round for `cluster`: scale, heal, shrink every deployment."""
        async with self._lock(cluster):
            await self._adopt(cluster)
            now = trio.current_time()
            self._failed = {k: until for k, until in self._failed.items() if until > now}
            table = self.tables[cluster]
            states = self.runtime.member_states(cluster)
            live = {p for p, s in states.items() if s != "dead"}
            alive = {p for p, s in states.items() if s == "alive"}
            changed = False
            for model, deployment in list(table.deployments.items()):
                served = self._served(cluster, model, live)
                scaled = self._scale(cluster, deployment, served)
                if scaled is not None:
                    table.deployments[model] = deployment = scaled
                    changed = True
                await self._heal(cluster, deployment, served, alive)
                await self._shrink(cluster, deployment, served)
            await self._release_given_up(cluster)
            if changed:
                await self._publish(cluster)

    async def _adopt(self, cluster: str) -> None:
        """As a new coordinator (once per term): take the newest table among the members'
        and this node's, and publish it under this term."""
        term = self._term(cluster)
        if self._adopted.get(cluster) == term:
            return
        tables = [self.tables.get(cluster)]
        loading: dict[str, list[Loading]] = {self.me: read_loading(self.inflight.report(cluster))}
        request = wire.encode_request(wire.TableRequest(cluster))

        async def ask(peer: str) -> None:
            try:
                raw = await self.net.request(
                    peer,
                    wire.COORDINATOR_PROTOCOL,
                    request,
                    timeout_s=self.settings.adopt_timeout_s,
                )
                reply = wire.decode_reply(raw)
                if reply.get("table") is not None:
                    body = wire.body_of(wire.TableBody, reply["table"])
                    tables.append(Table.of(body))
                loading[peer] = read_loading(reply.get("loading"))
            except (NetworkError, wire.WireError):
                pass  # unreachable or odd: the others' tables will do

        with trio.move_on_after(self.settings.adopt_timeout_s):
            async with trio.open_nursery() as nursery:
                for peer in sorted(self._alive(cluster) - {self.me}):
                    nursery.start_soon(ask, peer)
        newest = max(
            (t for t in tables if t is not None and t.term <= term),
            key=lambda t: (t.term, t.version),
            default=None,
        )
        deployments = dict(newest.deployments) if newest is not None else {}
        self.tables[cluster] = Table(term, 0, deployments)
        self._adopted[cluster] = term
        self._pending = {k: v for k, v in self._pending.items() if k[0] != cluster}
        self._given_up.pop(cluster, None)  # an earlier term's: not this one's to release
        assigned = self._assigned_before(cluster, deployments, loading)
        if deployments:
            self._event(
                cluster,
                "*",
                "adopt",
                f"coordinator of term {term}: {len(deployments)} deployment(s), "
                f"{assigned} range(s) still loading on the last coordinator's orders",
            )
        if newest is not None:  # (a cluster that never had a table needs none sent)
            await self._publish(cluster)

    def _assigned_before(
        self,
        cluster: str,
        deployments: Mapping[str, wire.Deployment],
        loading: Mapping[str, list[Loading]],
    ) -> int:
        """Count the ranges members are loading on an earlier coordinator's orders as this
        one's pending assignments, each with what is left of its `assign_timeout_s`."""
        now = trio.current_time()
        count = 0
        for peer, items in sorted(loading.items()):
            for item in items:
                if item.model not in deployments:
                    continue
                left = max(self.settings.assign_timeout_s - item.loading_s, 0.0)
                s = Served(peer, item.start, item.end, pending=True)
                self._pending.setdefault((cluster, item.model), {})[peer] = _Pending(s, now + left)
                count += 1
        return count

    async def _release_given_up(self, cluster: str) -> None:
        """Release the ranges given up on, so that a member still loading one unloads it
        once loaded (coordinator_inflight) instead of serving it beside its replacement."""
        for model, s in self._given_up.pop(cluster, []):
            body = wire.to_body(wire.ReleaseBody(model, s.start, s.end))
            await self.runtime.command(cluster, wire.RELEASE, body, to={s.peer_id})

    async def _publish(self, cluster: str) -> None:
        """Send the deployment table, one version on, to every member."""
        table = self.tables[cluster]
        table.version += 1
        await self.member.save()
        await self.runtime.command(cluster, wire.DEPLOYMENTS, wire.to_body(table.body()))

    def _alive(self, cluster: str) -> set[str]:
        return {p for p, s in self.runtime.member_states(cluster).items() if s == "alive"}

    def _served(self, cluster: str, model: str, live: set[str]) -> list[Served]:
        """The live members' announced ranges of `model`, and the pending assignments (an
        announced one is no longer pending; one past its deadline is given up)."""
        out = served_ranges(list(self.replica.entries.of_kind("blocks")), model, live)
        pending = self._pending.get((cluster, model), {})
        now = trio.current_time()
        announced = {(s.peer_id, s.start, s.end) for s in out}
        for peer, wait in list(pending.items()):
            s = wait.served
            if (peer, s.start, s.end) in announced:
                del pending[peer]
            elif now >= wait.deadline or peer not in live:
                del pending[peer]
                if peer in live:  # late: whatever it loads now is not wanted
                    self._given_up.setdefault(cluster, []).append((model, s))
                self._failed[(cluster, model, peer)] = now + self.settings.failed_cooldown_s
                self._event(
                    cluster, model, "give_up", f"{peer} did not announce {s.start}..{s.end}"
                )
                self._wake.set()  # place it elsewhere now
            else:
                out.append(s)
        if not pending:
            self._pending.pop((cluster, model), None)
        return out

    def _settled(self, cluster: str, model: str) -> bool:
        """Whether every range the deployment wants is announced (none still assigned)."""
        table = self.tables.get(cluster)
        deployment = table.deployments.get(model) if table else None
        if deployment is None:
            return False
        states = self.runtime.member_states(cluster)
        served = self._served(cluster, model, {p for p, s in states.items() if s != "dead"})
        if self._pending.get((cluster, model)):
            return False
        return not shortfalls(deployment.spec.shape.num_layers, served, deployment.target)

    def _scale(
        self, cluster: str, deployment: wire.Deployment, served: list[Served]
    ) -> wire.Deployment | None:
        spec = deployment.spec
        scaler = self._scalers.setdefault((cluster, spec.model), Scaler(self.scaling))
        decision = scaler.observe(
            trio.current_time(),
            load_of(served),
            deployment.target,
            spec.min_instances,
            spec.max_instances,
        )
        if decision is None:
            return None
        target, reason = decision
        self._event(cluster, spec.model, "scale", f"{deployment.target} -> {target}: {reason}")
        return wire.Deployment(spec, target)

    async def _heal(
        self, cluster: str, deployment: wire.Deployment, served: list[Served], alive: set[str]
    ) -> None:
        """Place every run of layers held fewer times than the target."""
        spec = deployment.spec
        n, target = spec.shape.num_layers, deployment.target
        for _ in range(MAX_HEAL_STEPS):
            runs = shortfalls(n, served, target)
            if not runs:
                return
            start, end = runs[0]
            held = min(coverage(n, served)[start:end])
            now = trio.current_time()
            busy = {s.peer_id for s in served}
            eligible = {
                p for p in alive - busy if self._failed.get((cluster, spec.model, p), 0.0) <= now
            }
            facts, excluded = await self._facts(cluster, eligible, spec.model)
            request = PlacementRequest(spec.model_spec(), replicas=1, start=start, end=end)
            try:
                placement = place(request, facts, self.weights)
            except PlacementError as exc:
                self._stuck(cluster, spec.model, f"layers {start}..{end}: {exc}", excluded)
                return
            self._placed[(cluster, spec.model)] = placement.to_json()
            for a in placement.plan.assignments:
                # pending before it is sent: a member that fails at once reports back at once
                key, s = (cluster, spec.model), Served(a.peer_id, a.start, a.end, pending=True)
                deadline = now + self.settings.assign_timeout_s
                self._pending.setdefault(key, {})[a.peer_id] = _Pending(s, deadline)
                score = placement.scores[a.peer_id].total
                why = f"layers {start}..{end} held {held} of {target} time(s)"
                to = f"{a.start}..{a.end} to {a.peer_id} (score {score:.3f})"
                self._event(cluster, spec.model, "assign", f"{to}: {why}")
                order = wire.AssignBody(spec.model, spec.model_dir, a.start, a.end, spec.dtype)
                results = await self.runtime.command(
                    cluster, wire.ASSIGN, wire.to_body(order), to={a.peer_id}
                )
                refused = results.get(a.peer_id)
                if refused is not None:
                    self._pending.get(key, {}).pop(a.peer_id, None)
                    self._failed[(cluster, spec.model, a.peer_id)] = (
                        now + self.settings.failed_cooldown_s
                    )
                    self._event(cluster, spec.model, "assign_refused", f"{a.peer_id}: {refused}")
                    if refused == "unreachable":  # no answer: it may have the order all the
                        # same, and load it beside the copy placed instead: released too
                        self._given_up.setdefault(cluster, []).append((spec.model, s))
                elif a.peer_id in self._pending.get(key, {}):  # (not failed meanwhile)
                    served.append(s)

    def _stuck(self, cluster: str, model: str, why: str, excluded: Mapping[str, str]) -> None:
        """Say once (until it changes) why a shortfall can't be placed now."""
        events = self._events.get(cluster) or deque()
        last = next((e for e in reversed(events) if e["model"] == model), None)
        if excluded:
            why += f" (left out: {'; '.join(f'{p}: {r}' for p, r in sorted(excluded.items())[:5])})"
        if last is None or last["action"] != "stuck" or last["reason"] != why:
            self._event(cluster, model, "stuck", why)

    async def _shrink(
        self, cluster: str, deployment: wire.Deployment, served: list[Served]
    ) -> None:
        """Release the servers beyond the target (never below it; not while assigning)."""
        spec = deployment.spec
        if self._pending.get((cluster, spec.model)):
            return
        slowest = sorted(served, key=lambda s: (-(s.ms_per_layer or 0.0), s.peer_id))
        extra = surplus(
            spec.shape.num_layers, served, deployment.target, [s.peer_id for s in slowest]
        )
        for s in extra:
            body = wire.to_body(wire.ReleaseBody(spec.model, s.start, s.end))
            results = await self.runtime.command(cluster, wire.RELEASE, body, to={s.peer_id})
            refused = results.get(s.peer_id)
            why = f"{deployment.target} instance(s) wanted, layers held that often without it"
            if refused is not None:
                why += f" (refused: {refused})"
            self._event(cluster, spec.model, "release", f"{s.start}..{s.end} on {s.peer_id}: {why}")

    async def _facts(
        self, cluster: str, peers: Iterable[str], model: str
    ) -> tuple[list[NodeFacts], dict[str, str]]:
        """What placement knows of `peers`: their signed records (memory, energy, RTTs) and
        their announcements (measured ms per layer: of this model, else of any)."""
        records = await self.directory.find()
        peers_now = getattr(self.net, "peers", {})
        own = {p: st.rtt_ms for p, st in peers_now.items() if st.rtt_ms is not None}
        entries = list(self.replica.entries.of_kind("blocks"))
        return node_facts(records, entries, peers, model, self.me, own)

    # -- what cluster_info shows -------------------------------------------------------------

    def status(self, cluster: str, model: str) -> dict[str, Any]:
        return coordinator_view.status(self, cluster, model)

    def placements(self, cluster: str) -> list[dict[str, Any]]:
        return coordinator_view.placements(self, cluster)
