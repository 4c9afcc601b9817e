"""The addresses a libp2p host takes from its peers, and those it passes on (a part of the
host adapter, `p2p.host`; issue 19, item 4).

py-libp2p 0.8.1 stores whatever a peer says in the peerstore (identify's listen addresses
and signed record, Kademlia's closer and provider peers, gossipsub's peer exchange, DCUtR's
observed addresses), and its swarm dials what is stored: its auto-connector dials the whole
peerstore, and every Kademlia walk dials the peers it is told of. A hostile peer could so
make every node dial a victim (`/p2p/` naming another peer, `0.0.0.0`, which Linux dials as
this host), multicast or port 0; and our Kademlia answers would pass on to anyone what we
stored (a same-host peer's loopback address to a remote peer). `AddrGuard` is the one seam:

- In: the peerstore's `add_addrs` (which `add_addr` and `consume_peer_record` call too) keeps
  only what `p2p.addrs.check_addr` accepts for that peer, loopback and link-local ones only
  while this node is itself on a single host's network (`p2p.addrs.local_only`: the devnet),
  never one of our own listeners, at most MAX_ADDRS per peer; each dropped address is counted
  as `addr_<reason>` (source `peerstore`; `dcutr` for a hole punch's addresses). The swarm
  dials only what is stored, so it never dials the rest. Our own `connect()` stores the
  address it was given as it is (`trusted_add`: the operator's word, not a peer's).
- Out: every frame written on a Kademlia stream (answers we serve, requests we send) and on
  an identify stream (answer, push) is rewritten for the peer at its other end. An address
  `check_addr` refuses is dropped and counted (source `answer`: a provider's addresses are
  stored as it gave them); loopback and link-local addresses go only to a peer on this host
  (connected directly from one of its addresses), and a signed peer record that carries one
  is withheld from the others (it cannot be edited; py-libp2p then reads the plain list).
  Withheld local addresses are normal and counted in `withheld` only. AutoNAT's dial-back
  requests are tailored by `p2p.reach` with `reach_of` (the widest scope a peer can dial);
  the DHT resource record, read by anyone, by `p2p.addrs.for_everyone`.
- A DNS name is judged by its name when it is stored (`localhost` is local, any other
  public), and each address it resolves to when the TCP transport dials it, as an address
  given would be (source `dns`): a name cannot make us dial 0.0.0.0, multicast, our own
  listener, or loopback from a node not on loopback alone.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import ipaddress
import math
import time
from collections.abc import Callable
from typing import Any

import multiaddr
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.identity.identify_push.identify_push import ID_PUSH as IDENTIFY_PUSH_PROTOCOL
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL
from libp2p.kad_dht.pb.kademlia_pb2 import Message as KadMessage
from libp2p.peer.envelope import consume_envelope
from libp2p.peer.id import ID
from libp2p.transport.exceptions import OpenConnectionError

from p2p.addrs import (
    LOCAL,
    MAX_ADDRS,
    PRIVATE,
    PUBLIC,
    AddrRefused,
    check_addr,
    ip_scope,
    is_local_ip,
    is_own_addr,
    local_only,
)
from p2p.limits import RejectHook

LOCAL_TTL_S = 1.0  # how long "this node is on loopback alone" is taken as read
MAX_VARINT_BYTES = 10
_DNS = ("/dns/", "/dns4/", "/dns6/", "/dnsaddr/")
# the DNS address a transport's dial is resolving now (None: an IP address was dialled)
_resolving: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gridmesh_resolving", default=None
)


def _same_host(ip: str) -> bool:
    """Whether a connection from `ip` comes from this host (loopback or one of its own
    addresses). Tests replace it to play a remote peer on loopback."""
    return is_local_ip(ip.removeprefix("::ffff:"))


class AddrGuard:
    """Checks the addresses one host stores from its peers and tells its peers (see the
    module docstring). Only this host's objects are changed (instance attributes): other
    hosts in the process keep py-libp2p's own behaviour."""

    def __init__(self, host: Any, on_reject: RejectHook) -> None:
        self._host = host
        self._on_reject = on_reject
        self._store = host.get_peerstore()
        self.trusted_add = self._store.add_addrs  # py-libp2p's own: no checks
        self._local_at = -math.inf
        self._local = False
        self._own: list[Any] = []  # our listeners, and their ports (read with `_local`)
        self._own_ports: set[str] = set()
        self.withheld: collections.Counter[str] = collections.Counter()

    def install(self, dcutr: Any | None) -> None:
        """Take over the peerstore's intake, the Kademlia and identify streams (both ways)
        and DCUtR's address decoding of this host. Call before the handlers are guarded."""
        self._store.add_addrs = self.add_addrs
        self._open_stream = self._host.new_stream
        self._host.new_stream = self._new_stream
        handlers = self._host.get_mux().handlers
        for protocol in (KAD_PROTOCOL, IDENTIFY_PROTOCOL):
            if handlers.get(protocol) is not None:
                handlers[protocol] = self._tailored_handler(protocol, handlers[protocol])
        if dcutr is not None:
            decode = dcutr._decode_observed_addrs
            dcutr._decode_observed_addrs = lambda raw: self.usable("", decode(raw), "dcutr")
        for transport in self._host.get_network().transport_manager.get_transports():
            if hasattr(transport, "_dial_resolved"):  # TCP: resolves /dns* names itself
                self._check_resolved(transport)

    # -- in: what we store, and so dial ---------------------------------------------------

    def local(self) -> bool:
        """Whether this node is reachable on loopback or link-local addresses alone (read at
        most every LOCAL_TTL_S: the peerstore takes addresses many times a second)."""
        now = time.monotonic()
        if now - self._local_at > LOCAL_TTL_S:
            with contextlib.suppress(Exception):  # never fail an intake on our own addresses
                self._local = local_only([str(a) for a in self._host.get_addrs()])
                self._own = list(self._host.get_transport_addrs())
                self._own_ports = {_port(str(a)) for a in self._own}
            self._local_at = now
        return self._local

    def add_addrs(self, peer_id: ID, addrs: Any, ttl: int = 0) -> None:
        """The peerstore's `add_addrs`, for a peer's word: only usable addresses are kept."""
        if peer_id == self._host.get_id():
            self.trusted_add(peer_id, addrs, ttl)
            return
        kept = self.usable(peer_id.to_base58(), list(addrs), "peerstore")
        stored = self._stored(peer_id)
        new = [a for a in kept if a not in stored]
        room = max(MAX_ADDRS - len(stored), 0)
        for _ in new[room:]:
            self._on_reject("peerstore", "addr_too_many")
        kept = [a for a in kept if a in stored or a in new[:room]]  # known ones: ttl renewed
        if kept:
            self.trusted_add(peer_id, kept, ttl)

    def _stored(self, peer_id: ID) -> list[Any]:
        data = getattr(self._store, "peer_data_map", {}).get(peer_id)
        return list(data.get_addrs()) if data is not None else []

    def usable(self, peer: str, addrs: list[Any], source: str) -> list[Any]:
        """The `addrs` of `peer` ("": none named) this node may dial; the rest counted."""
        local = self.local()
        kept = []
        for addr in addrs:
            try:
                place, scope = check_addr(str(addr), peer)
                if scope == LOCAL and not local:
                    raise AddrRefused("local")
                if (
                    "/p2p-circuit" not in place
                    and _port(place) in self._own_ports
                    and is_own_addr(addr, self._own)
                ):
                    raise AddrRefused("own")
            except AddrRefused as exc:
                self._on_reject(source, f"addr_{exc.reason}")
                continue
            except Exception:  # str() of a broken multiaddr
                self._on_reject(source, "addr_malformed")
                continue
            kept.append(addr)
        return kept

    def _check_resolved(self, transport: Any) -> None:
        """What a name resolves to is checked as the name could not be (unspecified,
        multicast, loopback from a node not on loopback alone, our own listener) before the
        transport dials it; each refused answer is counted (source `dns`)."""
        dials = {name: getattr(transport, name) for name in ("dial", "dial_with_source")}
        dial_resolved = transport._dial_resolved

        def resolving(dial: Callable[..., Any]) -> Callable[..., Any]:
            async def dial_named(maddr: Any, *args: Any, **kwargs: Any) -> Any:
                text = str(maddr)
                token = _resolving.set(text if text.startswith(_DNS) else None)
                try:
                    return await dial(maddr, *args, **kwargs)
                finally:
                    _resolving.reset(token)

            return dial_named

        async def checked(addr: Any, *args: Any, **kwargs: Any) -> Any:
            name = _resolving.get()
            if name is not None:
                place = str(addr).split("/p2p/")[0]
                if not self.usable("", [multiaddr.Multiaddr(place)], "dns"):
                    raise OpenConnectionError(f"{name} resolved to {place}: not dialled")
            return await dial_resolved(addr, *args, **kwargs)

        for name, dial in dials.items():
            setattr(transport, name, resolving(dial))
        transport._dial_resolved = checked

    # -- out: what we tell each peer -----------------------------------------------------

    def _tailored_handler(self, protocol: str, handler: Callable[[Any], Any]) -> Any:
        async def tailored(stream: Any) -> None:
            await handler(self._tailored(protocol, stream))

        return tailored

    async def _new_stream(self, peer_id: ID, protocol_ids: Any) -> Any:
        stream = await self._open_stream(peer_id, protocol_ids)
        ours = [p for p in (KAD_PROTOCOL, IDENTIFY_PUSH_PROTOCOL) if p in list(protocol_ids)]
        return self._tailored(ours[0], stream) if ours else stream

    def _tailored(self, protocol: str, stream: Any) -> TailoredStream:
        near = self.near(stream)
        if protocol == KAD_PROTOCOL:
            return TailoredStream(stream, lambda frame: self.kad_frame(frame, near))
        return TailoredStream(stream, lambda frame: self.identify_frame(frame, near))

    def near(self, stream: Any) -> bool:
        """Whether the peer at the other end of `stream` is on this host: the stream's
        connection comes from one of its addresses and the peer is not reached through a
        relay (whose address that would be)."""
        try:
            remote = stream.get_remote_address()
            peer = stream.muxed_conn.peer_id
        except Exception:
            return False
        if not remote or not _same_host(str(remote[0])):
            return False
        with contextlib.suppress(Exception):
            for conn in self._host.get_network().get_connections(peer) or []:
                if any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses()):
                    return False
        return True

    def reach_of(self, peer: ID) -> int:
        """The widest scope of our addresses `peer` could dial (what AutoNAT asks it to
        try): LOCAL when it is on this host (connected directly from one of its addresses),
        PRIVATE when a direct connection comes from a private address (our LAN, or behind
        our NAT), else PUBLIC (across the internet, or known only through a relay)."""
        widest = PUBLIC
        with contextlib.suppress(Exception):
            for conn in self._host.get_network().get_connections(peer) or []:
                if any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses()):
                    continue
                ip = str(conn.muxed_conn.get_remote_address()[0]).removeprefix("::ffff:")
                if _same_host(ip):
                    return LOCAL
                with contextlib.suppress(ValueError, AddrRefused):
                    if ip_scope(ipaddress.ip_address(ip)) == PRIVATE:
                        widest = PRIVATE
        return widest

    def identify_frame(self, frame: bytes, near: bool) -> bytes:
        """Our identify message for one peer: no local address unless it is on this host
        (and then no signed record, which has them)."""
        if near:
            return frame
        message = Identify()
        message.ParseFromString(frame)
        kept = [raw for raw in message.listen_addrs if _scope(raw, "") != LOCAL]
        if len(kept) == len(message.listen_addrs):
            return frame
        self.withheld["identify"] += len(message.listen_addrs) - len(kept)
        del message.listen_addrs[:]
        message.listen_addrs.extend(kept)
        message.ClearField("signedPeerRecord")
        return message.SerializeToString()

    def kad_frame(self, frame: bytes, near: bool) -> bytes:
        """A Kademlia message for one peer: other peers' addresses that are usable, local
        ones only to a peer on this host, and signed records only where all of theirs are."""
        message = KadMessage()
        message.ParseFromString(frame)
        changed = False
        for entry in [*message.closerPeers, *message.providerPeers]:
            kept = []
            for raw in entry.addrs:
                scope = _peer_scope(raw, entry.id)
                if isinstance(scope, str):
                    self._on_reject("answer", f"addr_{scope}")
                elif scope == LOCAL and not near:
                    self.withheld["kad"] += 1
                else:
                    kept.append(raw)
            if len(kept) != len(entry.addrs):
                changed = True
                del entry.addrs[:]
                entry.addrs.extend(kept)
            if entry.HasField("signedRecord") and not _record_fits(entry.signedRecord, near):
                changed = True
                entry.ClearField("signedRecord")
        if message.HasField("senderRecord") and not _record_fits(message.senderRecord, near):
            changed = True
            message.ClearField("senderRecord")
        return message.SerializeToString() if changed else frame


