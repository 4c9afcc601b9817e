"""Placement: which cluster members serve which layers of a model, and why.

`place` is the one seam a cluster's coordinator calls (a sandboxed policy may replace it
later): a plain function of what the coordinator knows about its members, with no I/O. It
scores every eligible member by weighted terms, each normalised to [0, 1] over the members
being compared (so the weights, not the units, say what matters):

- `memory`     (+) the node's layer budget (`memory_fraction` of its free bytes) / the largest
- `throughput` (+) its measured speed (1 / announced `ms_per_layer`) / the fastest
- `rtt`        (-) its mean measured round trip to the other members / the largest such mean
               (a hop between two members costs their RTT on every token)
- `energy`     (-) its energy cost per layer run: GPU power draw x ms_per_layer x declared
               price per kWh, / the dearest
- `carbon`     (-) the same with its declared grams of CO2 per kWh instead of the price

A value a node does not declare or has not measured is *assumed* and named in its breakdown:
an unmeasured speed is the median of the measured ones; an undeclared price, carbon intensity
or GPU power the worst declared one (a node never gains by keeping quiet); an unmeasured RTT
between two members `unknown_rtt_ms`. A node without GPUs draws 0 GPU watts.

Chains are built in score order, fewest nodes first: the best-scored members are added to a
chain until their budgets hold the range, and `scheduler.shard_plan.plan_with_nodes` splits the
layers over them (memory-weighted, adjusted by throughput; the ends where the embedding and
the head fit). Between the ends, the nodes are then ordered to make the sum of consecutive
hops' RTTs smallest (each keeps its count of layers, so memory stays within budget).
`replicas` chains use disjoint nodes; fewer are built when the members can't hold that many.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from msgspec import Meta

from scheduler.model_memory import (
    DEFAULT_KV_RESERVE_TOKENS,
    MAX_KV_RESERVE_TOKENS,
    LayerCosts,
    check_reserve_tokens,
)
from scheduler.shard_plan import (
    MAX_BYTES,
    MAX_PEER_ID_LEN,
    MAX_REPLICAS,
    Assignment,
    Candidate,
    ModelSpec,
    Plan,
    PlanError,
    plan_shards,
    plan_with_nodes,
)

MAX_NODES = 1024  # members compared at once (the pairwise RTT mean is quadratic)
MAX_RTT_ENTRIES = 4096  # measured RTTs read per node
MAX_MS_PER_LAYER = 1e6
MIN_MS_PER_LAYER = 1e-6
MAX_POWER_W = 1e6
MAX_ENERGY_PRICE = 1e9  # per kWh, in any currency: only ratios between nodes matter
MAX_CARBON = 1e6  # g CO2 per kWh
MAX_RTT_MS = 1e7
_BRUTE_FORCE_MIDDLE = 6  # chains with up to this many middle nodes are ordered exactly
TERMS = ("memory", "throughput", "rtt", "energy", "carbon")

Weight = Annotated[float, Meta(ge=0.0, le=1000.0)]


class PlacementError(PlanError):
    """The range can't be placed on these members; the message says what was needed."""


@dataclass(frozen=True)
class PlacementWeights:
    """How much each term counts (0: ignored). Exposed as `[cluster] placement_*` keys."""

    memory: Weight = 1.0
    throughput: Weight = 1.0
    rtt: Weight = 1.0
    energy: Weight = 0.5
    carbon: Weight = 0.5
    # the RTT assumed between two members when neither has measured the other
    unknown_rtt_ms: Annotated[float, Meta(ge=0.0, le=60_000.0)] = 50.0
    # the share of a node's free memory a plan may use
    memory_fraction: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.9
    # the most nodes one chain may use (0: as many as the range has layers)
    max_nodes_per_chain: Annotated[int, Meta(ge=0, le=MAX_NODES)] = 0
    # positions of KV cache a node keeps room for in each layer it is given, beside the
    # weights (a sliding-window layer: at most its window; scheduler.model_memory)
    kv_reserve_tokens: Annotated[int, Meta(ge=0, le=MAX_KV_RESERVE_TOKENS)] = (
        DEFAULT_KV_RESERVE_TOKENS
    )

    def validate(self) -> None:
        for name in TERMS:
            if not _is_num(getattr(self, name)) or not 0.0 <= getattr(self, name) <= 1000.0:
                raise PlacementError(f"weight {name} must be a number in [0, 1000]")
        if not _is_num(self.unknown_rtt_ms) or not 0.0 <= self.unknown_rtt_ms <= 60_000.0:
            raise PlacementError("unknown_rtt_ms must be a number in [0, 60000]")
        if not _is_num(self.memory_fraction) or not 0.0 < self.memory_fraction <= 1.0:
            raise PlacementError("memory_fraction must be a number in (0, 1]")
        if not _is_int(self.max_nodes_per_chain) or not 0 <= self.max_nodes_per_chain <= MAX_NODES:
            raise PlacementError(f"max_nodes_per_chain must be an integer in [0, {MAX_NODES}]")
        try:
            check_reserve_tokens(self.kv_reserve_tokens)
        except PlanError as exc:
            raise PlacementError(str(exc)) from None


