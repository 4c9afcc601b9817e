"""Shard planning: cut a model's layers into contiguous ranges and place them on daemons.

Pure decision logic: no I/O, no torch. Candidates usually come from other peers' resource
records, so every value is checked and bounded; a candidate with odd values is left out,
never trusted and never a crash.

The rule (exo's memory-weighted partitioning, adjusted by throughput):

1. A node's *budget* is `floor(memory_fraction * free_bytes)`. A range `[s, e)` costs
   `(e - s) * (layer_bytes + cache_bytes_per_layer)`, plus `embed_bytes` when `s == 0` and
   `head_bytes` when `e == num_layers`. No range ever exceeds its node's budget.
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

MAX_LAYERS = 100_000
MAX_BYTES = 2**62
MAX_REPLICAS = 1024
MAX_CANDIDATES = 4096
MAX_PEER_ID_LEN = 256
MAX_NAME_LEN = 256
MAX_THROUGHPUT = 1e15
MAX_RTT_MS = 1e7
_MIN_FACTOR = 1e-12
_UNKNOWN_PRICE = MAX_PRICE_PER_UNIT + 1  # a node without a price sorts after every price


class PlanError(ValueError):
    """The model can't be placed as asked; the message says what was needed and available."""


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
class ModelSpec:
    name: str
    num_layers: int
    layer_bytes: int
    embed_bytes: int
    head_bytes: int
    cache_bytes_per_layer: int = 0

    @property
    def per_layer_bytes(self) -> int:
        """Bytes one layer takes on a server, weights plus the KV-cache reserve."""
        return self.layer_bytes + self.cache_bytes_per_layer

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.per_layer_bytes + self.embed_bytes + self.head_bytes

    def validate(self) -> None:
        if not isinstance(self.name, str) or not 0 < len(self.name) <= MAX_NAME_LEN:
            raise PlanError(f"model name must be a string of 1 to {MAX_NAME_LEN} characters")
        if not _is_int(self.num_layers) or not 1 <= self.num_layers <= MAX_LAYERS:
            raise PlanError(f"num_layers must be an integer in [1, {MAX_LAYERS}]")
        for field in ("layer_bytes", "embed_bytes", "head_bytes", "cache_bytes_per_layer"):
            value = getattr(self, field)
            if not _is_int(value) or not 0 <= value <= MAX_BYTES:
                raise PlanError(f"{field} must be an integer in [0, 2**62]")


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
) -> Plan:
    """Place `model` on up to `max_nodes` nodes per chain, `replicas` chains if they fit.

    Returns a plan with at least one full chain (its `replicas` says how many were built);
    raises PlanError when not even one fits. Deterministic: the input order doesn't matter.
    `max_price_per_unit` (None: no maximum) leaves out the candidates over it or unpriced.
    """
    if max_nodes is not None and (not _is_int(max_nodes) or max_nodes < 1):
        raise PlanError("max_nodes must be a positive integer or None")
    return _plan(model, candidates, replicas, max_nodes, False, memory_fraction, max_price_per_unit)


def plan_with_nodes(
    model: ModelSpec,
    candidates: Iterable[Candidate],
    n_nodes: int,
    *,
    replicas: int = 1,
    memory_fraction: float = 0.9,
    max_price_per_unit: int | None = None,
) -> Plan:
    """Like plan_shards, but every chain is split over exactly `n_nodes` daemons."""
    if not _is_int(n_nodes) or n_nodes < 1:
        raise PlanError("n_nodes must be a positive integer")
    return _plan(model, candidates, replicas, n_nodes, True, memory_fraction, max_price_per_unit)


