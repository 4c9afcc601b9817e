"""Helpers for tests that run a cluster of real daemon processes: forming the cluster through
the cluster_* RPC methods, the coordinator they agree on, members' /metrics, and `Worker`, a
libp2p peer in the test's process that joins the cluster as a worker (its own signed member
entry, as `gridmesh cluster join` writes one in an open cluster) and records every coordinator
command sent to it, so that a test can replay them as any peer on the network could."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from daemon.api.client import DaemonUnreachable, RPCCallError
from daemon.devnet import DaemonProcess, wait_for
from daemon.tools.hostile_peer.peer import hostile_network
from p2p import codec, identity
from p2p.network import NetworkError
from registry.entry import sign_entry
from registry.hlc import Timestamp, wall_clock_ms
from registry.replication import SYNC_PROTOCOL
from registry.replication import WIRE_VERSION as SYNC_WIRE_VERSION
from scheduler import election_wire
from scheduler import swim_driver as swim_runner
from scheduler.swim import SwimSettings

STALE = "gridmesh_cluster_commands_refused_total"


def form_cluster(
    daemons: list[DaemonProcess], name: str, voters: int, timeout_s: float = 60.0
) -> None:
    """daemons[0] creates an open cluster; the next `voters - 1` join as voters, the rest as
    workers (each retries until the cluster's entry has reached it)."""
    daemons[0].call("cluster_create", {"name": name, "admission": "open"})
    for index, daemon in enumerate(daemons[1:], start=1):
        role = "voter" if index < voters else "worker"
        wait_for(
            lambda d=daemon, r=role: _joined(d, name, r),
            timeout_s,
            f"daemon {index} to join {name} as a {role}",
            poll_s=0.2,
        )


def _joined(daemon: DaemonProcess, name: str, role: str) -> bool:
    try:
        answer = daemon.call("cluster_join", {"name": name, "role": role}, timeout=10)
    except (RPCCallError, DaemonUnreachable):
        return False
    return answer["status"] == "active"


def views(daemons: list[DaemonProcess], name: str) -> list[dict[str, Any]] | None:
    try:
        return [d.call("cluster_coordinator", {"name": name}, timeout=5) for d in daemons]
    except (RPCCallError, DaemonUnreachable, OSError):
        return None


def agreed(daemons: list[DaemonProcess], name: str) -> tuple[str, int] | None:
    """(coordinator, term) when every one of `daemons` names the same ones and exactly one
    of them holds the lease; else None."""
    seen = views(daemons, name)
    if not seen:
        return None
    named = {(v["coordinator"], v["term"]) for v in seen}
    if len(named) != 1 or seen[0]["coordinator"] is None:
        return None
    if sum(bool(v["coordinating"]) for v in seen) != 1:
        return None
    return seen[0]["coordinator"], seen[0]["term"]


def stale_refusals(daemon: DaemonProcess) -> float:
    return daemon.metric(STALE, reason="stale_term")


@dataclass
class Received:
    """A coordinator command as it reached the worker (monotonic time of arrival)."""

    at: float
    sender: str
    command: election_wire.Command


@dataclass
class Worker:
    """A peer in the test's process, a worker member of a cluster of real daemons."""

    net: Any
    ident: identity.NodeIdentity
    swim: swim_runner.SwimDriver
    nursery: trio.Nursery
    received: list[Received] = field(default_factory=list)

    @property
    def peer_id(self) -> str:
        return self.ident.peer_id

    async def _on_command(self, sender: str, payload: bytes) -> bytes:
        try:
            cmd = election_wire.decode_command(payload)
        except election_wire.ElectionWireError as exc:
            return codec.encode({"v": election_wire.WIRE_VERSION, "refused": exc.reason})
        self.received.append(Received(trio.current_time(), sender, cmd))
        return codec.encode({"v": election_wire.WIRE_VERSION, "refused": None})

    async def join(self, daemons: list[DaemonProcess], cluster: str) -> None:
        """Write this peer's own member entry (a worker) and push it to every daemon; then
        take part in the cluster's SWIM as any member does (so it is not declared dead)."""
        now = Timestamp(wall_clock_ms(), 0)
        entry = sign_entry(
            self.ident,
            kind="members",
            key=f"{cluster}/{self.peer_id}",
            value={"cluster_id": cluster, "peer_id": self.peer_id, "roles": ["worker"]},
            ts=now,
            created=now,
            owner=self.peer_id,
        )
        push = {"v": SYNC_WIRE_VERSION, "op": "push", "entries": [entry.to_wire()]}
        for daemon in daemons:
            reply = codec.decode(await self._push(daemon, codec.encode(push)))
            if "error" in reply:
                raise AssertionError(f"{daemon.peer_id} refused the member entry: {reply}")
        members = [d.peer_id for d in daemons] + [self.peer_id]
        core = swim_runner.new_core(self.ident, cluster, SwimSettings(), members)
        await self.nursery.start(self.swim.run, core)

    async def _push(self, daemon: DaemonProcess, payload: bytes, within_s: float = 60) -> bytes:
        """A registry push to `daemon`, tried again until `within_s`: on a loaded machine a
        daemon's hello check of this peer can time out (it then drops the connection and
        refuses this peer's streams until it reconnects), and the tests are not about that."""
        deadline = trio.current_time() + within_s
        while True:
            try:
                return await self.net.request(daemon.peer_id, SYNC_PROTOCOL, payload, timeout_s=15)
            except NetworkError:
                if trio.current_time() > deadline:
                    raise
            with contextlib.suppress(NetworkError):  # (a connect takes its hello's time)
                await self.net.connect(daemon.addr)

    async def send(self, daemon: DaemonProcess, cmd: election_wire.Command) -> str | None:
        """Send `cmd` to a member: None if it accepted it, else the reason it gave."""
        answer = codec.decode(
            await self.net.request(
                daemon.peer_id,
                election_wire.COMMAND_PROTOCOL,
                election_wire.encode(cmd),
                timeout_s=10,
            )
        )
        return answer.get("refused")


@asynccontextmanager
async def worker_peer(network_id: str, daemons: list[DaemonProcess]) -> AsyncIterator[Worker]:
    """A Worker connected to every one of `daemons` (not yet a member: `join`)."""
    ident = identity.NodeIdentity.generate()
    net = hostile_network(network_id, ident)
    async with net.run(), trio.open_nursery() as nursery:
        worker = Worker(net, ident, swim_runner.SwimDriver(net), nursery)
        net.set_request_handler(election_wire.COMMAND_PROTOCOL, worker._on_command)
        for daemon in daemons:
            await net.connect(daemon.addr)
        yield worker
        nursery.cancel_scope.cancel()
