"""Verified work benchmark (issue 20): what spot checks cost, and how fast they catch cheaters.

Setup: a random Llama checkpoint (make_tiny; `--hidden`, `--layers`, float32, CPU) split in two
ranges, each served by three honest shard servers (`ShardServer`), with real threads and real
time. A requester (`RemoteModel` + `generate`, greedy) runs `--generations` generations at
once of `--tokens` tokens each after a short prompt; its routes go through a0 and b0, and
a1, a2, b1, b2 are the replicas its checks run on.

Where the servers run (since session 16): on a network every provider is another machine,
so a check's replica pass takes nothing from the requester's or the route's cores, event
loop or GIL; what the requester's throughput pays for a check is its own verifier and
protocol CPU, the wait for the check's answer (or, speculating, the machinery that hides
it), and the route's extra passes when a waiting generation misses its batch. By default,
then, the routes' servers run in a child process and the replicas in another (`Host`,
reached over Unix sockets: `p2p.localsock`; the replicas announced 0.05 ms slower, so that
routes stay on a0, b0), and this process is the requester alone: its tokens/s and its CPU
are the requester's. The replicas' process runs under SCHED_IDLE (`--no-sched-idle`: not),
on the cores the requester and routes leave idle, as if on machines of their own (these are
2 cores shared with other work: under load a check's answer waits for an idle core, which
is where speculation should hide the wait). The routes run apart too, rather than in this
process, so that the verifier's CPU does not hold the route's passes on one GIL, nor the
route's passes the verifier's, which no network does; they keep this process's priority,
since their passes are the requester's throughput. It is still one machine: the routes and
the requester share 2 cores. `--routes-here` (what `--replicas-apart` was before session
16): the routes' servers in this process, the replicas apart. `--one-process` (the default
before session 16): every server in this process on the in-memory network, where a
replica's pass holds the routes' back (session 15 measured +0.79 route passes a check).

Tables 1a and 1b, overhead: aggregate tokens/s without a verifier, and with spot checks at 0, 2
and 10 % of the steps of each hop (a flat rate: `probation_rate` = `rate`), after a warm-up that
runs every server (routes and replicas: a check on every step, with a verifier of its own, so
that no configuration's first round pays for a server's first passes), rounds interleaved
(`--rounds`, each in another order; every configuration of a round draws its checks from the
round's seed, so that those of one rate check about as many steps in it). The overhead is paired
round by round (since session 17): each round's ratio of tokens/s with checks to its run without
(and of CPU ms per token), the overhead 1 - their geometric mean over the rounds (CPU: the
geometric mean - 1), with a 95 % interval from a bootstrap over rounds; the column after it
gives the median and the first to third quartile of the rounds' own ratios (how much one round's
figure moves). Under table 1a: the 0 % row as the noise floor (a verifier on and no check drawn:
its hooks cost about 10 us of the requester's CPU a token, some 0.3 % of a token's wall, so the
rest of what the row reads is the bench's noise), each rate against the 0 % row, paired (what
the checks cost beyond the machinery), and the overheads from the rounds' totals (the estimate
before session 17). Table 1a is what the requester sees: tokens/s and this process's CPU (the
requester's alone by default; with `--routes-here` the routes' too; with `--one-process`
everything), and the routes' forward passes a token. Table 1b is the network's extra compute,
never the requester's throughput: the routes' CPU, the replicas' (and as a share of the
routes'), all processes' together with its overhead, and what one check cost it. Why paired
ratios, each round weighing the same: a round's two runs ran seconds apart under the same load,
and on this shared 2-core machine the load moves one run's figures by 10 points and more
(`uptime` beside every number; a run's tokens/s hardly follows the run's before it, so the noise
is per run and only more rounds narrow the interval): totals let the slowest, most loaded rounds
weigh most, and a round's ratio moves only itself. A mean, not a median: at 2 % a round holds
about 15 checks, a count that is skewed, and the mean's is the rate's. Why 10 rounds by default
(3 before): three rounds' interval spans some 20 points at 2 %; at 20 rounds the 0 % row's
interval still spans 8-10 points (sessions 15-16), so a 5 % target needs some 40 rounds or more
on a quiet machine (`--pool` pairs the rounds of several `--keep` files together, as one
longer run). `--keep FILE` writes every round's runs (JSON) to compare estimators on
them, with the cores other work kept busy during each run (/proc/stat less the bench's own CPU).
A fit of the rounds' ratios on that load was tried in session 17 and dropped: other work here
runs at the bench's priority (nice 19), so a run with checks, taking more CPU, leaves it less
(-0.07 cores at 2 %, -0.13 at 10 %, standard error 0.02-0.03, load 3-10), and the fit read the
checks' own cost as a lighter load, adding 6-12 points to the overheads. "CPU per check" is what
one checked step cost the network (all processes), in hop-steps (half a token's CPU without
checks): at a rate r the overhead is about r times it (each token's two hops are drawn, and a
token costs two hop-steps). Every checked step runs again on a replica, in the replica session
that follows the hop for the generation: the hop's inputs since its last check and the step's,
in one pass ("replica positions per check"; a hop's first check of a generation catches up on
the whole prefix). Also the largest honest difference seen between a provider and its replica
(row-relative; `daemon.verify.compare` allows 1e-5 in float32). `--breakdown` adds where the
time goes per configuration (its servers' columns count only those in this process: all of them
with `--one-process`): the cores the process kept busy (CPU / wall: it is one process, but its
passes run in worker threads, so the wall overhead is not the CPU one), the routes' servers' and
the replicas' forward passes and compute time (and the replicas' CPU per pass: what a check's
catch-up costs), how long the token loops waited for checks (at a step's end; a speculating
generation in `settle`: at its end, or with too many tokens held), and the verifier's hooks' CPU
in a step it does not check (what the machinery costs at a 0 % rate; the hooks of such a step
never yield, so their thread's CPU time is theirs alone). Its timing costs about ten clock reads
per step (some 10 us here: the thread CPU clock is a system call), charged to every row with a
verifier and not to "none": read the overheads from a run without `--breakdown`.

`--spread` (with `--one-process`): generation i's route is a{i % 3}, b{i % 3} (announced 0.05
ms faster to it), so every server carries traffic and a check's pass on its replica may share a
batch with that replica's own steps (`daemon.shards.batching`), as in a network where the
replicas serve requesters of their own; with `--generations 24` each server carries 8
generations, as the routes' two servers do by default. In the breakdown every server counts as
a route's then.

Speculation and gathering (`verify.speculate`, on by default since session 16; `gather_s`, 0): a
speculating generation does not wait for a step's checks (a token goes out only once its steps
passed: `daemon.shards.token_loop`), and its checks may wait up to `gather_s` for others so
that a replica runs several in one pass; the line under the table says how many went per
round. `--waiting` adds, interleaved in the same rounds, each rate above 0 with the other
mechanism than the default's: rows "spec" (speculating) where the default waits, rows "wait"
where it speculates. `--gather S ...` adds each rate above 0, speculating, with `gather_s` S
(rows "gS"). Each such row is also set against the default's row of its rate, paired round
by round as against the run without checks (a line under the table): the difference the
choice of mechanism makes, with its own 95 % interval.

Table 2, steps to detection: a fourth server of the first range cheats in each mode
(`daemon.verify.cheat`; `corrupt` on half of its steps, the others on all) and announces the
lowest round trip, so routes go through it; at a flat 2 % rate, the steps it served until the
first failed check, over `--seeds` seeded runs, against `daemon.verify.detection`'s mean; and
`corrupt` again with `audit_history` (a check also compares every earlier position). The
95 % interval of the mean uses the larger of the sample's and the distribution's standard
deviation (a few seeded geometric draws understate it).

usage: python bench/verify.py [--hidden 256] [--layers 8] [--generations 8] [--tokens 48]
       [--rounds 10] [--seeds 20] [--rates 0 0.02 0.10] [--threads 1]
       [--skip-detection] [--skip-overhead] [--breakdown] [--waiting] [--gather S ...] [--keep FILE]
       [--one-process [--spread] | --routes-here] [--no-sched-idle]
       python bench/verify.py --pool FILE [FILE ...]   (the rounds of several --keep files)
"""