@dataclass(frozen=True)
class NodeFacts:
    """What the coordinator knows of one member (from its signed record and announcements)."""

    peer_id: str
    free_bytes: int
    ms_per_layer: float | None = None
    """Measured (announced by a block it serves); None: it has served nothing yet."""
    rtt_ms: Mapping[str, float] = field(default_factory=dict)
    """Round trips it measured to other peers, by peer id."""
    gpu_power_w: float | None = None
    """Its GPUs' power draw; 0 without GPUs; None: it has GPUs whose draw is unknown."""
    energy_price_per_kwh: float | None = None
    carbon_g_per_kwh: float | None = None


@dataclass(frozen=True)
class PlacementRequest:
    model: ModelSpec
    replicas: int = 1
    start: int = 0
    end: int | None = None
    """Place layers [start, end) only (healing a chain); None: to the model's last layer."""


@dataclass(frozen=True)
class NodeScore:
    peer_id: str
    total: float
    terms: dict[str, float]
    """Each term's weighted contribution (negative for costs); they sum to `total`."""
    inputs: dict[str, float | None]
    """The values scored (free/budget bytes, ms_per_layer, mean_rtt_ms, gpu_power_w, ...)."""
    assumed: tuple[str, ...] = ()
    """Inputs the node did not declare or measure (their values above were assumed)."""
    chosen: bool = False
    next_hop_rtt_ms: float | None = None
    """In the plan: the RTT from this node to the next node of its chain (None: the last)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "total": round(self.total, 6),
            "terms": {k: round(v, 6) for k, v in self.terms.items()},
            "inputs": self.inputs,
            "assumed": list(self.assumed),
            "chosen": self.chosen,
            "next_hop_rtt_ms": self.next_hop_rtt_ms,
        }


@dataclass(frozen=True)
class Placement:
    plan: Plan
    start: int
    end: int
    scores: dict[str, NodeScore]
    """Every eligible node's score, chosen or not."""
    excluded: dict[str, str]
    """Nodes left out before scoring, and why."""

    def to_json(self) -> dict[str, Any]:
        ranked = sorted(self.scores.values(), key=lambda s: (-s.total, s.peer_id))
        return {
            **self.plan.to_json(),
            "start": self.start,
            "end": self.end,
            "scores": [s.to_json() for s in ranked],
            "excluded": dict(sorted(self.excluded.items())),
        }


@dataclass
class _Scored:
    facts: NodeFacts
    budget: int
    speed: float  # layers per ms (measured or assumed)
    score: NodeScore


def place(
    request: PlacementRequest,
    nodes: Iterable[NodeFacts],
    weights: PlacementWeights | None = None,
) -> Placement:
    """Plan `request` over `nodes` (the eligible members), with every node's score broken
    down by term. Deterministic: the order of `nodes` doesn't matter. PlacementError when not
    even one chain of the range fits."""
    weights = weights or PlacementWeights()
    weights.validate()
    model, start, end = _check_request(request)
    sub = _sub_spec(model, start, end)
    costs = LayerCosts.of(sub, weights.kv_reserve_tokens)
    facts, excluded = _valid(nodes, costs, weights.memory_fraction)
    scored = _score(facts, weights)
    order = sorted(scored, key=lambda s: (-s.score.total, s.facts.peer_id))
    limit = weights.max_nodes_per_chain or sub.num_layers
    chains: list[list[Assignment]] = []
    left = list(order)
    for replica in range(request.replicas):
        chain = _chain(sub, costs, left, limit, weights, replica)
        if chain is None:
            break
        chains.append(chain)
        used = {a.peer_id for a in chain}
        left = [s for s in left if s.facts.peer_id not in used]
    if not chains:
        raise PlacementError(_no_fit(sub, costs, start, end, scored, excluded, limit, weights))
    by_peer = {n.peer_id: n for n in facts}
    rtt, _ = _rtt_table((by_peer[a.peer_id] for chain in chains for a in chain), weights)
    final: dict[str, NodeScore] = {s.facts.peer_id: s.score for s in scored}
    assignments: list[Assignment] = []
    for chain in chains:
        for i, a in enumerate(chain):
            nxt = chain[i + 1].peer_id if i + 1 < len(chain) else None
            hop = None if nxt is None else round(rtt[(a.peer_id, nxt)], 3)
            final[a.peer_id] = _with(final[a.peer_id], chosen=True, next_hop_rtt_ms=hop)
            assignments.append(Assignment(a.peer_id, a.start + start, a.end + start, a.replica))
    plan = Plan(model.name, assignments, len(chains), model.num_layers)
    return Placement(plan, start, end, final, excluded)


