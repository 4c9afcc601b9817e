"""What keeps a py-libp2p host alive and fair under hostile input (DESIGN.md, "Known
pitfalls": one malformed message on some protocols kills the host).

`StreamGuard` wraps every stream handler, libp2p's own included, in one gate: a banned peer
is refused (p2p.bans), then a per-peer rate limit, then the hello (nothing but the hello is
served to a peer until it passed), then
the handler, whose failure is counted and resets the stream instead of escaping.
`harden_pubsub` puts cheap per-peer checks before py-libp2p's own gossip checks, and counts
every message py-libp2p would drop silently; `GossipValidators` runs our topics' validators
inside py-libp2p, before a message is delivered or forwarded; `harden_inbound` caps inbound
connections per IP and gives their slots back when they close.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.exceptions import ValidationError
from libp2p.peer.id import ID
from libp2p.pubsub.pubsub import ValidationCache, ValidationResult, signature_validator

from p2p.bans import PeerBans
from p2p.codec import CodecError
from p2p.dhtguard import DHT_PROTOCOL, DHT_REFUSAL, CountingValidator, ResetCountingStream
from p2p.framing import FrameTooLargeError
from p2p.hello import HELLO_PROTOCOL, HelloGate
from p2p.limits import HostLimits, RateLimiter, RejectHook
from p2p.network import GossipValidator, GossipVerdict, gossip_verdict

log = logging.getLogger(__name__)

# set while an inbound DHT stream is served: the peer that opened it (`StrikingValidator`)
DHT_PEER: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gridmesh_dht_peer", default=None
)
# refusals of a put record that an honest peer can cause: py-libp2p republishes the records it
# holds, and a copy may expire on the way, or come from a peer whose clock is off
NO_STRIKE_REASONS = frozenset({"stale", "future"})


class StreamGuard:
    """The one gate every inbound stream passes: ban, rate limit, hello, then handler."""

    def __init__(
        self, limiter: RateLimiter, hello: HelloGate, on_reject: RejectHook, bans: PeerBans
    ) -> None:
        self._limiter = limiter
        self._hello = hello
        self._on_reject = on_reject
        self._bans = bans
        self.errors = 0  # handlers that raised
        # inbound streams being served now, by peer and by protocol (HostLimits caps)
        self.open_by_peer: dict[str, int] = {}
        self.open_by_protocol: dict[str, int] = {}

    def guard_all(self, handlers: dict[Any, Any]) -> None:
        """Wrap every handler of a multiselect table that is not wrapped yet, in place."""
        for protocol, handler in list(handlers.items()):
            if handler is None or getattr(handler, "_gridmesh_guarded", False):
                continue
            handlers[protocol] = self.wrap(str(protocol), handler)

    def wrap(self, protocol: str, handler: Callable[[Any], Awaitable[None]]) -> Any:
        async def guarded(stream: Any) -> None:
            try:
                peer = stream.muxed_conn.peer_id.to_base58()
            except Exception:
                peer = None
            if peer is not None:
                refusal = None
                if self._bans.is_banned(peer):
                    refusal = "banned"
                elif not self._limiter.allow((peer, protocol)):
                    refusal = "rate_limited"
                    self._bans.strike(peer, f"streams of {protocol}")
                    self._bans.penalize(peer, "rate_limited")
                if refusal is not None:
                    self._on_reject("stream", refusal)
                    with contextlib.suppress(Exception):
                        await stream.reset()
                    return
                # nothing but the hello is served to a peer until its hello is valid
                if protocol != HELLO_PROTOCOL and peer not in self._hello.verified:
                    verified = False
                    try:
                        verified = await self._hello.wait_verified(peer)
                    finally:  # counted also when the peer's connection is dropped meanwhile
                        if not verified:
                            self._on_reject("stream", "no_hello")
                    if not verified:
                        with contextlib.suppress(Exception):
                            await stream.reset()
                        return
            busy = self._over_caps(peer, protocol)
            if busy is not None:
                self._on_reject("stream", busy)
                with contextlib.suppress(Exception):
                    await stream.reset()
                return
            self._opened(peer, protocol, 1)
            try:
                await self._serve(peer, protocol, handler, stream)
            finally:
                self._opened(peer, protocol, -1)

        guarded._gridmesh_guarded = True  # type: ignore[attr-defined]
        return guarded

    def _over_caps(self, peer: str | None, protocol: str) -> str | None:
        """Why a new stream of `peer` on `protocol` is one too many (None: it is not)."""
        limits = self._hello.limits
        if self.open_by_protocol.get(protocol, 0) >= limits.max_streams_per_protocol:
            return "protocol_busy"
        if peer is not None and self.open_by_peer.get(peer, 0) >= limits.max_streams_per_peer:
            self._bans.penalize(peer, "rate_limited")
            return "too_many_streams"
        return None

    def _opened(self, peer: str | None, protocol: str, delta: int) -> None:
        for table, key in ((self.open_by_peer, peer), (self.open_by_protocol, protocol)):
            if key is None:
                continue
            count = table.get(key, 0) + delta
            if count > 0:
                table[key] = count
            else:
                table.pop(key, None)

    async def _serve(
        self,
        peer: str | None,
        protocol: str,
        handler: Callable[[Any], Awaitable[None]],
        stream: Any,
    ) -> None:
        """Run the handler; its failure is counted and resets the stream."""
        token, peer_token, raw = None, None, stream
        if protocol == DHT_PROTOCOL:
            cell = [False]
            token, peer_token = DHT_REFUSAL.set(cell), DHT_PEER.set(peer)
            stream = ResetCountingStream(
                stream,
                cell,
                self._on_reject,
                lambda: self._allow_dht_message(peer),
            )
        try:
            await handler(stream)
        except trio.Cancelled:
            raise
        except BaseException as exc:  # noqa: BLE001 - the guard must catch everything
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            self.errors += 1
            if not getattr(exc, "_gridmesh_counted", False):
                self._on_reject("stream", reason_of(exc))
            garbage = isinstance(exc, CodecError | FrameTooLargeError)
            if peer is not None and garbage and not getattr(exc, "_gridmesh_scored", False):
                self._bans.penalize(peer, "malformed")
            log.info("stream handler for %s failed: %r", protocol, exc)
            with contextlib.suppress(Exception):
                await raw.reset()  # counted above, not again by a DHT stream's proxy
        finally:
            if token is not None and peer_token is not None:
                DHT_REFUSAL.reset(token)
                DHT_PEER.reset(peer_token)

    def _allow_dht_message(self, peer: str | None) -> bool:
        if peer is not None and self._bans.is_banned(peer):
            return False
        if self._limiter.allow((peer, "dht-message")):
            return True
        if peer is not None:
            self._bans.strike(peer, "DHT messages")
            self._bans.penalize(peer, "rate_limited")
        return False


class StrikingValidator(CountingValidator):
    """The DHT's validator (`CountingValidator`, refusals counted), and a strike (p2p.bans)
    against a peer for each record it puts that is refused for what only a forger or a
    flooder sends: a bad signature, someone else's key, another network or namespace,
    garbage. A flood of forged puts then gets its sender banned within seconds, instead of
    costing a stream, a negotiation and a check each for as long as it lasts. Expired or
    future records (NO_STRIKE_REASONS) are no strike, nor is anything refused on our reads."""

    def __init__(self, validators: dict[str, Any], on_reject: RejectHook, bans: PeerBans) -> None:
        super().__init__(validators, on_reject)
        self._bans = bans

    def validate(self, key: str, value: bytes) -> None:
        try:
            super().validate(key, value)
        except Exception as exc:
            peer = DHT_PEER.get()
            if peer is not None:
                reason = getattr(exc, "reason", None)
                if reason in NO_STRIKE_REASONS:
                    self._bans.penalize(peer, "stale")
                else:
                    self._bans.strike(peer, f"DHT record {reason}")
                    self._bans.penalize(
                        peer, "bad_signature" if reason == "bad_signature" else "invalid_record"
                    )
            raise


def harden_pubsub(
    pubsub: Any,
    limits: HostLimits,
    on_reject: RejectHook,
    messages: RateLimiter,
    message_bytes: RateLimiter,
    bans: PeerBans,
) -> None:
    """Cheap, per-peer checks before py-libp2p's own, and a count for every drop.

    py-libp2p starts a task per received message and drops bad ones silently; here a
    forwarding peer over its rate (`messages`, `message_bytes`) or a message over the size
    limit is dropped before the signature check, and whatever py-libp2p then refuses (bad
    signature, validation) or cannot queue for our subscription is counted. A bad signature is
    a strike against the forwarder (honest peers forward only what they validated); a message
    over a rate or size limit is not: an honest forwarder relays whatever rate its mesh
    publishes at, and may run with larger limits. A banned forwarder's messages are dropped
    unread. A message our validators refused (`GossipValidators`) is counted by them, not
    here, and its later copies are dropped before py-libp2p checks their signatures again.
    """
    push = pubsub.push_msg
    cache = pubsub.validation_cache
    pubsub.validation_cache = RefusalCache(cache.ttl, cache.max_size)

    def refused_before(msg: Any) -> bool:
        """A validator refused this message id (now or earlier), and counted it."""
        return pubsub.validation_cache.get(pubsub._msg_id_constructor(msg)) is not None

    async def push_msg(forwarder: ID, msg: Any) -> None:
        if forwarder == pubsub.my_id:
            await push(forwarder, msg)
            return
        peer, size = forwarder.to_base58(), msg.ByteSize()
        if bans.is_banned(peer):
            on_reject("pubsub", "banned")
            return
        if size > limits.max_gossip_bytes:
            on_reject("pubsub", "too_large")
            return
        if not messages.allow(peer) or not message_bytes.allow(peer, size):
            on_reject("pubsub", "rate_limited")
            return
        if pubsub._is_msg_seen(msg) or refused_before(msg):
            return  # duplicates are normal in a mesh
        await push(forwarder, msg)
        if not pubsub._is_msg_seen(msg):
            if refused_before(msg):
                return  # a validator of ours refused it: it counted it (GossipValidators)
            bad_sig = pubsub.strict_signing and not _safe_signature_check(msg)
            on_reject("pubsub", "bad_signature" if bad_sig else "refused")
            if bad_sig:  # a strike, not a score: floods of these are what strikes are for
                bans.strike(peer, "gossip bad_signature")

    def notify_subscriptions(msg: Any) -> None:
        for topic in msg.topicIDs:
            if topic in pubsub.topic_ids:
                try:
                    pubsub.subscribed_topics_send[topic].send_nowait(msg)
                except trio.WouldBlock:
                    on_reject("pubsub", "queue_full")

    pubsub.push_msg = push_msg
    pubsub.notify_subscriptions = notify_subscriptions


class RefusalCache(ValidationCache):
    """py-libp2p's cache of validation results by message id (origin and sequence number),
    keeping refusals only.

    py-libp2p keeps an accepted id for 300 s, past the seen ids' TTL (`seen_ttl_s`): an
    origin could then send other data under an id it had used before and skip the
    validators. A refusal is safe to keep: only the origin can sign a message under its id,
    so a refused id refuses nothing but the origin's own message."""

    def put(self, msg_id: bytes, result: ValidationResult) -> None:
        if not result.is_valid:
            super().put(msg_id, result)