from __future__ import annotations

import sys
from pathlib import Path

# This folder holds bench/registry.py, named like the `registry` package: don't shadow it.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import trio  # noqa: E402

from daemon.shards import SHARD_PROTOCOL  # noqa: E402
from daemon.shards.client import RemoteModel, generate  # noqa: E402
from daemon.shards.model import make_tiny  # noqa: E402
from daemon.shards.server import ShardServer  # noqa: E402
from daemon.verify import detection  # noqa: E402
from daemon.verify.cheat import MODES, Cheat  # noqa: E402
from daemon.verify.policy import VerifyConfig  # noqa: E402
from daemon.verify.verifier import Verifier  # noqa: E402
from p2p import localsock  # noqa: E402
from p2p.identity import NodeIdentity  # noqa: E402
from p2p.testing.memnet import MemoryNetwork  # noqa: E402
from scheduler.routing import Server  # noqa: E402

FRACTION = {"corrupt": 0.5}


class Cluster:
    def __init__(self, layers: int, routes: Host | None = None, replicas: Host | None = None):
        self.hub = MemoryNetwork()
        self.client = self.hub.add_node("client")
        self.layers = layers
        self.servers: dict[str, ShardServer] = {}
        self.ranges: dict[str, tuple[int, int]] = {}
        self.names: dict[str, str] = {}  # peer id -> its name (a0 .. b2, cheat)
        self.route_host, self.replica_host = routes, replicas
        self.hosts = [h for h in (routes, replicas) if h is not None]
        self.opener: Any = self.client
        if self.hosts:  # servers in child processes, reached over their Unix sockets
            self.opener = SplitOpener(self.client, {p for h in self.hosts for p in h.ids.values()})
            half = layers // 2
            for host in self.hosts:
                for name, peer in host.ids.items():
                    self.ranges[peer] = (0, half) if name.startswith("a") else (half, layers)
                    self.names[peer] = name

    async def add(self, peer: str, model_dir: Path, start: int, end: int) -> ShardServer:
        node = self.hub.add_node(peer)
        server = ShardServer(opener=node)
        await server.load("m", model_dir, start, end)
        node.set_stream_handler(
            SHARD_PROTOCOL, server.handle_stream, max_frame_bytes=lambda: server.max_frame_bytes
        )
        self.servers[peer], self.ranges[peer] = server, (start, end)
        self.names[peer] = peer
        return server

    async def announced(self, lane: int | None = None) -> list[Server]:
        return [
            Server(p, a, b, ms_per_layer=1.0, rtt_ms=self._rtt_ms(p, lane))
            for p, (a, b) in self.ranges.items()
        ]

    def _rtt_ms(self, peer: str, lane: int | None = None) -> float:
        if peer == "cheat":
            return 0.5
        if lane is not None:  # `--spread`: this generation's route is a{lane}, b{lane}
            return 1.0 if peer[1:] == str(lane) else 1.05
        # servers apart: the routes are a0, b0 (the others announced a little slower)
        return 1.05 if self.hosts and self.names.get(peer) not in ROUTES else 1.0

    def model(self, checks: object, max_length: int, lane: int | None = None) -> RemoteModel:
        async def announced() -> list[Server]:
            return await self.announced(lane)

        return RemoteModel(
            self.opener,
            announced,
            model_id="m",
            num_layers=self.layers,
            max_length=max_length,
            verifier=checks,
        )


async def honest_cluster(
    model_dir: Path, layers: int, routes: Host | None = None, replicas: Host | None = None
) -> Cluster:
    """Three honest servers a range: in this process, but those `routes` and `replicas`
    serve in their child processes."""
    cluster = Cluster(layers, routes, replicas)
    half = layers // 2
    for name in ROUTES + REPLICAS:
        if name not in cluster.names.values():
            await cluster.add(name, model_dir, *((0, half) if name[0] == "a" else (half, layers)))
    return cluster


class Breakdown:
    """Where a configuration's time goes, summed over its rounds (`--breakdown`): per server
    group (the routes' servers, the others: replicas), forward passes, steps in them and
    compute seconds; and how long the token loops waited in the checks' hook."""

    def __init__(self) -> None:
        self.passes: dict[str, int] = {"route": 0, "replica": 0}
        self.steps: dict[str, int] = {"route": 0, "replica": 0}
        self.compute_s: dict[str, float] = {"route": 0.0, "replica": 0.0}
        self.compute_cpu_s: dict[str, float] = {"route": 0.0, "replica": 0.0}  # threads' CPU
        self.hook_s = 0.0  # token loops' wall time in after_step, all steps
        self.checked_hook_s = 0.0  # of it, in steps with a check
        self.checked_steps = 0
        self.unchecked_hook_cpu_s = 0.0  # the hooks' CPU in steps without a check
        self.unchecked_steps = 0
        self.tokens = 0
        self.wall_s = 0.0
        self.cpu_s = 0.0


