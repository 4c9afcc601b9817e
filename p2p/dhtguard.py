"""Guards of py-libp2p's Kademlia DHT: our validator behind a strict namespaced one, and every
refusal counted (KadDHT refuses many things silently, by resetting the stream)."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

from libp2p.records.validator import NamespacedValidator, Validator

from p2p.limits import RejectHook
from p2p.network import DHTValidator, NetworkError


class ValidatorBridge(Validator):
    """Adapts our `DHTValidator` to py-libp2p's `Validator` base class."""

    def __init__(self, inner: DHTValidator, on_reject: RejectHook) -> None:
        self._inner = inner
        self._on_reject = on_reject

    def validate(self, key: str, value: bytes) -> None:
        try:
            self._inner.validate(key, value)
        except Exception as exc:
            # our validator counts what it refuses, except expired copies (normal on reads
            # of its local store); here they came from the DHT, so they are counted too
            if getattr(exc, "reason", None) == "stale":
                self._on_reject("dht", "stale")
            exc._gridmesh_counted = True  # type: ignore[attr-defined]
            raise

    def select(self, key: str, values: list[bytes]) -> int:
        return self._inner.select(key, values)


# set while an inbound DHT stream is served: whether its refusal was counted already
DHT_REFUSAL: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "gridmesh_dht_refusal", default=None
)
DHT_PROTOCOL = "/ipfs/kad/1.0.0"


class ResetCountingStream:
    """A libp2p stream whose reset by KadDHT's handler counts as a refused message.

    KadDHT refuses many things before (or instead of) asking our validator: bad signed peer
    records, mismatched or empty keys, oversized records, a full inbound limiter. It resets
    the stream for each, silently; this proxy counts the resets the validator did not count.
    """

    def __init__(
        self,
        stream: Any,
        cell: list[bool],
        on_reject: RejectHook,
        allow_message: Callable[[], bool],
    ) -> None:
        self._stream = stream
        self._cell = cell
        self._on_reject = on_reject
        self._allow_message = allow_message
        self._broken = False
        # where we are in KadDHT's varint-prefixed messages, to limit them per peer however
        # many a peer sends on one stream
        self._prefix: list[int] = []
        self._body_left = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def read(self, n: int | None = None) -> bytes:
        starts_message = not self._prefix and not self._body_left
        try:
            data = await self._stream.read(n)
        except Exception:
            # the peer reset or dropped the stream (an honest querier that got its answer
            # elsewhere does): KadDHT resets it in turn, which is no refusal of ours
            self._broken = True
            raise
        if data and starts_message and not self._allow_message():
            self._cell[0] = True
            self._on_reject("dht", "rate_limited")
            raise NetworkError("DHT messages over this peer's rate limit")
        self._track(data)
        return data

    def _track(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._body_left:
                step = min(self._body_left, len(view))
                self._body_left -= step
                view = view[step:]
                continue
            byte = view[0]
            view = view[1:]
            self._prefix.append(byte)
            if not byte & 0x80 or len(self._prefix) >= 10:
                self._body_left = sum((b & 0x7F) << (7 * i) for i, b in enumerate(self._prefix))
                self._prefix = []

    async def reset(self) -> None:
        if not self._cell[0] and not self._broken:
            self._cell[0] = True
            self._on_reject("dht", "refused")
        await self._stream.reset()


class CountingValidator(NamespacedValidator):
    """A strict `NamespacedValidator` that counts every refusal, foreign keys included."""

    def __init__(self, validators: dict[str, Validator], on_reject: RejectHook) -> None:
        super().__init__(validators, strict_validation=True)
        self._on_reject = on_reject

    def validate(self, key: str, value: bytes) -> None:
        try:
            super().validate(key, value)
        except Exception as exc:
            if not getattr(exc, "_gridmesh_counted", False):
                self._on_reject("dht", "foreign_key")
            cell = DHT_REFUSAL.get()
            if cell is not None:
                cell[0] = True
            raise
