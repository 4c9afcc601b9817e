"""P2P benchmark: N real daemons on loopback (default 4, 6, 8), one table.

Columns: connect latency (TCP + Noise + Yamux + our hello, from a fresh host to each daemon),
DHT put and get latency (records of 20 throwaway identities, put by one bench host and read by
another that does not hold them), and the time from starting a new daemon until every daemon
finds it through nodes_find ("found by all" counts from spawning the process, interpreter
start included; "after ready" from the moment it wrote daemon.json).
Targets: connect <= 30 ms, get p95 <= 300 ms, found by all <= 5 s.

usage: python bench/p2p.py [--sizes 4 6 8] [--records 20]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the `p2p` package: run as a script, its folder would shadow it.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import trio  # noqa: E402

from daemon.devnet import DaemonProcess, Devnet  # noqa: E402
from p2p import identity, records  # noqa: E402
from p2p.discovery import DiscoverySettings, RecordValidator  # noqa: E402
from p2p.host import Libp2pNetwork, quiet_libp2p_logs  # noqa: E402

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


def bench_host() -> Libp2pNetwork:
    settings = DiscoverySettings(network_id="bench")
    return Libp2pNetwork(
        identity.NodeIdentity.generate(),
        network_id="bench",
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht_namespace=records.NAMESPACE,
        dht_validator=RecordValidator(settings, time.time, lambda reason: None),
        dht_timeout_s=5.0,
    )


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
    args = parser.parse_args()
    quiet_libp2p_logs()
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
