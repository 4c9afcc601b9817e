"""vDAG benchmark: what running a graph adds over calling its blocks directly (issue 18).

Every measurement below is interleaved with the others: each is called `--round` times in
turn, round after round, until each has `--calls` samples (after 20 warm-up calls each), so
that a change in the machine's load falls on all of them alike. Times are of one call after
another, in ms; p50 and p99 of the samples.

Default: two whole daemons A and B in this process, on the in-memory network with no added
latency (the executor, the block protocol's msgpack, the registry lookups and the sandbox
are the real ones; the network hop is an in-memory transfer, not TCP). A no-op Python block
("noop": its on_data returns its input) is served by A as "local" and by B as "remote".
Lines:

- `block called directly (sandbox)`: A's sandbox pool calls the local block's eval (what the
  block costs by itself, no vDAG);
- `remote block called directly (block protocol)`: A calls B's block over the multiplexed
  block stream the runner uses (`BlockStreams.call`, no vDAG);
- `no-op policy call (sandbox)`: A's sandbox pool calls a no-op policy's eval directly;
- `vDAG localN / remoteN (N nodes)`: a chain of N nodes of that block run by A
  (`VdagService.infer` on a compiled plan);
- `vDAG polN`: the local chain with a no-op pre- and post-processing policy on every node;
- `find and compile the plan`: what vdag_infer does per request before running (not in the
  chains' times);
- `overhead per node, local block, N`: (p50 of localN - N x p50 of the local direct call) / N,
  and the same with p99s;
- `overhead per node, remote block, N`: (p50 of remoteN - N x p50 of the remote direct call)
  / N, and the same with p99s;
- `overhead per policy call, N`: (p50 of polN - p50 of localN) / 2N (each policy call's
  whole cost inside the vDAG, its sandbox call included), and the same with p99s;
- no-op policy calls per second through the sandbox, one caller (from the mean of the direct
  policy calls; bench/sandbox.py measures more callers and workers).

`--procs`: two daemon processes A and B (daemon.devnet) over libp2p on TCP loopback; the
bench process has its own libp2p host on the devnet's network and its own sandbox pool.
Lines:

- `vdag_infer NAME`: one JSON-RPC call to A running vDAG NAME (HTTP included), timed in the
  calling thread: chains of 1 and N nodes of A's block (localK), of B's block (remoteK), of
  A's block with a no-op pre- and post-processing policy on every node (polK), and fan-outs
  of N nodes side by side (localfanN, remotefanN);
- `per node (KIND, block call included)`: the slope (p50 of KIND N - p50 of KIND 1) /
  (N - 1), for A's block, B's block, and A's block with its 2 policies (pol): what one more
  sequential node costs, its block call included (the HTTP call, the plan lookup and the
  first node cancel), and the same with p99s;
- `one step of KIND N inside A (its trace)`: each step's time from its start to its end in
  the executor's trace that vdag_infer answers (A's runner, the hop and B's block call; not
  the HTTP call nor the executor between steps);
- `local block called directly (sandbox, bench process)`: the bench's own sandbox pool (the
  daemons' [sandbox] settings: the defaults) calls the same block package's eval;
- `remote block called directly (mux stream to B)`: the bench's host calls B's block over
  the block protocol the runner uses (`/gridmesh/vdag-block-mux/1.0.0`, `BlockStreams`, the
  stream kept open; the same BlockCall as the runner sends), no vDAG;
- `vDAG overhead per local node` = local slope - local direct call, p50 (p99: the p99s);
- `vDAG overhead per remote node` = remote slope - remote direct call, p50 (p99: the p99s);
- `overhead per policy call` = (pol slope - local slope) / 2, p50 (p99: the p99s);
- `libp2p round trip, kept stream`: one frame the size of a block call each way over a kept
  libp2p stream between the bench's host and a bare host in another process (no vDAG, no
  block: the floor of a remote hop here), and `per remote node beyond that` = remote slope -
  that round trip (p50s);
- `per parallel node (KIND block)`: (p50 of KINDfanN - p50 of KIND1) / (N - 1), p99 alike.

Slopes and differences of p99s are noisy (each p99 is ~3 samples of 300); a negative value
is noise around zero. The last line is a JSON summary: each per-node overhead (p50, p99, at
each N) against the 1 ms target, and the policy call against 0.5 ms; `met` is judged on p50.

Targets (issue 18): <= 1 ms overhead per node on loopback; a sandboxed no-op policy call
<= 0.5 ms p50.

usage: python bench/vdag.py [--calls 300] [--round 20] [--nodes 1,4,8] [--procs]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
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

TARGET_NODE_MS = 1.0
TARGET_POLICY_MS = 0.5
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
PAYLOAD = {"text": "x" * 64}

Probe = Callable[[], Awaitable[float]]  # one call; returns its seconds
Row = tuple[str, float, float]  # what, p50 s, p99 s


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def packages(root: Path) -> tuple[Path, dict[str, str]]:
    """The no-op block's folder, and the no-op policy's rule (URI and digest)."""
    block = write(
        root / "noop",
        {"block.py": BLOCK, "manifest.json": '{"name": "noop", "entry": "block:Block"}'},
    )
    policy = write(
        root / "policy", {"function.py": POLICY, "manifest.json": '{"name": "noop-policy"}'}
    )
    return block, {"policyRuleURI": str(policy), "policyRuleDigest": load_package(policy).digest}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def p50_p99(values: list[float]) -> tuple[float, float]:
    return percentile(values, 0.5), percentile(values, 0.99)


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


def fan(name: str, block: str, n: int) -> dict[str, Any]:
    """`n` nodes of `block`, each on the vDAG's input, all of them its output (in parallel)."""
    nodes = [{"nodeLabel": f"f{i}", "nodeType": "block", "manualBlockId": block} for i in range(n)]
    labels = [f"f{i}" for i in range(n)]
    graph = {"input": labels, "output": labels, "connections": []}
    return {"vdagName": name, "vdagVersion": "1", "nodes": nodes, "graph": graph}


