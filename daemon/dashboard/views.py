"""The dashboard's JSON views, each built from this daemon's own JSON-RPC methods.

A view asks through `Call` (the dispatcher in-process, so the same validation, errors and
per-method metrics as any RPC client), and never fails as a whole: a part whose method
fails (no chain configured, a cluster gone) carries `{"error": message}` instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from urllib.parse import parse_qsl

import msgspec
from msgspec import Meta

from registry.query import MAX_LENGTH, QueryError, compile_filter

Call = Callable[[str, dict[str, Any] | None], Awaitable[Any]]

MAX_CLUSTERS = 20  # clusters whose coordinator the network view asks for
GENERATIONS_SHOWN = 16  # recent generations (routes, failovers) on the models and jobs views
MAX_QUERY_BYTES = 6 * 1024


class ViewError(Exception):
    """A request the dashboard refuses (HTTP 400), with a message that says why."""


class RPCFailed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class RegistryQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The registry view's query string."""

    kind: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,31}$")] | None = None
    filter: Annotated[str, Meta(max_length=MAX_LENGTH)] | None = None
    limit: Annotated[int, Meta(ge=1, le=200)] = 50
    cursor: Annotated[str, Meta(min_length=1, max_length=1024)] | None = None


def parse_query(raw: bytes, allowed: set[str]) -> dict[str, str]:
    """A query string as a dict, refused when it is too long, not UTF-8, repeats a name or
    names one that is not in `allowed`."""
    if len(raw) > MAX_QUERY_BYTES:
        raise ViewError(f"query string longer than {MAX_QUERY_BYTES} bytes")
    try:
        text = raw.decode("ascii")
        decoded = parse_qsl(
            text, keep_blank_values=True, strict_parsing=bool(text), errors="strict"
        )
    except (UnicodeError, ValueError) as exc:
        raise ViewError(f"malformed query string: {exc}") from None
    out: dict[str, str] = {}
    for key, value in decoded:
        if key not in allowed:
            raise ViewError(
                f"unknown parameter {key[:40]!r}: expected {', '.join(sorted(allowed))}"
            )
        if key in out:
            raise ViewError(f"parameter {key!r} given twice")
        out[key] = value
    return out


def registry_query(raw: bytes) -> RegistryQuery:
    """The registry view's parameters, typed and bounded; the filter is compiled here so a
    bad one is refused with its position before anything is asked."""
    given: dict[str, Any] = dict(parse_query(raw, {"kind", "filter", "limit", "cursor"}))
    given = {k: v for k, v in given.items() if v != ""}
    if "limit" in given:
        if not given["limit"].isdigit() or len(given["limit"]) > 6:
            raise ViewError("limit: expected a whole number from 1 to 200")
        given["limit"] = int(given["limit"])
    try:
        query = msgspec.convert(given, RegistryQuery)
    except msgspec.ValidationError as exc:
        raise ViewError(f"invalid parameter: {exc}") from None
    try:
        compile_filter(query.filter)
    except QueryError as exc:
        raise ViewError(f"bad filter: {exc}") from None
    return query


async def _part(call: Call, method: str, params: dict[str, Any] | None = None) -> Any:
    try:
        return await call(method, params)
    except RPCFailed as exc:
        return {"error": exc.message, "code": exc.code}


async def node_view(call: Call) -> dict[str, Any]:
    info = await _part(call, "node_info")
    peer_id = info.get("peer_id") if isinstance(info, dict) else None
    records = await _part(call, "nodes_find")
    own = None
    if isinstance(records, list):
        own = next((r for r in records if r.get("peer_id") == peer_id), None)
    peers = await _part(call, "node_peers")
    connected = sum(1 for p in peers if p.get("connected")) if isinstance(peers, list) else None
    return {
        "info": info,
        "advertised": own.get("addrs") if own else [],
        "record_expires_at": own.get("expires_at") if own else None,
        "serves": (own.get("resources") or {}).get("blocks") if own else None,
        "peers_connected": connected,
    }


async def network_view(call: Call) -> dict[str, Any]:
    nodes = await _part(call, "nodes_find")
    peers = await _part(call, "node_peers")
    clusters = await _part(call, "registry_list", {"kind": "clusters", "limit": MAX_CLUSTERS})
    rows = []
    for entry in clusters.get("items", []) if isinstance(clusters, dict) else []:
        name = entry.get("key")
        coord = await _part(call, "cluster_coordinator", {"name": name})
        value = entry.get("value") if isinstance(entry.get("value"), dict) else {}
        settings = value.get("settings") if isinstance(value.get("settings"), dict) else {}
        rows.append(
            {
                "name": name,
                "admission": settings.get("admission"),
                "value": value,
                "coordinator": coord,
            }
        )
    return {"nodes": nodes, "peers": peers, "clusters": rows}


