"""Random and malformed bytes on the circuit relay v2 hop and stop protocols and on DCUtR, sent
by a real peer over loopback to a host that relays and punches holes: the host survives, counts
each refusal (p2p.reachguard) and holds it against the sender, and an honest peer still gets a
relay reservation and answers. The first-message check itself is fuzzed without a network."""

from __future__ import annotations

import contextlib
from collections import Counter
from contextlib import AsyncExitStack

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, StopMessage
from libp2p.relay.circuit_v2.pb.dcutr_pb2 import HolePunch
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID as STOP_PROTOCOL
from libp2p.utils.varint import encode_uvarint

from p2p import identity, records
from p2p.host import Libp2pNetwork
from p2p.reach import ReachSettings
from p2p.reachguard import (
    DCUTR,
    HOP,
    STOP,
    Refused,
    ReplayStream,
    check_message,
    read_first,
)
from tests.p2p.test_reach import _AnyValue, echo, wait_for

RULES = {HOP_PROTOCOL: HOP, STOP_PROTOCOL: STOP, DCUTR_PROTOCOL: DCUTR}
PROTOCOLS = st.sampled_from(sorted(RULES, key=str))


def _node(rejects: Counter[str], **reach: object) -> Libp2pNetwork:
    return Libp2pNetwork(
        identity.NodeIdentity.generate(),
        network_id="reachfuzz",
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht_namespace=records.NAMESPACE,
        dht_validator=_AnyValue(),
        on_reject=lambda source, reason: rejects.update([f"{source}:{reason}"]),
        reach=ReachSettings(**{"confirmations": 1, "check_s": 0.2, **reach}),  # type: ignore[arg-type]
    )


def _delimited(payload: bytes) -> bytes:
    return encode_uvarint(len(payload)) + payload


def _wrong_type(protocol: str, number: int) -> bytes:
    """A well-formed message of the protocol's type whose type field it never sends first."""
    if protocol == DCUTR_PROTOCOL:
        return _delimited(HolePunch(type=HolePunch.SYNC).SerializeToString())
    wrong = HopMessage.STATUS if protocol == HOP_PROTOCOL else StopMessage.STATUS
    return _delimited(b"\x08" + encode_uvarint(wrong if number < 3 else number))


def _bad_peer(protocol: str, junk: bytes) -> bytes:
    peer_id = b"\x13" + junk  # not a multihash a peer id may use
    if protocol == DCUTR_PROTOCOL:
        return _delimited(
            HolePunch(type=HolePunch.CONNECT, ObsAddrs=[b"\xff" + junk]).SerializeToString()
        )
    cls = HopMessage if protocol == HOP_PROTOCOL else StopMessage
    return _delimited(cls(type=cls.CONNECT, peer={"id": peer_id}).SerializeToString())


# (protocol, bytes, refused for sure)
SENT = st.one_of(
    st.tuples(PROTOCOLS, st.binary(max_size=2048), st.just(False)),  # anything at all
    st.builds(  # a length over the protocol's bound
        lambda p, extra, tail: (p, encode_uvarint(RULES[p].max_bytes + extra) + tail, True),
        PROTOCOLS,
        st.integers(min_value=1, max_value=1 << 30),
        st.binary(max_size=64),
    ),
    st.builds(  # fewer bytes than the length says, then the end
        lambda p, data, short: (p, encode_uvarint(len(data) + short) + data, True),
        PROTOCOLS,
        st.binary(max_size=256),
        st.integers(min_value=1, max_value=64),
    ),
    st.builds(
        lambda p, n: (p, _wrong_type(p, n), True),
        PROTOCOLS,
        st.integers(min_value=0, max_value=1 << 20),
    ),
    st.builds(lambda p, junk: (p, _bad_peer(p, junk), True), PROTOCOLS, st.binary(max_size=40)),
)


def _refusals(rejects: Counter[str]) -> int:
    kinds = ("stream:hop_", "stream:stop_", "stream:dcutr_")
    return sum(
        n for key, n in rejects.items() if key.startswith(kinds) and "not_serving" not in key
    )


