"""Route finding: the cheapest chain of servers covering a model's layers (Petals-style).

Pure decision logic: no I/O. Server announcements come from other peers, so every field is
checked; a server with odd values is skipped (and named in the error if no route is found).

Cost model, in milliseconds: each server costs `ms_per_layer` for each layer it runs on the
route, plus its hops:
- without `hop_rtt` the client relays: it sends to each server and gets the result back, so
  every span costs that server's full `rtt_ms` (Petals' model);
- with `hop_rtt(a, b)` servers forward to the next server directly: the route costs half the
  client's rtt to the first server, half of each server-to-server rtt, and half the last
  server's rtt for the way back (one-way latencies along the ring). `hop_rtt` returning
  +inf means the two can't talk (no edge); NaN or a negative value means unknown, and we
  fall back to going through the client, `(rtt_a + rtt_b) / 2`.

The search is Dijkstra (heapq) over states "activations are at layer boundary b, held by
server s". A server may be entered at any boundary inside its range and run any sub-range.
Costs are summed as integer microseconds so that equal costs compare equal; on equal cost
the cheaper route wins (the sum of each server's price per unit times the layers it runs; a
server that declares no price counts as dearer than any price), then fewer hops, then the
order of servers sorted by (peer id, range). The result does not depend on the input order.

Prices: `max_price_per_unit` (a job's maximum, in the stablecoin's smallest unit per
layer-token) leaves out every server whose price is over it, and every server that declares
none (an older version: it cannot be paid); a NoRouteError says how many were left out so.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from p2p.records import MAX_PRICE_PER_UNIT

MAX_LAYERS = 100_000
MAX_SERVERS = 4096
MAX_PEER_ID_LEN = 256
MAX_MS = 1e7
_LISTED = 16
_CLIENT = -1
_DONE = -2

_State = tuple[int, int]
# what a server that declares no price weighs in the tie-break: more than any price
_UNKNOWN_PRICE = MAX_PRICE_PER_UNIT + 1

HopRtt = Callable[[str, str], float]


class NoRouteError(LookupError):
    """No chain of usable servers covers the layers asked for."""

    def __init__(
        self,
        message: str,
        *,
        missing: list[tuple[int, int]],
        first_missing: int,
        considered: list[str],
        skipped: dict[str, str],
        priced_out: int = 0,
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.first_missing = first_missing
        self.considered = considered
        self.skipped = skipped
        self.priced_out = priced_out
        """How many servers (peers) were left out for their price."""


@dataclass(frozen=True)
class Server:
    peer_id: str
    start: int
    end: int
    """Half-open layer range the server holds."""
    ms_per_layer: float
    rtt_ms: float
    """Round trip from the client."""
    alive: bool = True
    price_per_unit: int | None = None
    """Its price per layer-token; None: it declares none (an older version)."""


@dataclass(frozen=True)
class Span:
    peer_id: str
    start: int
    end: int


def find_route(
    servers: Iterable[Server],
    num_layers: int,
    *,
    start: int = 0,
    exclude: Iterable[str] = frozenset(),
    hop_rtt: HopRtt | None = None,
    max_price_per_unit: int | None = None,
) -> list[Span]:
    """The cheapest chain of spans covering `[start, num_layers)`.

    `start > 0` re-routes after a failure: pass the layer where the dead server's span began
    and the dead server in `exclude`. `max_price_per_unit` (None: no maximum) leaves out the
    servers over it or without a price. Raises NoRouteError naming the missing layers.
    """
    return _search(servers, num_layers, start, exclude, hop_rtt, max_price_per_unit)[0]


def route_cost(
    route: list[Span],
    servers: Iterable[Server],
    *,
    hop_rtt: HopRtt | None = None,
) -> float:
    """The estimated time of `route` in ms under the cost model above (inf if it can't run).

    When a peer announces several ranges, each span is charged to the cheapest usable one
    that holds it.
    """
    by_peer: dict[str, list[Server]] = {}
    for s in servers:
        if _usable(s) is None:
            by_peer.setdefault(s.peer_id, []).append(s)
    total = 0.0
    prev: Server | None = None
    for span in route:
        options: list[tuple[float, Server]] = []
        for s in by_peer.get(span.peer_id, []):
            if not s.start <= span.start < span.end <= s.end:
                continue
            if hop_rtt is None:
                hop: float | None = s.rtt_ms
            elif prev is None:
                hop = s.rtt_ms / 2
            else:
                full = _hop(hop_rtt, prev, s)
                hop = None if full is None else full / 2
            if hop is not None:
                options.append((hop + s.ms_per_layer * (span.end - span.start), s))
        if not options:
            return math.inf
        cost, prev = min(options, key=lambda o: (o[0], o[1].start, o[1].end))
        total += cost
    if hop_rtt is not None and prev is not None:
        total += prev.rtt_ms / 2
    return total


def _usable(s: Any) -> str | None:
    """Why a server can't be used on its own terms (None: it can)."""
    if not isinstance(s, Server):
        return "not a Server"
    if not isinstance(s.peer_id, str) or not 0 < len(s.peer_id) <= MAX_PEER_ID_LEN:
        return "bad peer id"
    if not (_is_int(s.start) and _is_int(s.end) and 0 <= s.start < s.end <= MAX_LAYERS):
        return "bad range"
    if not (_is_num(s.ms_per_layer) and 0.0 <= s.ms_per_layer <= MAX_MS):
        return "bad ms_per_layer"
    if not (_is_num(s.rtt_ms) and 0.0 <= s.rtt_ms <= MAX_MS):
        return "bad rtt_ms"
    if s.alive is not True:
        return "dead"
    price = s.price_per_unit
    if price is not None and not (_is_int(price) and 0 <= price <= MAX_PRICE_PER_UNIT):
        return "bad price"
    return None


def _over_price(s: Server, max_price: int | None) -> str | None:
    """Why a usable server is too dear for `max_price` (None: it is not)."""
    if max_price is None:
        return None
    if s.price_per_unit is None:
        return "declares no price"
    if s.price_per_unit > max_price:
        return f"price {s.price_per_unit} over the maximum {max_price}"
    return None


def _price_key(s: Server) -> int:
    return _UNKNOWN_PRICE if s.price_per_unit is None else s.price_per_unit


def _us(ms: float) -> int:
    return round(ms * 1000)


def _hop(hop_rtt: HopRtt, a: Server, b: Server) -> float | None:
    """Server-to-server rtt in ms; None when they can't reach each other."""
    value = hop_rtt(a.peer_id, b.peer_id)
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value == math.inf:
            return None
        if math.isfinite(value) and value >= 0:
            return min(float(value), MAX_MS)
    return a.rtt_ms + b.rtt_ms


def _search(
    servers: Iterable[Server],
    num_layers: int,
    start: int,
    exclude: Iterable[str],
    hop_rtt: HopRtt | None,
    max_price: int | None = None,
) -> tuple[list[Span], int]:
    if not _is_int(num_layers) or not 1 <= num_layers <= MAX_LAYERS:
        raise ValueError(f"num_layers must be an integer in [1, {MAX_LAYERS}]")
    if not _is_int(start) or not 0 <= start < num_layers:
        raise ValueError(f"start must be an integer in [0, {num_layers})")
    if max_price is not None and not (_is_int(max_price) and max_price >= 0):
        raise ValueError("max_price_per_unit must be an integer >= 0 or None")
    if isinstance(exclude, str):
        exclude = {exclude}
    excluded = {e for e in exclude if isinstance(e, str)}
    usable: set[Server] = set()
    skipped: dict[str, str] = {}
    priced_out: set[str] = set()
    for s in servers:
        reason = _usable(s)
        if reason is None and s.peer_id in excluded:
            reason = "excluded"
        if reason is None and s.end > num_layers:
            reason = f"range [{s.start}, {s.end}) beyond the model's {num_layers} layers"
        if reason is None and s.end <= start:
            reason = "before the start layer"
        if reason is None and (reason := _over_price(s, max_price)) is not None:
            priced_out.add(s.peer_id)
        if reason is None:
            usable.add(s)
        else:
            peer = s.peer_id if isinstance(s, Server) and isinstance(s.peer_id, str) else "?"
            skipped.setdefault(peer[:MAX_PEER_ID_LEN], reason)
    if len(usable) > MAX_SERVERS:  # keep the closest: rtt is what the client measured itself
        near = sorted(
            usable,
            key=lambda s: (s.rtt_ms, s.ms_per_layer, _price_key(s), s.peer_id, s.start, s.end),
        )
        for s in near[MAX_SERVERS:]:
            skipped.setdefault(s.peer_id, f"over the limit of {MAX_SERVERS} servers")
        usable = set(near[:MAX_SERVERS])
    pool = sorted(
        usable, key=lambda s: (s.peer_id, s.start, s.end, s.ms_per_layer, s.rtt_ms, _price_key(s))
    )
    by_layer: list[list[int]] = [[] for _ in range(num_layers)]
    for i, s in enumerate(pool):
        for layer in range(max(s.start, start), s.end):
            by_layer[layer].append(i)

    step = [_us(s.ms_per_layer) for s in pool]
    unit = [_price_key(s) for s in pool]  # the tie-break after time: money per layer
    half = [_us(s.rtt_ms / 2) for s in pool]
    full = [_us(s.rtt_ms) for s in pool]
    hops: dict[tuple[int, int], int | None] = {}

    def hop_cost(a: int, b: int) -> int | None:
        if (a, b) not in hops:
            assert hop_rtt is not None
            value = _hop(hop_rtt, pool[a], pool[b])
            hops[(a, b)] = None if value is None else _us(value / 2)
        return hops[(a, b)]

    # A state is (boundary b, i): i >= 0 means server i holds the activations at b and has
    # run at least one layer (entering a server always runs its first layer, so no span is
    # empty); _CLIENT means the client holds them, _DONE that they are back after layer n.
    # Paths are compared by (time, money, hops): every path to a state has run the same
    # layers, so with equal prices money never decides, and all three only grow.
    best: dict[_State, tuple[int, int, int]] = {(start, _CLIENT): (0, 0, 0)}
    prev: dict[_State, tuple[_State, bool]] = {}
    heap: list[tuple[int, int, int, int, int]] = [(0, 0, 0, start, _CLIENT)]
    furthest = start

    def relax(
        state: _State, cost: int, money: int, nhops: int, parent: _State, entered: bool
    ) -> None:
        old = best.get(state)
        if old is None or (cost, money, nhops) < old:
            best[state] = (cost, money, nhops)
            prev[state] = (parent, entered)
            heapq.heappush(heap, (cost, money, nhops, state[0], state[1]))

    while heap:
        cost, money, nhops, b, i = heapq.heappop(heap)
        state = (b, i)
        if best[state] != (cost, money, nhops):
            continue  # a stale heap entry
        furthest = max(furthest, b)
        if i == _DONE or (i == _CLIENT and b == num_layers):
            return _spans(state, prev, pool), cost
        if i == _CLIENT:
            for t in by_layer[b]:
                entry = full[t] if hop_rtt is None else half[t]
                relax((b + 1, t), cost + entry + step[t], money + unit[t], nhops + 1, state, True)
            continue
        if b < pool[i].end:
            relax((b + 1, i), cost + step[i], money + unit[i], nhops, state, False)
        if hop_rtt is None:
            relax((b, _CLIENT), cost, money, nhops, state, False)
        elif b == num_layers:
            relax((b, _DONE), cost + half[i], money, nhops, state, False)
        else:
            for t in by_layer[b]:
                hop = hop_cost(i, t) if t != i else None
                if hop is not None:
                    relax((b + 1, t), cost + hop + step[t], money + unit[t], nhops + 1, state, True)
    raise _no_route(pool, skipped, num_layers, start, furthest, len(priced_out), max_price)


def _spans(goal: _State, prev: dict[_State, tuple[_State, bool]], pool: list[Server]) -> list[Span]:
    """Walk the predecessors back; a span begins at each edge that entered a server."""
    entries: list[tuple[int, int]] = []  # (boundary entered at, server index)
    state = goal
    while state in prev:
        parent, entered = prev[state]
        if entered:
            entries.append((parent[0], state[1]))
        state = parent
    entries.reverse()
    ends = [b for b, _ in entries[1:]] + [goal[0]]
    return [Span(pool[i].peer_id, b, end) for (b, i), end in zip(entries, ends, strict=True)]


def _no_route(
    pool: list[Server],
    skipped: dict[str, str],
    num_layers: int,
    start: int,
    furthest: int,
    priced_out: int = 0,
    max_price: int | None = None,
) -> NoRouteError:
    covered = [False] * num_layers
    for s in pool:
        for layer in range(max(s.start, start), s.end):
            covered[layer] = True
    missing: list[tuple[int, int]] = []
    for layer in range(start, num_layers):
        if not covered[layer]:
            if missing and missing[-1][1] == layer:
                missing[-1] = (missing[-1][0], layer + 1)
            else:
                missing.append((layer, layer + 1))
    if missing:
        first = missing[0][0]
        ranges = ", ".join(_fmt_range(a, b) for a, b in missing[:_LISTED])
        if len(missing) > _LISTED:
            ranges += f" and {len(missing) - _LISTED} more ranges"
        head = (
            f"no route for layers {_fmt_range(start, num_layers)}: "
            f"no usable server holds layer(s) {ranges} (first missing: {first})"
        )
    else:
        first = furthest
        head = (
            f"no route for layers {_fmt_range(start, num_layers)}: every layer is served, "
            f"but no chain of reachable servers gets past layer {furthest}"
        )
    if priced_out:
        head += (
            f"; {priced_out} server(s) excluded for price (over the maximum of {max_price} "
            "per unit, or declaring no price)"
        )
    considered = [f"{s.peer_id}{_fmt_range(s.start, s.end)}" for s in pool]
    text = f"{head}; considered {len(pool)} server(s)"
    if considered:
        text += ": " + ", ".join(considered[:_LISTED])
        if len(considered) > _LISTED:
            text += f" and {len(considered) - _LISTED} more"
    if skipped:
        items = [f"{peer} ({why})" for peer, why in sorted(skipped.items())]
        text += f"; skipped {len(items)}: " + ", ".join(items[:_LISTED])
        if len(items) > _LISTED:
            text += f" and {len(items) - _LISTED} more"
    return NoRouteError(
        text,
        missing=missing,
        first_missing=first,
        considered=[s.peer_id for s in pool],
        skipped=dict(skipped),
        priced_out=priced_out,
    )


def _fmt_range(a: int, b: int) -> str:
    return f"[{a}, {b})" if b - a != 1 else f"[{a}]"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
