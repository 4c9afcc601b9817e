"""What a cluster's coordinator reads about its members, from data peers wrote: their
announced ranges and load (the `blocks` registry) and their signed resource records (memory,
declared energy, GPU power, measured RTTs), each value checked, an odd one taken as unknown
(`scheduler.placement` bounds and refuses what is left)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from daemon.cluster.coordinator_state import Served
from registry.blocks import Announcement, BadAnnouncement, parse_announcement
from scheduler.placement import NodeFacts

NOT_ACCEPTING = "does not accept deploys ([shards] allow_remote_deploy = false)"


class _Load(msgspec.Struct):
    """The load fields of an announcement (daemon.shards.service), read leniently."""

    queue_length: Annotated[int, Meta(ge=0)] | None = None
    utilisation: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None


def _announced(entries: Iterable[Any]) -> Iterable[tuple[Announcement, Any]]:
    for entry in entries:
        try:
            item = parse_announcement(entry)
        except BadAnnouncement:
            continue
        if item is not None:
            yield item, entry


def served_ranges(entries: Iterable[Any], model: str, live: set[str]) -> list[Served]:
    """The ranges of `model` the `live` members announce, with the load they announce."""
    out = []
    for item, entry in _announced(entries):
        if item.model != model or item.peer_id not in live:
            continue
        try:
            load = msgspec.convert(entry.value["parameters"], _Load)
        except (msgspec.ValidationError, TypeError, KeyError):
            load = _Load()
        out.append(
            Served(
                item.peer_id,
                item.start,
                item.end,
                item.ms_per_layer,
                load.queue_length,
                load.utilisation,
            )
        )
    return out


def node_facts(
    records: Iterable[Any],
    entries: Iterable[Any],
    peers: Iterable[str],
    model: str,
    me: str,
    own_rtts: Mapping[str, float],
) -> tuple[list[NodeFacts], dict[str, str]]:
    """What placement knows of `peers`, and why some are left out: memory, energy and RTTs
    from their records, the measured ms per layer from their announcements (of `model`, else
    of any model). This node (`me`) adds the RTTs it measures now."""
    wanted = set(peers)
    by_peer = {r.peer_id: r for r in records if r.peer_id in wanted}
    speeds: dict[str, dict[bool, list[float]]] = {}
    for item, _ in _announced(entries):
        if item.peer_id in wanted and item.ms_per_layer > 0:
            bucket = speeds.setdefault(item.peer_id, {True: [], False: []})
            bucket[item.model == model].append(item.ms_per_layer)
    facts, excluded = [], {}
    for peer in sorted(wanted):
        record = by_peer.get(peer)
        if record is None:
            excluded[peer] = "no resource record known here (yet)"
            continue
        res = _mapping(record.resources)
        if peer != me and res.get("accepts_deploys") is not True:
            excluded[peer] = NOT_ACCEPTING
            continue
        measured = speeds.get(peer, {True: [], False: []})
        ms = min(measured[True] or measured[False] or [0.0]) or None
        energy = _mapping(res.get("energy"))
        rtts = _mapping(res.get("rtt_ms"))
        facts.append(
            NodeFacts(
                peer,
                free_bytes(res),
                ms,
                {**rtts, **own_rtts} if peer == me else rtts,
                _number(energy.get("gpu_power_w")),
                _number(energy.get("energy_price_per_kwh")),
                _number(energy.get("carbon_g_per_kwh")),
            )
        )
    return facts, excluded


def free_bytes(res: Mapping[str, Any]) -> int:
    """The memory a shard would load into: the freest GPU's, else the RAM available."""
    gpus = res.get("gpus") if isinstance(res.get("gpus"), list) else []
    free = [g.get("memory_free_bytes") for g in gpus or () if isinstance(g, dict)]
    free = [f for f in free if _count(f)]
    if free:
        return max(free)
    memory = _mapping(res.get("memory")).get("available_bytes")
    return memory if _count(memory) else 0


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None
