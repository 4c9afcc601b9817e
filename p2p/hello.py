"""The hello: which gridmesh network a peer belongs to, checked before it is served anything.

KadDHT ignores `protocol_prefix` (DESIGN.md, "Known pitfalls"), so networks are kept apart by
a signed hello exchanged on every connection: a peer whose hello is missing, malformed or
names another network is refused and dropped. `HelloGate` keeps which peers passed, checks
new ones (in the background for connections the DHT made), and lets the host's stream guard
wait for a peer's check before serving it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Annotated

import msgspec
import trio

from p2p import codec, identity, versions
from p2p.limits import HostLimits, RejectHook
from p2p.network import HELLO_PROTOCOL, NetworkError

log = logging.getLogger(__name__)

__all__ = ["HELLO_PROTOCOL", "HelloBody", "HelloGate", "open_hello", "open_hello_body"]
HELLO_TYPE = "hello"
MAX_HELLO_BYTES = 4096
HELLO_RETRY_S = 30.0

# request(peer id, protocol, payload, *, timeout_s) -> response
Request = Callable[..., Awaitable[bytes]]


class HelloBody(msgspec.Struct, frozen=True):
    """The signed hello's body: which gridmesh network the sender belongs to, and which
    version of the wire protocol it speaks (p2p.versions; absent from hellos of nodes that
    predate it: 1.0). Fields a newer minor version adds are skipped."""

    network_id: Annotated[str, msgspec.Meta(max_length=128)]
    version: versions.Version = "1.0"


def open_hello(payload: bytes, sender: str) -> str:
    """The network id of a peer's hello; CodecError unless it is well-formed and theirs."""
    return open_hello_body(payload, sender).network_id


def open_hello_body(payload: bytes, sender: str) -> HelloBody:
    """A peer's hello; CodecError unless it is well-formed and theirs."""
    env = codec.parse_envelope(payload, expect_type=HELLO_TYPE, max_bytes=MAX_HELLO_BYTES)
    if env.sender != sender:
        raise codec.CodecError("wrong_sender", "hello signed by another peer")
    try:
        body = msgspec.convert(env.body, HelloBody, strict=True)
    except msgspec.ValidationError as exc:
        raise codec.CodecError("malformed", f"hello body: {str(exc)[:200]}") from None
    codec.verify_envelope(env)  # last: the costly check, after the cheap ones
    return body


