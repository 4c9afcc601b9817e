"""Shard planning: cut a model's layers into contiguous ranges and place them on daemons.

Pure decision logic: no I/O, no torch. Candidates usually come from other peers' resource
records, so every value is checked and bounded; a candidate with odd values is left out,
never trusted and never a crash.

The rule (exo's memory-weighted partitioning, adjusted by throughput):

1. A node's *budget* is `floor(memory_fraction * free_bytes)`. A range `[s, e)` costs each
   of its layers' weights and KV-cache reserve (`kv_reserve_tokens` positions of keys and
   values per layer, a sliding-window layer's at most its window: `model_memory.LayerCosts`),
   plus `embed_bytes` when `s == 0` and `head_bytes` when `e == num_layers`. No range ever
   exceeds its node's budget.
2. Nodes are preferred by `budget * throughput` (then lower rtt, then lower price, a node
   that declares no price after every priced one, then peer id). Each chain
   gets up to `max_nodes` nodes (default: as many as there are layers); `replicas` chains are
   built on disjoint node sets, and when the pool can't hold that many copies, fewer are built
   (down to one). A node holds at most one range of a model.
3. Within a chain, the ends go to the nodes that lose the fewest layers to the embedding and
   the head (ties: the preferred node), the others keep their preference order between them.
4. Node i's share of the layers is proportional to `w_i = room_i * throughput_i`, where
   `room_i` is the bytes left for layers at its position (budget minus the embedding or head
   it holds), clamped to `[1, cap_i]` layers (cap_i: the layers its budget holds); what a
   capped node can't take goes to the others by the same weights (water-filling). With equal
   throughput this is exo's memory weighting; a node twice as fast gets twice the share until
   its memory is full. Shares are rounded by largest remainder, ties by chain position.

Prices: `max_price_per_unit` (a job's maximum, in the stablecoin's smallest unit per
layer-token) leaves out the candidates whose price is over it, and those that declare none
(older versions, which cannot be paid); a PlanError says how many were left out so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from p2p.records import MAX_PRICE_PER_UNIT
from scheduler.model_memory import (
    DEFAULT_KV_RESERVE_TOKENS,
    FIRST,
    LAST,
    MAX_BYTES,
    MAX_LAYERS,
    MAX_NAME_LEN,
    MIDDLE,
    LayerCosts,
    ModelSpec,
    PlanError,
)

__all__ = [  # the model's sizes live in scheduler.model_memory; callers import them here too
    "DEFAULT_KV_RESERVE_TOKENS",
    "MAX_BYTES",
    "LayerCosts",
    "ModelSpec",
    "PlanError",
    "Assignment",
    "Candidate",
    "Plan",
    "plan_shards",
    "plan_with_nodes",
]

MAX_REPLICAS = 1024
MAX_CANDIDATES = 4096
MAX_PEER_ID_LEN = 256
MAX_THROUGHPUT = 1e15
MAX_RTT_MS = 1e7
_MIN_FACTOR = 1e-12
_UNKNOWN_PRICE = MAX_PRICE_PER_UNIT + 1  # a node without a price sorts after every price


@dataclass(frozen=True)
class Candidate:
    peer_id: str
    free_bytes: int
    throughput: float
    """Relative compute speed (layers/s, TFLOPS, ...): only ratios between candidates matter."""
    rtt_ms: float | None = None
    price_per_unit: int | None = None
    """Its price per layer-token; None: it declares none (an older version)."""


@dataclass(frozen=True)
class Assignment:
    peer_id: str
    start: int
    end: int
    """Half-open: the node serves layers start .. end - 1."""
    replica: int = 0
    """Which copy of the chain this range belongs to."""

    @property
    def layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    model: str
    assignments: list[Assignment]
    replicas: int
    num_layers: int = 0
    """0 means: the largest assignment end."""

    @property
    def layer_count(self) -> int:
        if self.num_layers > 0:
            return self.num_layers
        return max((a.end for a in self.assignments), default=0)

    def coverage(self) -> list[int]:
        """How many servers hold each layer."""
        counts = [0] * self.layer_count
        for a in self.assignments:
            for layer in range(max(a.start, 0), min(a.end, len(counts))):
                counts[layer] += 1
        return counts

    def min_coverage(self) -> int:
        return min(self.coverage(), default=0)

    def by_peer(self) -> dict[str, Assignment]:
        return {a.peer_id: a for a in self.assignments}

    def chains(self) -> list[list[Assignment]]:
        """The assignments of each replica, in layer order."""
        out: dict[int, list[Assignment]] = {}
        for a in self.assignments:
            out.setdefault(a.replica, []).append(a)
        return [sorted(out[r], key=lambda a: a.start) for r in sorted(out)]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "num_layers": self.layer_count,
            "replicas": self.replicas,
            "assignments": [
                {"peer_id": a.peer_id, "start": a.start, "end": a.end, "replica": a.replica}
                for a in self.assignments
            ],
        }

    @classmethod
    def from_json(cls, raw: Any) -> Plan:
        """Parse a plan from untrusted JSON; PlanError names the bad field."""
        if not isinstance(raw, dict):
            raise PlanError("plan must be an object")
        model, num_layers, replicas = raw.get("model"), raw.get("num_layers"), raw.get("replicas")
        if not isinstance(model, str) or not 0 < len(model) <= MAX_NAME_LEN:
            raise PlanError("plan.model must be a non-empty string")
        if not _is_int(num_layers) or not 1 <= num_layers <= MAX_LAYERS:
            raise PlanError(f"plan.num_layers must be an integer in [1, {MAX_LAYERS}]")
        if not _is_int(replicas) or not 1 <= replicas <= MAX_REPLICAS:
            raise PlanError(f"plan.replicas must be an integer in [1, {MAX_REPLICAS}]")
        items = raw.get("assignments")
        if not isinstance(items, list) or len(items) > MAX_CANDIDATES:
            raise PlanError(f"plan.assignments must be a list of at most {MAX_CANDIDATES}")
        assignments: list[Assignment] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise PlanError(f"plan.assignments[{i}] must be an object")
            peer, start, end = item.get("peer_id"), item.get("start"), item.get("end")
            replica = item.get("replica", 0)
            if not isinstance(peer, str) or not 0 < len(peer) <= MAX_PEER_ID_LEN:
                raise PlanError(f"plan.assignments[{i}].peer_id must be a non-empty string")
            if peer in seen:
                raise PlanError(f"plan.assignments[{i}]: peer {peer} holds two ranges")
            seen.add(peer)
            if not (_is_int(start) and _is_int(end) and 0 <= start < end <= num_layers):
                raise PlanError(f"plan.assignments[{i}] needs 0 <= start < end <= num_layers")
            if not _is_int(replica) or not 0 <= replica < MAX_REPLICAS:
                raise PlanError(f"plan.assignments[{i}].replica must be a small integer")
            assignments.append(Assignment(peer, start, end, replica))
        return cls(model, assignments, replicas, num_layers)


@dataclass(frozen=True)
class _Node:
    peer_id: str
    budget: int
    throughput: float
    rtt: float
    price: int | None = None

    @property
    def score(self) -> float:
        return self.budget * self.throughput

    @property
    def price_key(self) -> int:
        return _UNKNOWN_PRICE if self.price is None else self.price

    def pref_key(self) -> tuple[float, float, int, str]:
        return (-self.score, self.rtt, self.price_key, self.peer_id)


def plan_shards(
    model: ModelSpec,
    candidates: Iterable[Candidate],
    *,
    replicas: int = 1,
    max_nodes: int | None = None,
    memory_fraction: float = 0.9,
    max_price_per_unit: int | None = None,
    kv_reserve_tokens: int = DEFAULT_KV_RESERVE_TOKENS,
) -> Plan:
    """Place `model` on up to `max_nodes` nodes per chain, `replicas` chains if they fit.

    Returns a plan with at least one full chain (its `replicas` says how many were built);
    raises PlanError when not even one fits. Deterministic: the input order doesn't matter.
    `max_price_per_unit` (None: no maximum) leaves out the candidates over it or unpriced.
    `kv_reserve_tokens`: the positions of KV cache each layer's node keeps room for.
    """
    if max_nodes is not None and (not _is_int(max_nodes) or max_nodes < 1):
        raise PlanError("max_nodes must be a positive integer or None")
    return _plan(
        model,
        candidates,
        replicas,
        max_nodes,
        False,
        memory_fraction,
        max_price_per_unit,
        kv_reserve_tokens,
    )


def plan_with_nodes(
    model: ModelSpec,
    candidates: Iterable[Candidate],
    n_nodes: int,
    *,
    replicas: int = 1,
    memory_fraction: float = 0.9,
    max_price_per_unit: int | None = None,
    kv_reserve_tokens: int = DEFAULT_KV_RESERVE_TOKENS,
) -> Plan:
    """Like plan_shards, but every chain is split over exactly `n_nodes` daemons."""
    if not _is_int(n_nodes) or n_nodes < 1:
        raise PlanError("n_nodes must be a positive integer")
    return _plan(
        model,
        candidates,
        replicas,
        n_nodes,
        True,
        memory_fraction,
        max_price_per_unit,
        kv_reserve_tokens,
    )


def _plan(
    model: ModelSpec,
    candidates: Iterable[Candidate],
    replicas: int,
    per_chain: int | None,
    exact: bool,
    memory_fraction: float,
    max_price: int | None = None,
    kv_reserve_tokens: int = DEFAULT_KV_RESERVE_TOKENS,
) -> Plan:
    if not isinstance(model, ModelSpec):
        raise PlanError("model must be a ModelSpec")
    costs = LayerCosts.of(model, kv_reserve_tokens)
    if not _is_int(replicas) or not 1 <= replicas <= MAX_REPLICAS:
        raise PlanError(f"replicas must be an integer in [1, {MAX_REPLICAS}]")
    if (
        not isinstance(memory_fraction, int | float)
        or isinstance(memory_fraction, bool)
        or not 0.0 < memory_fraction <= 1.0
    ):
        raise PlanError("memory_fraction must be a number in (0, 1]")
    if max_price is not None and not (_is_int(max_price) and max_price >= 0):
        raise PlanError("max_price_per_unit must be an integer >= 0 or None")
    n = model.num_layers
    if exact and per_chain is not None and per_chain > n:
        raise PlanError(f"can't split {n} layers over {per_chain} daemons: at most one per layer")
    valid, rejected = _valid_nodes(candidates, memory_fraction)
    nodes = [node for node in valid if _affordable(node, max_price)]
    priced_out = len(valid) - len(nodes)
    holders = [node for node in nodes if costs.fit(node.budget) >= 1]
    pool = sorted(holders, key=_Node.pref_key)[:MAX_CANDIDATES]
    size = min(per_chain if per_chain is not None else n, n)
    by_memory = sorted(pool, key=lambda node: (-node.budget, node.pref_key()))
    top = min(replicas, len(pool) // size if exact else len(pool))
    per_copy = max(costs.total, 1)
    top = min(top, sum(node.budget for node in pool) // per_copy)
    for count in range(top, 0, -1):
        for ordered in (pool, by_memory):
            groups = _groups(costs, ordered, count, size, exact)
            if groups is not None:
                return _build(model, groups)
    message = _no_fit_message(
        model, costs, kv_reserve_tokens, nodes, pool, rejected, size, exact, memory_fraction
    )
    if priced_out:
        message += (
            f"; {priced_out} candidate(s) excluded for price (over the maximum of {max_price} "
            "per unit, or declaring no price)"
        )
    raise PlanError(message)


def _affordable(node: _Node, max_price: int | None) -> bool:
    """Whether a node's declared price is within `max_price` (None: any node is)."""
    return max_price is None or (node.price is not None and node.price <= max_price)