# per loaded range (by identity), the CPU time its passes took in their worker threads
_PASS_CPU: dict[int, float] = {}


def count_pass_cpu() -> None:
    """Count each forward pass's CPU time (its worker thread's) per range (`--breakdown`):
    the process's CPU time less these is the event loop's (client, protocol, verifier)."""
    import daemon.shards.server as server_module

    run_steps = server_module.run_steps

    def counted(sessions, xs, last_only, static):  # type: ignore[no-untyped-def]
        started = time.thread_time()
        try:
            return run_steps(sessions, xs, last_only, static)
        finally:
            key = id(sessions[0].block)
            _PASS_CPU[key] = _PASS_CPU.get(key, 0.0) + time.thread_time() - started

    server_module.run_steps = counted


def _snapshot(cluster: Cluster) -> dict[str, tuple[int, int, float, float]]:
    """Per server: (passes, steps in them, compute seconds, their CPU seconds) so far."""
    out = {}
    for peer, server in cluster.servers.items():
        sizes = server.batching.batch_sizes
        blocks = list(server.blocks.values())
        out[peer] = (
            sum(sizes.values()),
            sum(k * n for k, n in sizes.items()),
            sum(b.compute_s for b in blocks),
            sum(_PASS_CPU.get(id(b), 0.0) for b in blocks),
        )
    return out


async def workload(
    cluster: Cluster,
    verifier: Verifier | None,
    args: argparse.Namespace,
    breakdown: Breakdown | None = None,
    runs: list[Run] | None = None,
) -> None:
    """`--generations` concurrent generations; their tokens, wall and CPU seconds (this
    process's, and each child's: the routes' and the replicas') and the routes' and
    replicas' forward passes go to `runs`."""
    done = 0
    routes: set[str] = set()
    before = _snapshot(cluster)

    async def one(i: int) -> None:
        nonlocal done
        checks = verifier.generation() if verifier is not None else None
        if checks is not None and breakdown is not None:
            _instrument(checks, breakdown)
        lane = i % 3 if args.spread else None  # (`--spread`: the route a{i % 3}, b{i % 3})
        remote = cluster.model(checks, max_length=args.tokens + 16, lane=lane)
        if checks is not None and breakdown is not None:
            _time_settle(remote, breakdown)
        await remote.open()
        routes.update(h.peer_id for h in remote.hops)
        async for _ in generate(remote, [i % 200 + 1, 3, 5, 7, 11, 13], args.tokens):
            done += 1
        await remote.close()
        if checks is not None:
            await checks.aclose()  # its replica sessions

    hosts_before = [h.stats() if h is not None else None for h in _hosts(cluster)]
    busy = machine_busy_s()
    started, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for i in range(args.generations):
            nursery.start_soon(one, i)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    hosts = [h.stats() if h is not None else None for h in _hosts(cluster)]
    after = _snapshot(cluster)
    passes = {  # (the servers in this process)
        group: sum(after[p][0] - before[p][0] for p in after if (p in routes) == (group == "route"))
        for group in ("route", "replica")
    }
    child_cpu = [0.0, 0.0]
    for i, (a, b) in enumerate(zip(hosts_before, hosts, strict=True)):
        if a is not None and b is not None:
            child_cpu[i] = b.cpu_s - a.cpu_s
            passes["route" if i == 0 else "replica"] += b.passes - a.passes
    if runs is not None:
        others = machine_busy_s() - busy - cpu - sum(child_cpu)
        runs.append(
            Run(done, wall, cpu, *child_cpu, passes["route"], passes["replica"], others / wall)
        )
    if breakdown is not None:
        for peer in after:
            group = "route" if peer in routes else "replica"
            breakdown.passes[group] += after[peer][0] - before[peer][0]
            breakdown.steps[group] += after[peer][1] - before[peer][1]
            breakdown.compute_s[group] += after[peer][2] - before[peer][2]
            breakdown.compute_cpu_s[group] += after[peer][3] - before[peer][3]
        breakdown.tokens += done
        breakdown.wall_s += wall
        breakdown.cpu_s += cpu