class HelloGate:
    """The peers whose signed hello named our network (by peer id: Noise authenticates it)."""

    def __init__(
        self,
        ident: identity.NodeIdentity,
        network_id: str,
        limits: HostLimits,
        on_reject: RejectHook,
        *,
        request: Request,
        drop_peer: Callable[[str], Awaitable[None]],
        connected_peers: Callable[[], set[str]],
        now: Callable[[], float],
    ) -> None:
        self._ident = ident
        self.network_id = network_id
        self.limits = limits
        self._on_reject = on_reject
        self._request = request
        self._drop_peer = drop_peer
        self._connected_peers = connected_peers
        self._now = now
        self.nursery: trio.Nursery | None = None  # for background checks, while running
        self.verified: OrderedDict[str, None] = OrderedDict()
        # set when a peer's hello check ends; waited on by its streams
        self._done: dict[str, trio.Event] = {}
        self._inflight: set[str] = set()
        # peer id -> (when, why) its last hello failed: told to a waiting dial, and no hello
        # in the background is tried again for HELLO_RETRY_S
        self._failures: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._refused: OrderedDict[str, str] = OrderedDict()  # peer id -> why, for users
        self.version = versions.PROTOCOL_VERSION  # what our hello says we speak

    def hello(self) -> bytes:
        body = {"network_id": self.network_id, "version": self.version}
        return codec.seal(self._ident, HELLO_TYPE, body, timestamp=self._now()).to_wire()

    async def answer(self, sender: str, payload: bytes) -> bytes:
        """The HELLO_PROTOCOL request handler."""
        try:
            body = open_hello_body(payload, sender)
        except codec.CodecError as exc:
            self._on_reject("hello", exc.reason)
            exc._gridmesh_counted = True  # type: ignore[attr-defined]
            raise
        theirs = body.network_id
        why = versions.incompatibility(self.version, body.version)
        if why is not None:
            self._on_reject("hello", "incompatible_version")
            # answered, so that the dialler can tell its user why; never verified
            self._note_refused(sender, f"peer {sender} {why}")
        elif theirs == self.network_id:
            self.mark_verified(sender)
        else:
            self._on_reject("hello", "wrong_network")
            # shown, not held against it: the background check still runs (and drops it)
            self._note_refused(sender, self._other_network(sender, theirs))
        # answered either way, so that the dialler can tell its user which network we are on
        return self.hello()

    async def _check(self, peer_id: str) -> None:
        """Refuse a peer of another gridmesh network (or one that is no gridmesh node)."""
        try:
            reply = await self._request(
                peer_id, HELLO_PROTOCOL, self.hello(), timeout_s=self.limits.hello_timeout_s
            )
            body = open_hello_body(reply, peer_id)
        except (NetworkError, codec.CodecError) as exc:
            self._on_reject("hello", getattr(exc, "reason", "no_hello"))
            await self._drop_peer(peer_id)
            raise NetworkError(f"peer {peer_id} failed the gridmesh handshake: {exc}") from None
        theirs = body.network_id
        why = versions.incompatibility(self.version, body.version)
        if why is not None:
            self._on_reject("hello", "incompatible_version")
            await self._drop_peer(peer_id)
            raise NetworkError(f"peer {peer_id} {why}")
        if theirs != self.network_id:
            self._on_reject("hello", "wrong_network")
            await self._drop_peer(peer_id)
            raise NetworkError(self._other_network(peer_id, theirs))
        self.mark_verified(peer_id)

    def _other_network(self, peer_id: str, theirs: str) -> str:
        return f"peer {peer_id} is on network {theirs[:64]!r}, not {self.network_id!r}"

    def _note_refused(self, peer_id: str, why: str) -> None:
        self._refused[peer_id] = why
        self._refused.move_to_end(peer_id)
        while len(self._refused) > self.limits.max_tracked_peers:
            self._refused.popitem(last=False)

    def refused(self) -> dict[str, str]:
        """Peers whose hello failed (another network, none, malformed) and why, oldest
        first: what `node_peers` can show beside the peers that passed."""
        return dict(self._refused)

    async def ensure_verified(self, peer_id: str) -> None:
        """Check the peer's hello unless done already or under way (then wait for that one)."""
        if peer_id in self.verified:
            return
        if peer_id in self._inflight:
            done = self._done.setdefault(peer_id, trio.Event())
            with trio.move_on_after(self.limits.hello_timeout_s + 1):
                await done.wait()
            if peer_id not in self.verified:
                raise NetworkError(
                    self._failures.get(peer_id, (0.0, f"peer {peer_id} failed the hello"))[1]
                )
            return
        self._inflight.add(peer_id)
        try:
            await self._check(peer_id)
        except NetworkError as exc:
            self._failures[peer_id] = (time.monotonic(), str(exc))
            while len(self._failures) > self.limits.max_tracked_peers:
                self._failures.popitem(last=False)
            self._note_refused(peer_id, str(exc))
            raise
        finally:
            self._inflight.discard(peer_id)
            if peer_id not in self.verified:
                self._done.pop(peer_id, trio.Event()).set()

    def in_background(self, peer_id: str) -> None:
        """Check a peer's hello in the background (not again within HELLO_RETRY_S of a
        failure: a peer the DHT keeps telling us of is not dialled in a loop)."""
        if peer_id in self.verified or peer_id in self._inflight or self.nursery is None:
            return
        failed_at = self._failures.get(peer_id, (-HELLO_RETRY_S, ""))[0]
        if time.monotonic() - failed_at < HELLO_RETRY_S:
            return
        self.nursery.start_soon(self._background, peer_id)

    async def _background(self, peer_id: str) -> None:
        try:
            await self.ensure_verified(peer_id)
        except NetworkError as exc:  # counted by _check
            log.info("%s", exc)

    def mark_verified(self, peer_id: str) -> None:
        self._failures.pop(peer_id, None)
        self._refused.pop(peer_id, None)
        self.verified[peer_id] = None
        self.verified.move_to_end(peer_id)
        if len(self.verified) > self.limits.max_tracked_peers:
            connected = self._connected_peers()
            for old in list(self.verified):
                if len(self.verified) <= self.limits.max_tracked_peers:
                    break
                if old not in connected:
                    del self.verified[old]
        self._done.setdefault(peer_id, trio.Event()).set()

    def forget_unverified(self, peer_id: str) -> None:
        """The peer's last connection closed: drop what we kept while its check was pending."""
        if peer_id not in self.verified and peer_id not in self._inflight:
            self._done.pop(peer_id, None)

    async def wait_verified(self, peer_id: str) -> bool:
        """Whether the peer passed its hello, waiting up to `hello_timeout_s` for its check."""
        if peer_id in self.verified:
            return True
        done = self._done.setdefault(peer_id, trio.Event())
        with trio.move_on_after(self.limits.hello_timeout_s):
            await done.wait()
        return peer_id in self.verified
