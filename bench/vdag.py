"""vDAG benchmark: what running a graph adds over calling its blocks directly.

Two whole daemons in this process, on the in-memory network with no added latency (the
executor, the block protocol's msgpack, the registry lookups and the sandbox are the real
ones; the network hop is an in-memory transfer, not TCP). A no-op Python block ("noop": its
on_data returns its input) is served by daemon A (local to the vDAG's runner) and daemon B
(remote). Measured, one request after another, each `--calls` times:

- direct: the block called through A's sandbox pool (what the block costs by itself);
- a chain of N nodes of the local block, run by A (`VdagService.infer`): overhead per node
  = (p50 of the chain - N x p50 direct) / N, and the same at p99;
- the chain on the remote block (B's sandbox, over the block protocol);
- the chain with a pre- and a post-processing no-op policy on every node: overhead per
  policy call = (p50 with - p50 without) / 2N;
- finding and compiling the plan, which vdag_infer does per request (not in the chains'
  times, which run a compiled plan);
- no-op policy calls per second through the sandbox, one caller (bench/sandbox.py measures
  it with more callers and workers).

Targets (issue 18): <= 1 ms overhead per node; a sandboxed no-op policy call <= 0.5 ms p50.

`--procs`: instead, two daemon processes over libp2p on TCP loopback, timed from a JSON-RPC
client; the per-node cost is the slope between a 1-node and the longest chain (the block's
own call and the hop included). Beside it, for scale: the round trip of one frame each way
over a kept libp2p stream between two bare hosts in two processes (no vDAG, no block: the
floor of a remote node's hop on this machine) and what a remote node costs beyond it (p50s
of separate runs: noisy); and fan-outs of the longest chain's length of local and remote
nodes run in parallel (a remote fan-out's calls go to one peer at once).

usage: python bench/vdag.py [--calls 300] [--nodes 1,4,8] [--procs]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.sandbox import load_package  # noqa: E402
from daemon.vdag_methods import resolve_plan  # noqa: E402
from daemon.vdags.protocol import BlockCall, encode  # noqa: E402
from p2p.testing.memnet import MemoryNetwork  # noqa: E402
from scheduler.vdag import PolicyRule  # noqa: E402
from tests.daemon.harness import MemoryCluster  # noqa: E402

BLOCK = """class Block:
    def __init__(self, context):
        pass

    def on_data(self, entry):
        return True, entry

    def health(self):
        return True, "ok"
"""
POLICY = """class AIOSv1PolicyRule:
    def __init__(self, rule_id, settings, parameters):
        pass

    def eval(self, parameters, input_data, context):
        return input_data

    def management(self, action, data):
        return None
