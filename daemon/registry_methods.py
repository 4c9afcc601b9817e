"""The registry_* JSON-RPC methods: read and write the replicated registries."""

from __future__ import annotations

from typing import Any

from daemon.api.jsonrpc import Dispatcher, Param, RPCError, invalid_params
from registry import schemas
from registry.query import QueryError, compile_filter
from registry.replica import Rejected
from registry.replication import Replicator

REGISTRY_REFUSED = -32020
NOT_FOUND = -32004


def _refused(exc: Rejected) -> RPCError:
    code = NOT_FOUND if exc.reason == "not_found" else REGISTRY_REFUSED
    return RPCError(code, f"{exc.reason}: {exc}", {"reason": exc.reason})


def _kind(kind: str) -> str:
    if kind not in schemas.KINDS:
        raise invalid_params(f"unknown kind {kind[:40]!r}; kinds: {', '.join(schemas.KINDS)}")
    return kind


def register_registry_methods(dispatcher: Dispatcher, replicator: Replicator) -> None:
    replica = replicator.replica

    async def registry_put(kind: str, key: str, value: dict[str, Any]) -> dict[str, Any]:
        try:
            entry = await replicator.write(_kind(kind), key, value)
        except Rejected as exc:
            raise _refused(exc) from None
        return entry.to_json()

    async def registry_delete(kind: str, key: str) -> dict[str, Any]:
        try:
            entry = await replicator.write(_kind(kind), key, None)
        except Rejected as exc:
            raise _refused(exc) from None
        return entry.to_json()

    async def registry_get(kind: str, key: str) -> dict[str, Any]:
        entry = replica.get(_kind(kind), key)
        if entry is None or entry.deleted:
            raise RPCError(NOT_FOUND, f"{kind}/{key} does not exist")
        return entry.to_json()

    async def registry_list(
        kind: str | None = None,
        filter: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        if kind is not None:
            _kind(kind)
        if not 1 <= limit <= 1000:
            raise invalid_params("limit must be between 1 and 1000")
        try:
            predicate = compile_filter(filter)
        except QueryError as exc:
            raise invalid_params(f"bad filter: {exc}") from None
        try:
            page = replica.list(kind, predicate, limit=limit, cursor=cursor)
        except Rejected as exc:
            raise invalid_params(str(exc)) from None
        return {"items": [e.to_json() for e in page.items], "next_cursor": page.next_cursor}

    async def registry_kinds() -> list[str]:
        return list(schemas.KINDS)

    async def registry_stats() -> dict[str, Any]:
        return {**replica.stats(), "replication": dict(replicator.stats)}

    kind_param = Param("kind", (str,), True, f"one of {', '.join(schemas.KINDS)}")
    key_param = Param("key", (str,), True, "entry key")
    dispatcher.register(
        "registry_put",
        registry_put,
        [kind_param, key_param, Param("value", (dict,), True, "the entry, checked by its schema")],
        "Create or update an entry; replicated to every node.",
    )
    dispatcher.register(
        "registry_get", registry_get, [kind_param, key_param], "One entry by kind and key."
    )
    dispatcher.register(
        "registry_delete",
        registry_delete,
        [kind_param, key_param],
        "Delete an entry (a tombstone, replicated like a write).",
    )
    dispatcher.register(
        "registry_list",
        registry_list,
        [
            Param("kind", (str,), False, "only this kind"),
            Param("filter", (str,), False, "e.g. \"minInstances >= 1 AND key LIKE 'llama%'\""),
            Param("limit", (int,), False, "page size, 1..1000 (default 100)"),
            Param("cursor", (str,), False, "next_cursor of the previous page"),
        ],
        "Entries sorted by kind and key, filtered, one page at a time.",
    )
    dispatcher.register("registry_kinds", registry_kinds, [], "The registry kinds.")
    dispatcher.register(
        "registry_stats", registry_stats, [], "Entry counts, rejections and replication counters."
    )