def machine_busy_s() -> float:
    """The CPU seconds every core of the machine has been busy (/proc/stat: all but idle and
    iowait; 0 where there is none): with the bench's own CPU taken off, what other work took
    during a run, the load that the rounds' pairing is meant to cancel."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # (not guests)


def _instrument(checks: Any, breakdown: Breakdown) -> None:
    """Time the checks' hooks of one generation (`--breakdown`): the token loop's wall time
    in `after_step` (all steps, and those with a check), and the hooks' CPU in steps without
    a check. Those run start to end without yielding to the event loop (nothing is awaited
    where no hop was drawn), so their thread's CPU time is theirs alone: what the verifier
    costs a step it does not check."""
    before_step, input_known, after_step, speculative = (
        checks.before_step,
        checks.input_known,
        checks.after_step,
        checks.after_step_speculative,
    )
    pending = [0.0]  # this step's CPU in before_step and input_known so far

    def timed_before(*args: Any) -> None:
        started = time.thread_time()
        try:
            before_step(*args)
        finally:
            pending[0] += time.thread_time() - started

    def timed_input(*args: Any) -> None:
        started = time.thread_time()
        try:
            input_known(*args)
        finally:
            pending[0] += time.thread_time() - started

    async def timed_after(*args: Any) -> None:
        started, cpu = time.perf_counter(), time.thread_time()
        before = checks.checked_steps
        try:
            await after_step(*args)
        finally:
            took = time.perf_counter() - started
            breakdown.hook_s += took
            if checks.checked_steps > before:
                breakdown.checked_hook_s += took
                breakdown.checked_steps += 1
            else:
                breakdown.unchecked_hook_cpu_s += pending[0] + time.thread_time() - cpu
                breakdown.unchecked_steps += 1
            pending[0] = 0.0

    def timed_speculative(*args: Any) -> Any:
        # (a speculating step's hook: it never waits; the token loop's waits for verdicts
        # are timed in `settle`, see `_time_settle`)
        cpu = time.thread_time()
        out = None
        try:
            out = speculative(*args)
            return out
        finally:
            if out is None:
                breakdown.unchecked_hook_cpu_s += pending[0] + time.thread_time() - cpu
                breakdown.unchecked_steps += 1
            else:
                breakdown.checked_steps += 1
            pending[0] = 0.0

    checks.before_step, checks.input_known, checks.after_step = (
        timed_before,
        timed_input,
        timed_after,
    )
    checks.after_step_speculative = timed_speculative


def _time_settle(remote: Any, breakdown: Breakdown) -> None:
    """Count the token loop's wall time in `settle` (`--breakdown`): where a speculating
    generation waits for its checks (its end, or too many tokens held)."""
    settle = remote.settle

    async def timed(*, wait: bool) -> Any:
        started = time.perf_counter()
        try:
            return await settle(wait=wait)
        finally:
            took = time.perf_counter() - started
            breakdown.hook_s += took
            breakdown.checked_hook_s += took

    remote.settle = timed


@dataclass(frozen=True)
class Run:
    """One configuration's run in one round."""

    tokens: int
    wall_s: float
    cpu_s: float  # this process's
    route_cpu_s: float = 0.0  # the routes' process's (by default; else 0, in `cpu_s`)
    replica_cpu_s: float = 0.0  # the replicas' process's (unless `--one-process`)
    route_passes: int = 0  # forward passes of the routes' servers
    replica_passes: int = 0  # and of the replicas'
    others_cores: float = 0.0  # the cores other work kept busy meanwhile (in `--keep`'s JSON)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def cpu_ms_per_token(self) -> float:
        return 1000 * self.cpu_s / self.tokens

    def cpu(self, part: str) -> float:
        """CPU seconds of one part: "here" (this process), "routes", "replicas" (their
        processes') or "network" (all of them)."""
        if part == "network":
            return self.cpu_s + self.route_cpu_s + self.replica_cpu_s
        return {"here": self.cpu_s, "routes": self.route_cpu_s, "replicas": self.replica_cpu_s}[
            part
        ]


def paired(
    runs: list[Run], base: list[Run], rounds: list[int] | None = None, part: str = "here"
) -> tuple[float, float]:
    """The overhead of `runs` over `base` (wall, CPU; fractions) from each round's own pair
    (`rounds`: which rounds, repeats allowed: a bootstrap sample): 1 - the geometric mean over
    the rounds of tokens/s with checks / without, and the geometric mean of CPU per token
    with checks / without - 1. Paired: a round's two runs ran seconds apart, under the same
    load and the same seed of check draws. Each round weighs the same: a round slowed by
    other work (the shared machine) moves its own ratio, not the whole, as it does a total
    it dominates. The mean (not a median) of the rounds' ratios: the number of checks in a
    round is skewed at 2 %, and its mean is the rate's."""
    picked = rounds if rounds is not None else list(range(len(runs)))
    wall = [math.log(runs[i].tokens_per_s / base[i].tokens_per_s) for i in picked]
    cpu = [math.log(_cpu_per_token(runs[i], part) / _cpu_per_token(base[i], part)) for i in picked]
    return 1 - math.exp(statistics.fmean(wall)), math.exp(statistics.fmean(cpu)) - 1


def _cpu_per_token(run: Run, part: str) -> float:
    return max(run.cpu(part), 1e-9) / run.tokens


def pooled(
    runs: list[Run], base: list[Run], rounds: list[int] | None = None, part: str = "here"
) -> tuple[float, float]:
    """The overhead from the rounds' totals (the bench's estimate before session 17, printed
    under the table): 1 - tokens/s with checks / without, and CPU per token with checks /
    without - 1, over all rounds' tokens, walls and CPU. A round slowed by other work weighs
    more, as its walls are longer."""
    picked = rounds if rounds is not None else list(range(len(runs)))

    def total(which: list[Run]) -> tuple[float, float, float]:
        return (
            sum(which[i].tokens for i in picked),
            sum(which[i].wall_s for i in picked),
            sum(which[i].cpu(part) for i in picked),
        )

    t, w, c = total(runs)
    bt, bw, bc = total(base)
    return 1 - (t / w) / (bt / bw), (c / t) / (bc / bt) - 1


def interval(
    runs: list[Run],
    base: list[Run],
    samples: int = 2000,
    part: str = "here",
    estimate: Any = paired,
) -> tuple[str, str]:
    """95 % intervals of the overheads (wall, CPU; `estimate`: `paired` or `pooled`) by a
    paired bootstrap over rounds (a round's run with checks goes with the same round's run
    without: they ran seconds apart, under the same load)."""
    n = len(runs)
    if n < 3:
        return "-", "-"
    rng = random.Random(0)  # (the same resamples every time: the interval is reproducible)
    draws = [
        estimate(runs, base, [rng.randrange(n) for _ in range(n)], part) for _ in range(samples)
    ]
    out = []
    for which in (0, 1):
        values = sorted(100 * d[which] for d in draws)
        out.append(f"{values[int(0.025 * samples)]:.1f}..{values[int(0.975 * samples)]:.1f}%")
    return out[0], out[1]


@dataclass(frozen=True)
class Mode:
    """One configuration with checks: the rate, and how a generation takes its checks
    (`speculate`: None, `VerifyConfig`'s default; `--waiting`: the other mechanism;
    `--gather`: speculating, its checks gathering for `gather_s` first)."""

    rate: float
    speculate: bool | None = None
    gather_s: float = 0.0

    @property
    def label(self) -> str:
        out = f"{self.rate * 100:.0f}%"
        if self.gather_s:
            return out + f" g{self.gather_s:g}"
        if self.speculate is None:
            return out
        return out + (" spec" if self.speculate else " wait")


def _verifier(mode: Mode) -> Verifier:
    """A configuration's verifier (a flat rate: `probation_rate` = `rate`)."""
    config = VerifyConfig(
        rate=mode.rate,
        probation_rate=mode.rate,
        speculate=VerifyConfig().speculate if mode.speculate is None else mode.speculate,
        gather_s=mode.gather_s,
    )
    return Verifier(config, rng=random.Random(1))


