"""`gridmesh doctor` on whole daemons (tests/daemon/harness.py, the in-memory network) with a
real dev chain served over HTTP (the contracts deployed, tests/daemon/payments/escrow_env.py),
on the real clock: the chain client waits on its worker thread, which trio's virtual clock
would jump over.

A healthy node (staked, funded, connected, a GPU) passes every line; reachability stays
'unknown' (warn) until AutoNAT exists. Then, with the chain stopped, its node key made
world-readable and its bootstrap peer gone (it still has another peer), exactly the key
files line, the bootstrap line and the chain RPC line fail, each with its fix (payout and
contracts, which need the chain, are skipped: not checked); the clock and the DHT round
trip still pass through the other peer."""

from __future__ import annotations

import json
import socket
import threading
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from contracts.chain.client import ChainClient
from daemon import doctor
from daemon.node import IN_PROCESS, Daemon
from daemon.payments.escrow import Escrow
from tests.daemon.harness import RESOURCES, MemoryCluster, RunningDaemon, memory_addr
from tests.daemon.payments.escrow_env import MIN_STAKE, Env, deployed_chain

GPU = {
    "index": 0,
    "name": "NVIDIA H200",
    "uuid": "GPU-0",
    "memory_total_bytes": 141 << 30,
    "memory_free_bytes": 140 << 30,
    "utilization_pct": 0,
    "power_w": 80.0,
}


def _with_gpu(home: Path) -> dict[str, Any]:
    return {**json.loads(json.dumps(RESOURCES)), "gpus": [GPU], "gpu_driver": "560.35"}


class Cable:
    """A TCP relay between the daemons and the chain: pulling it stops the chain for them
    (open keep-alive connections included, which a stopped HTTP server would still serve)."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = [self._listener]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._listener.accept()
                far = socket.create_connection(("127.0.0.1", self._upstream))
            except OSError:
                return
            with self._lock:
                self._sockets += [near, far]
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def pull(self) -> None:
        with self._lock:
            for sock in self._sockets:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


class ChainCluster(MemoryCluster):
    """Whole daemons, each with an Escrow on the dev chain for its own payout key."""

    def __init__(self, root: Path, nursery: trio.Nursery, env: Env) -> None:
        super().__init__(root, nursery, detect_resources=_with_gpu)
        self.env = env
        self.cable = Cable(env.chain.port)

    def escrow(self, home: Path, config: Any, ident: Any) -> Escrow:
        client = self.env.stack.enter_context(
            ChainClient(self.cable.url, "0x" + ident.payout_key.hex(), retries=2)
        )
        return Escrow(client, self.env.record.as_json())

    async def _launch(self, home: Path, bootstrap: list[str]) -> RunningDaemon:
        home.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before the daemon runs
        parts = replace(IN_PROCESS, detect_resources=self.detect_resources, escrow=self.escrow)
        daemon = Daemon(home, self.config(bootstrap), network=self._network, parts=parts)
        self._launched += 1
        running = RunningDaemon(daemon, self.hub.node(daemon.ident.peer_id), "")
        running.addr = memory_addr(self._launched, daemon.ident.peer_id)
        await self.nursery.start(self._run, running)
        return running


async def _doctor(node: RunningDaemon) -> dict[str, doctor.Check]:
    """Every line, as `gridmesh doctor` makes them: the local ones from the home (an
    in-process daemon writes no RPC cookie), then the daemon's through its dispatcher."""
    local, _ = doctor.local_checks(node.daemon.home, None, {}, daemon_running=False)
    lines = [*local, *doctor.parse_checks(await node.call("node_doctor"))]
    assert [c.name for c in lines] == [*doctor.LOCAL_CHECKS, *doctor.DAEMON_CHECKS]
    return {c.name: c for c in lines}


def _statuses(lines: dict[str, doctor.Check]) -> dict[str, str]:
    return {name: check.status for name, check in lines.items()}