# -- checking ---------------------------------------------------------------------------------


def _check_request(request: Any) -> tuple[ModelSpec, int, int]:
    if not isinstance(request, PlacementRequest) or not isinstance(request.model, ModelSpec):
        raise PlacementError("request must be a PlacementRequest with a ModelSpec")
    model = request.model
    model.validate()
    if not _is_int(request.replicas) or not 1 <= request.replicas <= MAX_REPLICAS:
        raise PlacementError(f"replicas must be an integer in [1, {MAX_REPLICAS}]")
    end = model.num_layers if request.end is None else request.end
    if not (_is_int(request.start) and _is_int(end) and 0 <= request.start < end):
        raise PlacementError("the range must have 0 <= start < end")
    if end > model.num_layers:
        raise PlacementError(f"the range ends past the model's {model.num_layers} layers")
    return model, request.start, end


def _sub_spec(model: ModelSpec, start: int, end: int) -> ModelSpec:
    """The range [start, end) as a model of its own: the embedding only if it starts at 0,
    the head only if it ends at the last layer."""
    return ModelSpec(
        model.name,
        end - start,
        model.layer_bytes,
        model.embed_bytes if start == 0 else 0,
        model.head_bytes if end == model.num_layers else 0,
        model.cache_bytes_per_layer,
        model.kv_bytes_per_token,
        model.window_range(start, end),
    )


def _budget(free: int, fraction: float) -> int:
    return min(int(free * fraction), free)  # as scheduler.shard_plan computes it


def _valid(
    nodes: Iterable[Any], costs: LayerCosts, fraction: float
) -> tuple[list[NodeFacts], dict[str, str]]:
    """Usable nodes (bounded values, one per peer id, one layer at least fits) and why the
    others were left out."""
    try:
        items = list(itertools.islice(iter(nodes), MAX_NODES * 4))
    except TypeError as exc:
        raise PlacementError("nodes must be a list of NodeFacts") from exc
    kept: dict[str, NodeFacts] = {}
    excluded: dict[str, str] = {}
    if not all(isinstance(n, NodeFacts) and isinstance(n.peer_id, str) for n in items):
        raise PlacementError("nodes must be NodeFacts with a peer id")
    listed = Counter(n.peer_id for n in items)
    for item in sorted(items, key=lambda n: n.peer_id):
        peer = item.peer_id[:MAX_PEER_ID_LEN]
        problem = "listed twice" if listed[item.peer_id] > 1 else _problem(item)
        if problem is None and _budget(item.free_bytes, fraction) < costs.largest:
            problem = (
                f"too little free memory: {item.free_bytes} bytes, one layer needs "
                f"{costs.largest} (weights and KV-cache reserve) within {fraction:.0%}"
            )
        if problem is None:
            kept[peer] = item
        else:
            excluded[peer] = problem
    if len(kept) > MAX_NODES:
        for peer in sorted(kept)[MAX_NODES:]:
            excluded[peer] = f"over the {MAX_NODES} nodes compared at once"
            del kept[peer]
    return list(kept.values()), excluded


def _problem(n: NodeFacts) -> str | None:
    """Why a node's facts can't be used, or None."""
    if not 0 < len(n.peer_id) <= MAX_PEER_ID_LEN:
        return "bad peer id"
    if not _is_int(n.free_bytes) or not 0 <= n.free_bytes <= MAX_BYTES:
        return "free_bytes must be an integer in [0, 2**62]"
    for name, top in (
        ("ms_per_layer", MAX_MS_PER_LAYER),
        ("gpu_power_w", MAX_POWER_W),
        ("energy_price_per_kwh", MAX_ENERGY_PRICE),
        ("carbon_g_per_kwh", MAX_CARBON),
    ):
        value = getattr(n, name)
        if value is not None and (not _is_num(value) or not 0.0 <= value <= top):
            return f"{name} must be a number in [0, {top:g}] or unknown"
    if n.ms_per_layer is not None and n.ms_per_layer < MIN_MS_PER_LAYER:
        return f"ms_per_layer must be at least {MIN_MS_PER_LAYER:g}"
    if not isinstance(n.rtt_ms, Mapping):
        return "rtt_ms must be a mapping of peer id to milliseconds"
    return None


