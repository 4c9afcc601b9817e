"""P2P benchmark: N real daemons on loopback (default 4, 6, 8), one table.

Columns: connect latency (TCP + Noise + Yamux + our hello, from a fresh host to each daemon),
DHT put and get latency (records of 20 throwaway identities, put by one bench host and read by
another that does not hold them), and the time from starting a new daemon until every daemon
finds it through nodes_find ("found by all" counts from spawning the process, interpreter
start included; "after ready" from the moment it wrote daemon.json).
Targets: connect <= 30 ms, get p95 <= 300 ms, found by all <= 5 s.

A second table (p2p.reach, in one process on loopback: a relay and two hosts): the time to
connect through the relay (TCP to the relay, a circuit, Noise + Yamux over it, our hello),
the time from that dial until DCUtR has made the connection direct (loopback has no NAT: this
is the protocol's own cost, not a punch's), and request throughput (1 MiB requests answered
with their length) over the relayed connection and over a direct one.

usage: python bench/p2p.py [--sizes 4 6 8] [--records 20] [--relay-samples 5] [--relay-only]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the `p2p` package: run as a script, its folder would shadow it.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import trio  # noqa: E402
from libp2p.peer.id import ID  # noqa: E402

from daemon.devnet import DaemonProcess, Devnet  # noqa: E402
from p2p import identity, records  # noqa: E402
from p2p.discovery import DiscoverySettings, RecordValidator  # noqa: E402
from p2p.host import Libp2pNetwork, quiet_libp2p_logs  # noqa: E402
from p2p.reach import ReachSettings  # noqa: E402

CONFIG = """
network_id = "bench"
[p2p]
listen = ["/ip4/127.0.0.1/tcp/0"]
reconnect_min_s = 0.2
reconnect_max_s = 2.0
ping_interval_s = 5.0
dht_timeout_s = 3.0
[rpc]
port = 0
[grpc]
port = 0
[resources]
publish_interval_s = 10.0
record_validity_s = 30.0
"""


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_host(
    reach: ReachSettings | None = None, listen: str = "/ip4/127.0.0.1/tcp/0"
) -> Libp2pNetwork:
    settings = DiscoverySettings(network_id="bench")
    return Libp2pNetwork(
        identity.NodeIdentity.generate(),
        network_id="bench",
        listen=[listen],
        dht_namespace=records.NAMESPACE,
        dht_validator=RecordValidator(settings, time.time, lambda reason: None),
        dht_timeout_s=5.0,
        reach=reach,
    )


BULK = 1 << 20  # bytes per throughput request
DIRECT_WAIT_S = 15.0  # a dial not direct by then counts as missed


async def _length(sender: str, data: bytes) -> bytes:
    return str(len(data)).encode()


async def _throughput(dialer: Libp2pNetwork, peer_id: str, total: int) -> float:
    """MiB/s of `total` bytes sent as 1 MiB requests to `peer_id`."""
    payload = b"\x5a" * BULK
    started = time.perf_counter()
    for _ in range(total // BULK):
        assert await dialer.request(peer_id, "bulk", payload, timeout_s=30) == str(BULK).encode()
    return total / (1 << 20) / (time.perf_counter() - started)


async def _wait(condition, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110 - real sockets: poll the state
            await trio.sleep(0.005)


async def measure_relay(samples: int, total: int) -> dict[str, list[float]]:
    """Relay connect and time-to-direct (fresh dialers), relayed and direct throughput."""
    fast = {"confirmations": 1, "check_s": 0.2}

    def host(**reach: object) -> Libp2pNetwork:
        return bench_host(ReachSettings(**{**fast, **reach}))  # type: ignore[arg-type]

    out: dict[str, list[float]] = {
        "relay": [],
        "direct": [],
        "missed": [],
        "relayed_mib": [],
        "direct_mib": [],
    }
    relay = host(serve=True, circuit_bytes=1 << 40)
    punching, relayed_only = host(), host(hole_punch=False)
    async with relay.run(), punching.run(), relayed_only.run():
        for target in (punching, relayed_only):
            await target.connect(relay.listen_addrs()[0])
            target.set_request_handler("bulk", _length)
        await _wait(lambda: relay.reach.serving, 10)
        for target in (punching, relayed_only):
            assert await target.reach.reserve_on(ID.from_base58(relay.peer_id))

        def circuit(target: Libp2pNetwork) -> str:
            return next(a for a in target.listen_addrs() if "/p2p-circuit/" in a)

        for _ in range(samples):  # a fresh dialer each time: relay dial, then DCUtR
            async with host().run() as dialer:
                await dialer.connect(relay.listen_addrs()[0])
                started = time.perf_counter()
                await dialer.connect(circuit(punching))
                out["relay"].append((time.perf_counter() - started) * 1000)
                try:
                    await _wait(
                        lambda d=dialer: d.reach.connection_kind(punching.peer_id) == "direct",
                        DIRECT_WAIT_S,
                    )
                    out["direct"].append((time.perf_counter() - started) * 1000)
                except trio.TooSlowError:
                    out["missed"].append(1.0)  # DCUtR gave no direct connection in time
        async with host(hole_punch=False).run() as dialer:  # nobody punches: stays relayed
            await dialer.connect(relay.listen_addrs()[0])
            await dialer.connect(circuit(relayed_only))
            assert dialer.reach.connection_kind(relayed_only.peer_id) == "relayed"
            out["relayed_mib"].append(await _throughput(dialer, relayed_only.peer_id, total))
            await dialer.connect(relayed_only.listen_addrs()[0])  # a direct connection too
            assert dialer.reach.connection_kind(relayed_only.peer_id) == "direct"
            out["direct_mib"].append(await _throughput(dialer, relayed_only.peer_id, total))
    return out


async def measure_dht(daemons: list[DaemonProcess], n_records: int) -> dict[str, list[float]]:
    connect_ms: list[float] = []
    put_ms: list[float] = []
    get_ms: list[float] = []
    for _ in range(3):  # three fresh hosts, each dialling every daemon once
        async with bench_host().run() as host:
            for daemon in daemons:
                started = time.perf_counter()
                await host.connect(daemon.addr)
                connect_ms.append((time.perf_counter() - started) * 1000)
    idents = [identity.NodeIdentity.generate() for _ in range(n_records)]
    keys = [records.record_key("bench", i.peer_id) for i in idents]
    async with bench_host().run() as writer:
        await writer.connect(daemons[0].addr)
        for ident, key in zip(idents, keys, strict=True):
            value = records.make_record(
                ident, network_id="bench", now=time.time(), valid_for=60.0, addrs=[], resources={}
            )
            started = time.perf_counter()
            await writer.dht_put(key, value)
            put_ms.append((time.perf_counter() - started) * 1000)
    # a reader that joins after the puts holds none of the values: every get is remote
    async with bench_host().run() as reader:
        await reader.connect(daemons[-1].addr)
        for key in keys:
            started = time.perf_counter()
            value = await reader.dht_get(key)
            get_ms.append((time.perf_counter() - started) * 1000)
            if value is None:
                raise RuntimeError(f"DHT get of {key} found nothing")
    return {"connect": connect_ms, "put": put_ms, "get": get_ms}


def measure_join(devnet: Devnet, config: Path) -> tuple[float, float]:
    """Seconds from spawning a new daemon (and from its daemon.json appearing) until every
    daemon, the newcomer included, lists it in nodes_find."""
    newcomer = DaemonProcess(
        devnet.root / "newcomer", config=config, bootstrap=[devnet.daemons[0].addr]
    )
    spawned = time.monotonic()
    newcomer.start()
    ready = time.monotonic()
    devnet.daemons.append(newcomer)  # stopped with the devnet
    seen_at: dict[str, float] = {}

    def watch(daemon: DaemonProcess) -> None:  # one poller per daemon: no daemon waits on another
        client = daemon.client(timeout=10)
        while time.monotonic() < spawned + 60:
            if newcomer.peer_id in {r["peer_id"] for r in client.call("nodes_find", {})}:
                seen_at[daemon.peer_id] = time.monotonic()
                return
            time.sleep(0.02)

    threads = [threading.Thread(target=watch, args=(d,)) for d in devnet.daemons]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(seen_at) < len(devnet.daemons):
        raise RuntimeError(f"{len(devnet.daemons) - len(seen_at)} daemons never found it")
    done = max(seen_at.values())
    return done - spawned, done - ready


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--relay-samples", type=int, default=5)
    parser.add_argument("--relay-mib", type=int, default=32, help="MiB per throughput run")
    parser.add_argument("--relay-only", action="store_true", help="only the relay tables")
    args = parser.parse_args()
    quiet_libp2p_logs(logging.CRITICAL)  # DCUtR and the relay log every reset stream
    if not args.relay_only:
        daemon_table(args)
    print("loopback (no NAT):")
    relay_table(trio.run(measure_relay, args.relay_samples, args.relay_mib << 20), args)
    from bench.p2p_nat import measure_nat, unavailable  # noqa: PLC0415 - root only

    why = unavailable()
    if why is not None:
        print(f"behind NAT: not measured ({why})")
        return 0
    print("behind NAT (network namespaces: two private hosts, each behind a MASQUERADE NAT):")
    relay_table(measure_nat(args.relay_samples, args.relay_mib << 20), args)
    return 0


def relay_table(r: dict[str, list[float]], args: argparse.Namespace) -> None:
    samples, total = args.relay_samples, args.relay_mib << 20
    header = (
        f"{'relay connect p50':>17} | {'p95':>8} | {'until direct p50':>16} | {'p95':>8} | "
        f"{'relayed MiB/s':>13} | {'direct MiB/s':>12}"
    )
    print(header)
    print("-" * len(header))
    print(
        f"{pct(r['relay'], 0.5):>14.1f} ms | {pct(r['relay'], 0.95):>5.1f} ms | "
        f"{pct(r['direct'], 0.5) if r['direct'] else float('nan'):>13.1f} ms | "
        f"{pct(r['direct'], 0.95) if r['direct'] else float('nan'):>5.1f} ms | "
        f"{r['relayed_mib'][0]:>13.1f} | {r['direct_mib'][0]:>12.1f}"
    )
    print(
        f"({samples} relay dials, {len(r['missed'])} not direct within {DIRECT_WAIT_S:.0f} s; "
        f"{total >> 20} MiB as 1 MiB requests)"
    )


def daemon_table(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="gridmesh-bench-") as tmp:
        config = Path(tmp) / "bench.toml"
        config.write_text(CONFIG)
        for size in args.sizes:
            print(f"starting {size} daemons ...", file=sys.stderr, flush=True)
            with Devnet(size, root=Path(tmp) / f"n{size}", config=config) as devnet:
                devnet.wait_all_found(60)
                time.sleep(2)  # let start-up lookups settle before timing anything
                samples = trio.run(measure_dht, devnet.daemons, args.records)
                join_s = measure_join(devnet, config)
            rows.append((size, samples, join_s))
    header = (
        f"{'daemons':>7} | {'connect p50':>11} | {'connect p95':>11} | {'put p50':>8} | "
        f"{'put p95':>8} | {'get p50':>8} | {'get p95':>8} | {'found by all':>12} | "
        f"{'after ready':>11}"
    )
    print(header)
    print("-" * len(header))
    for size, s, (join_s, join_ready_s) in rows:
        print(
            f"{size:>7} | {statistics.median(s['connect']):>8.1f} ms | "
            f"{pct(s['connect'], 0.95):>8.1f} ms | {pct(s['put'], 0.5):>5.1f} ms | "
            f"{pct(s['put'], 0.95):>5.1f} ms | {pct(s['get'], 0.5):>5.1f} ms | "
            f"{pct(s['get'], 0.95):>5.1f} ms | {join_s:>10.2f} s | {join_ready_s:>9.2f} s"
        )
    print("targets: connect <= 30 ms, get p95 <= 300 ms, found by all <= 5 s")


if __name__ == "__main__":
    sys.exit(main())
