"""Gossip validators on the libp2p host (`Gossip.subscribe(..., validator)`), attacked by a
real peer: refusals are counted once, by the validator; bad signatures still count as
strikes and ban; a validator's bug refuses only its message; and an accepted message's id
cannot be reused later to slip other data past the validator. (That a refused message is
neither delivered nor forwarded is the conformance suite's: `p2p.testing.conformance` and
`p2p.testing.gossip_line`, on both transports.)"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from libp2p.exceptions import ValidationError
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX

from p2p import identity, records
from p2p.host import HostLimits, Libp2pNetwork
from p2p.network import GossipVerdict

TOPIC = "t"


class _AcceptAll:
    def validate(self, key: str, value: bytes) -> None:
        pass

    def select(self, key: str, values: list[bytes]) -> int:
        return len(values) - 1


def _node(rejects: Counter[str], limits: HostLimits | None = None) -> Libp2pNetwork:
    return Libp2pNetwork(
        identity.NodeIdentity.generate(),
        network_id="validators",
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht_namespace=records.NAMESPACE,
        dht_validator=_AcceptAll(),
        on_reject=lambda source, reason: rejects.update([f"{source}:{reason}"]),
        limits=limits,
    )


@asynccontextmanager
async def _running(*nets: Libp2pNetwork) -> AsyncIterator[None]:
    """Run `nets`; a failure inside is raised as itself, not inside the hosts' nested
    exception groups."""
    failure: Exception | None = None
    async with AsyncExitStack() as stack:
        for net in nets:
            await stack.enter_async_context(net.run())
        try:
            yield
        except Exception as exc:
            failure = exc
    if failure is not None:
        raise failure


async def _until(condition: Callable[[], object], limit_s: float, what: str) -> None:
    with trio.fail_after(limit_s):
        while not condition():  # noqa: ASYNC110 - real sockets: poll
            await trio.sleep(0.02)
    assert condition(), what


async def test_refusals_are_counted_by_the_validator_only_and_bad_signatures_still_ban():
    target_rejects: Counter[str] = Counter()
    # strikes alone ban here: the refusals' score (p2p.scoring) is tested in test_scoring.py
    limits = HostLimits(ban_strikes=5, ban_window_s=60, ban_s=60, score_threshold=-1e6)
    target = _node(target_rejects, limits)
    forger = _node(Counter())
    refused: list[bytes] = []
    got: list[bytes] = []

    def validator(origin: str, data: bytes) -> bool:
        if data.startswith(b"bug"):
            raise RuntimeError("a validator's bug")
        if data.startswith(b"refused"):
            refused.append(data)  # what a validator counts as its refusal
            return False
        return True

    async def on_message(origin: str, data: bytes) -> None:
        got.append(data)

    async with _running(target, forger):
        await target.subscribe(TOPIC, on_message, validator)
        await forger.subscribe(TOPIC, on_message)
        await forger.connect(target.listen_addrs()[0])
        with trio.fail_after(10):  # until the mesh carries the forger's gossip
            while not got:
                await forger.publish(TOPIC, b"hello")
                await trio.sleep(0.1)
        # validly signed messages the validator refuses: many more than the ban's strikes
        # (one at a time: py-libp2p drops a publish when its queue to a peer is full)
        for i in range(40):
            await forger.publish(TOPIC, b"refused %d" % i)
            await _until(lambda i=i: len(refused) > i, 10, "the validator saw the message")
        for i in range(3):
            await forger.publish(TOPIC, b"bug %d" % i)
            await _until(lambda i=i: target_rejects["pubsub:validator_error"] > i, 10, "a bug")
        await forger.publish(TOPIC, b"after the bugs")
        await _until(lambda: b"after the bugs" in got, 10, "a message after the bugs")
        assert not [d for d in got if d.startswith((b"refused", b"bug"))]
        assert len(refused) == 40  # once each: no copy validated twice
        # counted by the validator, not again by the host; no strike against the forwarder
        assert target_rejects["pubsub:refused"] == 0, target_rejects
        assert target_rejects["pubsub:bad_signature"] == 0, target_rejects
        assert target_rejects["pubsub:validator_error"] == 3, target_rejects
        assert target_rejects["peer:banned"] == 0, target_rejects
        # unsigned messages: still a bad signature each, a strike each, and then a ban
        forger.pubsub.strict_signing = False
        with trio.fail_after(10):
            while not target_rejects["peer:banned"]:
                await forger.publish(TOPIC, b"unsigned")
                await trio.sleep(0.05)
        assert target_rejects["pubsub:bad_signature"] > 5, target_rejects
        assert b"unsigned" not in got


async def test_an_accepted_message_id_reused_for_other_data_is_validated_again():
    """py-libp2p caches an accepted message id for 300 s, longer than it remembers seen ids
    (`seen_ttl_s`): an origin that reuses the id afterwards with other data must still face
    the validator, not the cached acceptance."""
    limits = HostLimits(seen_ttl_s=1)
    target, forger = _node(Counter(), limits), _node(Counter(), limits)
    validated: list[bytes] = []
    got: list[bytes] = []

    def validator(origin: str, data: bytes) -> bool:
        validated.append(data)
        return not data.startswith(b"refused")

    async def on_message(origin: str, data: bytes) -> None:
        got.append(data)

    async with _running(target, forger):
        await target.subscribe(TOPIC, on_message, validator)
        await forger.subscribe(TOPIC, on_message)
        await forger.connect(target.listen_addrs()[0])
        seqno = (1 << 60).to_bytes(8, "big")
        with trio.fail_after(10):
            while not got:
                await _send_signed(forger, target, seqno, b"accepted")
                await trio.sleep(0.1)
        # the same origin and sequence number, other data, signed, once the target forgot
        # the id (looked up without `has`, which would keep it alive)
        await _until(lambda: not target.pubsub.seen_messages.cache, 10, "the seen id expired")
        await _send_signed(forger, target, seqno, b"refused reuse")
        await _until(lambda: b"refused reuse" in validated, 10, "the reuse validated")
        await forger.publish(TOPIC, b"after")
        await _until(lambda: b"after" in got, 10, "the next message")
        assert b"refused reuse" not in got


async def _send_signed(sender: Libp2pNetwork, to: Libp2pNetwork, seqno: bytes, data: bytes) -> None:
    """A signed message with a sequence number of our choosing, written straight to the
    peer's pubsub stream (a stock py-libp2p router would not send a reused id again)."""
    pubsub = sender.pubsub
    topic = sender.scope.topic(TOPIC)  # as the network names it
    msg = rpc_pb2.Message(data=data, topicIDs=[topic], from_id=pubsub.my_id.to_bytes(), seqno=seqno)
    assert pubsub.sign_key is not None
    msg.signature = pubsub.sign_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
    msg.key = sender.host.get_public_key().serialize()
    await pubsub.write_msg(pubsub.peers[to.pubsub.my_id], rpc_pb2.RPC(publish=[msg]))