# -- scoring ----------------------------------------------------------------------------------


def _rtts_of(n: NodeFacts) -> dict[str, float]:
    """The node's usable RTT measurements (bounded; odd values ignored)."""
    out: dict[str, float] = {}
    for peer, ms in itertools.islice(n.rtt_ms.items(), MAX_RTT_ENTRIES):
        if isinstance(peer, str) and _is_num(ms) and 0.0 <= ms <= MAX_RTT_MS:
            out[peer] = float(ms)
    return out


def _rtt_table(
    facts: Iterable[NodeFacts], weights: PlacementWeights
) -> tuple[dict[tuple[str, str], float], set[str]]:
    """RTT between every ordered pair of nodes (the mean of what either side measured, else
    `unknown_rtt_ms`), and the nodes with a pair that was assumed."""
    measured = {n.peer_id: _rtts_of(n) for n in facts}
    table: dict[tuple[str, str], float] = {}
    guessed: set[str] = set()
    for a, b in itertools.combinations(sorted(measured), 2):
        seen = [v for v in (measured[a].get(b), measured[b].get(a)) if v is not None]
        if not seen:
            guessed.update((a, b))
        table[(a, b)] = table[(b, a)] = sum(seen) / len(seen) if seen else weights.unknown_rtt_ms
    return table, guessed


def _score(facts: list[NodeFacts], weights: PlacementWeights) -> list[_Scored]:
    if not facts:
        return []
    budgets = {n.peer_id: _budget(n.free_bytes, weights.memory_fraction) for n in facts}

    def known(name: str) -> list[float]:
        return [float(v) for n in facts if (v := getattr(n, name)) is not None]

    fallback = {
        "ms_per_layer": statistics.median(known("ms_per_layer") or [1.0]),
        "gpu_power_w": max(known("gpu_power_w"), default=0.0),
        "energy_price_per_kwh": max(known("energy_price_per_kwh"), default=0.0),
        "carbon_g_per_kwh": max(known("carbon_g_per_kwh"), default=0.0),
    }
    rtt, rtt_guessed = _rtt_table(facts, weights)
    raw: dict[str, dict[str, float]] = {}
    assumed: dict[str, tuple[str, ...]] = {}
    for n in facts:
        values = {k: getattr(n, k) for k in fallback}
        guess = [k for k, v in values.items() if v is None]
        values = {k: fallback[k] if v is None else float(v) for k, v in values.items()}
        if n.peer_id in rtt_guessed:
            guess.append("rtt_ms")
        others = [rtt[(n.peer_id, p)] for p in budgets if p != n.peer_id]
        kwh_per_layer = values["gpu_power_w"] * values["ms_per_layer"] / 3.6e9  # W x ms -> kWh
        raw[n.peer_id] = {
            "free_bytes": float(n.free_bytes),
            "budget_bytes": float(budgets[n.peer_id]),
            **values,
            "mean_rtt_ms": sum(others) / len(others) if others else 0.0,
            "energy_cost_per_layer": kwh_per_layer * values["energy_price_per_kwh"],
            "carbon_g_per_layer": kwh_per_layer * values["carbon_g_per_kwh"],
        }
        assumed[n.peer_id] = tuple(guess)

    def top(key: str) -> float:
        return max(r[key] for r in raw.values())

    fastest = 1.0 / min(r["ms_per_layer"] for r in raw.values())
    out = []
    for n in facts:
        r = raw[n.peer_id]
        speed = 1.0 / r["ms_per_layer"]
        terms = {
            "memory": weights.memory * _ratio(r["budget_bytes"], top("budget_bytes")),
            "throughput": weights.throughput * _ratio(speed, fastest),
            "rtt": -weights.rtt * _ratio(r["mean_rtt_ms"], top("mean_rtt_ms")),
            "energy": -weights.energy
            * _ratio(r["energy_cost_per_layer"], top("energy_cost_per_layer")),
            "carbon": -weights.carbon * _ratio(r["carbon_g_per_layer"], top("carbon_g_per_layer")),
        }
        inputs: dict[str, float | None] = dict(r)
        score = NodeScore(n.peer_id, sum(terms.values()), terms, inputs, assumed[n.peer_id])
        out.append(_Scored(n, budgets[n.peer_id], speed, score))
    return out