def _port(text: str) -> str:
    """The TCP port of an address as text ("" for none)."""
    return text.split("/tcp/", 1)[1].split("/", 1)[0] if "/tcp/" in text else ""


@functools.lru_cache(maxsize=4096)
def _scope(raw: bytes, peer: str) -> int | str:
    """The scope of an address as written on the wire, or why it is refused."""
    try:
        return check_addr(str(multiaddr.Multiaddr(raw)), peer)[1]
    except AddrRefused as exc:
        return exc.reason
    except Exception:
        return "malformed"


@functools.lru_cache(maxsize=4096)
def _peer_scope(raw: bytes, peer_id: bytes) -> int | str:
    """`_scope` for a peer named by its id's bytes (as Kademlia names it)."""
    try:
        peer = ID(peer_id).to_base58()
    except Exception:
        return "malformed"
    return _scope(raw, peer)


@functools.lru_cache(maxsize=1024)
def _record_scopes(data: bytes) -> tuple[int, ...] | None:
    """The scopes of a signed peer record's addresses; None when it does not verify or has
    an address `check_addr` refuses (records are passed on as they are: cached)."""
    try:
        _, record = consume_envelope(data, "libp2p-peer-record")
        peer = record.peer_id.to_base58()
        scopes = [_scope(a.to_bytes(), peer) for a in record.addrs]
    except Exception:
        return None
    if any(isinstance(s, str) for s in scopes):
        return None
    return tuple(int(s) for s in scopes)