async def overhead(
    args: argparse.Namespace,
    model_dir: Path,
    routes: Host | None = None,
    replicas: Host | None = None,
) -> None:
    cluster = await honest_cluster(model_dir, args.layers, routes, replicas)
    verifiers = {mode: _verifier(mode) for mode in args.modes}
    await workload(cluster, None, args)  # warm up the routes' servers
    # and every replica (a check on every step), so that no configuration's first round
    # pays for a server's first passes
    warm = Verifier(VerifyConfig(rate=1.0, probation_rate=1.0), rng=random.Random(0))
    await workload(cluster, warm, args)
    configs: list[Mode | None] = [None, *args.modes]
    runs: dict[Mode | None, list[Run]] = {c: [] for c in configs}
    parts = {c: Breakdown() for c in configs} if args.breakdown else {}
    load_before = os.getloadavg()[0]
    for round_ in range(args.rounds):  # each round in another order: drifts cancel out
        shift = round_ % len(configs)
        for v in verifiers.values():  # every configuration draws from the round's seed:
            v.rng.seed(round_)  # those of one rate check about as many steps in a round
        for rate in configs[shift:] + configs[:shift]:
            await workload(cluster, verifiers.get(rate), args, parts.get(rate), runs[rate])
    base = runs[None]
    if args.keep is not None:
        keep(args.keep, runs, load_before)

    def middle(rate: Mode, which: int) -> str:
        """The middle half of the rounds' own overheads (their first and third quartiles):
        how much one round's figure moves on this machine."""
        if len(base) < 2:
            return "-"
        pairs = list(zip(runs[rate], base, strict=True))
        if which == 0:
            each = [100 * (1 - r.tokens_per_s / b.tokens_per_s) for r, b in pairs]
        else:
            each = [100 * (r.cpu_ms_per_token / b.cpu_ms_per_token - 1) for r, b in pairs]
        q1, q2, q3 = statistics.quantiles(each, n=4)
        return f"{q2:.1f} ({q1:.1f}..{q3:.1f})%"

    tokens = sum(r.tokens for r in base)
    base_tps = tokens / sum(r.wall_s for r in base)
    print(
        f"\noverhead: {args.generations} generations x {args.tokens} tokens, hidden "
        f"{args.hidden}, {args.layers} layers in 2 ranges x 3 servers, {args.rounds} rounds "
        f"(load {load_before:.1f} before them, {os.getloadavg()[0]:.1f} after), interleaved, "
        "every configuration of a round drawing its checks from the round's seed. Overheads "
        "from each round's pair (its run with checks against its run without: the geometric "
        "mean of the rounds' ratios), with a 95 % interval (bootstrap over rounds); and the "
        "median (first..third quartile) of the rounds' own ratios"
    )
    print(SETUPS[args.setup] + (IDLE if args.setup != "one" and args.sched_idle else ""))
    if args.spread:
        print(
            "spread: generation i's route is a{i % 3}, b{i % 3}, so that every server carries "
            "a third of the generations and a check's pass on its replica may share a batch "
            "with that replica's own steps (the breakdown's 'route' counts every server)"
        )
    here = {"apart": "requester", "routes-here": "requester + routes", "one": "one process"}[
        args.setup
    ]
    known = {"apart": ("routes", "replicas"), "routes-here": ("replicas",), "one": ()}[args.setup]
    configs = [None, *args.modes]

    def per_token(rate: Mode | None, part: str) -> float:
        done = sum(r.tokens for r in runs[rate])
        return 1000 * sum(r.cpu(part) for r in runs[rate]) / done

    def against(rate: Mode, part: str, base: list[Run] = base) -> list[str]:
        """A part's CPU ms/token, its overhead and interval against `base`."""
        return [
            f"{per_token(rate, part):.3f}",
            f"{paired(runs[rate], base, part=part)[1] * 100:.1f}%",
            interval(runs[rate], base, part=part)[1],
        ]

    print(
        "\nthe requester's throughput (its tokens/s, and its process's CPU: what a requester "
        "pays for its checks)"
    )
    rows = [["none", f"{base_tps:.1f}", "-", "-", "-", f"{per_token(None, 'here'):.3f}"]]
    rows[0] += ["-", "-", "-", f"{sum(r.route_passes for r in base) / tokens:.3f}"]
    for rate in args.modes:
        v = verifiers[rate]
        done = sum(r.tokens for r in runs[rate])
        rows.append(
            [
                rate.label,
                f"{done / sum(r.wall_s for r in runs[rate]):.1f}",
                f"{paired(runs[rate], base)[0] * 100:.1f}%",
                interval(runs[rate], base)[0],
                f"{middle(rate, 0)}",
                *against(rate, "here"),
                f"{v.counters['checks_pass'] + v.counters['checks_fail']}",
                f"{sum(r.route_passes for r in runs[rate]) / done:.3f}",
            ]
        )
    table(
        [
            "check rate",
            "tokens/s",
            "overhead (wall)",
            "95% interval",
            "per round: wall",
            f"CPU ms/token ({here})",
            "overhead (CPU)",
            "95% interval",
            "checks",
            "route passes/token",
        ],
        rows,
    )
    noise_floor(runs, base, args.modes)
    print(
        "\nthe network's extra compute (CPU ms a token: the routes' servers', the replicas', "
        "all processes'; not the requester's throughput)"
    )
    rows = []
    for rate in configs:
        v = verifiers.get(rate) if rate is not None else None
        done = sum(r.tokens for r in runs[rate])
        row = [rate.label if rate is not None else "none"]
        if "routes" in known:
            row += (
                against(rate, "routes")
                if rate is not None
                else [f"{per_token(None, 'routes'):.3f}", "-", "-"]
            )
        else:
            row += ["-", "-", "-"]
        row.append(f"{per_token(rate, 'replicas'):.3f}" if "replicas" in known else "-")
        row.append(
            f"{per_token(rate, 'replicas') / per_token(rate, 'routes') * 100:.1f}%"
            if "routes" in known
            else "-"
        )
        if rate is None or v is None:
            row += [f"{per_token(None, 'network'):.3f}", "-", "-", "-", "-", "-", "-"]
            rows.append(row)
            continue
        checks = v.counters["checks_pass"] + v.counters["checks_fail"]
        cpu = paired(runs[rate], base, part="network")[1]
        row += [f"{per_token(rate, 'network'):.3f}", f"{cpu * 100:.1f}%"]
        row.append(interval(runs[rate], base, part="network")[1])
        row += [
            f"{2 * cpu * done / checks:.1f}" if checks else "-",  # hop-steps: half a token's
            f"{sum(r.replica_passes for r in runs[rate]) / max(1, checks):.2f}",
            f"{v.counters['replica_positions'] / max(1, v.counters['replica_steps']):.1f}",
            f"{v.spread_max:.1e}",
        ]
        rows.append(row)
    table(
        [
            "check rate",
            "routes CPU ms/tok",
            "overhead",
            "95% interval",
            "replicas CPU ms/tok",
            "replicas/routes",
            "network CPU ms/tok",
            "overhead",
            "95% interval",
            "CPU per check (hop-steps)",
            "replica passes per check",
            "replica positions per check",
            "max honest spread",
        ],
        rows,
    )
    for rate in args.modes:  # a mechanism against the default's at its rate, paired
        plain = Mode(rate.rate)
        if rate != plain and plain in runs:
            wall, cpu = paired(runs[rate], runs[plain])
            wall_ci, cpu_ci = interval(runs[rate], runs[plain])
            net = paired(runs[rate], runs[plain], part="network")[1]
            net_ci = interval(runs[rate], runs[plain], part="network")[1]
            print(
                f"{rate.label} against {plain.label} (paired, same rounds): wall "
                f"{wall * 100:+.1f}% ({wall_ci}), CPU ({here}) {cpu * 100:+.1f}% ({cpu_ci}), "
                f"network CPU {net * 100:+.1f}% ({net_ci})"
            )
    for rate in args.modes:
        g = verifiers[rate].gather
        if g.rounds:
            print(
                f"{rate.label}: checks gathered in {g.rounds} rounds of "
                f"{g.checks / g.rounds:.2f} on average (verify.gather_s {g.gather_s} s)"
            )
    if parts:
        print_breakdown(parts, verifiers)