async def test_doctor_passes_a_healthy_node_and_fails_exactly_what_breaks(tmp_path: Path) -> None:
    with deployed_chain(accounts=2) as env:
        async with trio.open_nursery() as nursery:
            net = ChainCluster(tmp_path, nursery, env)
            first, middle, last = await net.start(3)  # each bootstraps from the one before
            await net.wait_for(net.all_found, 60, "the daemons to find each other")
            await last.call("node_connect", {"multiaddr": first.addr})  # a second peer
            escrow = last.daemon.escrow
            await env.escrow(0).send_gas(escrow.address, 10**18)
            await escrow.mint(2 * MIN_STAKE)
            await last.call("stake", {"amount": MIN_STAKE})

            healthy = await _doctor(last)
            report = doctor.render(list(healthy.values()))
            expected = {name: "pass" for name in healthy} | {"reachability": "warn"}
            assert _statuses(healthy) == expected, report
            assert "from the median of 2 peers" in healthy["clock"].detail, report
            assert "read back by 2 of 2 peers" in healthy["dht"].detail, report
            assert "all 4 found" in healthy["contracts"].detail, report
            assert "stake 100 tUSD (minimum 100)" in healthy["payout"].detail, report
            assert "NVIDIA H200" in healthy["gpus"].detail, report

            net.cable.pull()  # the chain stops answering
            (last.daemon.home / "node.key").chmod(0o644)
            net.kill(middle)  # its bootstrap peer; the first daemon is still connected

            broken = await _doctor(last)
            report = doctor.render(list(broken.values()))
            failing = {"keys", "bootstrap", "chain"}  # exactly the three broken things
            expected = {name: "fail" if name in failing else "pass" for name in broken} | {
                "reachability": "warn",
                "payout": "skip",  # they need the chain: not checked, not failed
                "contracts": "skip",
            }
            assert _statuses(broken) == expected, report
            assert broken["keys"].fix == f"chmod 600 {last.daemon.home / 'node.key'}"
            assert middle.addr in broken["bootstrap"].detail
            assert "firewall" in broken["bootstrap"].fix
            assert "does not answer" in broken["chain"].detail
            assert "gridmesh chain serve" in broken["chain"].fix
            assert broken["payout"].fix == broken["contracts"].fix == "fix the chain line first"
            assert "from the median of 1 peers" in broken["clock"].detail, report
            assert "read back by 1 of 1 peers" in broken["dht"].detail, report
            nursery.cancel_scope.cancel()


async def test_a_lone_node_fails_the_dht_and_cannot_measure_its_clock(
    tmp_path: Path, autojump_clock: Any
) -> None:
    async with trio.open_nursery() as nursery:
        net = MemoryCluster(tmp_path, nursery)
        (alone,) = await net.start(1)
        lines = await _doctor(alone)
        report = doctor.render(list(lines.values()))
        assert lines["bootstrap"].status == "warn", report  # the network's first node
        assert lines["clock"].status == "warn" and "no connected peers" in lines["clock"].detail
        assert lines["dht"].status == "fail" and lines["dht"].fix == "fix the bootstrap line first"
        # no deployment recorded: unpaid work, said, not failed
        assert [lines[n].status for n in ("chain", "payout", "contracts")] == ["warn"] * 3
        assert "unpaid work" in lines["chain"].detail
        assert lines["gpus"].status == "warn"
        nursery.cancel_scope.cancel()


async def test_peers_refuse_malformed_doctor_requests_and_count_them(
    tmp_path: Path, autojump_clock: Any
) -> None:
    from daemon.doctor_methods import DOCTOR_PROTOCOL
    from p2p.network import NetworkError

    async with trio.open_nursery() as nursery:
        net = MemoryCluster(tmp_path, nursery)
        a, b = await net.start(2)
        await net.wait_for(net.all_found, 60, "the daemons to find each other")
        for bad in (b"\xff", b"\x81\xa2op\xa3bad", b"x" * 100):
            try:
                await a.node.request(b.peer_id, DOCTOR_PROTOCOL, bad, timeout_s=5)
            except NetworkError:
                pass
            else:
                raise AssertionError(f"{bad!r} was answered")
        assert b.metric("gridmesh_rejected_messages_total", source="doctor") == 3
        nursery.cancel_scope.cancel()


async def test_a_peer_whose_clock_is_30_s_ahead_fails_the_clock_line(
    tmp_path: Path, autojump_clock: Any
) -> None:
    async with trio.open_nursery() as nursery:
        net = MemoryCluster(tmp_path, nursery)
        a, b = await net.start(2)
        await net.wait_for(net.all_found, 60, "the daemons to find each other")
        assert (await _doctor(a))["clock"].status == "pass"
        real_now = b.node.now
        b.node.now = lambda: real_now() + 30.0  # type: ignore[method-assign]
        clock = (await _doctor(a))["clock"]
        assert clock.status == "fail", clock
        assert clock.detail.startswith("this clock is 30.0 s behind its peers'"), clock
        assert "timedatectl set-ntp true" in clock.fix
        nursery.cancel_scope.cancel()
