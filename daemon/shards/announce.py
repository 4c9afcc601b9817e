"""The blocks registry as the shard service uses it: announce the blocks served here (their
free cache and this node's load, re-announced when either moves), withdraw them, and read
the announcements of a model's servers for routing.

`Announcements` is a part of daemon.shards.service.ShardService (mixed in): it uses the
service's identity, registry replica and replicator, metrics, network and shard server.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from p2p import localsock
from registry.blocks import announcement_key, announcements
from registry.replica import Rejected

if TYPE_CHECKING:
    from daemon.metrics import Metrics
    from daemon.shards.ports import Entries, ShardNetwork, Writer
    from daemon.shards.server import ShardServer
    from p2p.identity import NodeIdentity

log = logging.getLogger(__name__)

LOAD_STEP = 0.1  # re-announce a block when this node's utilisation moved this much
MAX_QUEUE_LENGTH = 1 << 20


block_key = announcement_key  # where a server announces a range it serves


class Announcements:
    """Announce, re-announce and withdraw this node's blocks; read a model's servers."""

    # set by ShardService.__init__
    ident: NodeIdentity
    net: ShardNetwork
    replica: Entries
    replicator: Writer
    metrics: Metrics
    price_per_unit: int
    utilisation: float  # share of the last interval this node spent computing
    _server: ShardServer | None
    _announced_free: dict[str, int]  # model -> free cache positions announced
    _announced_load: dict[str, tuple[int, float]]  # model -> load announced
    _load_mark: tuple[float, float] | None  # (monotonic, compute seconds)

    async def refresh_announcements(self) -> None:
        """Re-announce the blocks whose free cache moved by more than a tenth of the budget
        since their last announcement."""
        assert self._server is not None
        self.measure_load()
        for block in list(self._server.blocks.values()):
            if self._server.blocks.get(block.model_id) is not block:
                continue  # undeployed while we announced another: no resurrection
            announced = self._announced_free.get(block.model_id)
            free = self._server.free_cache_tokens(block)
            budget = block.tokens_for(self._server.cache_budget_bytes or 0)
            queue, util = self._announced_load.get(block.model_id, (0, 0.0))
            load_moved = abs(self.utilisation - util) >= LOAD_STEP or (queue > 0) != (
                self.queue_length() > 0
            )
            if announced is None or abs(free - announced) > budget // 10 or load_moved:
                await self._announce(self.block_json(block))

    def queue_length(self) -> int:
        """Steps waiting for this node's compute now (pending in its batchers)."""
        return self._server.waiting_steps if self._server is not None else 0

    def measure_load(self) -> float:
        """The share of the time since the last measurement this node spent computing (what
        its blocks' steps took), announced as `utilisation` for the cluster coordinator's
        scaling (daemon.cluster.coordinator)."""
        busy = sum(b.compute_s for b in self._server.blocks.values()) if self._server else 0.0
        now = time.monotonic()
        if self._load_mark is not None and now > self._load_mark[0]:
            spent = max(0.0, busy - self._load_mark[1])
            self.utilisation = round(min(1.0, spent / (now - self._load_mark[0])), 3)
        self._load_mark = (now, busy)
        return self.utilisation

    def block_json(self, block: Any) -> dict[str, Any]:
        """A served block as the APIs and announcements show it, with its free cache."""
        assert self._server is not None
        return {**block.to_json(), "cache_tokens_free": self._server.free_cache_tokens(block)}

    async def _announce(self, block: dict[str, Any]) -> None:
        peer_id = self.ident.peer_id
        key = block_key(block["model"], block["start"], block["end"], peer_id)
        value = {
            "blockId": key,
            "blockComponentURI": block["model"],
            "model": block["model"],
            "layers": [block["start"], block["end"]],
            "served_by": [peer_id],
            "parameters": {
                "ms_per_layer": block["ms_per_layer"],
                "dtype": block["dtype"],
                "parameters_bytes": block["parameters_bytes"],
                "cache_tokens_free": block["cache_tokens_free"],
                "host": localsock.HOST_ID,  # peers on this host dial our local socket
                "price_per_unit": self.price_per_unit,
                # load, for a cluster coordinator's scaling
                "queue_length": min(self.queue_length(), MAX_QUEUE_LENGTH),
                "utilisation": self.utilisation,
            },
        }
        try:
            await self.replicator.write("blocks", key, value)
            self._announced_free[block["model"]] = block["cache_tokens_free"]
            self._announced_load[block["model"]] = (
                value["parameters"]["queue_length"],
                self.utilisation,
            )
        except Rejected as exc:
            log.warning("could not announce %s: %s", key, exc)

    async def _withdraw(self, model_id: str, block: Any) -> None:
        """Withdraw the announcement of a model's block, no longer served here."""
        self._announced_free.pop(model_id, None)
        self._announced_load.pop(model_id, None)
        key = block_key(model_id, block.start, block.end, self.ident.peer_id)
        try:
            await self.replicator.write("blocks", key, None)
        except Rejected as exc:
            log.warning("could not withdraw %s: %s", key, exc)

    def announced(self, model_id: str) -> list[dict[str, Any]]:
        """Every announced server of a model, from this node's registry replica.

        Entries are read through their typed form (`registry.blocks`): only a server's own
        announcement counts, and an entry that cannot be read (stored by an older version,
        say) is skipped and counted (`registry`, `bad_entry`), never raised."""
        found = announcements(
            list(self.replica.entries.of_kind("blocks")),
            model_id,
            on_bad=lambda reason: self.metrics.reject("registry", reason),
        )
        return [
            {
                "peer_id": item.peer_id,
                "start": item.start,
                "end": item.end,
                "ms_per_layer": item.ms_per_layer,
                "cache_tokens_free": item.cache_tokens_free,
                "price_per_unit": item.price_per_unit,
            }
            for item in found
        ]

    async def servers(self, model_id: str, need_tokens: int = 0) -> list[Any]:
        """Announced servers of a model, as routing sees them. Those that announced less
        free cache than `need_tokens` are left out (the announcement may be stale either
        way: a server that turns out full refuses the session and is routed around)."""
        from scheduler.routing import Server

        me = self.ident.peer_id
        out = []
        for item in self.announced(model_id):
            peer = item["peer_id"]
            free = item["cache_tokens_free"]
            if free is not None and free < need_tokens:
                continue
            state = self.net.peers.get(peer)
            rtt = 0.0 if peer == me else (state.rtt_ms if state and state.rtt_ms else 1.0)
            # every announced server counts as alive: opening its stream dials it if needed,
            # and one that fails is excluded by the client for the rest of the generation
            out.append(
                Server(
                    peer,
                    item["start"],
                    item["end"],
                    item["ms_per_layer"],
                    rtt,
                    price_per_unit=item["price_per_unit"],
                )
            )
        return out
