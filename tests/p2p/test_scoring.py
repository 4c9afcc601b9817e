"""Peer scores (p2p.scoring) and bans for a low score (p2p.bans): units on a fake clock, then
real py-libp2p peers attacking a host with forged DHT records and with gossip its validator
refuses, each scored down, disconnected and refused; an honest peer's stale copies are not."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.pubsub.score import PeerScorer

from p2p import codec, identity, records
from p2p.bans import PeerBans
from p2p.discovery import DiscoverySettings, RecordValidator
from p2p.host import HostLimits, Libp2pNetwork
from p2p.scoring import PENALTIES, PeerScores, gossipsub_params
from tests.p2p.test_dht_strikes import NET, _peer, _put, _record, _running
from tests.p2p.test_gossip_validator import _node, _until


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_penalties_add_up_decay_and_cross_the_threshold_once():
    clock, lows = _Clock(), []
    scores = PeerScores(-20.0, 10.0, 8, lambda p, s: lows.append((p, s)), clock)
    assert scores.score("a") == 0.0
    assert scores.penalize("a", "invalid_record") == -10.0
    clock.t += 10  # one half-life
    assert scores.score("a") == pytest.approx(-5.0)
    scores.penalize("a", "invalid_record")  # -15
    assert not lows
    scores.penalize("a", "invalid_record")  # -25: below
    assert [p for p, _ in lows] == ["a"] and lows[0][1] == pytest.approx(-25.0)
    assert scores.score("a") == 0.0  # starts again (its ban is the back-off)
    with pytest.raises(KeyError):
        scores.penalize("a", "no such reason")
    with pytest.raises(ValueError):
        PeerScores(0.0, 10.0, 8, lambda p, s: None)


def test_stale_copies_at_an_honest_rate_never_reach_the_threshold():
    clock, lows = _Clock(), []
    scores = PeerScores(-100.0, 30.0, 8, lambda p, s: lows.append(p), clock)
    for _ in range(3600):  # one stale copy a second for an hour
        scores.penalize("honest", "stale")
        clock.t += 1
    assert not lows and scores.score("honest") > -10


def test_scores_are_bounded_and_the_lowest_listed():
    scores = PeerScores(-1000.0, 30.0, 3, lambda p, s: None, _Clock())
    for i, peer in enumerate("abcde"):
        for _ in range(i + 1):
            scores.penalize(peer, "malformed")
    assert [p for p, _ in scores.lowest()] == ["e", "d", "c"]  # a, b forgotten


def test_bans_for_a_low_score_and_gossipsub_sees_the_score():
    clock, banned = _Clock(), []
    bans = PeerBans(1000, 10.0, 60.0, 16, banned.append, clock, score_threshold=-25.0)
    peer = identity.NodeIdentity.generate().peer_id
    scorer = PeerScorer(gossipsub_params(bans.scores))
    bans.penalize(peer, "bad_signature")
    bans.penalize(peer, "invalid_record")
    # gossipsub's score is ours (P6): below half the threshold the peer is graylisted
    assert scorer.score(ID.from_base58(peer), ["t"]) == pytest.approx(-20.0)
    assert not scorer.is_graylisted(ID.from_base58(identity.NodeIdentity.generate().peer_id), ["t"])
    assert scorer.is_graylisted(ID.from_base58(peer), ["t"])
    assert not bans.is_banned(peer)
    bans.penalize(peer, "bad_signature")
    assert banned == [peer] and bans.is_banned(peer) and bans.low_score_bans == 1
    bans.penalize(peer, "bad_signature")  # banned already: no second ban
    assert banned == [peer]
    clock.t += 61
    assert not bans.is_banned(peer)  # the back-off is over


async def test_a_peer_putting_forged_records_is_scored_down_and_disconnected():
    rejects: Counter[str] = Counter()
    # strikes far away: the score alone bans (four forged records: -40)
    limits = HostLimits(ban_strikes=1000, ban_window_s=60, ban_s=60, score_threshold=-35)
    target = Libp2pNetwork(
        identity.NodeIdentity.generate(),
        network_id=NET,
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht_namespace=records.NAMESPACE,
        dht_validator=RecordValidator(
            DiscoverySettings(network_id=NET),
            time.time,
            lambda r: rejects.update([f"dht:{r}"]),
        ),
        on_reject=lambda s, r: rejects.update([f"{s}:{r}"]),
        limits=limits,
    )
    mallory = identity.NodeIdentity.generate()
    hostile = _peer(mallory)
    key = records.record_key(NET, mallory.peer_id)
    tampered = codec.decode(_record(mallory, time.time()))
    tampered["body"]["resources"] = {"gpus": [{"name": "H100"}] * 8}
    async with _running(target, hostile):
        await hostile.connect(target.listen_addrs()[0])
        sent = 0
        with trio.fail_after(20):
            while not rejects["peer:banned"]:
                assert not await _put(hostile, target, key, codec.encode(tampered))
                sent += 1
        assert sent == 4, (sent, rejects)
        assert target.bans.low_score_bans == 1 and target.bans.is_banned(mallory.peer_id)
        await _until(
            lambda: mallory.peer_id not in target.connected_peers(), 10, "its disconnection"
        )
        assert not await _put(hostile, target, key, _record(mallory, time.time()))


async def test_gossip_refused_by_our_validator_scores_its_origin_down_until_banned():
    rejects: Counter[str] = Counter()
    limits = HostLimits(ban_strikes=1000, ban_window_s=60, ban_s=60, score_threshold=-10)
    target, origin = _node(rejects, limits), _node(Counter())
    got: list[bytes] = []

    async def on_message(sender: str, data: bytes) -> None:
        got.append(data)

    async with _running(target, origin):
        await target.subscribe("t", on_message, lambda o, data: not data.startswith(b"bad"))
        await origin.subscribe("t", on_message)
        await origin.connect(target.listen_addrs()[0])
        with trio.fail_after(10):  # until the mesh carries the origin's gossip
            while not got:
                await origin.publish("t", b"hello")
                await trio.sleep(0.1)
        per_message = PENALTIES["malformed"]
        for i in range(int(10 / per_message) + 1):
            await origin.publish("t", b"bad %d" % i)
            await _until(
                lambda i=i: target.bans.scores.penalties > i or rejects["peer:banned"],
                10,
                "the refusal scored",
            )
        assert rejects["peer:banned"] == 1, rejects
        assert target.bans.is_banned(origin.peer_id)
        await _until(lambda: origin.peer_id not in target.connected_peers(), 10, "the drop")