"""


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def chain(name: str, block: str, n: int, policy: dict[str, Any] | None) -> dict[str, Any]:
    extra = (
        {"preprocessingPolicyRule": policy, "postprocessingPolicyRule": policy} if policy else {}
    )
    nodes = [
        {"nodeLabel": f"n{i}", "nodeType": "block", "manualBlockId": block, **extra}
        for i in range(n)
    ]
    edges = [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(n - 1)]
    graph = {"input": ["n0"], "output": [f"n{n - 1}"], "connections": edges}
    return {"vdagName": name, "vdagVersion": "1", "nodes": nodes, "graph": graph}


async def timed(calls: int, fn: Any) -> list[float]:
    for _ in range(min(20, calls)):  # warm
        await fn()
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - start)
    return out


def row(name: str, samples: list[float]) -> tuple[str, float, float]:
    return name, percentile(samples, 0.5), percentile(samples, 0.99)


async def bench(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="gridmesh-bench-vdag-"))
    block = write(
        root / "noop",
        {"block.py": BLOCK, "manifest.json": '{"name": "noop", "entry": "block:Block"}'},
    )
    policy = write(
        root / "policy", {"function.py": POLICY, "manifest.json": '{"name": "noop-policy"}'}
    )
    rule = {"policyRuleURI": str(policy), "policyRuleDigest": load_package(policy).digest}
    async with trio.open_nursery() as nursery:
        net = MemoryCluster(root / "net", nursery)
        net.hub = MemoryNetwork(seed=0, latency_s=0.0, fanout=8)
        await net.start(2)
        await net.wait_for(net.all_found, 60, "the daemons to find each other")
        a, b = net.daemons
        await a.call("vdag_block_serve", {"block": "local", "path": str(block)})
        await b.call("vdag_block_serve", {"block": "remote", "path": str(block)})
        service = a.daemon.vdags
        pool = await service.pool()
        print(f"sandbox layers: {pool.layers}")
        ref = service.blocks["local"].ref
        payload = {"text": "x" * 64}
        args_ = {"parameters": None, "input_data": payload, "context": {}}
        direct = await timed(args.calls, lambda: pool.call(ref, "eval", args_))
        noop_policy = service.store.ref(
            PolicyRule(str(policy), {}, {}, rule["policyRuleDigest"]),
            "bench",
        )
        pargs = {"parameters": {}, "input_data": payload, "context": {}}
        policy_calls = await timed(args.calls, lambda: pool.call(noop_policy, "eval", pargs))

        rows = [
            row("block called directly (sandbox)", direct),
            row("no-op policy call (sandbox)", policy_calls),
        ]
        per_node: list[tuple[str, float, float]] = []
        for n in args.nodes:
            specs = {
                f"local{n}": chain(f"local{n}", "local", n, None),
                f"remote{n}": chain(f"remote{n}", "remote", n, None),
                f"pol{n}": chain(f"pol{n}", "local", n, rule),
            }
            for spec in specs.values():
                await a.call("vdag_apply", {"value": spec})

            async def known(name: str) -> bool:
                try:
                    resolve_plan(a.daemon.replica, name, None)
                except Exception:
                    return False
                return True

            for name in specs:
                await net.wait_for(lambda name=name: known(name), 20, f"{name} to be runnable")
            results = {}
            for name in specs:
                spec_, plan = resolve_plan(a.daemon.replica, name, None)

                async def run(plan=plan, spec_=spec_) -> None:
                    await service.infer(plan, spec_.controller, payload, deadline_s=30)

                results[name] = await timed(args.calls, run)
                rows.append(row(f"vDAG {name} ({n} node{'s' if n > 1 else ''})", results[name]))
            name = f"local{n}"

            async def resolve(name: str = name) -> None:
                resolve_plan(a.daemon.replica, name, None)

            rows.append(
                row(
                    f"find and compile the plan of {name} (JSON-RPC does)",
                    await timed(args.calls, resolve),
                )
            )
            d50, d99 = percentile(direct, 0.5), percentile(direct, 0.99)
            for kind in ("local", "remote"):
                s = results[f"{kind}{n}"]
                per_node.append(
                    (
                        f"overhead per node, {kind} block, N={n}",
                        (percentile(s, 0.5) - n * d50) / n,
                        (percentile(s, 0.99) - n * d99) / n,
                    )
                )
            w, wo = results[f"pol{n}"], results[f"local{n}"]
            per_node.append(
                (
                    f"overhead per policy call, N={n}",
                    (percentile(w, 0.5) - percentile(wo, 0.5)) / (2 * n),
                    (percentile(w, 0.99) - percentile(wo, 0.99)) / (2 * n),
                )
            )
        nursery.cancel_scope.cancel()
    cores = len(os.sched_getaffinity(0))
    print(f"\n{args.calls} calls each, one after another; {cores} cores; ms")
    print(f"{'what':58} {'p50':>9} {'p99':>9}")
    for name, p50, p99 in rows + per_node:
        print(f"{name:58} {p50 * 1e3:9.3f} {p99 * 1e3:9.3f}")
    mean = sum(policy_calls) / len(policy_calls)
    print(f"\nno-op policy calls per second, one caller: {1 / mean:,.0f}")
    print(json.dumps({"targets": {"per_node_ms": 1.0, "policy_call_p50_ms": 0.5}}))


def fan(name: str, block: str, n: int) -> dict[str, Any]:
    """`n` nodes of `block`, each on the vDAG's input, all of them its output (in parallel)."""
    nodes = [{"nodeLabel": f"f{i}", "nodeType": "block", "manualBlockId": block} for i in range(n)]
    labels = [f"f{i}" for i in range(n)]
    graph = {"input": labels, "output": labels, "connections": []}
    return {"vdagName": name, "vdagVersion": "1", "nodes": nodes, "graph": graph}


ECHO = "/gridmesh-bench/echo/1.0.0"


def _bare_host() -> Any:
    from p2p import identity, records
    from p2p.discovery import DiscoverySettings, RecordValidator
    from p2p.host import Libp2pNetwork

    settings = DiscoverySettings(network_id="bench-vdag")
    return Libp2pNetwork(
        identity.NodeIdentity.generate(),
        network_id="bench-vdag",
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht_namespace=records.NAMESPACE,
        dht_validator=RecordValidator(settings, time.time, lambda reason: None),
        dht_timeout_s=5.0,
    )


async def echo_server() -> None:
    """A bare libp2p host answering each frame of ECHO streams with itself (prints its
    address, then serves until killed)."""
    net = _bare_host()

    async def echo(stream: Any) -> None:
        while True:
            try:
                frame = await stream.receive()
            except Exception:
                return
            await stream.send(frame)

    async with net.run():
        net.set_stream_handler(ECHO, echo, 1 << 20)
        print(net.listen_addrs()[0], flush=True)
        await trio.sleep_forever()


async def echo_client(addr: str, calls: int, payload: bytes) -> list[float]:
    net = _bare_host()
    async with net.run():
        stream = await net.open_stream(await net.connect(addr), ECHO, 1 << 20)

        async def once() -> None:
            await stream.send(payload)
            await stream.receive()

        return await timed(calls, once)