async def generations(call: Call) -> Any:
    """This node's recent generations, newest first, with their live routes and failovers
    (`generation_list`), or `{"error": ...}`."""
    listed = await _part(call, "generation_list", {"limit": GENERATIONS_SHOWN})
    return listed.get("generations", listed) if isinstance(listed, dict) else listed


async def models_view(call: Call, *, with_routes: bool = True) -> dict[str, Any]:
    """Per model, every announced server with its layers and KV cache free, joined with the
    load its node record declares (sessions of max_sessions, ms per layer), and the number
    of replicas of its least served layer; with the routes of this node's recent
    generations unless `with_routes` is false (the feed sends those on their own)."""
    routes = {"generations": await generations(call)} if with_routes else {}
    listed = await _part(call, "block_list")
    if "error" in listed:
        return {"error": listed["error"], "models": [], **routes}
    records = await _part(call, "nodes_find")
    declared: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    for record in records if isinstance(records, list) else []:
        for b in (record.get("resources") or {}).get("blocks") or []:
            if isinstance(b, dict):
                where = (record.get("peer_id"), b.get("model"), b.get("start"), b.get("end"))
                declared[where] = b  # type: ignore[index]
    models = []
    for model, servers in sorted((listed.get("announced") or {}).items()):
        rows = []
        for s in sorted(servers, key=lambda s: (s.get("start", 0), s.get("peer_id", ""))):
            load = declared.get((s.get("peer_id"), model, s.get("start"), s.get("end")), {})
            rows.append(
                {
                    **s,
                    "sessions": load.get("sessions"),
                    "max_sessions": load.get("max_sessions"),
                    "ms_per_layer": load.get("ms_per_layer"),
                }
            )
        layers = max((s.get("end", 0) for s in rows), default=0)
        replicas = _least_replicas(rows, layers)
        models.append({"model": model, "layers": layers, "replicas": replicas, "servers": rows})
    return {"models": models, "local": listed.get("local", []), **routes}


def _least_replicas(rows: list[dict[str, Any]], layers: int) -> int:
    """How many servers hold the least served layer of 0..layers (0: a gap). Counted per
    span between range boundaries, so a peer announcing a huge range costs nothing."""
    spans = [(s.get("start", 0), s.get("end", 0)) for s in rows]
    bounds = sorted({0, *(a for a, _ in spans), *(b for _, b in spans)})
    counts = [sum(1 for a, b in spans if a <= lo < b) for lo in bounds if lo < layers]
    return min(counts, default=0)


async def jobs_view(call: Call, per_model: list[dict[str, Any]]) -> dict[str, Any]:
    """This node's recent generations (tokens per second, time to first token, failovers),
    paid jobs, and per model what this node's metrics counted (`live.per_model`)."""
    return {
        "generations": await generations(call),
        "paid_jobs": await _part(call, "job_list"),
        "per_model": per_model,
    }


async def money_view(call: Call) -> dict[str, Any]:
    return {
        "wallet": await _part(call, "wallet"),
        "earnings": await _part(call, "earnings", {"history": True}),  # with its plot's points
        "jobs": await _part(call, "job_list"),
    }


def _amount(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


async def money_totals(call: Call) -> dict[str, Any]:
    """Earnings summed over jobs, with the balance and stake when a chain is configured: one
    point of the page's earnings-over-time plot (amounts in the token's smallest unit)."""
    earned = await _part(call, "earnings")
    if not isinstance(earned, dict) or "error" in earned:
        return {"error": earned.get("error") if isinstance(earned, dict) else "no answer"}
    jobs = [j for j in earned.get("jobs") or [] if isinstance(j, dict)]
    totals = {k: sum(_amount(j.get(k)) for j in jobs) for k in ("signed", "acknowledged")}
    totals |= {k: sum(_amount(j.get(k)) for j in jobs) for k in ("settled", "pending")}
    stake = earned.get("stake")
    return {
        **totals,
        "jobs": len(jobs),
        "balance": earned.get("balance"),
        "stake": stake.get("stake") if isinstance(stake, dict) else None,
        "chain_error": earned.get("chain_error"),
    }


async def registry_view(call: Call, query: RegistryQuery) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": query.limit}
    for name in ("kind", "filter", "cursor"):
        if getattr(query, name) is not None:
            params[name] = getattr(query, name)
    try:
        page = await call("registry_list", params)
    except RPCFailed as exc:
        raise ViewError(exc.message) from None
    return {"kinds": await _part(call, "registry_kinds"), "query": params, **page}


async def doctor_view(call: Call) -> dict[str, Any]:
    """`gridmesh doctor`'s daemon lines (reachability among them): run on demand only."""
    return {"checks": await _part(call, "node_doctor")}


VIEWS: dict[str, Callable[[Call], Awaitable[dict[str, Any]]]] = {
    "node": node_view,
    "network": network_view,
    "models": models_view,
    "money": money_view,
    "doctor": doctor_view,
}