async def _attack(sent: list[tuple[str, bytes, bool]]) -> None:
    rejects: Counter[str] = Counter()
    target = _node(rejects, serve=True)
    attacker, honest = _node(Counter(), hole_punch=False), _node(Counter(), hole_punch=False)
    async with AsyncExitStack() as stack:
        for net in (target, attacker, honest):
            await stack.enter_async_context(net.run())
        for net in (attacker, honest):
            await net.connect(target.listen_addrs()[0])
        await wait_for(lambda: target.reach.serving)  # its hop handler parses, not refuses
        target.set_request_handler("echo", echo)
        target_id = ID.from_base58(target.peer_id)
        for protocol, data, _ in sent:
            with contextlib.suppress(Exception), trio.move_on_after(3):
                stream = await attacker.host.new_stream(target_id, [protocol])
                await stream.write(data)
                await stream.close()
        must = sum(refused for _, _, refused in sent)
        await wait_for(lambda: _refusals(rejects) >= must, 10)
        assert _refusals(rejects) <= len(sent)  # each stream refused at most once
        if _refusals(rejects):  # held against the sender, never against the honest peer
            assert target.bans.scores.score(attacker.peer_id) < 0
        # alive, and serving the honest peer: a reservation on it, a request, a ping
        assert await honest.reach.reserve_on(target_id)
        assert await honest.request(target.peer_id, "echo", b"ok", timeout_s=5) == b"ok"
        await target.ping(honest.peer_id)
        assert target.bans.scores.score(honest.peer_id) == 0


@given(sent=st.lists(SENT, min_size=1, max_size=12))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_and_malformed_relay_and_dcutr_streams_are_refused_counted_and_survived(sent):
    trio.run(_attack, sent)


@pytest.mark.parametrize("rule", [HOP, STOP, DCUTR], ids=lambda r: r.kind)
@given(payload=st.binary(max_size=512))
@settings(max_examples=300, deadline=None)
def test_the_first_message_check_only_refuses(rule, payload):
    try:
        check_message(rule, payload)
    except Refused as refused:
        assert refused.reason in {
            "malformed",
            "bad_type",
            "bad_peer",
            "bad_addr",
            "too_many_addrs",
        }


def test_honest_first_messages_pass():
    me = ID.from_base58(identity.NodeIdentity.generate().peer_id).to_bytes()
    check_message(HOP, HopMessage(type=HopMessage.RESERVE).SerializeToString())
    connect = HopMessage(type=HopMessage.CONNECT, peer={"id": me})
    assert check_message(HOP, connect.SerializeToString()).peer.id == me
    check_message(STOP, StopMessage(type=StopMessage.CONNECT, peer={"id": me}).SerializeToString())
    addr = b"\x04\x7f\x00\x00\x01\x06\x0f\xa1"  # /ip4/127.0.0.1/tcp/4001
    punch = HolePunch(type=HolePunch.CONNECT, ObsAddrs=[addr])
    check_message(DCUTR, punch.SerializeToString())
    with pytest.raises(Refused, match="too_many_addrs"):
        many = HolePunch(type=HolePunch.CONNECT, ObsAddrs=[addr] * 33)
        check_message(DCUTR, many.SerializeToString())


class _Chunks:
    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    async def read(self, n: int | None = None) -> bytes:
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if n is not None and len(chunk) > n:
            chunk, rest = chunk[:n], chunk[n:]
            self.chunks.insert(0, rest)
        return chunk


async def test_a_checked_message_is_read_again_by_the_handler():
    message = HopMessage(type=HopMessage.RESERVE).SerializeToString()
    stream = _Chunks(_delimited(message)[:1], _delimited(message)[1:] + b"after")
    head, payload = await read_first(stream, HOP.max_bytes)
    assert payload == message and head == _delimited(message)
    replay = ReplayStream(stream, head)
    assert await replay.read(1) == head[:1]
    assert await replay.read() == head[1:]
    assert await replay.read(100) == b"after"
    with pytest.raises(Refused, match="too_large"):
        await read_first(_Chunks(encode_uvarint(HOP.max_bytes + 1)), HOP.max_bytes)
    with pytest.raises(Refused, match="malformed"):
        await read_first(_Chunks(b"\x05ab"), HOP.max_bytes)
