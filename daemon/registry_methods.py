"""The registry_* JSON-RPC methods: read and write the replicated registries."""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta

from daemon import errors, vdag_methods
from daemon.api.jsonrpc import Dispatcher
from daemon.errors import InvalidParams, NotFound
from registry import schemas
from registry.query import QueryError, compile_filter
from registry.replica import Rejected
from registry.replication import Replicator

Kind = Annotated[str, Meta(description=f"one of {', '.join(schemas.KINDS)}")]
Key = Annotated[str, Meta(description="entry key")]
Value = Annotated[dict[str, Any], Meta(description="the entry, checked by its schema")]
KindFilter = Annotated[str | None, Meta(description="only this kind")]
Filter = Annotated[str | None, Meta(description="e.g. \"minInstances >= 1 AND key LIKE 'llama%'\"")]
Limit = Annotated[int, Meta(ge=1, le=1000, description="page size, 1..1000 (default 100)")]
Cursor = Annotated[str | None, Meta(description="next_cursor of the previous page")]


def _kind(kind: str) -> str:
    if kind not in schemas.KINDS:
        raise InvalidParams(f"unknown kind {kind[:40]!r}; kinds: {', '.join(schemas.KINDS)}")
    return kind


def register_registry_methods(dispatcher: Dispatcher, replicator: Replicator) -> None:
    replica = replicator.replica

    async def registry_put(kind: Kind, key: Key, value: Value) -> dict[str, Any]:
        """Create or update an entry; replicated to every node. A vDAG is also judged against
        this node's registries first (unknown blocks and sub-vDAGs, a loop through the
        nesting), as `vdag_apply` judges it."""
        if kind == "vdags":
            vdag_methods.check(replica, value, key)
        try:
            entry = await replicator.write(_kind(kind), key, value)
        except Rejected as exc:
            raise errors.from_rejected(exc) from None
        return entry.to_json()

    async def registry_delete(kind: Kind, key: Key) -> dict[str, Any]:
        """Delete an entry (a tombstone, replicated like a write)."""
        try:
            entry = await replicator.write(_kind(kind), key, None)
        except Rejected as exc:
            raise errors.from_rejected(exc) from None
        return entry.to_json()

    async def registry_get(kind: Kind, key: Key) -> dict[str, Any]:
        """One entry by kind and key."""
        entry = replica.get(_kind(kind), key)
        if entry is None or entry.deleted:
            raise NotFound(f"{kind}/{key} does not exist")
        return entry.to_json()

    async def registry_list(
        kind: KindFilter = None,
        filter: Filter = None,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> dict[str, Any]:
        """Entries sorted by kind and key, filtered, one page at a time."""
        if kind is not None:
            _kind(kind)
        try:
            predicate = compile_filter(filter)
        except QueryError as exc:
            raise InvalidParams(f"bad filter: {exc}") from None
        try:
            page = replica.list(kind, predicate, limit=limit, cursor=cursor)
        except Rejected as exc:
            raise InvalidParams(str(exc)) from None
        return {"items": [e.to_json() for e in page.items], "next_cursor": page.next_cursor}

    async def registry_kinds() -> list[str]:
        """The registry kinds."""
        return list(schemas.KINDS)

    async def registry_stats() -> dict[str, Any]:
        """Entry counts, rejections and replication counters."""
        return {**replica.stats(), "replication": dict(replicator.stats)}

    for handler in (
        registry_put,
        registry_get,
        registry_delete,
        registry_list,
        registry_kinds,
        registry_stats,
    ):
        dispatcher.register(handler.__name__, handler)