def noise_floor(runs: dict[Mode | None, list[Run]], base: list[Run], modes: list[Mode]) -> None:
    """Under table 1a: the 0 % row as the bench's noise floor (a verifier on, no check
    drawn: its hooks cost about 10 us of the requester's CPU a token, some 0.3 % of a
    token's wall, so what the row reads beyond that is the bench's noise), each rate against
    it (paired: what the checks cost beyond the machinery), and the overheads from the
    rounds' totals (the estimate before session 17)."""
    zero = next((m for m in modes if m.rate == 0), None)
    if zero is not None:
        wall, cpu = paired(runs[zero], base)
        wall_ci, cpu_ci = interval(runs[zero], base)
        print(
            f"noise floor: the {zero.label} row (no check drawn) reads {wall * 100:+.1f}% wall "
            f"({wall_ci}), {cpu * 100:+.1f}% CPU ({cpu_ci}); an overhead within its interval's "
            "width of it is not resolved"
        )
        for mode in modes:
            if mode.rate > 0:
                wall, cpu = paired(runs[mode], runs[zero])
                wall_ci, cpu_ci = interval(runs[mode], runs[zero])
                print(
                    f"  {mode.label} against {zero.label} (paired): wall {wall * 100:+.1f}% "
                    f"({wall_ci}), CPU {cpu * 100:+.1f}% ({cpu_ci})"
                )
    told = []
    for mode in modes:
        wall, cpu = pooled(runs[mode], base)
        wall_ci, cpu_ci = interval(runs[mode], base, estimate=pooled)
        told.append(f"{mode.label} {wall * 100:.1f}% ({wall_ci}), CPU {cpu * 100:.1f}% ({cpu_ci})")
    print("from the rounds' totals (before session 17): " + "; ".join(told))


def keep(path: Path, runs: dict[Mode | None, list[Run]], load_before: float) -> None:
    """Every round's runs as JSON (`--keep`): to compare estimators on the same rounds."""
    out = {
        "load": [load_before, os.getloadavg()[0]],
        "runs": {
            (m.label if m is not None else "none"): [asdict(r) for r in rs]
            for m, rs in runs.items()
        },
    }
    path.write_text(json.dumps(out, indent=1))


def pool(paths: list[Path]) -> None:
    """`--pool`: the paired overheads over the rounds of several `--keep` files together (runs
    of the same configurations; the rounds of one run are paired as they ran), a longer run's
    interval without running it again."""
    runs: dict[str, list[Run]] = {}
    loads = []
    for path in paths:
        kept = json.loads(path.read_text())
        loads.append(kept["load"])
        for label, items in kept["runs"].items():
            runs.setdefault(label, []).extend(Run(**item) for item in items)
    base = runs.get("none")
    if not base or any(len(rs) != len(base) for rs in runs.values()):
        raise SystemExit("--pool: every file needs the same configurations, 'none' among them")
    shown = ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in loads)
    print(f"{len(base)} rounds of {len(paths)} run(s) (load before -> after: {shown})")
    rows = []
    for label, rs in runs.items():
        if label == "none":
            continue
        wall, cpu = paired(rs, base)
        wall_ci, cpu_ci = interval(rs, base)
        rows.append([label, f"{wall * 100:.1f}%", wall_ci, f"{cpu * 100:.1f}%", cpu_ci])
    table(["check rate", "overhead (wall)", "95% interval", "overhead (CPU)", "95% interval"], rows)


