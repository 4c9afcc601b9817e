"""The relay table of bench/p2p.py behind real NAT: hosts in network namespaces
(tests/daemon/natlab.py; root, iproute2, iptables), each in a thread of its own that entered
its namespace and runs its own trio loop.

The relay runs in the public namespace; two targets behind NAT A (one that hole-punches, one
that does not) reserve slots once AutoNAT has found them private; fresh dialers behind NAT B
dial the punching target through the relay and wait for DCUtR to make the connection direct,
then one dialer that does not punch measures requests over the relay, and one that does over
the punched direct connection.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import trio

from p2p.reach import PRIVATE, ReachSettings
from tests.daemon.natlab import PUBLIC_ADDR, NatLab, unavailable

__all__ = ["measure_nat", "unavailable"]

CLONE_NEWNET = 0x40000000
FAST = {"confirmations": 1, "check_s": 0.5}


def _in_netns(name: str, fn: Callable[[], Any], out: queue.Queue) -> threading.Thread:
    """Start `fn()` in a thread that has entered namespace `name`; its result (or error)
    goes to `out` as (name, value)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({name})")
            finally:
                os.close(fd)
            out.put((name, fn()))
        except BaseException as exc:
            out.put((name, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def measure_nat(samples: int, total: int) -> dict[str, list[float]]:
    from bench import p2p as bench  # the helpers of bench/p2p.py (imported by path there)

    results: dict[str, list[float]] = {
        "relay": [],
        "direct": [],
        "missed": [],
        "relayed_mib": [],
        "direct_mib": [],
    }
    relay_addr: queue.Queue = queue.Queue()
    circuits: queue.Queue = queue.Queue()
    done = threading.Event()
    out: queue.Queue = queue.Queue()

    def host(listen_ip: str, **reach: Any) -> Any:
        settings = ReachSettings(**{**FAST, **reach})
        return bench.bench_host(settings, f"/ip4/{listen_ip}/tcp/0")

    async def relay_main() -> None:
        relay = host(PUBLIC_ADDR, serve=True, circuit_bytes=1 << 40)
        async with relay.run():
            relay_addr.put(relay.listen_addrs()[0])
            relay_addr.put(relay.listen_addrs()[0])
            await trio.to_thread.run_sync(done.wait)

    async def targets_main(ip: str) -> None:
        addr = await trio.to_thread.run_sync(relay_addr.get)
        punching, plain = host(ip), host(ip, hole_punch=False)
        async with punching.run(), plain.run():
            for target in (punching, plain):
                await target.connect(addr)
                target.set_request_handler("bulk", bench._length)
            for target in (punching, plain):
                await bench._wait(lambda t=target: t.reach.status == PRIVATE, 60)
                await bench._wait(lambda t=target: t.reach.relayed_addrs(), 30)
                circuits.put(next(a for a in target.listen_addrs() if "/p2p-circuit/" in a))
            await trio.to_thread.run_sync(done.wait)

    async def dialers_main(ip: str) -> None:
        addr = await trio.to_thread.run_sync(relay_addr.get)
        to_punching = await trio.to_thread.run_sync(circuits.get)
        to_plain = await trio.to_thread.run_sync(circuits.get)
        punching_id, plain_id = to_punching.rsplit("/", 1)[1], to_plain.rsplit("/", 1)[1]
        for index in range(samples + 1):
            async with host(ip).run() as dialer:
                await dialer.connect(addr)
                started = time.perf_counter()
                await dialer.connect(to_punching)
                results["relay"].append((time.perf_counter() - started) * 1000)
                try:
                    await bench._wait(
                        lambda d=dialer: d.reach.connection_kind(punching_id) == "direct",
                        bench.DIRECT_WAIT_S,
                    )
                except trio.TooSlowError:
                    results["missed"].append(1.0)
                    continue
                results["direct"].append((time.perf_counter() - started) * 1000)
                if index == samples:  # the last one: throughput over the punched connection
                    results["direct_mib"].append(
                        await bench._throughput(dialer, punching_id, total)
                    )
        results["relay"].pop()  # that last dial was for throughput only
        async with host(ip, hole_punch=False).run() as dialer:
            await dialer.connect(addr)
            await dialer.connect(to_plain)
            assert dialer.reach.connection_kind(plain_id) == "relayed"
            results["relayed_mib"].append(await bench._throughput(dialer, plain_id, total))
        done.set()

    with NatLab() as lab:
        threads = [
            _in_netns(lab.pub, lambda: trio.run(relay_main), out),
            _in_netns(lab.privs[0], lambda: trio.run(targets_main, lab.private_addr(0)), out),
            _in_netns(lab.privs[1], lambda: trio.run(dialers_main, lab.private_addr(1)), out),
        ]
        errors = []
        for _ in threads:
            name, value = out.get(timeout=600)
            if isinstance(value, BaseException):
                errors.append((name, value))
                done.set()
        for thread in threads:
            thread.join(timeout=30)
    if errors:
        raise RuntimeError(f"NAT bench failed: {errors}")
    if not results["direct_mib"]:
        results["direct_mib"].append(float("nan"))
    return results
