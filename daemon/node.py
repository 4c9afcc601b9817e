"""The daemon: composes identity, the network, discovery, the registry, shards, RPC and metrics.

`Daemon` builds the services, each with only what it uses, and wires them; none of them knows
the `Daemon`. As a process (the default) it holds one home (an flock on HOME/daemon.lock);
while it runs, HOME/daemon.json tells the CLI and other tools where to reach it, and the file
and the RPC cookie are removed on exit. Given another network factory and `IN_PROCESS`, many
daemons run whole in one process on trio's virtual clock (tests, simulations).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from daemon import __version__, gcpauses, resources
from daemon.api import cookie
from daemon.api.http import serve_rpc
from daemon.api.jsonrpc import Dispatcher
from daemon.cluster.coordinator_methods import coordinator_for
from daemon.cluster.membership import register_cluster_methods
from daemon.cluster.runtime import ClusterRuntime, RegistryMembership, RuntimeSettings
from daemon.cluster.runtime_methods import register_runtime_methods
from daemon.doctor_methods import register_doctor_methods
from daemon.generation_methods import register_generation_methods
from daemon.home import (  # noqa: F401 - LOCK_FILE, DaemonError, read_daemon_file: re-exported
    DAEMON_FILE,
    LOCK_FILE,
    DaemonError,
    home_lock,
    read_daemon_file,
)
from daemon.metrics import Metrics
from daemon.registry_methods import register_registry_methods
from daemon.rpc_methods import register_node_methods
from daemon.settings import Config
from daemon.shard_methods import register_shard_methods
from daemon.shards.recent import RecentGenerations
from daemon.shards.service import ShardService
from daemon.vdag_methods import (
    grpc_infer,
    register_vdag_infer,
    register_vdag_methods,
    resolve_plan,
)
from daemon.vdags.openai import VdagCompletions
from daemon.vdags.service import VdagService
from p2p import identity
from p2p.aio import AsyncioBridge
from p2p.discovery import ResourceDirectory
from p2p.host import Libp2pNetwork
from p2p.network import DHTValidator, Network
from p2p.records import NAMESPACE
from registry.replica import Replica
from registry.replication import Replicator
from registry.store import RegistryStore
from scheduler.election_driver import ElectionStore, FileElectionStore, MemoryElectionStore
from scheduler.fencing import FenceStore, FileFenceStore, MemoryFenceStore

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 4.0


# builds this node's network: (identity, config, the DHT validator, metrics) -> Network
NetworkFactory = Callable[[identity.NodeIdentity, Config, DHTValidator, Metrics], Network]


@dataclass(frozen=True)
class ProcessParts:
    """What a daemon touches beyond its network. A daemon process has all of it; daemons
    sharing one process (and trio's virtual clock) run with `IN_PROCESS`."""

    # the home's lock, daemon.json and RPC cookie, SIGINT/SIGTERM, the HTTP JSON-RPC and
    # gRPC listeners (without them the API is the `dispatcher`, called in-process)
    process: bool = True
    sqlite: bool = True  # the registry persists in HOME/registry.db; else it lives in memory
    local_sockets: bool = True  # same-host shard streams over Unix sockets (if configured)
    detect_resources: Callable[[Path], dict[str, Any]] = resources.detect_resources
    # (home, config, identity) -> this node's Escrow, or None: no paid work. None here: the
    # deployment recorded in the home for [chain] network, if any (daemon.payments.wiring)
    escrow: Callable[[Path, Config, identity.NodeIdentity], Any] | None = None
    # clusters' election votes and command fences in HOME/cluster-*.json (fsynced); else in
    # memory: a restarted in-process daemon forgets its votes
    cluster_state_on_disk: bool = True


IN_PROCESS = ProcessParts(
    process=False, sqlite=False, local_sockets=False, cluster_state_on_disk=False
)
ELECTION_FILE = "cluster-election.json"
FENCE_FILE = "cluster-fence.json"
DEPLOYMENTS_FILE = "cluster-deployments.json"  # the deployment tables (coordinator_member)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def libp2p_network(
    ident: identity.NodeIdentity, config: Config, validator: DHTValidator, metrics: Metrics
) -> Libp2pNetwork:
    """The default network: a libp2p host (TCP, Noise, Yamux, Kademlia, GossipSub)."""
    return Libp2pNetwork(
        ident,
        network_id=config.network_id,
        listen=list(config.p2p.listen),
        dht_namespace=NAMESPACE,
        dht_validator=validator,
        dht_timeout_s=config.p2p.dht_timeout_s,
        on_reject=metrics.reject,
        on_dht_op=metrics.observe_dht,
        limits=config.host_limits(),
        reach=config.relay.reach(),
    )