def table(header: list[str], rows: list[list[str]]) -> None:
    """Print `rows` under `header`, each column as wide as its widest cell."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = " | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print(" | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def print_breakdown(parts: dict[Mode | None, Breakdown], verifiers: dict[Mode, Verifier]) -> None:
    print(
        "\nbreakdown (all rounds): per token, wall and CPU ms, and the cores the process kept "
        "busy (CPU / wall); the routes' servers' and the replicas' forward passes, steps and "
        "compute ms (wall, and the worker threads' CPU), and the replicas' CPU per pass; the "
        "rest of the CPU (the event loop: client, protocol, verifier); the token loops' wait "
        "in the checks; the verifier's hooks' CPU in a step without a check"
    )
    header = (
        "check rate | wall ms/tok | CPU ms/tok | cores | route passes/tok | route steps/pass "
        "| route compute ms/tok (CPU) | replica passes/tok | replica compute ms/tok (CPU) "
        "| replica CPU ms/pass | event loop CPU ms/tok | checked steps "
        "| wait per checked step ms | hook ms/tok | hooks CPU us/unchecked step "
        "| sessions opened"
    )
    print(header)
    print("-" * len(header))
    for rate, b in parts.items():
        n = max(1, b.tokens)

        def ms(seconds: float, n: int = n) -> float:
            return 1000 * seconds / n

        v = verifiers.get(rate) if rate is not None else None
        opened = v.counters["replica_sessions"] if v is not None else 0
        label = "none" if rate is None else rate.label
        per_pass = 1000 * b.compute_cpu_s["replica"] / max(1, b.passes["replica"])
        hooks = (
            f"{1e6 * b.unchecked_hook_cpu_s / b.unchecked_steps:.1f}" if b.unchecked_steps else "-"
        )
        print(
            f"{label:>10} | {1000 * b.wall_s / n:>11.3f} | {1000 * b.cpu_s / n:>10.3f} | "
            f"{b.cpu_s / max(1e-9, b.wall_s):>5.2f} | "
            f"{b.passes['route'] / n:>16.3f} | "
            f"{b.steps['route'] / max(1, b.passes['route']):>16.2f} | "
            f"{ms(b.compute_s['route']):>12.3f} ({ms(b.compute_cpu_s['route']):.3f}) | "
            f"{b.passes['replica'] / n:>18.3f} | "
            f"{ms(b.compute_s['replica']):>14.3f} ({ms(b.compute_cpu_s['replica']):.3f}) | "
            f"{per_pass:>19.2f} | "
            f"{ms(b.cpu_s - sum(b.compute_cpu_s.values())):>21.3f} | {b.checked_steps:>13} | "
            f"{1000 * b.checked_hook_s / max(1, b.checked_steps):>24.2f} | "
            f"{1000 * b.hook_s / n:>11.3f} | {hooks:>27} | {opened:>15}"
        )


# -- servers apart (the default; `--routes-here`, `--one-process`) --------------------------


ROUTES = ("a0", "b0")  # the routes' servers where servers run apart
REPLICAS = ("a1", "a2", "b1", "b2")  # and the replicas'

SETUPS = {
    "apart": (
        "servers apart (the default): the routes' servers (a0, b0) run in a process of their "
        "own, the replicas' (a1, a2, b1, b2) in another, reached over Unix sockets, as on a "
        "network where each is another machine: this process is the requester alone "
        "(client, verifier, protocol), its CPU is the requester's, and its tokens/s what the "
        "requester sees; the routes' and replicas' CPU is the network's"
    ),
    "routes-here": (
        "routes here (`--routes-here`): the replicas (a1, a2, b1, b2) run in a process of "
        "their own, reached over Unix sockets; the routes' servers (a0, b0) in this process "
        "with the requester, whose CPU then holds theirs"
    ),
    "one": (
        "one process (`--one-process`): requester, routes and replicas all in this process, "
        "on its event loop and GIL: a replica's pass holds the routes' back, which no network "
        "does"
    ),
}
IDLE = (
    "; the replicas' process under SCHED_IDLE (`--no-sched-idle` to turn it off): it runs "
    "only on cores the requester and routes leave idle, as if on machines of their own, "
    "which is where a check's answer waits on this 2-core machine when others load it"
)


@dataclass(frozen=True)
class HostStats:
    """A child process's CPU seconds and its servers' forward passes so far."""

    cpu_s: float
    passes: int


def _identities(seed: bytes, names: tuple[str, ...]) -> dict[str, NodeIdentity]:
    """The servers' keys, from one seed the parent draws per run (their Unix sockets are
    named after their peer ids: two runs at once must not share them)."""
    return {
        name: NodeIdentity(
            node_seed=hashlib.sha256(seed + f"node-{name}".encode()).digest(),
            payout_key=hashlib.sha256(seed + f"payout-{name}".encode()).digest(),
        )
        for name in names
    }


async def serve_host(model_dir: Path, layers: int, seed: bytes, names: tuple[str, ...]) -> None:
    """A child process (`Host`): the servers `names`, each listening on its Unix socket
    (`p2p.localsock`); a line on stdin answers this process's CPU seconds and its servers'
    passes so far, and stdin's end ends it."""
    half = layers // 2
    servers = []
    async with trio.open_nursery() as nursery:
        for name, ident in _identities(seed, names).items():
            server = ShardServer()
            start, end = (0, half) if name.startswith("a") else (half, layers)
            await server.load("m", model_dir, start, end)
            streams = localsock.LocalStreams(ident)
            streams.set_stream_handler(
                SHARD_PROTOCOL,
                server.handle_stream,
                max_frame_bytes=lambda server=server: server.max_frame_bytes,
            )
            await nursery.start(streams.serve)
            servers.append(server)
        print("ready", flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buffered = b""
        while True:
            data = await stdin.receive_some()
            if not data:
                break
            buffered += data
            while b"\n" in buffered:
                _, buffered = buffered.split(b"\n", 1)
                passes = sum(sum(s.batching.batch_sizes.values()) for s in servers)
                print(f"{time.process_time():.6f} {passes}", flush=True)
        nursery.cancel_scope.cancel()


def _sched_idle() -> None:
    """In a child before it runs: SCHED_IDLE, inherited by every thread it starts."""
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


class Host:
    """A child process serving `names`, and how to reach it and read its figures; under
    SCHED_IDLE where `idle`."""

    def __init__(
        self, model_dir: Path, layers: int, threads: int, names: tuple[str, ...], idle: bool
    ) -> None:
        seed = os.urandom(16)
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--host",
                str(model_dir),
                "--host-seed",
                seed.hex(),
                "--host-names",
                ",".join(names),
                "--layers",
                str(layers),
                "--threads",
                str(threads),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=_sched_idle if idle else None,  # noqa: PLW1509 (no threads yet)
        )
        assert self.process.stdout is not None and self.process.stdin is not None
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the servers' process ({', '.join(names)}) did not start")
        self.ids = {name: ident.peer_id for name, ident in _identities(seed, names).items()}

    def stats(self) -> HostStats:
        """The child's figures so far (asked between runs, outside their timing)."""
        assert self.process.stdout is not None and self.process.stdin is not None
        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        cpu, passes = self.process.stdout.readline().split()
        return HostStats(float(cpu), int(passes))

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


def _hosts(cluster: Cluster) -> tuple[Host | None, Host | None]:
    """The routes' and the replicas' child processes (None: in this process)."""
    return cluster.route_host, cluster.replica_host


