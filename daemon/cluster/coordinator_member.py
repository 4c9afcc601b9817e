"""A member's side of its clusters' coordinators: the fenced commands it carries out (`assign`:
load a range with the shard service, which announces it as block_load does; `release`:
unload it) and the deployment table it keeps, the newest by (term, version), for the next
coordinator. Commands reach it only once the runtime's fence accepted them; their bodies
are typed here (coordinator_wire) before anything is done."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from daemon.cluster import coordinator_wire as wire
from daemon.shards.jobs import ShardServiceError
from p2p import codec, files

if TYPE_CHECKING:
    from daemon.shards.service import ShardService

log = logging.getLogger(__name__)


@dataclass
class Table:
    """A cluster's deployment table: model -> its spec and target copies."""

    term: int
    version: int
    deployments: dict[str, wire.Deployment] = field(default_factory=dict)

    def body(self) -> wire.TableBody:
        return wire.TableBody(self.term, self.version, list(self.deployments.values()))

    @classmethod
    def of(cls, body: wire.TableBody) -> Table:
        return cls(body.term, body.version, {d.spec.model: d for d in body.deployments})


class TableFile:
    """Every cluster's deployment table in one JSON file (HOME/cluster-deployments.json),
    replaced atomically, so that a cluster whose members all restart still knows its blocks;
    None: in memory only. A file that can't be read is set aside, never fatal."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def load(self) -> dict[str, Table]:
        if self.path is None:
            return {}
        try:
            raw = json.loads(self.path.read_text())
            if not isinstance(raw, dict):
                raise ValueError("not a map")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return {}
        tables = {}
        for cluster, body in raw.items():
            try:
                tables[cluster] = Table.of(wire.body_of(wire.TableBody, body))
            except wire.WireError as exc:
                log.warning("ignoring %s's table in %s: %s", cluster, self.path, exc)
        return tables

    async def save(self, tables: dict[str, Table]) -> None:
        if self.path is None:
            return
        data = json.dumps({c: wire.to_body(t.body()) for c, t in sorted(tables.items())})
        await trio.to_thread.run_sync(files.replace_private, self.path, data.encode())


class MemberSide:
    """`coordinator_of(cluster)`: the coordinator this node knows (its own election's on a
    voter): a fenced command from another signer is not carried out. (The fence takes a
    voter's command for a term above the highest seen, which a voter that never won that
    term can sign; this check keeps a voter from acting on one.)"""

    def __init__(
        self,
        shards: ShardService,
        on_reject: Callable[[str], None],
        coordinator_of: Callable[[str], str | None],
        store: TableFile | None = None,
        tell: Callable[[str, bytes], Awaitable[None]] | None = None,
    ) -> None:
        """`tell(peer, request)`: sends a coordinator request (`coordinator_wire`), bounded,
        failures ignored; how a member reports an assignment it could not carry out."""
        self.shards = shards
        self.me = shards.ident.peer_id
        self._reject = on_reject
        self._coordinator_of = coordinator_of
        self.store = store or TableFile(None)
        self._tell = tell
        self.tables: dict[str, Table] = self.store.load()

    async def save(self) -> None:
        """Keep the tables on disk (when this node has a home)."""
        try:
            await self.store.save(self.tables)
        except OSError as exc:
            log.warning("could not save the deployment tables: %s", exc)

    def _unknown_signer(self, cluster: str, coordinator: str, action: str) -> bool:
        known = self._coordinator_of(cluster)
        if known is not None and known != coordinator:
            log.warning(
                "cluster %s: %s from %s ignored: the coordinator known here is %s",
                cluster,
                action,
                coordinator,
                known,
            )
            self._reject(f"{action}_not_the_coordinator")
            return True
        return False

    async def on_assign(self, cluster: str, coordinator: str, body: dict[str, Any]) -> None:
        """Load the assigned range; a member that takes no deploys from peers refuses (the
        coordinator leaves such members out; a forged or stale order never gets here)."""
        if self._unknown_signer(cluster, coordinator, wire.ASSIGN):
            return
        try:
            order = wire.body_of(wire.AssignBody, body)
        except wire.WireError as exc:
            self._reject(f"assign_{exc.reason}")
            return
        if coordinator != self.me and not self.shards.allow_remote_deploy:
            log.warning("cluster %s: assign refused: [shards] allow_remote_deploy is off", cluster)
            self._reject("assign_forbidden")
            await self._failed(cluster, coordinator, order, "this node takes no deploys")
            return
        existing = self.shards.local_block(order.model)
        if existing is not None and (existing.start, existing.end) != (order.start, order.end):
            await self.shards.unload(order.model)  # one range per model and node
        try:
            await self.shards.load(
                order.model, order.model_dir, order.start, order.end, order.dtype
            )
        except ShardServiceError as exc:
            log.warning("cluster %s: assigned %s failed to load: %s", cluster, order.model, exc)
            self._reject("assign_failed")
            await self._failed(cluster, coordinator, order, str(exc))

    async def _failed(
        self, cluster: str, coordinator: str, order: wire.AssignBody, error: str
    ) -> None:
        if self._tell is None:
            return
        report = wire.LoadFailed(cluster, order.model, order.start, order.end, error[:300])
        await self._tell(coordinator, wire.encode_request(report))

    async def on_release(self, cluster: str, coordinator: str, body: dict[str, Any]) -> None:
        if self._unknown_signer(cluster, coordinator, wire.RELEASE):
            return
        try:
            order = wire.body_of(wire.ReleaseBody, body)
        except wire.WireError as exc:
            self._reject(f"release_{exc.reason}")
            return
        block = self.shards.local_block(order.model)
        if block is None:
            return
        if order.start is not None and (block.start, block.end) != (order.start, order.end):
            return  # another range of it: not this one
        await self.shards.unload(order.model)

    async def on_table(self, cluster: str, coordinator: str, body: dict[str, Any]) -> None:
        if self._unknown_signer(cluster, coordinator, wire.DEPLOYMENTS):
            return
        try:
            table = wire.body_of(wire.TableBody, body)
        except wire.WireError as exc:
            self._reject(f"table_{exc.reason}")
            return
        current = self.tables.get(cluster)
        if current is None or (table.term, table.version) > (current.term, current.version):
            self.tables[cluster] = Table.of(table)
            await self.save()

    def table_reply(self, cluster: str) -> bytes:
        table = self.tables.get(cluster)
        body = None if table is None else wire.to_body(table.body())
        return codec.encode({"ok": True, "table": body})