def _valid_nodes(candidates: Any, memory_fraction: float) -> tuple[list[_Node], int]:
    """Usable candidates (one per peer id, the smallest claim kept) and how many were dropped."""
    try:
        items = list(candidates)
    except TypeError as exc:
        raise PlanError("candidates must be a list of Candidate") from exc
    kept: dict[str, _Node] = {}
    rejected = 0
    for c in items:
        node = _node_of(c, memory_fraction)
        if node is None:
            rejected += 1
            continue
        old = kept.get(node.peer_id)
        if old is None or (node.budget, node.throughput, -node.rtt, -node.price_key) < (
            old.budget,
            old.throughput,
            -old.rtt,
            -old.price_key,
        ):
            kept[node.peer_id] = node
        rejected += old is not None
    return list(kept.values()), rejected


def _node_of(c: Any, memory_fraction: float) -> _Node | None:
    if not isinstance(c, Candidate):
        return None
    if not isinstance(c.peer_id, str) or not 0 < len(c.peer_id) <= MAX_PEER_ID_LEN:
        return None
    if not _is_int(c.free_bytes) or not 0 <= c.free_bytes <= MAX_BYTES:
        return None
    tp = c.throughput
    if not _is_num(tp) or not 0.0 < tp <= MAX_THROUGHPUT:
        return None
    rtt = c.rtt_ms
    rtt_value = float(rtt) if _is_num(rtt) and 0.0 <= rtt <= MAX_RTT_MS else math.inf
    price = c.price_per_unit
    if price is not None and not (_is_int(price) and 0 <= price <= MAX_PRICE_PER_UNIT):
        return None
    budget = min(int(c.free_bytes * memory_fraction), c.free_bytes)
    return _Node(c.peer_id, budget, float(tp), rtt_value, price)