def _record_fits(data: bytes, near: bool) -> bool:
    scopes = _record_scopes(bytes(data))
    return scopes is not None and (near or LOCAL not in scopes)


def _frame(buffer: bytes) -> tuple[bytes, bytes] | None:
    """The first varint-length-prefixed frame of `buffer` and what follows; None while it
    is incomplete."""
    length = shift = 0
    for index, byte in enumerate(buffer[:MAX_VARINT_BYTES]):
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            start = index + 1
            if len(buffer) - start < length:
                return None
            return buffer[start : start + length], buffer[start + length :]
    if len(buffer) >= MAX_VARINT_BYTES:
        raise ValueError("varint too long")
    return None


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class TailoredStream:
    """A libp2p stream whose written frames (varint length, then the message) are rewritten
    by `rewrite` before they leave; everything else is the stream's own. A frame that does
    not parse goes out as it was written (it is ours)."""

    def __init__(self, stream: Any, rewrite: Callable[[bytes], bytes]) -> None:
        self._stream = stream
        self._rewrite = rewrite
        self._pending = b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def write(self, data: bytes) -> None:
        self._pending += bytes(data)
        out = b""
        while True:
            try:
                split = _frame(self._pending)
            except ValueError:  # not length-prefixed frames: passed on as written
                out, self._pending = out + self._pending, b""
                break
            if split is None:
                break
            frame, self._pending = split
            with contextlib.suppress(Exception):  # never fail our own message: as it was
                frame = self._rewrite(frame)
            out += _varint(len(frame)) + frame
        if out:
            await self._stream.write(out)

    async def close(self) -> None:
        await self._flush()
        await self._stream.close()

    async def _flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, b""
            with contextlib.suppress(Exception):
                await self._stream.write(pending)