def block_call(block: str) -> BlockCall:
    """The call a vDAG's runner sends for node n0 of a 1-node chain of `block` (the same
    fields: daemon.vdags.runner, RunContext.for_step)."""
    context = {"vdag": f"{block}1:1", "node": "n0", "block": block, "session": None}
    return BlockCall(block=block, input=PAYLOAD, timeout_s=30.0, context=context)


def timing(fn: Callable[[], Awaitable[Any]]) -> Probe:
    async def probe() -> float:
        start = time.perf_counter()
        await fn()
        return time.perf_counter() - start

    return probe


async def interleaved(probes: dict[str, Probe], calls: int, round_: int) -> dict[str, list[float]]:
    """Each probe `calls` times: `round_` calls of each in turn, round after round (after
    min(20, calls) warm-up calls of each), so that load changes fall on all alike."""
    for probe in probes.values():
        for _ in range(min(20, calls)):
            await probe()
    out: dict[str, list[float]] = {name: [] for name in probes}
    while any(len(samples) < calls for samples in out.values()):
        for name, probe in probes.items():
            for _ in range(min(round_, calls - len(out[name]))):
                out[name].append(await probe())
    return out


def print_rows(rows: list[Row]) -> None:
    print(f"{'what':68} {'p50':>9} {'p99':>9}")
    for name, p50, p99 in rows:
        high = "" if math.isnan(p99) else f"{p99 * 1e3:9.3f}"
        print(f"{name:68} {p50 * 1e3:9.3f} {high:>9}")


def judged(p50: float, p99: float, target_ms: float) -> dict[str, Any]:
    return {
        "p50_ms": round(p50 * 1e3, 4),
        "p99_ms": round(p99 * 1e3, 4),
        "met": p50 * 1e3 <= target_ms,
    }


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# -- in one process, on the in-memory network -----------------------------------------------