@dataclass(frozen=True)
class _Slot:
    node: _Node
    cap: int
    room: int


def _arrange(costs: LayerCosts, group: list[_Node], exact: bool) -> list[_Slot] | None:
    """Order a group into a chain (ends chosen as described above), or None if it can't hold
    the model with at least one layer on every node. Unless `exact`, a chain may leave out
    nodes that can't help."""
    n, k = costs.count, len(group)
    if k == 0 or k > n:
        return None
    if k == 1:
        node = group[0]
        extra = costs.embed + costs.head
        return [_Slot(node, n, node.budget - extra)] if costs.total <= node.budget else None
    mid = [costs.fit(node.budget, MIDDLE) for node in group]
    first_caps = [costs.fit(node.budget - costs.embed, FIRST) for node in group]
    last_caps = [costs.fit(node.budget - costs.head, LAST) for node in group]
    firsts = sorted((mid[i] - first_caps[i], i) for i in range(k) if first_caps[i] >= 1)[:2]
    lasts = sorted((mid[i] - last_caps[i], i) for i in range(k) if last_caps[i] >= 1)[:2]
    pairs = [(lf + ll, f, la) for lf, f in firsts for ll, la in lasts if f != la]
    if not pairs:
        # At most one node can hold an end: the only chain left is that node alone.
        return None if exact else _arrange(costs, [group[firsts[0][1]]], exact) if firsts else None
    _, f, la = min(pairs)
    middle = [i for i in range(k) if i not in (f, la)]
    slots = [_Slot(group[f], first_caps[f], group[f].budget - costs.embed)]
    slots += [_Slot(group[i], mid[i], group[i].budget) for i in middle]
    slots.append(_Slot(group[la], last_caps[la], group[la].budget - costs.head))
    if sum(s.cap for s in slots) < n:
        return None
    return slots


