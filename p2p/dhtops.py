"""Our DHT operations over py-libp2p's KadDHT: each bounded in time, observed, and validated
where py-libp2p does not validate (its local store, a single peer's answer).

Each runs detached, in the host's nursery, and its caller waits for the result with its
deadline. py-libp2p's walks write to every peer they meet, and a frame's write cannot be cut
by a deadline (p2p.atomic_writes shields it, for up to WRITE_TIMEOUT_S to a peer that reads
nothing): awaited inline, one such peer held a record's publication or look-up far past its
deadline, so the record expired (bench/abuse.py: a flooded node missing from every
`nodes_find`, its own included). Detached, the caller leaves on time and the operation ends
on its own; at most MAX_DETACHED run at once, and past that an operation is refused at once
(a put still stores its value locally, where a node asked directly reads it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID

from p2p.network import DHTValidator, NetworkError

# (op, outcome, seconds) -> None; the daemon counts them in /metrics
DHTObserver = Callable[[str, str, float], None]
# starts a task in the host's nursery; False when there is none (not running): run inline
Spawn = Callable[[Callable[[], Awaitable[None]]], bool]

MAX_DETACHED = 64


class DhtOps:
    """put, get and get_from on namespaced keys (the caller scopes them); find_peers."""

    def __init__(
        self,
        dht: KadDHT,
        validator: DHTValidator,
        timeout_s: float,
        on_op: DHTObserver | None = None,
        spawn: Spawn | None = None,
    ) -> None:
        self._dht = dht
        self._validator = validator
        self._timeout_s = timeout_s
        self._on_op = on_op or (lambda op, outcome, seconds: None)
        self._spawn = spawn or (lambda task: False)
        self.detached = 0  # operations running in the host's nursery now

    async def put(self, key: str, value: bytes) -> None:
        if self.detached >= MAX_DETACHED:  # still readable here, by a node that asks us
            self._dht.value_store.put(key.encode(), value)
        await self._timed("put", lambda: self._dht.put_value(key, value))

    async def get(self, key: str) -> bytes | None:
        # py-libp2p answers from its local store without re-validating: an expired copy would
        # hide the fresh one on the network for the store's 24 h TTL. Drop it and ask around.
        local = self._dht.value_store.get(key.encode())
        if local is not None and not self._valid(key, local.value):
            self._dht.value_store.remove(key.encode())
        return await self._timed("get", lambda: self._dht.get_value(key))

    async def get_from(self, peer_id: str, key: str) -> bytes | None:
        try:
            peer = ID.from_base58(peer_id)
        except Exception:
            return None
        # py-libp2p's one-peer GET_VALUE (a step of its walk): None on any failure
        store = self._dht.value_store
        value = await self._timed("get_from", lambda: store._get_from_peer(peer, key.encode()))
        return value if isinstance(value, bytes) and self._valid(key, value) else None

    async def find_peers(self, target: bytes) -> list[str]:
        """py-libp2p's iterative FIND_NODE walk (ALPHA in flight; peers met with addresses
        join its routing table and peerstore), bounded by our deadline."""
        found = await self._timed(
            "find_peers", lambda: self._dht.peer_routing.find_closest_peers_network(target)
        )
        own = self._dht.host.get_id()
        return [peer.to_base58() for peer in found if peer != own]

    def _valid(self, key: str, value: bytes) -> bool:
        try:
            self._validator.validate(key, value)
        except Exception:
            return False
        return True

    async def _timed(self, op: str, call: Callable[[], Awaitable[Any]]) -> Any:
        started = trio.current_time()
        outcome = "error"
        try:
            with trio.fail_after(self._timeout_s):
                result = await self._detached(op, call)
            outcome = "ok"
            return result
        except trio.TooSlowError:
            outcome = "timeout"
            raise NetworkError(f"DHT {op} took longer than {self._timeout_s} s") from None
        finally:
            self._on_op(op, outcome, trio.current_time() - started)

    async def _detached(self, op: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """`call()`'s result, run in the host's nursery (inline when the host is not running);
        cancelling the wait leaves it running to its end."""
        if self.detached >= MAX_DETACHED:
            self._on_op(op, "refused", 0.0)
            raise NetworkError(f"{MAX_DETACHED} DHT operations are still running: try later")
        done = trio.Event()
        outcome: list[tuple[bool, Any]] = []

        async def run() -> None:
            try:
                outcome.append((True, await call()))
            except Exception as exc:
                outcome.append((False, exc))
            finally:
                self.detached -= 1
                done.set()

        self.detached += 1
        if not self._spawn(run):
            await run()
        await done.wait()
        ok, result = outcome[0] if outcome else (False, NetworkError(f"DHT {op} was stopped"))
        if not ok:
            raise result
        return result
