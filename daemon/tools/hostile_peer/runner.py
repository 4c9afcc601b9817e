"""A hostile peer for fault tests and manual chaos: run it against a live daemon.

    python -m daemon.tools.hostile_peer garbage TARGET_MULTIADDR NETWORK_ID
        random bytes on every protocol the target advertises, and forged DHT records
    python -m daemon.tools.hostile_peer registry TARGET_MULTIADDR[,...] NETWORK_ID KIND KEY
        forged registry entries (someone else's entry, tampered signature), random bytes on
        the registry topic, and malformed sync requests, to every target given (each must
        graft the hostile peer into its gossip mesh first)
    python -m daemon.tools.hostile_peer flood KIND TARGET_MULTIADDR NETWORK_ID [--seconds S]
        one flood at the highest rate this process manages, for S seconds (default 10),
        bounded in count as well; KIND is one of
        badsig   registry gossip whose entries carry bad signatures (64 per message)
        gossip   garbage on the registry topic: random bytes and malformed structures
        dht      forged DHT puts (tampered, stale, foreign, oversized records) to the target
        streams  many streams held open on every protocol the target advertises, with churn,
                 and idle TCP connections that never finish the handshake
        frames   huge never-finished frames and floods of garbage frames on every framed
                 gridmesh protocol, and shard sessions opened up to the target's limits
        fill     a registry fill by one author: many valid, maximum-size entries (sync push
                 and gossip)
        idle     (a control) connected, sending nothing
        With --announce the hostile peer first puts a valid record of its own on the target,
        as an ordinary peer does. Other options bound the flood (see FloodLimits).
        It prints one line of counts, then `RESULT {json}` for scripts (bench/abuse.py).

Every attack must be rejected and counted by the target, which keeps serving. The flood
talks only to the target: it dials nothing else (the DHT puts go to the target alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict

import trio

from daemon.tools.hostile_peer import dht_flood, gossip_floods, probes, stream_floods
from daemon.tools.hostile_peer.peer import Flood, FloodLimits, FloodStats, connected
from p2p.host import quiet_libp2p_logs

# the flood families, in the order bench/abuse.py runs them
ATTACKS: dict[str, Callable[[Flood], Awaitable[None]]] = {
    "badsig": gossip_floods.badsig,
    "gossip": gossip_floods.gossip,
    "dht": dht_flood.dht,
    "streams": stream_floods.streams,
    "frames": stream_floods.frames,
    "fill": gossip_floods.fill,
}
FLOODS = tuple(ATTACKS)
IDLE = "idle"  # the control: connected, sending nothing


async def flood(
    kind: str,
    target_addr: str,
    network_id: str,
    limits: FloodLimits | None = None,
    on_start: Callable[[], None] | None = None,
) -> FloodStats:
    """Run one flood against the target for `limits.seconds` (or until its budget is spent);
    `on_start` is called once connected, when the flood begins."""
    if kind not in (IDLE, *FLOODS):
        raise ValueError(f"unknown flood {kind!r}: one of {IDLE}, {', '.join(FLOODS)}")
    limits = limits or FloodLimits()
    stats = FloodStats(kind)
    async with connected(target_addr, network_id, gossip=kind in ("badsig", "gossip", "fill")) as (
        net,
        me,
        target,
    ):
        attack = Flood(net, me, target, target_addr, network_id, limits, stats)
        if limits.announce:
            await attack.announce()
        started = trio.current_time()
        if on_start is not None:
            on_start()
        with trio.move_on_after(limits.seconds):
            await (attack.idle() if kind == IDLE else ATTACKS[kind](attack))
        stats.seconds = trio.current_time() - started
        await trio.sleep(limits.linger_s)
    return stats


def flood_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.tools.hostile_peer flood")
    parser.add_argument("kind", choices=(IDLE, *FLOODS))
    parser.add_argument("target")
    parser.add_argument("network_id")
    defaults = FloodLimits()
    for name, value in asdict(defaults).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    limits = FloodLimits(**{name: getattr(args, name) for name in asdict(defaults)})
    stats = trio.run(
        flood,
        args.kind,
        args.target,
        args.network_id,
        limits,
        lambda: print(f"FLOODING {args.kind}", flush=True),
    )
    print(stats.line(), flush=True)
    print("RESULT " + json.dumps(asdict(stats)), flush=True)
    return 0


def main(argv: list[str]) -> int:
    # a flood makes py-libp2p log every refused stream at ERROR: keep only the summary
    quiet_libp2p_logs(logging.CRITICAL if argv[:1] == ["flood"] else logging.ERROR)
    if argv and argv[0] == "flood":
        return flood_main(argv[1:])
    if len(argv) == 3 and argv[0] == "garbage":
        trio.run(probes.garbage, *argv[1:])
    elif len(argv) == 5 and argv[0] == "registry":
        trio.run(probes.registry, *argv[1:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0