class GossipValidators:
    """Our topics' gossip validators (`p2p.network.Gossip.subscribe`) as py-libp2p's.

    py-libp2p runs a topic's validator in `Pubsub.push_msg` after the signature check and
    before it marks the message seen, queues it for our subscription or forwards it to the
    mesh: a refused message goes nowhere. Each validator sees the message's origin and data;
    all of a topic's must accept. Our own publications pass unvalidated. A validator counts
    its own refusals; one that raises refuses, counted here as `pubsub`/`validator_error`.
    A refusal is raised as py-libp2p's ValidationError with a short text of ours, before
    py-libp2p would format the whole message into one.
    """

    def __init__(self, pubsub: Any, on_reject: RejectHook, bans: PeerBans | None = None) -> None:
        self._pubsub = pubsub
        self._on_reject = on_reject
        self._bans = bans  # a refused message lowers its (signing) origin's score
        self._by_topic: dict[str, list[GossipValidator]] = {}

    def add(self, topic: str, validator: GossipValidator) -> None:
        validators = self._by_topic.get(topic)
        if validators is None:
            validators = self._by_topic[topic] = []
            self._pubsub.set_topic_validator(topic, self._runner(topic, validators), False)
        validators.append(validator)

    def _runner(self, topic: str, validators: list[GossipValidator]) -> Callable[[ID, Any], bool]:
        pubsub, on_reject, bans = self._pubsub, self._on_reject, self._bans

        def validate(forwarder: ID, msg: Any) -> bool:
            if forwarder == pubsub.my_id:
                return True  # our own publication
            try:
                origin, data = ID(msg.from_id).to_base58(), msg.data
                verdict = GossipVerdict.ACCEPT
                for validator in validators:
                    verdict = gossip_verdict(validator(origin, data))
                    if verdict is not GossipVerdict.ACCEPT:
                        break
                # invalid: held against its origin (PeerBans never holds anything against
                # ourselves: a copy of our own message that came back); old news (IGNORE) is
                # no fault of anyone's
                if verdict is GossipVerdict.REJECT and bans is not None:
                    bans.penalize(origin, "malformed")
                accepted = verdict is GossipVerdict.ACCEPT
            except Exception as exc:  # a validator's bug refuses the message, never more
                on_reject("pubsub", "validator_error")
                log.info("gossip validator for %s failed: %r", topic, exc)
                accepted = False
            if not accepted:
                # refused with our own short error: py-libp2p's own, for a False, formats the
                # whole message into its text (1.4 ms for 500 KB of text, 32 ms of random bytes)
                raise ValidationError(f"refused by the gossip validator of {topic}")
            return True

        return validate


