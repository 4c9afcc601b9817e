"""The first message of every circuit relay v2 (hop, stop) and DCUtR stream, checked before
py-libp2p's handler sees it.

py-libp2p 0.8.1's relay and hole-punch handlers survive garbage (tests/p2p/test_reach.py), but
they refuse it silently, after a log line at error level: a peer sending malformed messages is
neither counted nor held against. So each such stream's first message is read here, within
FIRST_MESSAGE_S and a size bound, decoded into its protobuf type and checked: a known type for
that protocol and role (a relay is asked RESERVE or CONNECT, a stop end CONNECT, a DCUtR
responder CONNECT), well-formed peer ids and addresses (at most MAX_ADDRS of them). A message
that fails is counted on the reject hook as `stream`/`KIND_WHY` (`hop_malformed`,
`stop_too_large`, `dcutr_bad_type`, ...), lowers the sender's score (`malformed`, p2p.scoring)
and resets the stream. A message that passes is handed to py-libp2p's handler with the bytes
already read in front of the stream (`ReplayStream`), so it reads the same message itself.

Only the first message is checked: after it, a hop or stop stream carries the relayed
connection's bytes, and a DCUtR stream one more message (SYNC) that py-libp2p bounds to 4 KiB.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, StopMessage
from libp2p.relay.circuit_v2.pb.dcutr_pb2 import HolePunch

from p2p.bans import PeerBans
from p2p.limits import RejectHook

FIRST_MESSAGE_S = 10.0  # from a stream's opening to its first message's last byte
MAX_ADDRS = 32  # addresses in one message
MAX_ADDR_BYTES = 512  # one address, encoded
MAX_PEER_ID_BYTES = 128  # a peer id (a multihash: identity-encoded keys are the longest)


class Refused(Exception):
    """Why a first message is refused (`reason`: the second half of the counted reason)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Rule:
    """What the first message of one protocol may be."""

    kind: str  # hop, stop, dcutr: the first half of the counted reason
    message: type  # its protobuf class
    types: frozenset[int]  # the message types a first message may have
    max_bytes: int  # its encoded size (py-libp2p: 64 KiB for relay messages, 4 KiB DCUtR)


HOP = Rule("hop", HopMessage, frozenset({HopMessage.RESERVE, HopMessage.CONNECT}), 16 << 10)
STOP = Rule("stop", StopMessage, frozenset({StopMessage.CONNECT}), 16 << 10)
DCUTR = Rule("dcutr", HolePunch, frozenset({HolePunch.CONNECT}), 4 << 10)


def _uvarint(data: bytes, at: int) -> tuple[int, int]:
    """The unsigned varint at `data[at:]` and the index after it (Refused if malformed)."""
    value = shift = 0
    for index in range(at, min(len(data), at + 10)):
        value |= (data[index] & 0x7F) << shift
        if not data[index] & 0x80:
            return value, index + 1
        shift += 7
    raise Refused("malformed")


def check_peer_id(raw: bytes) -> None:
    """A peer id is a multihash: identity (0x00) or sha2-256 (0x12), its length exact."""
    if not raw or len(raw) > MAX_PEER_ID_BYTES:
        raise Refused("bad_peer")
    try:
        code, at = _uvarint(raw, 0)
        length, at = _uvarint(raw, at)
    except Refused:
        raise Refused("bad_peer") from None
    if code not in (0x00, 0x12) or length != len(raw) - at:
        raise Refused("bad_peer")


def check_addrs(addrs: Any) -> None:
    if len(addrs) > MAX_ADDRS:
        raise Refused("too_many_addrs")
    for addr in addrs:
        if len(addr) > MAX_ADDR_BYTES:
            raise Refused("bad_addr")
        try:
            str(multiaddr.Multiaddr(bytes(addr)))  # decoded only when asked for its text
        except Exception:
            raise Refused("bad_addr") from None


def check_message(rule: Rule, payload: bytes) -> Any:
    """The decoded first message of `rule`'s protocol, or Refused."""
    message = rule.message()
    try:
        message.ParseFromString(payload)
    except Exception:
        raise Refused("malformed") from None
    if message.type not in rule.types:
        raise Refused("bad_type")
    if rule is DCUTR:
        check_addrs(message.ObsAddrs)
        return message
    connect = rule is STOP or message.type == HopMessage.CONNECT
    if connect and not message.HasField("peer"):
        raise Refused("bad_peer")
    if message.HasField("peer"):
        check_peer_id(message.peer.id)
        check_addrs(message.peer.addrs)
    return message


async def _read(stream: Any, n: int) -> bytes:
    try:
        return bytes(await stream.read(n))
    except StreamEOF:  # py-libp2p raises at the end where a plain stream returns b""
        return b""


async def read_first(stream: Any, max_bytes: int) -> tuple[bytes, bytes]:
    """The first varint-delimited message: (every byte read, its payload)."""
    head = b""
    while not head or head[-1] & 0x80:
        if len(head) >= 10:
            raise Refused("malformed")
        byte = await _read(stream, 1)
        if not byte:
            raise Refused("malformed")  # ended before a whole message
        head += byte
    length, _ = _uvarint(head, 0)
    if length > max_bytes:
        raise Refused("too_large")
    chunks, missing = [], length
    while missing:
        chunk = await _read(stream, missing)
        if not chunk:
            raise Refused("malformed")
        chunks.append(chunk)
        missing -= len(chunk)
    payload = b"".join(chunks)
    return head + payload, payload


class ReplayStream:
    """A libp2p stream whose next reads return `head` first (bytes already read from it)."""

    def __init__(self, stream: Any, head: bytes) -> None:
        self._stream = stream
        self._head = head

    async def read(self, n: int | None = None) -> bytes:
        if not self._head:
            return bytes(await self._stream.read(n))
        if n is None or n < 0 or n >= len(self._head):
            data, self._head = self._head, b""
        else:
            data, self._head = self._head[:n], self._head[n:]
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


Handler = Callable[[Any], Awaitable[None]]


class FirstMessageCheck:
    """Wraps py-libp2p's relay and DCUtR handlers (see the module docstring)."""

    def __init__(self, on_reject: RejectHook, bans: PeerBans | None) -> None:
        self._on_reject = on_reject
        self._bans = bans
        self.refused = 0

    def wrap(self, rule: Rule, handler: Handler) -> Handler:
        async def checked(stream: Any) -> None:
            try:
                with trio.fail_after(FIRST_MESSAGE_S):
                    head, payload = await read_first(stream, rule.max_bytes)
                check_message(rule, payload)
            except trio.TooSlowError:
                await self._refuse(stream, rule, "timeout")
                return
            except Refused as refused:
                await self._refuse(stream, rule, refused.reason)
                return
            except Exception:  # the stream reset or broke under us: nothing to hold against
                with contextlib.suppress(Exception):
                    await stream.reset()
                return
            await handler(ReplayStream(stream, head))

        return checked

    async def _refuse(self, stream: Any, rule: Rule, why: str) -> None:
        self.refused += 1
        self._on_reject("stream", f"{rule.kind}_{why}")
        if self._bans is not None:
            with contextlib.suppress(Exception):
                self._bans.penalize(stream.muxed_conn.peer_id.to_base58(), "malformed")
        with contextlib.suppress(Exception):
            await stream.reset()
