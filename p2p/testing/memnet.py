"""An in-memory `Network` on trio's clock, for tests and simulations of up to ~1,000 nodes.

`MemoryNetwork` is the hub (latency, jitter, loss, partitions, counters); each `MemoryNode` is
one node's view and implements all of `p2p.network.Network` (it passes
`p2p.testing.conformance.check_network`). Run it under
`trio.testing.MockClock(autojump_threshold=0)` and minutes of virtual time pass in seconds.

This module gathers the kit's parts: `hub` (the links and the timer), `node` (requests,
gossip, the DHT's node side), `kademlia` (ids, routing table, lookups) and `peering`
(streams, connections, peer tracking; see there for how streams behave).

The DHT is a small Kademlia carried over the same request path as every other message
(`/memdht/find_node`, `/memdht/get`, `/memdht/put`), so loss, partitions and crashes affect
it as they would on a real network; there is no global dict.

How failures look to a caller (callers bound every call with `move_on_after`/`fail_after`):

| cause                                   | the caller sees                              |
|-----------------------------------------|----------------------------------------------|
| message lost (`loss`)                   | hangs (until the caller's deadline)          |
| peer in another partition               | hangs                                        |
| peer removed (a crashed machine)        | hangs                                        |
| peer removed with `refuse=True`         | `NetworkError` after one round trip          |
| peer id never added to the hub          | `NetworkError` at once (no address to dial)  |
| no handler for the protocol, or the     | `NetworkError` after one round trip          |
| handler raised                          |                                              |
| the calling node itself was removed     | `NetworkError` at once                       |

Streams (`open_stream`) cost one round trip to open, over the same links and with the same
failures as a request; their frames then travel at once, at most `stream_capacity` frames
buffered each way. A node removed with `refuse=True` resets its streams; without, they go
silent (see `p2p.testing.peering`).

DHT calls use the same links but bound each RPC by RPC_TIMEOUT_S of virtual time; a lost or
unanswered RPC counts as a failure against the peer.

Gossip (`publish`/`subscribe`) is an epidemic broadcast over the same lossy links, one hop per
message: the publisher sends to `fanout` random known peers subscribed to the topic (with
k-buckets, known or contacted: GossipSub meshes over connections); a
subscriber that has not seen the message id (a hash of origin and data, kept in a bounded
seen-cache) runs the topic's validators (`subscribe(..., validator)`; a refused message is
counted in `gossip_refused` and goes no further), then hands it to its handlers and forwards it
to `fanout` random subscribed known peers, never back to the peer it came from nor to the
origin. Loss, partitions, latency and crashes
apply per hop; nothing is retransmitted (anti-entropy is the caller's business). The hub knows
who subscribes to what; real GossipSub learns it from its peers and keeps a stable mesh of
`fanout` peers instead of picking at random per message. Handlers run one message at a time in
one task per subscribed topic; an exception is counted (`gossip_handler_errors`) and dropped.
Since the id is a hash of origin and data, publishing the same bytes twice is one message to
the receivers (GossipSub ids carry a sequence number too).

Networks: a node added with `network_id` (`hub.add_node(peer, validator, network_id=...)`)
scopes its protocol ids, topics and DHT keys as the libp2p host does (`p2p.network.
NetworkScope`), and two nodes of different networks refuse each other as the hello does:
`connect`, requests, streams and pings between them fail after one round trip with a
`NetworkError` naming both networks (kept in each node's `refused_peers()`), and their DHT
RPCs fail, so they never enter each other's routing tables. A node added without one
changes no name and meets only nodes added without one.

Simplifications: a handler runs in the caller's task, so it is cancelled when the caller gives
up; loss and jitter come from one `random.Random(seed)`, so a run is reproducible only up to
trio's (randomised) scheduling order; `now()` is `epoch + trio.current_time()`, which starts
at `epoch` only under a MockClock.

Routing: a node's table holds every peer it has heard from or heard of (no k-buckets), kept
sorted by id so the K closest to a target cost O(log n + K); a hub made with `bucket_size`
keeps at most that many per k-bucket instead, as real Kademlia does (a node then knows
O(K log n) peers, and finds the rest by walking: `dht_find_peers`). A peer leaves it after
MAX_FAILURES consecutive failed RPCs; a lookup adds the peers named in answers, as py-libp2p
does, except recently evicted ones. `known_peers()` is that table. Every lookup's depth is
counted in the hub's `lookup_rounds` (see `p2p.testing.kademlia._Lookup`).

`dht_get` returns the local copy first, as py-libp2p does, but only if the node's validator
still accepts it: a copy the validator now rejects (an expired record) is dropped and the
network is asked instead. py-libp2p 0.8.1 keeps local copies for 24 h regardless, so a stale
copy there hides the fresh one for that long; the libp2p adapter must do the same re-check.
"""

from p2p.streams import ChannelStream, stream_pair
from p2p.testing.hub import (
    _HEADER_BYTES,
    GOSSIP_FANOUT,
    SEEN_CACHE_SIZE,
    STREAM_CAPACITY,
    MemoryNetwork,
)
from p2p.testing.kademlia import (
    _DHT_PREFIX,
    ALPHA,
    EVICTION_BACKOFF_S,
    FIND_NODE,
    GET,
    ID_BITS,
    MAX_FAILURES,
    PUT,
    RPC_TIMEOUT_S,
    K,
    RoutingTable,
    dht_id,
    target_id,
)
from p2p.testing.node import DIAL_TIMEOUT_S, MemoryNode, message_id
from p2p.testing.peering import PING_TIMEOUT_S

__all__ = [
    "_DHT_PREFIX",
    "_HEADER_BYTES",
    "ALPHA",
    "DIAL_TIMEOUT_S",
    "EVICTION_BACKOFF_S",
    "FIND_NODE",
    "GET",
    "GOSSIP_FANOUT",
    "ID_BITS",
    "K",
    "MAX_FAILURES",
    "PING_TIMEOUT_S",
    "PUT",
    "RPC_TIMEOUT_S",
    "SEEN_CACHE_SIZE",
    "STREAM_CAPACITY",
    "ChannelStream",
    "MemoryNetwork",
    "MemoryNode",
    "RoutingTable",
    "dht_id",
    "message_id",
    "stream_pair",
    "target_id",
]
