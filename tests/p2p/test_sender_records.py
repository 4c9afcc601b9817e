"""A gossip peer's signed peer record is checked once, not with every RPC (p2p.sender_records):
on real hosts, a publisher's 60 messages cost the receiver a handful of envelope checks, and
a record that fails its check is still refused every time."""

from __future__ import annotations

from collections import Counter

import libp2p.pubsub.utils as pubsub_utils
import pytest
import trio

from p2p.sender_records import RECHECK_S, remembering
from tests.p2p.test_gossip_validator import _node, _running

TOPIC = "records"


async def test_a_publishers_repeated_record_is_checked_once(monkeypatch: pytest.MonkeyPatch):
    checks = 0
    consume = pubsub_utils.consume_envelope

    def counting(*args, **kwargs):
        nonlocal checks
        checks += 1
        return consume(*args, **kwargs)

    monkeypatch.setattr(pubsub_utils, "consume_envelope", counting)
    receiver, publisher = _node(Counter()), _node(Counter())
    got: list[bytes] = []

    async def on_message(origin: str, data: bytes) -> None:
        got.append(data)

    async with _running(receiver, publisher):
        await publisher.connect(receiver.listen_addrs()[0])
        await receiver.subscribe(TOPIC, on_message)
        await publisher.subscribe(TOPIC, on_message)
        with trio.fail_after(20):
            while not got:  # the mesh forms in its own time
                await publisher.publish(TOPIC, b"warmup")
                with trio.move_on_after(0.3):
                    while not got:  # noqa: ASYNC110 - nothing to wait on but the list
                        await trio.sleep(0.01)
            before = checks
            for i in range(60):
                await publisher.publish(TOPIC, b"news %d" % i)
                await trio.sleep(0.005)
            while sum(data.startswith(b"news") for data in got) < 60:  # noqa: ASYNC110
                await trio.sleep(0.02)
    # both hosts check each other's record once per RPC stream at most (py-libp2p alone: two
    # checks for each of the 60 RPCs, on the receiver only: 120 or more)
    assert checks - before <= 6, checks - before


def test_a_failed_or_old_record_is_checked_again():
    calls: list[bytes] = []
    verdicts = {b"good": True, b"bad": False}

    def consume(msg, host, peer_id=None) -> bool:
        calls.append(msg.senderRecord)
        return verdicts[msg.senderRecord]

    class Msg:
        def __init__(self, record: bytes) -> None:
            self.senderRecord = record

        def HasField(self, name: str) -> bool:  # noqa: N802 - protobuf's name
            return bool(self.senderRecord)

    class Peer:
        def __init__(self, raw: bytes) -> None:
            self.raw = raw

        def to_bytes(self) -> bytes:
            return self.raw

    now = [0.0]
    check = remembering(consume, clock=lambda: now[0])
    host, alice, bob = object(), Peer(b"alice"), Peer(b"bob")
    assert check(Msg(b"good"), host, alice) and check(Msg(b"good"), host, alice)
    assert calls == [b"good"]  # the repeat was not checked
    assert check(Msg(b"good"), host, bob)  # another peer's is its own
    assert not check(Msg(b"bad"), host, alice) and not check(Msg(b"bad"), host, alice)
    assert calls == [b"good", b"good", b"bad", b"bad"]  # refusals are never remembered
    now[0] = RECHECK_S + 1
    assert check(Msg(b"good"), host, alice)
    assert calls[-1] == b"good" and len(calls) == 5  # checked again once old
    assert check(Msg(b""), host, alice) and len(calls) == 5  # no record: nothing to check