def _plan(
    model: ModelSpec,
    candidates: Iterable[Candidate],
    replicas: int,
    per_chain: int | None,
    exact: bool,
    memory_fraction: float,
    max_price: int | None = None,
) -> Plan:
    if not isinstance(model, ModelSpec):
        raise PlanError("model must be a ModelSpec")
    model.validate()
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
    holders = [node for node in nodes if _fit(model, node.budget, 0) >= 1]
    pool = sorted(holders, key=_Node.pref_key)[:MAX_CANDIDATES]
    size = min(per_chain if per_chain is not None else n, n)
    by_memory = sorted(pool, key=lambda node: (-node.budget, node.pref_key()))
    top = min(replicas, len(pool) // size if exact else len(pool))
    per_copy = max(model.total_bytes, 1)
    top = min(top, sum(node.budget for node in pool) // per_copy)
    for count in range(top, 0, -1):
        for ordered in (pool, by_memory):
            groups = _groups(model, ordered, count, size, exact)
            if groups is not None:
                return _build(model, groups)
    message = _no_fit_message(model, nodes, pool, rejected, size, exact, memory_fraction)
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


def _fit(model: ModelSpec, budget: int, extra: int) -> int:
    """How many layers (at most num_layers) fit in `budget` beside `extra` bytes; -1: none."""
    room = budget - extra
    if room < 0:
        return -1
    if model.per_layer_bytes == 0:
        return model.num_layers
    return min(model.num_layers, room // model.per_layer_bytes)


@dataclass(frozen=True)
class _Slot:
    node: _Node
    cap: int
    room: int


def _arrange(model: ModelSpec, group: list[_Node], exact: bool) -> list[_Slot] | None:
    """Order a group into a chain (ends chosen as described above), or None if it can't hold
    the model with at least one layer on every node. Unless `exact`, a chain may leave out
    nodes that can't help."""
    n, k = model.num_layers, len(group)
    if k == 0 or k > n:
        return None
    if k == 1:
        node = group[0]
        extra = model.embed_bytes + model.head_bytes
        cap = _fit(model, node.budget, extra)
        return [_Slot(node, cap, node.budget - extra)] if cap >= n else None
    mid = [_fit(model, node.budget, 0) for node in group]
    first_caps = [_fit(model, node.budget, model.embed_bytes) for node in group]
    last_caps = [_fit(model, node.budget, model.head_bytes) for node in group]
    firsts = sorted((mid[i] - first_caps[i], i) for i in range(k) if first_caps[i] >= 1)[:2]
    lasts = sorted((mid[i] - last_caps[i], i) for i in range(k) if last_caps[i] >= 1)[:2]
    pairs = [(lf + ll, f, la) for lf, f in firsts for ll, la in lasts if f != la]
    if not pairs:
        # At most one node can hold an end: the only chain left is that node alone.
        return None if exact else _arrange(model, [group[firsts[0][1]]], exact) if firsts else None
    _, f, la = min(pairs)
    middle = [i for i in range(k) if i not in (f, la)]
    slots = [_Slot(group[f], first_caps[f], group[f].budget - model.embed_bytes)]
    slots += [_Slot(group[i], mid[i], group[i].budget) for i in middle]
    slots.append(_Slot(group[la], last_caps[la], group[la].budget - model.head_bytes))
    if sum(s.cap for s in slots) < n:
        return None
    return slots


def _groups(
    model: ModelSpec, ordered: list[_Node], count: int, size: int, exact: bool
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
        slots = _arrange(model, sorted(group, key=_Node.pref_key), exact)
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
    nodes: list[_Node],
    pool: list[_Node],
    rejected: int,
    size: int,
    exact: bool,
    memory_fraction: float,
) -> str:
    need = (
        f"model {model.name!r} needs {_fmt(model.total_bytes)}: {model.num_layers} layers x "
        f"{model.per_layer_bytes} (incl. KV-cache reserve) + embedding {model.embed_bytes} "
        f"+ head {model.head_bytes}"
    )
    usable = sum(node.budget for node in nodes)
    have = (
        f"{len(nodes)} candidate(s) offer {_fmt(usable)} usable "
        f"({memory_fraction:.0%} of their free memory)"
    )
    if rejected:
        have += f"; {rejected} candidate(s) ignored as invalid or duplicate"
    if usable < model.total_bytes:
        return f"{need}, but {have}"
    if len(pool) < len(nodes):
        have += f"; {len(nodes) - len(pool)} can't hold even one layer"
    if exact and len(pool) < size:
        return f"{need}; can't split over exactly {size} daemons: {have}, {len(pool)} usable"
    best = sum(node.budget for node in sorted(pool, key=lambda n: -n.budget)[:size])
    if size < model.num_layers and best < model.total_bytes:
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
