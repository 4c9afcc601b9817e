"""A gossip peer's signed peer record is checked once, not with every RPC it sends.

py-libp2p 0.8.1 attaches the sender's signed peer record (an Envelope) to every pubsub RPC,
and the receiver checks it twice per RPC (`Pubsub.continuously_read_stream`, then
`GossipSub.handle_rpc`): each check verifies the envelope's Ed25519 signature (more than
once: `consume_envelope`, then the peerstore's signer match) and replaces the peer's
certified addresses. A peer sends the same record, byte for byte, until its addresses
change, so nearly all of that repeats work already done. Profiled on the abuse bench's
target, these checks were 5 % of its samples during the streams and fill floods, paid for
every honest gossip RPC as well.

Here a record that was accepted from a peer is accepted again without a check when the same
peer sends the same bytes within `RECHECK_S` (after it, checked again, so the peerstore's
address TTL is renewed as py-libp2p would). Anything else (a new record, another peer's,
one that failed) goes through py-libp2p's check as before: a peer sending a new record
with each RPC gains nothing and costs no more than it did.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import libp2p.pubsub.gossipsub as _gossipsub
import libp2p.pubsub.pubsub as _pubsub
import libp2p.pubsub.utils as _utils

RECHECK_S = 600.0  # a record accepted this long ago is checked again
MAX_REMEMBERED = 4096  # (host, peer, record) accepted lately; the oldest forgotten

Consume = Callable[..., bool]


def remembering(consume: Consume, clock: Callable[[], float] = time.monotonic) -> Consume:
    """`consume` (py-libp2p's `maybe_consume_signed_record`), skipped for a record the same
    host accepted from the same peer, byte for byte, within RECHECK_S."""
    accepted: OrderedDict[tuple[Any, bytes, bytes], float] = OrderedDict()

    def maybe_consume_signed_record(msg: Any, host: Any, peer_id: Any = None) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        key = (id(host), peer_id.to_bytes() if peer_id is not None else b"", msg.senderRecord)
        now = clock()
        when = accepted.get(key)
        if when is not None and now - when < RECHECK_S:
            return True
        ok = consume(msg, host, peer_id)
        accepted.pop(key, None)
        if ok:
            accepted[key] = now
            while len(accepted) > MAX_REMEMBERED:
                accepted.popitem(last=False)
        return ok

    maybe_consume_signed_record._gridmesh_remembering = True  # type: ignore[attr-defined]
    return maybe_consume_signed_record


def install() -> None:
    """Put pubsub's and gossipsub's record checks behind the memory (idempotent)."""
    current = _pubsub.maybe_consume_signed_record
    if getattr(current, "_gridmesh_remembering", False):
        return
    cached = remembering(_utils.maybe_consume_signed_record)
    _pubsub.maybe_consume_signed_record = cached  # type: ignore[attr-defined]
    _gossipsub.maybe_consume_signed_record = cached  # type: ignore[attr-defined]