async def bench(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="gridmesh-bench-vdag-"))
    block, rule = packages(root)
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
        args_ = {"parameters": None, "input_data": PAYLOAD, "context": {}}
        noop_policy = service.store.ref(
            PolicyRule(rule["policyRuleURI"], {}, {}, rule["policyRuleDigest"]), "bench"
        )
        pargs = {"parameters": {}, "input_data": PAYLOAD, "context": {}}
        remote_call = block_call("remote")

        async def remote_direct() -> None:
            reply = await service.runner.streams.call(b.peer_id, remote_call)
            assert reply.ok, reply.message

        probes: dict[str, Probe] = {
            "direct": timing(lambda: pool.call(ref, "eval", args_)),
            "remote direct": timing(remote_direct),
            "policy": timing(lambda: pool.call(noop_policy, "eval", pargs)),
        }
        for n in args.nodes:
            specs = {
                f"local{n}": chain(f"local{n}", "local", n, None),
                f"remote{n}": chain(f"remote{n}", "remote", n, None),
                f"pol{n}": chain(f"pol{n}", "local", n, rule),
            }
            for spec in specs.values():

                async def applied(spec: dict[str, Any] = spec) -> bool:
                    try:  # refused until A has B's block announcement
                        await a.call("vdag_apply", {"value": spec})
                    except Exception:
                        return False
                    return True

                await net.wait_for(applied, 20, f"{spec['vdagName']} to apply")

            async def known(name: str) -> bool:
                try:
                    resolve_plan(a.daemon.replica, name, None)
                except Exception:
                    return False
                return True

            for name in specs:
                await net.wait_for(lambda name=name: known(name), 20, f"{name} to be runnable")
                spec_, plan = resolve_plan(a.daemon.replica, name, None)

                async def run(plan: Any = plan, spec_: Any = spec_) -> None:
                    await service.infer(plan, spec_.controller, PAYLOAD, deadline_s=30)

                probes[name] = timing(run)

            async def resolve(name: str = f"local{n}") -> None:
                resolve_plan(a.daemon.replica, name, None)

            probes[f"compile local{n}"] = timing(resolve)
        loads = [load_average()]
        samples = await interleaved(probes, args.calls, args.round)
        loads.append(load_average())
        nursery.cancel_scope.cancel()

    d50, d99 = p50_p99(samples["direct"])
    r50, r99 = p50_p99(samples["remote direct"])
    rows: list[Row] = [
        ("block called directly (sandbox)", d50, d99),
        ("remote block called directly (block protocol)", r50, r99),
        ("no-op policy call (sandbox)", *p50_p99(samples["policy"])),
    ]
    overheads: list[Row] = []
    summary: dict[str, Any] = {"local": {}, "remote": {}, "policy_in_vdag": {}}
    for n in args.nodes:
        s = "s" if n > 1 else ""
        for name in (f"local{n}", f"remote{n}", f"pol{n}"):
            rows.append((f"vDAG {name} ({n} node{s})", *p50_p99(samples[name])))
        compiled = p50_p99(samples[f"compile local{n}"])
        rows.append((f"find and compile the plan of local{n} (JSON-RPC does)", *compiled))
        for kind, base50, base99 in (("local", d50, d99), ("remote", r50, r99)):
            c50, c99 = p50_p99(samples[f"{kind}{n}"])
            per = ((c50 - n * base50) / n, (c99 - n * base99) / n)
            overheads.append((f"overhead per node, {kind} block, N={n}", *per))
            summary[kind][f"N={n}"] = judged(*per, TARGET_NODE_MS)
        w50, w99 = p50_p99(samples[f"pol{n}"])
        wo50, wo99 = p50_p99(samples[f"local{n}"])
        per = ((w50 - wo50) / (2 * n), (w99 - wo99) / (2 * n))
        overheads.append((f"overhead per policy call, N={n}", *per))
        summary["policy_in_vdag"][f"N={n}"] = judged(*per, TARGET_POLICY_MS)
    cores = len(os.sched_getaffinity(0))
    print(
        f"\nin one process, in-memory network; {args.calls} calls each, interleaved in rounds "
        f"of {args.round}; {cores} cores; load average before {loads[0]}, after {loads[1]}; ms"
    )
    print_rows(rows + overheads)
    policy = samples["policy"]
    print(f"\nno-op policy calls per second, one caller: {len(policy) / sum(policy):,.0f}")
    result = {
        "mode": "memnet",
        "targets": {"per_node_overhead_ms": TARGET_NODE_MS, "policy_call_p50_ms": TARGET_POLICY_MS},
        "per_node_overhead": {"local": summary["local"], "remote": summary["remote"]},
        "policy_call": judged(*p50_p99(policy), TARGET_POLICY_MS),
        "policy_overhead_in_vdag": summary["policy_in_vdag"],
        "load_average": loads,
    }
    print(json.dumps(result))


# -- two daemon processes over libp2p ---------------------------------------------------------

ECHO = "/gridmesh-bench/echo/1.0.0"


