"""Cluster runtime benchmark: coordinator failover, dead-member detection and the quiet cost.

Simulated (the default): every member runs the production `daemon.cluster.runtime.
ClusterRuntime` (SWIM, election, fencing, the workers' announcements) on the in-memory network
(`p2p.testing.hub`, 5 ms links) in trio's virtual time, all members voters, with the default
`[cluster]` settings. For each size (`--sizes`, default 3 5 7):
- failover: `--trials` runs, each a fresh cluster that elects and settles, then its
  coordinator is killed (as SIGKILL); the time until every surviving member names one and the
  same new coordinator and exactly one holds the lease (p50, p99, max);
- dead: in the same runs, the time until the last survivor's SWIM declares the killed member
  dead (p50, p99, max);
- quiet: messages per member per second (a request and its answer count as two, as the hub
  counts them) and bytes, over `--quiet` virtual seconds of a settled cluster.
Targets: failover p99 <= 3 s, dead <= 5 s.

`--procs N` (e.g. 5) also runs N real daemon processes on 127.0.0.1 (libp2p), forms one
cluster through `registry_put`, and `--proc-trials` times SIGKILLs the coordinator: the
wall-clock time until every survivor's `cluster_coordinator` names the same new one (polled
every 20 ms over HTTP, so a few tens of ms are polling), and until every survivor's /metrics
counts a dead member; the killed daemon is restarted between trials. Wall time on a shared
machine includes its scheduling. Do not run it during a timing window of another benchmark.
Then, where network namespaces can be made (root and iproute2: tests/daemon/netns.py), the
quiet cost of a real cluster: N daemons each in its own namespace on one bridge, the packets
and bytes each sends on its link per second over `--proc-quiet` s before they form a cluster
(republishing, registry sync, pings) and again once they have formed one (all voters) and
settled; the difference is the cluster's own traffic (SWIM, heartbeats; TCP packets, which
are not messages one for one: a request is a yamux stream of several frames, and its ACKs).

usage: python bench/cluster.py [--sizes 3 5 7] [--trials 50] [--quiet 10] [--seed 1]
       [--procs 5] [--proc-trials 20] [--proc-quiet 10] [--keep DIR]
(`--sizes` with no size: no simulation; `--keep DIR`: the real daemons' homes and logs stay
in DIR, and a kill after which no coordinator is agreed within 30 s is reported with them)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import trio  # noqa: E402
import trio.testing  # noqa: E402

from daemon.cluster.runtime import ClusterRuntime  # noqa: E402
from p2p.identity import NodeIdentity  # noqa: E402
from p2p.testing.hub import MemoryNetwork  # noqa: E402
from scheduler.election_driver import MemoryElectionStore  # noqa: E402
from scheduler.fencing import MemoryFenceStore  # noqa: E402

C = "bench"
SETTLE_S = 3.0
LIMIT_S = 15.0


@dataclass(frozen=True)
class _Member:
    peer_id: str
    voter: bool = True


@dataclass(frozen=True)
class _View:
    name: str
    members: dict[str, _Member]

    @property
    def voters(self) -> frozenset[str]:
        return frozenset(self.members)


class StaticMembership:
    """One cluster whose members are all voters, as a registry in sync would show it."""

    def __init__(self, peers: list[str]) -> None:
        self._view = _View(C, {p: _Member(p) for p in peers})

    def version(self) -> int:
        return 0

    def clusters_of(self, peer_id: str) -> list[str]:
        return [C] if peer_id in self._view.members else []

    def view(self, name: str) -> _View | None:
        return self._view if name == C else None


class SimNode:
    def __init__(self, hub: MemoryNetwork, ident: NodeIdentity, membership: StaticMembership):
        self.hub, self.ident = hub, ident
        self.runtime = ClusterRuntime(
            ident,
            hub.add_node(ident.peer_id),
            membership,
            election_store=MemoryElectionStore(),
            fence_store=MemoryFenceStore(),
        )
        self.scope = trio.CancelScope()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            await self.runtime.run(task_status=task_status)

    def kill(self) -> None:
        self.hub.remove_node(self.ident.peer_id, refuse=True)
        self.scope.cancel()


async def _start(nursery: trio.Nursery, size: int, seed: int) -> tuple[MemoryNetwork, list]:
    hub = MemoryNetwork(seed=seed, latency_s=0.005)
    idents = [
        NodeIdentity(hashlib.sha256(b"bench %d %d" % (seed, i)).digest(), bytes(31) + b"\x01")
        for i in range(size)
    ]
    membership = StaticMembership([i.peer_id for i in idents])
    nodes = [SimNode(hub, ident, membership) for ident in idents]
    for node in nodes:
        await nursery.start(node.run)
    return hub, nodes


def _agreed(nodes: list[SimNode]) -> str | None:
    leaders = [n for n in nodes if n.runtime.is_coordinator(C)]
    if len(leaders) != 1:
        return None
    known = {n.runtime.coordinator(C) for n in nodes}
    return leaders[0].ident.peer_id if known == {leaders[0].runtime.coordinator(C)} else None


async def _wait_agreed(nodes: list[SimNode], limit_s: float) -> str | None:
    deadline = trio.current_time() + limit_s
    while trio.current_time() < deadline:
        if (leader := _agreed(nodes)) is not None:
            return leader
        await trio.sleep(0.01)
    return None


async def _trial(size: int, seed: int) -> tuple[float, float]:
    async with trio.open_nursery() as nursery:
        hub, nodes = await _start(nursery, size, seed)
        leader_id = await _wait_agreed(nodes, LIMIT_S)
        await trio.sleep(SETTLE_S)
        leader = next(n for n in nodes if n.ident.peer_id == leader_id)
        leader.kill()
        killed = trio.current_time()
        rest = [n for n in nodes if n is not leader]
        failover = dead = float("inf")
        while trio.current_time() - killed < LIMIT_S and (
            failover == float("inf") or dead == float("inf")
        ):
            now = trio.current_time() - killed
            if failover == float("inf") and _agreed(rest) not in (None, leader_id):
                failover = now
            if dead == float("inf") and all(
                n.runtime.member_states(C).get(leader_id) == "dead" for n in rest
            ):
                dead = now
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    return failover, dead


async def _quiet(size: int, seed: int, quiet_s: float) -> tuple[float, float]:
    async with trio.open_nursery() as nursery:
        hub, nodes = await _start(nursery, size, seed)
        await _wait_agreed(nodes, LIMIT_S)
        await trio.sleep(SETTLE_S)
        sent, sent_bytes = hub.messages_sent, hub.bytes_sent
        await trio.sleep(quiet_s)
        nursery.cancel_scope.cancel()
    per = size * quiet_s
    return (hub.messages_sent - sent) / per, (hub.bytes_sent - sent_bytes) / per


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _row(label: str, failovers: list[float], deads: list[float], rate: str, extra: str) -> str:
    return (
        f"{label:>14} | {statistics.median(failovers):>7.2f} | {_pct(failovers, 0.99):>7.2f} | "
        f"{max(failovers):>7.2f} | {statistics.median(deads):>7.2f} | {_pct(deads, 0.99):>7.2f} | "
        f"{max(deads):>7.2f} | {rate} | {extra}"
    )


def _header(label: str) -> None:
    header = (
        f"{label:>14} | {'fo p50':>7} | {'fo p99':>7} | {'fo max':>7} | {'dead p50':>7} | "
        f"{'dead p99':>7} | {'dead max':>7} | {'msg/member/s':>12} {'B/member/s':>10} | "
        f"{'trials':>6} {'wall s':>6}"
    )
    print(header)
    print("-" * len(header))


def simulate(args: argparse.Namespace) -> None:
    print("cluster runtime, simulated: virtual time, 5 ms links, default [cluster] settings")
    _header("voters")
    for size in args.sizes:
        started = time.perf_counter()
        clock = trio.testing.MockClock(autojump_threshold=0)
        rate, byte_rate = trio.run(_quiet, size, args.seed, args.quiet, clock=clock)
        failovers, deads = [], []
        for trial in range(args.trials):
            clock = trio.testing.MockClock(autojump_threshold=0)
            failover, dead = trio.run(_trial, size, args.seed * 1000 + trial, clock=clock)
            failovers.append(failover)
            deads.append(dead)
        print(
            _row(
                str(size),
                failovers,
                deads,
                f"{rate:>12.1f} {byte_rate:>10.0f}",
                f"{args.trials:>6} {time.perf_counter() - started:>6.1f}",
            ),
            flush=True,
        )


BENCH_CONFIG = (
    'network_id = "clusterbench"\n[p2p]\nlisten = ["/ip4/127.0.0.1/tcp/0"]\n'
    "reconnect_min_s = 0.2\nreconnect_max_s = 2.0\nping_interval_s = 1.0\n"
    "dht_timeout_s = 2.0\n[rpc]\nport = 0\n[resources]\npublish_interval_s = 1.0\n"
    "record_validity_s = 4.0\nmax_clock_skew_s = 5.0\n[registry]\nsync_interval_s = 0.5\n"
    "sync_timeout_s = 1.0\n[grpc]\nenabled = false\n"
)


def real_daemons(args: argparse.Namespace) -> None:
    from daemon.api.client import DaemonUnreachable, RPCCallError
    from daemon.devnet import Devnet, wait_for

    config = BENCH_CONFIG
    if args.keep is not None:  # the daemons' homes and logs stay there
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        place: Any = contextlib.nullcontext(str(args.keep))
    else:
        place = tempfile.TemporaryDirectory(prefix="gridmesh-cluster-bench-")
    with place as root:
        path = Path(root) / "bench.toml"
        path.write_text(config)
        with Devnet(args.procs, root=Path(root) / "net", config=path) as devnet:
            devnet.wait_all_found(timeout_s=60)
            daemons = devnet.daemons
            admin = daemons[0]
            admin.call(
                "registry_put",
                {"kind": "clusters", "key": C, "value": {"name": C, "admins": [admin.peer_id]}},
            )
            for d in daemons:
                admin.call(
                    "registry_put",
                    {
                        "kind": "members",
                        "key": f"{C}/{d.peer_id}",
                        "value": {
                            "cluster_id": C,
                            "peer_id": d.peer_id,
                            "roles": ["admin" if d is admin else "voter"],
                        },
                    },
                )

            def agreed(group: list[Any]) -> str | None:
                try:
                    views = [d.call("cluster_coordinator", {"name": C}, timeout=5) for d in group]
                except (DaemonUnreachable, RPCCallError, OSError):  # one restarting
                    return None
                leaders = [v for v in views if v["coordinating"]]
                if len(leaders) != 1:
                    return None
                ids = {(v["coordinator"], v["term"]) for v in views}
                return leaders[0]["coordinator"] if len(ids) == 1 else None

            failovers, deads = [], []
            for _ in range(args.proc_trials):
                leader_id = wait_for(lambda: agreed(daemons), 60, "a coordinator known to all")
                time.sleep(SETTLE_S)
                leader = next(d for d in daemons if d.peer_id == leader_id)
                rest = [d for d in daemons if d is not leader]
                killed = time.monotonic()
                leader.kill()
                failover = dead = None
                while time.monotonic() - killed < 30 and (failover is None or dead is None):
                    if failover is None and agreed(rest) not in (None, leader_id):
                        failover = time.monotonic() - killed
                    if dead is None and all(
                        d.metric("gridmesh_cluster_members", cluster=C, state="dead") >= 1
                        for d in rest
                    ):
                        dead = time.monotonic() - killed
                    time.sleep(0.02)
                if failover is None:
                    print(
                        f"trial {len(failovers) + 1}: no new coordinator known to all 30 s after "
                        f"the kill ({time.strftime('%H:%M:%S')}; logs: {root}/net/*/daemon.log)",
                        file=sys.stderr,
                    )
                failovers.append(failover if failover is not None else float("inf"))
                deads.append(dead if dead is not None else float("inf"))
                leader.bootstrap = [rest[0].addr]
                leader.start()
            print(f"\n{args.procs} real daemon processes (libp2p on 127.0.0.1), wall time")
            _header("daemons")
            print(
                _row(
                    f"{args.procs} processes",
                    failovers,
                    deads,
                    f"{'-':>12} {'-':>10}",
                    f"{args.proc_trials:>6}",
                )
            )


def _link_counters(netns_name: str) -> tuple[int, int]:
    """(packets, bytes) sent on the namespace's eth0 so far."""
    import json
    import subprocess

    out = subprocess.run(
        ["ip", "-s", "-j", "-n", netns_name, "link", "show", "eth0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    ).stdout
    tx = json.loads(out)[0]["stats64"]["tx"]
    return int(tx["packets"]), int(tx["bytes"])


def _sent_rates(lan: Any, seconds: float) -> tuple[float, float]:
    """Packets and bytes per member per second sent over `seconds` of wall time."""
    before = [_link_counters(name) for name in lan.nodes]
    started = time.monotonic()
    time.sleep(seconds)
    after = [_link_counters(name) for name in lan.nodes]
    per = len(lan.nodes) * (time.monotonic() - started)
    packets = sum(a[0] - b[0] for a, b in zip(after, before, strict=True)) / per
    sent = sum(a[1] - b[1] for a, b in zip(after, before, strict=True)) / per
    return packets, sent


def quiet_real(args: argparse.Namespace) -> None:
    """The quiet cost of a real cluster, measured on each daemon's own link (namespaces)."""
    from daemon.devnet import all_found, wait_for
    from tests.daemon import netns
    from tests.daemon.cluster_procs import agreed, form_cluster

    why = netns.unavailable()
    if why is not None:
        print(f"\nquiet real cluster: not measured ({why})")
        return
    with tempfile.TemporaryDirectory(prefix="gridmesh-cluster-quiet-") as root:
        path = Path(root) / "bench.toml"
        path.write_text(BENCH_CONFIG)
        daemons: list[Any] = []
        with netns.Lan(args.procs) as lan:
            try:
                for index in range(args.procs):
                    daemon = netns.NetnsDaemon(
                        Path(root) / f"node{index}",
                        lan.nodes[index],
                        lan.addr(index),
                        config=path,
                        bootstrap=[daemons[-1].addr] if daemons else [],
                    )
                    daemons.append(daemon)
                    daemon.start()
                wait_for(lambda: all_found(daemons), 60, "every daemon to find all", poll_s=0.2)
                time.sleep(SETTLE_S)
                without = _sent_rates(lan, args.proc_quiet)
                form_cluster(daemons, C, voters=args.procs)
                wait_for(lambda: agreed(daemons, C), 60, "a coordinator known to all")
                time.sleep(SETTLE_S)
                term = agreed(daemons, C)
                within = _sent_rates(lan, args.proc_quiet)
                still = agreed(daemons, C)
            finally:
                for daemon in daemons:
                    daemon.stop()
    print(
        f"\n{args.procs} real daemons, each in a network namespace: sent on its link per "
        f"member per second, {args.proc_quiet:g} s each (wall time)"
    )
    header = f"{'':>24} | {'packets/s':>9} | {'bytes/s':>9}"
    print(header)
    print("-" * len(header))
    print(f"{'no cluster':>24} | {without[0]:>9.1f} | {without[1]:>9.0f}")
    print(f"{'one quiet cluster':>24} | {within[0]:>9.1f} | {within[1]:>9.0f}")
    print(
        f"{'the cluster adds':>24} | {within[0] - without[0]:>9.1f} | "
        f"{within[1] - without[1]:>9.0f}"
    )
    steady = "the same coordinator throughout" if term == still else f"{term} then {still}"
    print(f"(coordinator and term: {steady})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[3, 5, 7])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--quiet", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--procs", type=int, default=0, help="also N real daemons (e.g. 5)")
    parser.add_argument("--proc-trials", type=int, default=20)
    parser.add_argument("--proc-quiet", type=float, default=10.0)
    parser.add_argument("--keep", type=Path, help="run the real daemons here and keep their logs")
    args = parser.parse_args()
    if args.sizes:
        simulate(args)
    if args.procs:
        real_daemons(args)
        quiet_real(args)


if __name__ == "__main__":
    main()