def _groups(
    costs: LayerCosts, ordered: list[_Node], count: int, size: int, exact: bool
) -> list[list[_Slot]] | None:
    """Deal the first count*size nodes of `ordered` into `count` chains, snake order (1..k,
    k..1, ...) so the chains get similar capacity; None when one of them can't hold the model."""
    chosen = ordered[: count * size]
    if exact and len(chosen) < count * size:
        return None
    groups: list[list[_Node]] = [[] for _ in range(count)]
    for i, node in enumerate(chosen):
        row, col = divmod(i, count)
        groups[col if row % 2 == 0 else count - 1 - col].append(node)
    out = []
    for group in groups:
        slots = _arrange(costs, sorted(group, key=_Node.pref_key), exact)
        if slots is None:
            return None
        out.append(slots)
    return out


def _build(model: ModelSpec, groups: list[list[_Slot]]) -> Plan:
    assignments: list[Assignment] = []
    for replica, slots in enumerate(groups):
        top_room = max(max(s.room, 1) for s in slots)
        top_tp = max(s.node.throughput for s in slots)
        weights = [
            max(max(s.room, 1) / top_room, _MIN_FACTOR)
            * max(s.node.throughput / top_tp, _MIN_FACTOR)
            for s in slots
        ]
        counts = _water_fill(model.num_layers, weights, [s.cap for s in slots])
        start = 0
        for slot, layers in zip(slots, counts, strict=True):
            assignments.append(Assignment(slot.node.peer_id, start, start + layers, replica))
            start += layers
    return Plan(model.name, assignments, len(groups), model.num_layers)