class Daemon:
    def __init__(
        self,
        home: Path,
        config: Config,
        *,
        exit_watchdog_s: float | None = None,
        network: NetworkFactory = libp2p_network,
        parts: ProcessParts = ProcessParts(),  # noqa: B008 - frozen, shared safely
    ) -> None:
        self.home = home
        self.config = config
        self.parts = parts
        self._exit_watchdog_s = exit_watchdog_s
        self.ident, created = identity.init_identity(home)
        if created:
            log.info("created a new identity in %s", home)
        self.metrics = Metrics()
        self.resources: dict[str, Any] = {}
        self.rpc_url = ""
        self.grpc_port: int | None = None
        self.openai_url = ""
        self.openai: Any = None  # daemon.api.openai_http.OpenAIServer when [serving] openai
        self.shutdown = trio.Event()
        self._nursery_: trio.Nursery | None = None
        self._publish_now = trio.Event()
        self.net = network(self.ident, config, _LazyValidator(self), self.metrics)
        self.directory = ResourceDirectory(
            self.net,
            self.ident,
            config.discovery(),
            describe=lambda: (
                self.net.listen_addrs(),
                {
                    **public_resources(self.resources),
                    "blocks": self.shards.summary(),
                    "accepts_deploys": config.shards.allow_remote_deploy,  # for planners
                    **resources.placement_record(  # energy and RTTs, weighed by placement
                        self.resources,
                        config.resources.values_for(resources.EnergySettings),
                        self.net.peers,
                    ),
                },
            ),
            on_reject=lambda reason: self.metrics.reject("dht", reason),
            price_per_unit=config.market.price_per_unit,  # signed into the record
        )
        # the asyncio side: sqlite and gRPC (a daemon without either needs no bridge thread)
        self.bridge = AsyncioBridge() if parts.sqlite or parts.process else None
        self.store = (
            RegistryStore(self.bridge, home / "registry.db")
            if parts.sqlite and self.bridge
            else None
        )
        self.replica = Replica(
            self.ident,
            store=self.store,
            on_reject=self.metrics.reject,
            limits=config.registry_limits(),
        )
        self.replicator = Replicator(
            self.net,
            self.replica,
            config.replication(),
            on_reject=self.metrics.reject,
            on_entries=self.metrics.registry_replicated,
        )
        self.dispatcher = Dispatcher(on_outcome=self.metrics.rpc_outcome)
        register_node_methods(
            self.dispatcher,
            ident=self.ident,
            network_id=config.network_id,
            net=self.net,
            directory=self.directory,
            local_state=self._local_state,
            request_shutdown=self.request_shutdown,
        )
        register_registry_methods(self.dispatcher, self.replicator)
        register_vdag_methods(self.dispatcher, self.replicator)
        self.shards = ShardService(
            ident=self.ident,
            net=self.net,
            replica=self.replica,
            replicator=self.replicator,
            metrics=self.metrics,
            allow_remote_deploy=config.shards.allow_remote_deploy,
            torch_threads=config.shards.torch_threads,
            cache_gib=config.shards.cache_gib,
            device=config.shards.device,
            local_sockets=config.shards.local_sockets and parts.local_sockets,
            stream_idle_s=config.shards.stream_idle_s,
            max_streams_per_peer=config.shards.max_streams_per_peer,
            max_local_connections=config.shards.max_local_connections,
            max_batch=config.shards.max_batch,
            batch_window_s=config.shards.batch_window_s,
            pipeline=config.shards.pipeline,
            batched_layout=config.shards.batched_layout,
            price_per_unit=config.market.price_per_unit,
            max_price_per_unit=config.market.max_price_per_unit,
            verifier=self._verifier(),
        )
        register_shard_methods(self.dispatcher, self.shards, self.directory)
        # the last generations' routes and failovers (generation_list, the dashboard)
        self.shards.generations = RecentGenerations(on_end=self.metrics.generation_ended)
        register_generation_methods(self.dispatcher, self.shards.generations)
        self.vdags = VdagService(  # vdag_infer; Python blocks; the sandbox pool (on first use)
            peer_id=self.ident.peer_id,
            net=self.net,
            replicator=self.replicator,
            shards=self.shards,
            metrics=self.metrics,
            home=home,
            sandbox=config.sandbox,
        )
        register_vdag_infer(self.dispatcher, self.replicator, self.vdags)
        self.clusters = self._cluster_runtime()
        register_runtime_methods(self.dispatcher, self.clusters)
        register_cluster_methods(
            self.dispatcher,
            self.replicator,
            self.directory,
            describe=self.clusters.describe,
            placements=lambda name: self.coordinator.placements(name),  # built just below
        )
        self.metrics.watch_clusters(self.clusters.snapshot)
        self.metrics.watch_shards(self.shards.snapshot)
        self.metrics.watch_replication(lambda: self.replicator.stats)
        self.metrics.watch_network(self.net, self.directory.liveness)  # liveness, scores, bans
        # a process's collector pauses, kept short by freezing what start-up and model loads
        # built (daemon.gcpauses); in-process daemons share their test's process: left alone
        self.gc_pauses = gcpauses.GcPauses() if parts.process else None
        if self.gc_pauses is not None:
            pauses = self.gc_pauses
            self.metrics.watch_gc(pauses.snapshot)
            self.shards.on_loaded = lambda: pauses.freeze("torch's import or a model load")
        self.coordinator = coordinator_for(  # places, heals and scales through clusters
            self.dispatcher,
            self.clusters,
            self.shards,
            self.directory,
            self.replica,
            self.metrics,
            config,
            home / DEPLOYMENTS_FILE if parts.cluster_state_on_disk else None,
        )
        self.escrow: Any = None  # daemon.payments.escrow.Escrow when this node has a chain
        self._own_escrow = False
        self.paid: Any = None  # daemon.payments.wiring.PaidWork: paid work, with an Escrow
        self._wire_payments()
        from daemon.payments.methods import Payments, register_payment_methods

        self.payments = Payments.of_daemon(self)  # job_*, earnings, stake, ... (JSON-RPC)
        register_payment_methods(self.dispatcher, self.payments)
        register_doctor_methods(self.dispatcher, self)  # node_doctor (`gridmesh doctor`)
        self.metrics.known_methods = {m["name"] for m in self.dispatcher.describe()}
        self.openai = self._openai_endpoint()
        if self.openai is not None:  # its `model` may name a vDAG
            self.openai.vdags = VdagCompletions(
                lambda name: resolve_plan(self.replica, name, None), self.vdags
            )

    def _local_state(self) -> dict[str, Any]:
        """What node_info adds: the RPC URL, resources, and the OpenAI endpoint's URL when
        [serving] openai is on ("" until it listens)."""
        state = {"rpc_url": self.rpc_url, "resources": self.resources}
        if self.openai is not None:
            state["openai_url"] = self.openai_url
        return state

    def _openai_endpoint(self) -> Any:
        """The OpenAI-compatible endpoint (daemon.api.openai_http) when [serving] openai is
        on, else None. Built here; a daemon process also listens on [serving] host:port, an
        in-process one is driven through `openai.handle_connection`."""
        serving = self.config.serving
        if not serving.openai:
            return None
        from daemon.api.openai_http import OpenAIServer
        from daemon.serving.access import Access
        from daemon.serving.engine import Engine

        engine = Engine(
            self.shards,
            self.metrics,
            model_dirs=serving.model_dirs,
            max_queue=serving.max_queue,
        )
        return OpenAIServer(engine, Access(serving), self.metrics, max_body=serving.max_body_bytes)

    def _verifier(self) -> Any:
        """The spot checks of this node's generations ([verify]; None when off), exported
        in /metrics and by the `verify_status` method."""
        verifier = None
        if self.config.verify.enabled:
            from daemon.verify.metrics import VerifyCollector
            from daemon.verify.verifier import Verifier

            verifier = Verifier(self.config.verify.policy())
            self.metrics.registry.register(VerifyCollector(verifier))

        async def verify_status() -> dict[str, Any]:
            """This node's spot checks as a requester: config, counters, providers by
            standing ({"enabled": false} when [verify] is off)."""
            return (
                {"enabled": False} if verifier is None else {"enabled": True, **verifier.to_json()}
            )

        self.dispatcher.register("verify_status", verify_status)
        return verifier

    def _cluster_runtime(self) -> ClusterRuntime:
        """SWIM, election and fenced commands for the clusters this node is a member of."""
        cluster = self.config.cluster
        election_store: ElectionStore = MemoryElectionStore()
        fence_store: FenceStore = MemoryFenceStore()
        if self.parts.cluster_state_on_disk:
            path = self.home / ELECTION_FILE
            try:
                election_store = FileElectionStore(path)
                path = self.home / FENCE_FILE
                fence_store = FileFenceStore(path)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                # never start without them: the node could vote twice in a term, or accept
                # a deposed coordinator's command
                raise DaemonError(
                    f"{path} is damaged ({type(exc).__name__}: {exc}); it holds this node's "
                    "cluster votes and fences: restore it, or move it away to start with none"
                ) from None
        return ClusterRuntime(
            self.ident,
            self.net,
            RegistryMembership(self.replica),
            election_store=election_store,
            fence_store=fence_store,
            settings=RuntimeSettings(
                swim=self.config.swim(),
                election=self.config.election(),
                watch_interval_s=cluster.watch_interval_s,
                command_timeout_s=cluster.command_timeout_s,
                announce_retry_s=cluster.announce_retry_s,
                max_clusters=cluster.max_clusters,
            ),
        )

    def _wire_payments(self) -> None:
        """Give the shard service the provider and requester sides of paid work when this
        node has an Escrow; without one, paid sessions and generations are refused."""
        if self.parts.escrow is not None:
            self.escrow = self.parts.escrow(self.home, self.config, self.ident)
        else:  # ours: its chain client's thread ends with the daemon
            from daemon.payments.wiring import escrow_from_home

            self.escrow = escrow_from_home(self.home, self.config, self.ident)
            self._own_escrow = self.escrow is not None
        if self.escrow is None:
            return
        from daemon.payments.wiring import build

        self.paid = build(
            self.escrow,
            home=self.home,
            ident=self.ident,
            config=self.config,
            net=self.net,
            lookup=self.directory.lookup,
            on_reject=lambda reason: self.metrics.reject("payments", reason),
        )
        if self.paid is not None:
            self.shards.provider = self.paid.provider
            self.paid.provider.on_settle = self.metrics.settlement
            self.shards.requester = self.paid.requester

    async def refresh_resources(self) -> None:
        self.resources = await trio.to_thread.run_sync(self.parts.detect_resources, self.home)
        self.metrics.set_resources(self.resources)

    async def _refresh_loop(self) -> None:
        while True:
            await trio.sleep(self.config.resources.publish_interval_s)
            await self.refresh_resources()
            self.metrics.set_peers(len(self.net.connected_peers()), len(self.net.known_peers()))

    async def _publish_loop(self) -> None:
        """Publish every interval, and at once when a bootstrap connection (re)opens."""
        while True:
            self._publish_now = trio.Event()
            ok = await self.directory.publish_once()
            self.metrics.record_published(ok)
            with trio.move_on_after(self.config.resources.publish_interval_s):
                await self._publish_now.wait()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                self.shutdown.set()
                return

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        process = self.parts.process
        with home_lock(self.home) if process else contextlib.nullcontext():
            try:
                if self.store is not None:
                    await self.store.open()
                await self.replica.load()
                await self._run_locked(task_status)
            finally:
                if process:
                    (self.home / DAEMON_FILE).unlink(missing_ok=True)
                    cookie.remove_cookie(self.home)
                if self.store is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        await self.store.close()
                self.payments.close()
                if self.paid is not None:
                    self.paid.close()
                if self._own_escrow:
                    self.escrow.client.close()
                if self.bridge is not None:
                    self.bridge.close()

    async def _run_locked(self, task_status: trio.TaskStatus[None]) -> None:
        await self.refresh_resources()
        process = self.parts.process
        token = cookie.create_cookie(self.home) if process else ""
        async with self.net.run(), trio.open_nursery() as nursery:
            self._nursery_ = nursery
            if process:
                nursery.start_soon(self._watch_signals)
                port = await nursery.start(
                    lambda task_status: serve_rpc(
                        self.dispatcher,
                        token=token,
                        port=self.config.rpc.port,
                        metrics=self.metrics.render,
                        on_reject=lambda reason: self.metrics.reject("rpc", reason),
                        max_connections=self.config.rpc.max_connections,
                        request_timeout_s=self.config.rpc.request_timeout_s,
                        task_status=task_status,
                    )
                )
                self.rpc_url = f"http://127.0.0.1:{port}/"
            for addr in self.config.p2p.bootstrap:
                nursery.start_soon(
                    self.net.keep_connected,
                    addr,
                    self.config.p2p.reconnect_min_s,
                    self.config.p2p.reconnect_max_s,
                    lambda peer_id: self._publish_now.set(),
                )
            await self.replicator.start()
            await nursery.start(self.clusters.run)
            await nursery.start(self.coordinator.run)
            await nursery.start(self.shards.run)
            await nursery.start(self.vdags.run)
            if self.paid is not None:  # vouchers answered, jobs settled
                await nursery.start(
                    lambda task_status: self.paid.run(self.net, task_status=task_status)
                )
            if process and self.config.grpc.enabled and self.bridge is not None:
                from daemon.api.grpc_server import ShardBackend, serve_grpc

                self.grpc_port = await nursery.start(
                    lambda task_status: serve_grpc(
                        self.bridge,
                        ShardBackend(self.shards),
                        port=self.config.grpc.port,
                        token=token,  # the RPC cookie: gRPC authenticates like JSON-RPC
                        on_reject=lambda reason: self.metrics.reject("grpc", reason),
                        vdag_infer=grpc_infer(self.replicator, self.vdags),
                        task_status=task_status,
                    )
                )
            if process and self.openai is not None:
                from daemon.api.openai_http import serve_openai

                serving = self.config.serving
                port = await nursery.start(
                    lambda task_status: serve_openai(
                        self.openai,
                        host=serving.host,
                        port=serving.port,
                        task_status=task_status,
                    )
                )
                shown = f"[{serving.host}]" if ":" in serving.host else serving.host
                self.openai_url = f"http://{shown}:{port}/v1"
            nursery.start_soon(self.replicator.run_anti_entropy)
            nursery.start_soon(self.replicator.run_gc)
            nursery.start_soon(self.net.track_peers, self.config.p2p.ping_interval_s)
            nursery.start_soon(self._publish_loop)
            nursery.start_soon(self.directory.refresh_forever)  # keeps nodes_find off the DHT
            nursery.start_soon(self._refresh_loop)
            if process:
                _write_json_atomic(self.home / DAEMON_FILE, self.info_file())
            if self.gc_pauses is not None:
                self.gc_pauses.install()
                self.gc_pauses.freeze("start-up")
            log.info("daemon %s up; rpc %s", self.ident.peer_id, self.rpc_url)
            task_status.started()
            await self.shutdown.wait()
            if self._exit_watchdog_s is not None:
                _arm_exit_watchdog(self._exit_watchdog_s)
            if process:
                (self.home / DAEMON_FILE).unlink(missing_ok=True)
            nursery.cancel_scope.cancel()

    def request_shutdown(self, delay_s: float = 0.05) -> None:
        """Stop soon, leaving time to answer the RPC call that asked for it."""

        async def later() -> None:
            await trio.sleep(delay_s)
            self.shutdown.set()

        if self._nursery_ is None:
            self.shutdown.set()
        else:
            self._nursery_.start_soon(later)

    def info_file(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "peer_id": self.ident.peer_id,
            "listen_addrs": self.net.listen_addrs(),
            "rpc_url": self.rpc_url,
            "grpc_addr": f"127.0.0.1:{self.grpc_port}" if self.grpc_port else None,
            "openai_url": self.openai_url or None,
            "version": __version__,
        }


def public_resources(detected: dict[str, Any]) -> dict[str, Any]:
    """What goes into the signed public record: no local paths (they name users)."""
    disk = {k: v for k, v in (detected.get("disk") or {}).items() if k != "path"}
    return {**detected, "disk": disk}


class _LazyValidator:
    """The DHT validator exists only once the directory does; the host needs it earlier."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def validate(self, key: str, value: bytes) -> None:
        self._daemon.directory.validator.validate(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        return self._daemon.directory.validator.select(key, values)


def _arm_exit_watchdog(grace_s: float) -> None:
    """If libp2p's teardown hangs, leave anyway: a stop must take seconds, not minutes."""

    def expire() -> None:
        log.warning("shutdown took longer than %.1f s; exiting", grace_s)
        os._exit(0)

    timer = threading.Timer(grace_s, expire)
    timer.daemon = True
    timer.start()