def _bare_host(network_id: str) -> Any:
    from p2p import identity, records
    from p2p.discovery import DiscoverySettings, RecordValidator
    from p2p.host import Libp2pNetwork

    settings = DiscoverySettings(network_id=network_id)
    return Libp2pNetwork(
        identity.NodeIdentity.generate(),
        network_id=network_id,
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht_namespace=records.NAMESPACE,
        dht_validator=RecordValidator(settings, time.time, lambda reason: None),
        dht_timeout_s=5.0,
    )


async def echo_server(network_id: str) -> None:
    """A bare libp2p host answering each frame of ECHO streams with itself (prints its
    address, then serves until killed)."""
    net = _bare_host(network_id)

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


async def measure_procs(
    args: argparse.Namespace,
    a: Any,
    b: Any,
    names: list[str],
    echo_addr: str,
    network_id: str,
    block: Path,
    root: Path,
) -> tuple[dict[str, list[float]], list[str]]:
    """All of --procs's measurements, interleaved (see the module's docstring)."""
    from daemon.sandbox.config import SandboxConfig
    from daemon.sandbox.pool import SandboxPool
    from daemon.vdags.pyblocks import load_block
    from daemon.vdags.streams import BlockStreams

    net = _bare_host(network_id)
    client = a.client(timeout=60)

    longest = max(args.nodes)
    steps: dict[str, list[float]] = {f"steps local{longest}": [], f"steps remote{longest}": []}

    def rpc_probe(name: str) -> Probe:
        def once() -> float:
            start = time.perf_counter()
            result = client.call("vdag_infer", {"name": name, "input": PAYLOAD})
            took = time.perf_counter() - start
            if f"steps {name}" in steps:  # each step's time inside A (the executor's trace)
                steps[f"steps {name}"] += [
                    s["finished_s"] - s["started_s"] for s in result["steps"]
                ]
            return took

        async def probe() -> float:  # timed in the thread: trio's hand-over not counted
            return await trio.to_thread.run_sync(once)

        return probe

    async with net.run(), trio.open_nursery() as nursery:
        peer_b = await net.connect(b.addr)
        echo = await net.open_stream(await net.connect(echo_addr), ECHO, 1 << 20)
        frame = encode(block_call("remote"))
        streams = BlockStreams(net)
        await nursery.start(streams.run)
        remote_call = block_call("remote")

        async def remote_direct() -> None:
            reply = await streams.call(peer_b, remote_call)
            assert reply.ok, reply.message

        async def round_trip() -> None:
            await echo.send(frame)
            await echo.receive()

        config = SandboxConfig()
        local = load_block("local", block, digest=None, allowed=config.allowed_packages)
        args_ = {"parameters": None, "input_data": PAYLOAD, "context": {}}
        async with SandboxPool(config, hidden_paths=[root]) as pool:
            probes: dict[str, Probe] = {
                "local direct": timing(lambda: pool.call(local.ref, "eval", args_)),
                "remote direct": timing(remote_direct),
                "round trip": timing(round_trip),
            }
            probes.update({name: rpc_probe(name) for name in names})
            loads = [load_average()]
            samples = await interleaved(probes, args.calls, args.round)
            loads.append(load_average())
        assert streams.opened == 1, "the direct calls took more than one stream"
        nursery.cancel_scope.cancel()
    samples.update(steps)
    samples["frame bytes"] = [float(len(frame))]
    return samples, loads