def _ratio(value: float, top: float) -> float:
    return value / top if top > 0 else 0.0


def _with(score: NodeScore, **changes: Any) -> NodeScore:
    return dataclasses.replace(score, **changes)


# -- chains -----------------------------------------------------------------------------------


def _chain(
    sub: ModelSpec,
    costs: LayerCosts,
    ordered: list[_Scored],
    limit: int,
    weights: PlacementWeights,
    replica: int,
) -> list[Assignment] | None:
    """The fewest best-scored nodes of `ordered` that hold `sub`, split and ordered; None if
    no chain of at most `limit` of them does.

    The best-scored prefix that holds the range is tried first; when none does (a node that
    can't hold an end, rounding to whole layers), shard_plan's own choice among all of them."""
    limit = min(limit, sub.num_layers)
    frac, tokens = weights.memory_fraction, weights.kv_reserve_tokens
    chain: list[Assignment] | None = None
    for size in range(1, min(limit, len(ordered)) + 1):
        group = ordered[:size]
        if sum(s.budget for s in group) < costs.total:
            continue
        try:
            plan = plan_with_nodes(
                sub, _candidates(group), size, memory_fraction=frac, kv_reserve_tokens=tokens
            )
        except PlanError:
            continue
        chain = plan.chains()[0]
        break
    if chain is None:
        try:
            plan = plan_shards(
                sub,
                _candidates(ordered),
                max_nodes=limit,
                memory_fraction=frac,
                kv_reserve_tokens=tokens,
            )
        except PlanError:
            return None
        chain = plan.chains()[0]
    facts = {s.facts.peer_id: s.facts for s in ordered}
    rtt, _ = _rtt_table((facts[a.peer_id] for a in chain), weights)
    return _order_middle([Assignment(a.peer_id, a.start, a.end, replica) for a in chain], rtt)


def _candidates(group: list[_Scored]) -> list[Candidate]:
    return [Candidate(s.facts.peer_id, s.facts.free_bytes, s.speed) for s in group]


def _order_middle(
    chain: list[Assignment], rtt: Mapping[tuple[str, str], float]
) -> list[Assignment]:
    """Keep the ends, order the nodes between them (each with its count of layers) so the
    sum of consecutive RTTs is smallest: exactly for short chains, greedily for long ones."""
    if len(chain) <= 3:
        return chain
    first, middle, last = chain[0], chain[1:-1], chain[-1]

    def cost(order: list[Assignment] | tuple[Assignment, ...]) -> float:
        path = [first, *order, last]
        return sum(rtt[(a.peer_id, b.peer_id)] for a, b in itertools.pairwise(path))

    if len(middle) <= _BRUTE_FORCE_MIDDLE:
        best: list[Assignment] | tuple[Assignment, ...] = middle
        for order in itertools.permutations(middle):
            if cost(order) < cost(best) - 1e-9:
                best = order
        ordered = list(best)
    else:
        ordered, here, rest = [], first, list(middle)
        while rest:
            nxt = min(rest, key=lambda a: rtt[(here.peer_id, a.peer_id)])
            rest.remove(nxt)
            ordered.append(nxt)
            here = nxt
        if cost(ordered) >= cost(middle):
            ordered = list(middle)
    out, start = [first], first.end
    for a in [*ordered, last]:
        out.append(Assignment(a.peer_id, start, start + a.layers, a.replica))
        start += a.layers
    return out


def _no_fit(
    sub: ModelSpec,
    costs: LayerCosts,
    start: int,
    end: int,
    scored: list[_Scored],
    excluded: dict[str, str],
    limit: int,
    weights: PlacementWeights,
) -> str:
    usable = sum(s.budget for s in scored)
    message = (
        f"layers {start}..{end} of {sub.name!r} need {costs.total} bytes "
        f"({sub.num_layers} layers of {sub.layer_bytes} + KV-cache reserve "
        f"{costs.layer_total - sub.num_layers * sub.layer_bytes} for "
        f"{weights.kv_reserve_tokens} tokens per layer"
        + (f" + embedding {sub.embed_bytes}" if sub.embed_bytes else "")
        + (f" + head {sub.head_bytes}" if sub.head_bytes else "")
        + f"); {len(scored)} eligible node(s) offer {usable} usable bytes "
        f"({weights.memory_fraction:.0%} of their free memory)"
    )
    if usable >= costs.total:
        message += f", but no chain of at most {limit} of them holds it in whole layers"
    if excluded:
        message += f"; {len(excluded)} left out ({'; '.join(sorted(set(excluded.values()))[:3])})"
    return message


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