def _water_fill(n: int, weights: list[float], caps: list[int]) -> list[int]:
    """Integers k_i in [1, cap_i] summing to n, as close as can be to proportional to weights.

    Needs len(weights) <= n <= sum(caps) and every cap >= 1.
    """

    def shares(lam: float) -> list[float]:
        return [min(max(lam * w, 1.0), float(c)) for w, c in zip(weights, caps, strict=True)]

    lo, hi = 0.0, max(c / w for w, c in zip(weights, caps, strict=True))
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(shares(mid)) < n:
            lo = mid
        else:
            hi = mid
    real = shares(hi)
    counts = [min(max(int(math.floor(x)), 1), c) for x, c in zip(real, caps, strict=True)]
    order = sorted(range(len(counts)), key=lambda i: (-(real[i] - counts[i]), i))
    while sum(counts) < n:
        for i in order:
            if sum(counts) < n and counts[i] < caps[i]:
                counts[i] += 1
    while sum(counts) > n:
        for i in reversed(order):
            if sum(counts) > n and counts[i] > 1:
                counts[i] -= 1
    return counts


def _no_fit_message(
    model: ModelSpec,
    costs: LayerCosts,
    tokens: int,
    nodes: list[_Node],
    pool: list[_Node],
    rejected: int,
    size: int,
    exact: bool,
    memory_fraction: float,
) -> str:
    reserve = costs.layer_total - model.num_layers * model.layer_bytes
    need = (
        f"model {model.name!r} needs {_fmt(costs.total)}: {model.num_layers} layers x "
        f"{model.layer_bytes} + KV-cache reserve {reserve} ({tokens} tokens per layer"
        + (
            f", fixed {model.cache_bytes_per_layer} per layer"
            if model.cache_bytes_per_layer
            else ""
        )
        + f") + embedding {model.embed_bytes} + head {model.head_bytes}"
    )
    usable = sum(node.budget for node in nodes)
    have = (
        f"{len(nodes)} candidate(s) offer {_fmt(usable)} usable "
        f"({memory_fraction:.0%} of their free memory)"
    )
    if rejected:
        have += f"; {rejected} candidate(s) ignored as invalid or duplicate"
    if usable < costs.total:
        return f"{need}, but {have}"
    if len(pool) < len(nodes):
        have += f"; {len(nodes) - len(pool)} can't hold even one layer"
    if exact and len(pool) < size:
        return f"{need}; can't split over exactly {size} daemons: {have}, {len(pool)} usable"
    best = sum(node.budget for node in sorted(pool, key=lambda n: -n.budget)[:size])
    if size < model.num_layers and best < costs.total:
        return (
            f"{need}; {have}, but a chain may use only {size} node(s) and the {size} "
            f"largest hold only {_fmt(best)}"
        )
    return (
        f"{need}; {have}, but no chain fits: no node holds the embedding or the head "
        "beside a layer, or rounding to whole layers per node loses too much"
    )


def _fmt(count: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= scale:
            return f"{count} bytes ({count / scale:.2f} {unit})"
    return f"{count} bytes"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