def bench_procs(args: argparse.Namespace) -> None:
    import logging
    import subprocess

    from daemon.devnet import Devnet, wait_for
    from p2p.host import quiet_libp2p_logs

    root = Path(tempfile.mkdtemp(prefix="gridmesh-bench-vdag-procs-"))
    block, rule = packages(root)
    longest = max(args.nodes)
    ends = sorted({1, longest})
    with Devnet(2, root=root / "net") as net:
        net.wait_all_found(60)
        a, b = net.daemons
        a.call("vdag_block_serve", {"block": "local", "path": str(block)}, timeout=120)
        b.call("vdag_block_serve", {"block": "remote", "path": str(block)}, timeout=120)
        specs = [chain(f"{kind}{n}", kind, n, None) for kind in ("local", "remote") for n in ends]
        specs += [chain(f"pol{n}", "local", n, rule) for n in ends]
        specs += [fan(f"{kind}fan{longest}", kind, longest) for kind in ("local", "remote")]
        for spec in specs:

            def applied(spec: dict[str, Any] = spec) -> bool:
                try:
                    a.call("vdag_apply", {"value": spec})
                except Exception:
                    return False
                return True

            wait_for(applied, 30, f"{spec['vdagName']} to apply", poll_s=0.2)
        names = [spec["vdagName"] for spec in specs]
        network_id = b.call("node_info")["network_id"]
        quiet_libp2p_logs(logging.CRITICAL)
        server = subprocess.Popen(
            [sys.executable, __file__, "--echo-server", network_id],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            echo_addr = server.stdout.readline().strip()
            samples, loads = trio.run(
                measure_procs, args, a, b, names, echo_addr, network_id, block, root
            )
        finally:
            server.kill()
            server.wait()
    report_procs(args, names, samples, loads)


def report_procs(
    args: argparse.Namespace, names: list[str], samples: dict[str, list[float]], loads: list[str]
) -> None:
    longest = max(args.nodes)
    span = longest - 1

    def slope(kind: str, many: str) -> tuple[float, float]:
        one, wide = p50_p99(samples[f"{kind}1"]), p50_p99(samples[many])
        return (wide[0] - one[0]) / span, (wide[1] - one[1]) / span

    cores = len(os.sched_getaffinity(0))
    print(
        f"\nprocesses over libp2p on loopback; {args.calls} calls each, interleaved in rounds "
        f"of {args.round}; {cores} cores; load average before {loads[0]}, after {loads[1]}; ms"
    )
    rows: list[Row] = [(f"vdag_infer {name}", *p50_p99(samples[name])) for name in names]
    local, remote, pol = (slope(kind, f"{kind}{longest}") for kind in ("local", "remote", "pol"))
    kinds = ("local block", "remote block", "local block + 2 policies")
    for kind, per in zip(kinds, (local, remote, pol), strict=True):
        rows.append((f"per node ({kind}, block call included), 1 vs {longest} nodes", *per))
    for kind in ("local", "remote"):
        what = f"one step of {kind}{longest} inside A (its trace), each step"
        rows.append((what, *p50_p99(samples[f"steps {kind}{longest}"])))
    ld, rd, rt = (p50_p99(samples[k]) for k in ("local direct", "remote direct", "round trip"))
    rows.append(("local block called directly (sandbox, bench process)", *ld))
    rows.append(("remote block called directly (mux stream to B)", *rd))
    over_local = (local[0] - ld[0], local[1] - ld[1])
    over_remote = (remote[0] - rd[0], remote[1] - rd[1])
    over_policy = ((pol[0] - local[0]) / 2, (pol[1] - local[1]) / 2)
    rows.append(("vDAG overhead per local node (slope - direct)", *over_local))
    rows.append(("vDAG overhead per remote node (slope - direct)", *over_remote))
    rows.append(("overhead per policy call ((pol - local slope) / 2)", *over_policy))
    frame = int(samples["frame bytes"][0])
    rows.append((f"libp2p round trip, kept stream, {frame} B frame (no vDAG)", *rt))
    rows.append(
        ("per remote node beyond that (block call included)", remote[0] - rt[0], float("nan"))
    )
    for kind in ("local", "remote"):
        per = slope(kind, f"{kind}fan{longest}")
        rows.append((f"per parallel node ({kind} block), 1 vs {longest} side by side", *per))
    print_rows(rows)
    result = {
        "mode": "procs",
        "targets": {"per_node_overhead_ms": TARGET_NODE_MS, "policy_call_p50_ms": TARGET_POLICY_MS},
        "per_node_overhead": {
            "local": judged(*over_local, TARGET_NODE_MS),
            "remote": judged(*over_remote, TARGET_NODE_MS),
        },
        "policy_overhead_in_vdag": judged(*over_policy, TARGET_POLICY_MS),
        "load_average": loads,
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--round", type=int, default=20, help="calls of each in turn")
    parser.add_argument("--nodes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    parser.add_argument(
        "--procs", action="store_true", help="two daemon processes over libp2p (TCP loopback)"
    )
    parser.add_argument("--echo-server", metavar="NETWORK_ID", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.calls < 1 or args.round < 1 or min(args.nodes) < 1:
        parser.error("--calls, --round and --nodes must be positive")
    if args.echo_server:
        trio.run(echo_server, args.echo_server)
    elif args.procs:
        if max(args.nodes) < 2:
            parser.error("--procs needs a chain of at least 2 nodes (--nodes)")
        bench_procs(args)
    else:
        trio.run(bench, args)


if __name__ == "__main__":
    main()
