"""Shard streams, both ways: the ones this node's shard server accepts (libp2p, with frames
bounded by what it serves, and a Unix socket for daemons on this host) and the ones it
opens to a shard server (in memory to itself, over the Unix socket to a daemon on this
host, else over libp2p).

`ShardStreams` is a part of daemon.shards.service.ShardService (mixed in): it uses the
service's identity, network, registry replica, metrics, its shard server (`server`,
`_server`, `ensure_torch`) and its nursery (`spawn`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from daemon.shards import SHARD_PROTOCOL
from p2p import localsock
from p2p.network import NetworkError, Stream
from p2p.streams import stream_pair
from registry.blocks import announcements

if TYPE_CHECKING:
    from daemon.metrics import Metrics
    from daemon.shards.ports import Entries, ShardNetwork
    from daemon.shards.server import ShardServer
    from p2p.identity import NodeIdentity

log = logging.getLogger(__name__)

LOCAL_RETRY_S = 60.0  # after a failed local dial, use libp2p to that peer for this long
# the longest shard frame a stream takes before this node serves anything (headers only)
HEADER_FRAME_BYTES = 64 * 1024


class ShardStreams:
    """Accept shard streams for this node's server; open them to any shard server."""

    # set by ShardService.__init__
    ident: NodeIdentity
    net: ShardNetwork
    replica: Entries
    metrics: Metrics
    local_sockets: bool
    max_local_connections: int
    _server: ShardServer | None
    _local_failed: dict[str, float]  # peer -> when a local dial last failed

    # -- accepting -------------------------------------------------------------------------

    def _register_stream_handler(self) -> None:
        """Register the libp2p shard handler, its frames bounded by what we serve at the
        moment each frame begins (`max_frame_bytes` is asked per frame): libp2p's framing
        refuses longer ones from their length prefix, also on streams opened before a load
        or an unload; the server checks each frame against its session anyway."""
        assert self._server is not None
        self.net.set_stream_handler(
            SHARD_PROTOCOL,
            self._server.handle_stream,
            max_frame_bytes=self.max_frame_bytes,
        )

    def max_frame_bytes(self) -> int:
        """The longest shard frame this node takes now (asked per frame, on libp2p streams
        and local sockets alike)."""
        if self._server is None:
            return HEADER_FRAME_BYTES
        return max(HEADER_FRAME_BYTES, self._server.max_frame_bytes)

    async def serve_local(self) -> None:
        """Accept shard streams from daemons on this host over a Unix socket (see
        p2p.localsock); without one (not Linux, or the name taken) peers use libp2p."""
        if not self.local_sockets:
            return
        listener = localsock.Listener(
            self.ident,
            {SHARD_PROTOCOL: self._on_local_stream},
            on_reject=lambda reason: self.metrics.reject("localsock", reason),
            max_frame_bytes=self.max_frame_bytes,
            max_connections=self.max_local_connections,
        )
        try:
            await listener.serve()
        except OSError as exc:
            log.warning("no local shard socket (%s); same-host peers will use libp2p", exc)

    async def _on_local_stream(self, stream: Stream) -> None:
        await self.ensure_torch()
        await self.server.handle_stream(stream)

    # -- opening ---------------------------------------------------------------------------

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        """A stream to a shard server: in memory to ourselves, over the Unix socket to a
        daemon on this host, else over libp2p."""
        transports = self.metrics.shard_streams
        if peer_id == self.ident.peer_id:
            transports.labels("loopback").inc()
            return await self._loopback(protocol)
        failed_at = self._local_failed.get(peer_id, -LOCAL_RETRY_S)
        if self.same_host(peer_id) and time.monotonic() - failed_at >= LOCAL_RETRY_S:
            try:
                stream = await localsock.dial(self.ident, peer_id, protocol)
                transports.labels("local").inc()
                return stream
            except NetworkError as exc:
                log.info("local stream to %s failed (%s); using libp2p", peer_id[-12:], exc)
                self._local_failed[peer_id] = time.monotonic()
        transports.labels("libp2p").inc()
        return await self.net.open_stream(peer_id, protocol)

    def same_host(self, peer_id: str) -> bool:
        """Whether the peer announced a block from this host (same kernel boot id)."""
        if not self.local_sockets:
            return False
        # only the peer's own, readable announcements say where it runs (registry.blocks)
        return any(
            item.peer_id == peer_id and item.host == localsock.HOST_ID
            for item in announcements(self.replica.entries.of_kind("blocks"))
        )

    async def _loopback(self, protocol: str) -> Stream:
        """A stream to our own shard server, in memory (libp2p cannot dial itself)."""
        me = self.ident.peer_id
        client_end, server_end = stream_pair(me, me, capacity=4)

        async def serve() -> None:
            try:
                await self.server.handle_stream(server_end)
            except Exception:  # as the libp2p guard: count it, end the stream, keep the node
                log.exception("loopback shard stream failed")
                self.metrics.reject("shard", "handler_error")
            finally:
                await server_end.close()

        self.spawn(serve)
        return client_end
