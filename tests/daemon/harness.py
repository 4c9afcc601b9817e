"""Whole daemons in one process: N `Daemon`s on the in-memory network, on trio's virtual clock.

Each daemon is the production `Daemon` (discovery, registry replication, shards, the RPC
methods, metrics) built with a network factory that puts it on one `MemoryNetwork`, and with
`IN_PROCESS` (no home lock, daemon.json, cookie, signals, HTTP or gRPC listeners, sqlite or Unix
sockets). Tests call each daemon's JSON-RPC `Dispatcher` directly (`call`), with the same
validation and errors as over HTTP, and kill a daemon as SIGKILL would: its tasks stop, its
peers' streams to it break at once and requests to it are refused.

Run under pytest-trio's `autojump_clock`: minutes of the daemons' timers pass in a second.
Worker threads would let the virtual clock jump while a thread computes (firing every deadline
meanwhile), so `inline_threads` runs `trio.to_thread.run_sync` calls on the event loop.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from daemon.api.client import RPCCallError
from daemon.config import Config, parse
from daemon.metrics import Metrics
from daemon.node import IN_PROCESS, Daemon
from p2p.identity import NodeIdentity
from p2p.network import DHTValidator
from p2p.testing.memnet import MemoryNetwork, MemoryNode

# a daemon that republishes every second, as tests/daemon/conftest.py's FAST_CONFIG
FAST = {
    "network_id": "memtest",
    "p2p": {
        "listen": ["/ip4/127.0.0.1/tcp/0"],  # unused: memory nodes listen nowhere
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 2.0,
        "ping_interval_s": 1.0,
        "dht_timeout_s": 2.0,
    },
    "resources": {"publish_interval_s": 1.0, "record_validity_s": 4.0, "max_clock_skew_s": 5.0},
    "registry": {"sync_interval_s": 0.5, "sync_timeout_s": 1.0},
    # one torch thread: a tiny model's steps are ~30x slower with two threads on a busy 2-core
    # machine (they wait on each other)
    "shards": {"allow_remote_deploy": True, "local_sockets": False, "torch_threads": 1},
    "grpc": {"enabled": False},
}

RESOURCES = {
    "cpu": {"cores": 4},
    "memory": {"total_bytes": 8 << 30, "available_bytes": 6 << 30},
    "gpus": [],
    "disk": {"free_bytes": 100 << 30, "path": "/nowhere"},
}


def memory_addr(index: int, peer_id: str) -> str:
    """Where daemon `index` says it listens: a memory node is dialled by its peer id alone,
    but the config checks bootstrap addresses as TCP multiaddrs."""
    return f"/ip4/10.0.{index // 250}.{index % 250 + 1}/tcp/4001/p2p/{peer_id}"


class _TokenWatch(list[int]):
    def __init__(self, tokens: list[int], count: int, action: Callable[[], None]) -> None:
        super().__init__(tokens)
        self._count, self._action = count, action

    def append(self, token: int) -> None:
        super().append(token)
        if len(self) == self._count:
            self._action()


class RunningDaemon:
    """One whole daemon of a `MemoryCluster`, and how a test talks to it."""

    def __init__(self, daemon: Daemon, node: MemoryNode, addr: str) -> None:
        self.daemon = daemon
        self.node = node
        self.addr = addr
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    @property
    def peer_id(self) -> str:
        return self.daemon.ident.peer_id

    def at_token(self, job_id: str, count: int, action: Callable[[], None]) -> None:
        """Call `action` as this daemon's job `job_id` receives its `count`th token. Frames
        between shards take no virtual time on the in-memory network, so a whole generation
        runs between two polls of the clock: this is how a test acts mid-generation."""
        job = self.daemon.shards.jobs[job_id]
        job.tokens = _TokenWatch(job.tokens, count, action)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """A JSON-RPC call through the daemon's dispatcher; RPCCallError as over HTTP."""
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        raw = await self.daemon.dispatcher.handle(json.dumps(body).encode())
        assert raw is not None
        reply = json.loads(raw)
        if "error" in reply:
            error = reply["error"]
            raise RPCCallError(error["code"], error["message"], error.get("data"))
        return reply["result"]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus metric's samples whose labels include `labels` (0 if none)."""
        total = 0.0
        for line in self.daemon.metrics.render().decode().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, value = line.rsplit(" ", 1)
            if series.split("{")[0] == name and all(
                f'{k}="{v}"' in series for k, v in labels.items()
            ):
                total += float(value)
        return total