class SplitOpener:
    """The requester's streams: to the servers apart over their Unix sockets, to the others
    over the in-memory network."""

    def __init__(self, memory: Any, apart: set[str]) -> None:
        self.memory = memory
        self.apart = apart
        self.ident = NodeIdentity.generate()

    async def open_stream(self, peer_id: str, protocol: str) -> Any:
        if peer_id in self.apart:
            return await localsock.dial(self.ident, peer_id, protocol)
        return await self.memory.open_stream(peer_id, protocol)


async def detection_table(args: argparse.Namespace, model_dir: Path) -> None:
    cluster = await honest_cluster(model_dir, args.layers)
    server = await cluster.add("cheat", model_dir, 0, args.layers // 2)
    honest_forward = server.forward
    print(
        f"\nsteps to detection at a flat 2 % rate, {args.seeds} seeded runs per mode "
        "(the cheater's steps up to and including the one caught)"
    )
    header = "mode           | cheats on | expected | measured mean | 95% CI of mean | median | max"
    print(header)
    print("-" * len(header))
    rows = [(mode, mode, False) for mode in MODES] + [("corrupt, audit", "corrupt", True)]
    for label, mode, audit in rows:
        q = FRACTION.get(mode, 1.0)
        expected = (
            detection.expected_steps_audited(0.02, q)
            if audit
            else detection.expected_steps(0.02, q)
        )
        measured = []
        for seed in range(args.seeds):
            cheat = Cheat(server, mode, fraction=q, seed=seed).install()
            config = VerifyConfig(rate=0.02, probation_rate=0.02, audit_history=audit)
            v = Verifier(config, rng=random.Random(seed))
            checks = v.generation()
            remote = cluster.model(checks, max_length=1000)
            await remote.open()
            async for _ in generate(remote, [seed % 200 + 1, 7], 990):
                if remote.recoveries:
                    break
            await remote.close()
            await checks.aclose()
            server.forward = honest_forward
            measured.append(
                cheat.steps_through(remote.recoveries) if remote.recoveries else math.inf
            )
        finite = [m for m in measured if math.isfinite(m)]
        mean = statistics.fmean(finite)
        # the sample's sd, or the distribution's where larger: 20 seeded geometric draws of
        # mean 50 often show half its sd of 49.5 (seeds 0..19 of skip: mean 19 to 31)
        r = 0.02
        sd = statistics.pstdev(finite)
        if audit:
            sd = max(sd, math.sqrt((1 - q) / q**2 + (1 - r) / r**2))
        else:
            sd = max(sd, math.sqrt(1 - r * q) / (r * q))
        half = 1.96 * sd / math.sqrt(len(finite))
        print(
            f"{label:<14} | {q * 100:>8.0f}% | {expected:>8.1f} | "
            f"{mean:>13.1f} | {mean - half:>6.1f}..{mean + half:<6.1f} | "
            f"{statistics.median(finite):>6.0f} | {max(finite):>3.0f}"
            + (
                f" ({len(measured) - len(finite)} not caught in 990)"
                if len(finite) < len(measured)
                else ""
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.02, 0.10])
    parser.add_argument("--skip-detection", action="store_true")
    parser.add_argument(
        "--waiting",
        action="store_true",
        help="also each rate above 0 with the other mechanism than the default's: "
        "speculating (rows 'spec') or waiting for every check (rows 'wait')",
    )
    parser.add_argument(
        "--gather",
        type=float,
        nargs="+",
        default=[],
        metavar="S",
        help="also each rate above 0 with verify.gather_s S (rows 'gS')",
    )
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument(
        "--breakdown", action="store_true", help="where the time goes, per check rate"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--keep", type=Path, metavar="FILE", help="write every round's runs there (JSON)"
    )
    parser.add_argument(
        "--pool",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="run nothing: the paired overheads over the rounds of these --keep files together",
    )
    setup = parser.add_mutually_exclusive_group()
    setup.add_argument(
        "--one-process",
        action="store_true",
        help="every server in this process with the requester (the default before session 16)",
    )
    setup.add_argument(
        "--routes-here",
        "--replicas-apart",
        action="store_true",
        help="the routes' servers in this process, the replicas in a process of their own "
        "(what --replicas-apart named before session 16)",
    )
    parser.add_argument(
        "--no-sched-idle",
        dest="sched_idle",
        action="store_false",
        help="the replicas' process at this process's priority, not under SCHED_IDLE",
    )
    parser.add_argument(
        "--spread",
        action="store_true",
        help="generation i's route is a{i %% 3}, b{i %% 3}: every server carries traffic, "
        "and a check shares its replica's passes",
    )
    parser.add_argument("--host", type=Path, help=argparse.SUPPRESS)  # (a `Host` child)
    parser.add_argument("--host-seed", default="", help=argparse.SUPPRESS)
    parser.add_argument("--host-names", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pool:
        pool(args.pool)
        return
    args.modes = [Mode(r) for r in args.rates]
    if args.waiting:
        other = not VerifyConfig().speculate  # the mechanism the default does not use
        args.modes += [Mode(r, speculate=other) for r in args.rates if r > 0]
    args.modes += [
        Mode(r, speculate=True, gather_s=g) for g in args.gather for r in args.rates if r > 0
    ]
    args.setup = "one" if args.one_process else "routes-here" if args.routes_here else "apart"
    if args.spread and args.setup != "one":
        parser.error("--spread puts routes on every server: only with --one-process")
    torch.set_num_threads(args.threads)
    if args.host is not None:
        names = tuple(args.host_names.split(","))
        trio.run(serve_host, args.host, args.layers, bytes.fromhex(args.host_seed), names)
        return
    if args.breakdown:
        count_pass_cpu()
    logging.getLogger("daemon.shards.client").setLevel(logging.ERROR)  # the caught cheaters
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(
            Path(tmp) / "m", layers=args.layers, hidden=args.hidden, seed=5, max_positions=1024
        )
        if not args.skip_overhead:
            hosts: list[Host] = []
            try:
                routes = replicas = None
                if args.setup == "apart":
                    routes = Host(model_dir, args.layers, args.threads, ROUTES, idle=False)
                    hosts.append(routes)
                if args.setup != "one":
                    replicas = Host(
                        model_dir, args.layers, args.threads, REPLICAS, idle=args.sched_idle
                    )
                    hosts.append(replicas)
                trio.run(overhead, args, model_dir, routes, replicas)
            finally:
                for host in hosts:
                    host.close()
        if not args.skip_detection:
            trio.run(detection_table, args, model_dir)
    print(f"load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