async def test_a_refusal_costs_no_formatting_of_the_message():
    """py-libp2p formats a refused message whole into its error's text (32 ms for 500 KB of
    random bytes): a refusal of ours must not reach that."""
    net = _node(Counter())
    net.gossip_validators.add(TOPIC, lambda origin, data: data != b"refused")
    origin = identity.NodeIdentity.generate()

    class Message:  # what py-libp2p reads of a message, and a text it must not ask for
        from_id = ID.from_base58(origin.peer_id).to_bytes()
        seqno = bytes(8)
        topicIDs = [TOPIC]  # noqa: N815 - protobuf's name
        data = b"refused"

        def __str__(self) -> str:
            raise AssertionError("the message was formatted")

    with pytest.raises(ValidationError, match="refused by the gossip validator"):
        await net.pubsub.validate_msg(ID.from_base58(origin.peer_id), Message())
    message = Message()
    message.seqno = (1).to_bytes(8, "big")
    message.data = b"accepted"
    await net.pubsub.validate_msg(ID.from_base58(origin.peer_id), message)


async def test_old_news_is_dropped_without_holding_it_against_anyone():
    """A message a validator IGNOREs (a copy of what the node holds: honest gossip, all the
    time) goes nowhere and costs its origin nothing; a REJECT lowers the origin's score; and
    a copy of our own message that comes back never lowers our own. (Every refusal lowered
    the origin's score before: in bench/abuse.py the duplicate copies of honest registry
    writes banned their authors, the target among them, and the target itself.)"""
    limits = HostLimits(score_threshold=-5.0)  # ten REJECTs' worth of "malformed"
    net = _node(Counter(), limits)
    verdicts = {
        b"old": GossipVerdict.IGNORE,
        b"bad": GossipVerdict.REJECT,
        b"new": GossipVerdict.ACCEPT,
    }
    net.gossip_validators.add(TOPIC, lambda origin, data: verdicts[data])
    honest, hostile = identity.NodeIdentity.generate(), identity.NodeIdentity.generate()

    def message(origin: str, data: bytes, n: int) -> Any:
        return rpc_pb2.Message(
            data=data,
            topicIDs=[TOPIC],
            from_id=ID.from_base58(origin).to_bytes(),
            seqno=n.to_bytes(8, "big"),
        )

    forwarder = ID.from_base58(identity.NodeIdentity.generate().peer_id)
    for n in range(1, 301):  # far more old news than the ban threshold's worth
        with pytest.raises(ValidationError):
            await net.pubsub.validate_msg(forwarder, message(honest.peer_id, b"old", n))
    assert net.bans.scores.score(honest.peer_id) == 0
    assert not net.bans.is_banned(honest.peer_id)
    await net.pubsub.validate_msg(forwarder, message(honest.peer_id, b"new", 301))
    for n in range(1, 11):  # our own message, refused on its way back: never held against us
        with pytest.raises(ValidationError):
            await net.pubsub.validate_msg(forwarder, message(net.peer_id, b"bad", n))
    assert net.bans.scores.score(net.peer_id) == 0
    for n in range(1, 12):
        with pytest.raises(ValidationError):
            await net.pubsub.validate_msg(forwarder, message(hostile.peer_id, b"bad", n))
    assert net.bans.is_banned(hostile.peer_id)
