"""The assignments a member is still carrying out, so that a coordinator elected meanwhile
knows them (daemon.cluster.coordinator).

A member loads a range it is `assign`ed for as long as the checkpoint takes to read; if the
coordinator that assigned it dies meanwhile, the next one sees no announcement of it yet. It
asks every member for its deployment table when it takes over (`TableRequest`), and the
member's reply now also lists the ranges it is loading (`Loading`: model, range, seconds
since the order); the new coordinator counts those as assigned, until announced or given up
(`assign_timeout_s` after the order), instead of placing more copies beside them.

A coordinator that gives up on an assignment (not announced in time) releases that range; a
member still loading it then unloads it as soon as it is loaded, rather than serving beside
the copy placed instead. A member of an older version replies without `loading`: read as
none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import trio
from msgspec import Meta

from daemon.cluster import coordinator_wire as wire

if TYPE_CHECKING:
    from daemon.cluster.coordinator_member import MemberSide
    from daemon.shards.service import ShardService

log = logging.getLogger(__name__)


class Loading(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A range a member is loading on an `assign`, as it reports it."""

    model: wire.ModelName
    start: wire.Layer
    end: wire.Layer
    loading_s: Annotated[float, Meta(ge=0.0, le=1e7)]


_Reports = Annotated[list[Loading], Meta(max_length=wire.MAX_DEPLOYMENTS)]


def read_loading(raw: Any) -> list[Loading]:
    """A member's `loading` list (None: an older member, none); WireError if it is odd."""
    if raw is None:
        return []
    try:
        items = msgspec.convert(raw, _Reports, strict=True)
    except msgspec.ValidationError as exc:
        raise wire.WireError("malformed", f"a bad loading report: {str(exc)[:200]}") from None
    return [i for i in items if i.start < i.end]


@dataclass
class _Order:
    start: int
    end: int
    since: float
    released: bool = False


class InFlight:
    """A member's `assign` and `release` handlers (MemberSide's, wrapped): the ranges being
    loaded are kept while they load, and one released meanwhile is unloaded once loaded."""

    def __init__(
        self,
        member: MemberSide,
        shards: ShardService,
        coordinator_of: Callable[[str], str | None],
    ) -> None:
        self.member = member
        self.shards = shards
        self._coordinator_of = coordinator_of
        self._loading: dict[tuple[str, str], _Order] = {}  # (cluster, model) -> order

    def report(self, cluster: str) -> list[dict[str, Any]]:
        """What this node is loading for `cluster`'s coordinators, as the table reply sends
        it."""
        now = trio.current_time()
        return [
            msgspec.to_builtins(Loading(model, o.start, o.end, min(now - o.since, 1e7)))
            for (c, model), o in sorted(self._loading.items())
            if c == cluster and not o.released
        ]

    async def on_assign(self, cluster: str, coordinator: str, body: dict[str, Any]) -> None:
        try:
            order = wire.body_of(wire.AssignBody, body)
        except wire.WireError:
            await self.member.on_assign(cluster, coordinator, body)  # refused and counted there
            return
        key = (cluster, order.model)
        mine = _Order(order.start, order.end, trio.current_time())
        self._loading[key] = mine
        try:
            await self.member.on_assign(cluster, coordinator, body)
        finally:
            if self._loading.get(key) is mine:
                del self._loading[key]
        if mine.released:
            block = self.shards.local_block(order.model)
            if block is not None and (block.start, block.end) == (order.start, order.end):
                log.info(
                    "cluster %s: %s %d..%d was released while it loaded: unloaded",
                    cluster,
                    order.model,
                    order.start,
                    order.end,
                )
                await self.shards.unload(order.model)

    async def on_release(self, cluster: str, coordinator: str, body: dict[str, Any]) -> None:
        await self.member.on_release(cluster, coordinator, body)
        known = self._coordinator_of(cluster)
        if known is not None and known != coordinator:
            return  # not carried out (the member said why)
        try:
            order = wire.body_of(wire.ReleaseBody, body)
        except wire.WireError:
            return
        loading = self._loading.get((cluster, order.model))
        if loading is not None and (
            order.start is None or (order.start, order.end) == (loading.start, loading.end)
        ):
            loading.released = True