class MemoryCluster:
    """N whole daemons on one `MemoryNetwork`, each bootstrapping from the one before."""

    def __init__(
        self,
        root: Path,
        nursery: trio.Nursery,
        *,
        seed: int = 0,
        settings: dict[str, Any] | None = None,
        detect_resources: Callable[[Path], dict[str, Any]] | None = None,
    ) -> None:
        self.root = root
        self.nursery = nursery
        self.hub = MemoryNetwork(seed=seed, latency_s=0.001, fanout=8)
        self.daemons: list[RunningDaemon] = []
        self._launched = 0
        self.settings = settings or FAST
        # fixed resources by default: detection reads the machine (and may take a while)
        self.detect_resources = detect_resources or (lambda home: json.loads(json.dumps(RESOURCES)))

    def config(self, bootstrap: list[str]) -> Config:
        raw = json.loads(json.dumps(self.settings))
        raw.setdefault("p2p", {})["bootstrap"] = bootstrap
        return parse(raw)

    def _network(
        self, ident: NodeIdentity, config: Config, validator: DHTValidator, metrics: Metrics
    ) -> MemoryNode:
        return self.hub.add_node(ident.peer_id, validator)

    async def start(self, count: int) -> list[RunningDaemon]:
        """Start `count` more daemons, each bootstrapping from the previous one."""
        for _ in range(count):
            bootstrap = [self.daemons[-1].addr] if self.daemons else []
            await self.add(self.root / f"node{len(self.daemons)}", bootstrap)
        return self.daemons

    async def add(self, home: Path, bootstrap: list[str]) -> RunningDaemon:
        """Start one more daemon, in `home`."""
        running = await self._launch(home, bootstrap)
        self.daemons.append(running)
        return running

    async def restart(self, old: RunningDaemon, bootstrap: list[str]) -> RunningDaemon:
        """Start a daemon again in the home of `old` (stopped or killed), in its place: same
        identity; its registry starts empty (in-process daemons keep it in memory)."""
        running = await self._launch(old.daemon.home, bootstrap)
        self.daemons[self.daemons.index(old)] = running
        return running

    async def _launch(self, home: Path, bootstrap: list[str]) -> RunningDaemon:
        home.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before the daemon runs
        parts = replace(IN_PROCESS, detect_resources=self.detect_resources)
        daemon = Daemon(home, self.config(bootstrap), network=self._network, parts=parts)
        peer_id = daemon.ident.peer_id
        self._launched += 1
        addr = memory_addr(self._launched, peer_id)
        running = RunningDaemon(daemon, self.hub.node(peer_id), addr)
        await self.nursery.start(self._run, running)
        return running

    async def _run(self, running: RunningDaemon, *, task_status: Any) -> None:
        try:
            with running.scope:
                await running.daemon.run(task_status=task_status)
        finally:
            running.stopped.set()

    async def stop(self, running: RunningDaemon) -> None:
        """A clean stop (as SIGTERM): the daemon winds down, then leaves the network."""
        running.daemon.shutdown.set()
        await running.stopped.wait()
        self.hub.remove_node(running.peer_id, refuse=True)

    def kill(self, running: RunningDaemon) -> None:
        """SIGKILL, in memory: the daemon's tasks stop where they are, its streams break and
        its peers' requests to it are refused."""
        self.hub.remove_node(running.peer_id, refuse=True)
        running.scope.cancel()

    async def deploy(
        self,
        model_dir: Path,
        servers: list[RunningDaemon],
        ranges: list[tuple[int, int]],
        model: str = "tiny",
    ) -> None:
        """`servers[i]` loads `ranges[i]` of the model (one `block_deploy` plan, asked of
        daemon 0), then every daemon sees every range announced."""
        plan = [
            {"peer_id": d.peer_id, "start": a, "end": b}
            for d, (a, b) in zip(servers, ranges, strict=True)
        ]
        result = await self.daemons[0].call(
            "block_deploy", {"model": model, "model_dir": str(model_dir), "plan": plan}
        )
        assert all(r["ok"] for r in result["results"]), result

        async def everyone_sees_every_range() -> bool:
            for d in self.daemons:
                listed = await d.call("block_list", {"model": model})
                if len(listed["announced"].get(model, [])) != len(ranges):
                    return False
            return True

        await self.wait_for(everyone_sees_every_range, 15, "every daemon to see every range")

    async def wait_for(
        self,
        condition: Callable[[], Awaitable[Any]],
        timeout_s: float,
        what: str,
        poll_s: float = 0.05,
    ) -> Any:
        """Poll `condition` on the virtual clock until it returns something truthy."""
        with trio.move_on_after(timeout_s):
            while True:
                result = await condition()
                if result:
                    return result
                await trio.sleep(poll_s)  # virtual time (autojump clock)
        raise AssertionError(f"timed out after {timeout_s} s (virtual) waiting for {what}")

    async def all_found(self) -> bool:
        """Whether every daemon's nodes_find lists every daemon."""
        ids = {d.peer_id for d in self.daemons}
        for running in self.daemons:
            found = {r["peer_id"] for r in await running.call("nodes_find", {})}
            if found != ids:
                return False
        return True


@asynccontextmanager
async def memory_cluster(root: Path, count: int, **kwargs: Any) -> AsyncIterator[MemoryCluster]:
    """`count` whole daemons that have found each other; all stopped on exit."""
    async with trio.open_nursery() as nursery:
        cluster = MemoryCluster(root, nursery, **kwargs)
        await cluster.start(count)
        await cluster.wait_for(cluster.all_found, 60, f"all {count} daemons to find each other")
        try:
            yield cluster
        finally:
            nursery.cancel_scope.cancel()


def inline_threads(monkeypatch: Any) -> None:
    """Run `trio.to_thread.run_sync` on the event loop: on the autojump clock a thread that
    computes would let virtual time jump past every deadline meanwhile."""

    async def run_sync(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