def harden_inbound(
    swarm: Any, limit: int, on_reject: RejectHook, poll_s: Callable[[], float]
) -> None:
    """Per-IP cap on inbound connections, inbound slots that come back, and a count of the
    connections refused for want of a slot (p2p.caps sets their number).

    py-libp2p 0.8.1 holds an inbound slot (of 250) until the swarm stops, not until the
    connection closes: after ~125 peers have come and gone, every new peer is refused.
    Here the slot's holder is cancelled once the connection's socket is closed (checked every
    `poll_s()` seconds), and one IP may hold at most `limit` connections (idle sockets from
    one address would otherwise take every slot before their handshakes time out).
    """
    original = swarm._handle_inbound_connection
    per_ip: dict[str, int] = {}

    async def until_closed(raw: Any, scope: trio.CancelScope) -> None:
        sock = getattr(getattr(raw, "stream", None), "socket", None)
        if sock is None:
            return  # not a TCP stream we can watch: py-libp2p's behaviour stays
        while sock.fileno() != -1:  # noqa: ASYNC110 - nothing signals a closed socket
            await trio.sleep(poll_s())
        scope.cancel()

    async def handle(raw: Any, maddr: Any) -> None:
        try:
            ip = (raw.get_remote_address() or ("", 0))[0]
        except Exception:
            ip = ""
        slots = getattr(swarm, "_inbound_limiter", None)  # py-libp2p's: it refuses uncounted
        full = slots is not None and slots.available_tokens < 1
        if full or per_ip.get(ip, 0) >= limit:
            on_reject("connection", "inbound_limit" if full else "per_ip_limit")
            with contextlib.suppress(Exception):
                await raw.close()
            return
        per_ip[ip] = per_ip.get(ip, 0) + 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(until_closed, raw, nursery.cancel_scope)
                await original(raw, maddr)
                nursery.cancel_scope.cancel()
        finally:
            per_ip[ip] -= 1
            if not per_ip[ip]:
                del per_ip[ip]

    swarm._handle_inbound_connection = handle


def _safe_signature_check(msg: Any) -> bool:
    try:
        return bool(signature_validator(msg))
    except Exception:
        return False


def reason_of(exc: BaseException) -> str:
    """The reason an error is counted under: its own `reason`, else its type's name."""
    if isinstance(exc, BaseExceptionGroup):
        first = exc.exceptions[0] if exc.exceptions else exc
        return reason_of(first)
    reason = getattr(exc, "reason", None)  # our errors name their own reason
    return reason if isinstance(reason, str) else type(exc).__name__


def describe_error(exc: BaseException) -> str:
    """One line for an exception, unwrapping ExceptionGroups to their first leaf."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__