def libp2p_round_trips(calls: int, payload: bytes) -> list[float]:
    """Round trips of `payload` over a kept libp2p stream to a bare host in another process."""
    import logging
    import subprocess

    from p2p.host import quiet_libp2p_logs

    quiet_libp2p_logs(logging.CRITICAL)
    server = subprocess.Popen(
        [sys.executable, __file__, "--echo-server"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        addr = server.stdout.readline().strip()
        return trio.run(echo_client, addr, calls, payload)
    finally:
        server.kill()
        server.wait()


def bench_procs(args: argparse.Namespace) -> None:
    """Two daemon processes over libp2p on TCP loopback, timed from a JSON-RPC client: the
    per-node cost is the slope between a 1-node and an N-node chain (the block's own
    sandbox call and the libp2p hop included; the HTTP call and the plan lookup cancel)."""
    from daemon.devnet import Devnet, wait_for

    root = Path(tempfile.mkdtemp(prefix="gridmesh-bench-vdag-procs-"))
    block = write(
        root / "noop",
        {"block.py": BLOCK, "manifest.json": '{"name": "noop", "entry": "block:Block"}'},
    )
    longest = max(args.nodes)
    with Devnet(2, root=root / "net") as net:
        net.wait_all_found(60)
        a, b = net.daemons
        a.call("vdag_block_serve", {"block": "local", "path": str(block)}, timeout=120)
        b.call("vdag_block_serve", {"block": "remote", "path": str(block)}, timeout=120)
        names = []
        for kind in ("local", "remote"):
            for n in sorted({1, longest}):
                spec = chain(f"{kind}{n}", kind, n, None)

                def applied(spec: dict[str, Any] = spec) -> bool:
                    try:
                        a.call("vdag_apply", {"value": spec})
                    except Exception:
                        return False
                    return True

                wait_for(applied, 30, f"{spec['vdagName']} to apply", poll_s=0.2)
                names.append(spec["vdagName"])
        for kind in ("local", "remote"):
            spec = fan(f"{kind}fan{longest}", kind, longest)
            wait_for(lambda s=spec: bool(a.call("vdag_apply", {"value": s})), 30, "a fan-out")
            names.append(spec["vdagName"])
        client = a.client(timeout=60)
        samples: dict[str, list[float]] = {}
        payload = {"text": "x" * 64}
        for name in names:
            for _ in range(min(20, args.calls)):
                client.call("vdag_infer", {"name": name, "input": payload})
            out = []
            for _ in range(args.calls):
                start = time.perf_counter()
                client.call("vdag_infer", {"name": name, "input": payload})
                out.append(time.perf_counter() - start)
            samples[name] = out
    # the block call's frame, as a remote node sends it (msgpack of a BlockCall)
    frame = encode(BlockCall(block="remote", input=payload, timeout_s=30.0, context={}))
    floor = libp2p_round_trips(args.calls, frame)
    print(f"\nprocesses over libp2p on loopback; {args.calls} JSON-RPC calls each; ms")
    print(f"{'what':58} {'p50':>9} {'p99':>9}")
    for name, out in samples.items():
        print(
            f"{'vdag_infer ' + name:58} {percentile(out, 0.5) * 1e3:9.3f} "
            f"{percentile(out, 0.99) * 1e3:9.3f}"
        )
    for kind in ("local", "remote"):
        one, many = samples[f"{kind}1"], samples[f"{kind}{longest}"]
        per = [(percentile(many, q) - percentile(one, q)) / (longest - 1) for q in (0.5, 0.99)]
        what = f"per node ({kind} block, block call included), 1 vs {longest} nodes"
        print(f"{what:58} {per[0] * 1e3:9.3f} {per[1] * 1e3:9.3f}")
    what = f"libp2p round trip, kept stream, {len(frame)} B frame (no vDAG)"
    print(f"{what:58} {percentile(floor, 0.5) * 1e3:9.3f} {percentile(floor, 0.99) * 1e3:9.3f}")
    one, many = samples["remote1"], samples[f"remote{longest}"]
    per_node = (percentile(many, 0.5) - percentile(one, 0.5)) / (longest - 1)
    what = "per remote node beyond that (block call included)"
    print(f"{what:58} {(per_node - percentile(floor, 0.5)) * 1e3:9.3f} {'':>9}")
    for kind in ("local", "remote"):
        one, wide = samples[f"{kind}1"], samples[f"{kind}fan{longest}"]
        per = [(percentile(wide, q) - percentile(one, q)) / (longest - 1) for q in (0.5, 0.99)]
        what = f"per parallel node ({kind} block), 1 vs {longest} side by side"
        print(f"{what:58} {per[0] * 1e3:9.3f} {per[1] * 1e3:9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--nodes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    parser.add_argument(
        "--procs", action="store_true", help="two daemon processes over libp2p (TCP loopback)"
    )
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        trio.run(echo_server)
    elif args.procs:
        bench_procs(args)
    else:
        trio.run(bench, args)


if __name__ == "__main__":
    main()
