"""Peers that keep breaking the host's limits are banned (p2p.bans): the strike arithmetic on a
fake clock, then a real flooding peer against a real host, while an honest peer is served."""

import contextlib

import trio
from libp2p.kad_dht.pb.kademlia_pb2 import Message as KadMessage
from libp2p.utils.varint import encode_uvarint

from p2p.bans import PeerBans
from p2p.host import DHT_PROTOCOL, HostLimits
from p2p.network import NetworkError
from tests.p2p.test_host import Node, _count


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_bans(clock: FakeClock, strikes: int = 5, ban_s: float = 30.0) -> tuple[PeerBans, list]:
    banned: list[str] = []
    bans = PeerBans(strikes, 10.0, ban_s, 100, banned.append, clock)
    return bans, banned


def test_the_strike_over_the_limit_bans_once_until_the_ban_ends():
    clock = FakeClock()
    bans, banned = make_bans(clock)
    for _ in range(5):
        bans.strike("evil")
    assert not bans.is_banned("evil") and banned == []
    bans.strike("evil")
    assert bans.is_banned("evil") and banned == ["evil"]
    bans.strike("evil")  # strikes while banned do not ban again
    assert banned == ["evil"] and bans.bans == 1
    assert not bans.is_banned("honest")
    clock.now = 29.9
    assert bans.banned() == ["evil"]
    clock.now = 30.0
    assert not bans.is_banned("evil") and bans.banned() == []


def test_occasional_refusals_never_ban():
    """The strikes refill over the window: a peer refused now and then is never banned."""
    clock = FakeClock()
    bans, banned = make_bans(clock)
    for _ in range(1000):
        bans.strike("bursty")
        clock.now += 2.1  # 5 strikes per 10 s refill one every 2 s
    assert banned == []


def test_ban_s_zero_turns_bans_off():
    clock = FakeClock()
    bans, banned = make_bans(clock, ban_s=0)
    for _ in range(100):
        bans.strike("evil")
    assert banned == [] and not bans.is_banned("evil")


def test_a_node_never_strikes_penalizes_or_bans_itself():
    banned: list[str] = []
    bans = PeerBans(5, 10.0, 30.0, 100, banned.append, FakeClock(), own="me")
    for _ in range(100):
        bans.strike("me")
        bans.penalize("me", "bad_signature")
    bans.ban("me")
    assert banned == [] and not bans.is_banned("me") and bans.scores.score("me") == 0
    for _ in range(6):
        bans.strike("evil")
    assert banned == ["evil"]


def test_banned_peers_are_forgotten_beyond_the_cap():
    clock = FakeClock()
    banned: list[str] = []
    bans = PeerBans(1, 10.0, 60.0, 3, banned.append, clock)
    for peer in "abcde":
        bans.ban(peer)
    assert bans.banned() == ["c", "d", "e"]


async def test_a_flooding_peer_is_banned_disconnected_and_refused_while_honest_peers_are_served():
    limits = HostLimits(streams_per_s=5.0, stream_burst=10, ban_strikes=20, ban_s=3.0)
    target, flooder, honest = Node(limits=limits), Node(), Node()
    async with target.net.run(), flooder.net.run(), honest.net.run():
        addr = target.net.listen_addrs()[0]
        await flooder.net.connect(addr)
        await honest.net.connect(addr)

        async def echo(sender: str, payload: bytes) -> bytes:
            return payload

        target.net.set_request_handler("/gridmesh/test/echo/1", echo)
        with trio.fail_after(20):
            while not target.net.bans.is_banned(flooder.ident.peer_id):
                with contextlib.suppress(NetworkError):
                    await flooder.net.request(
                        target.ident.peer_id, "/gridmesh/test/echo/1", b"x", timeout_s=2
                    )
        assert _count(target, "peer", "banned") == 1
        assert _count(target, "stream", "rate_limited") > 20
        with trio.fail_after(5):  # its connection is closed
            while flooder.ident.peer_id in target.net.connected_peers():  # noqa: ASYNC110
                await trio.sleep(0.02)

        # it comes back: the connection is closed as soon as its identity is known, and
        # nothing it asks is served
        refused_before = _count(target, "connection", "banned")
        try:
            await flooder.net.connect(addr, timeout_s=3)
            await flooder.net.request(
                target.ident.peer_id, "/gridmesh/test/echo/1", b"x", timeout_s=2
            )
            served = True
        except NetworkError:
            served = False
        assert not served
        with trio.fail_after(5):
            while _count(target, "connection", "banned") <= refused_before:  # noqa: ASYNC110
                await trio.sleep(0.02)

        # the honest peer, on the same host, was never touched
        reply = await honest.net.request(target.ident.peer_id, "/gridmesh/test/echo/1", b"ok")
        assert reply == b"ok"
        assert not target.net.bans.is_banned(honest.ident.peer_id)

        # and the ban ends
        with trio.fail_after(15):
            while True:
                try:
                    await flooder.net.connect(addr, timeout_s=3)
                    reply = await flooder.net.request(
                        target.ident.peer_id, "/gridmesh/test/echo/1", b"back", timeout_s=2
                    )
                    break
                except NetworkError:
                    await trio.sleep(0.2)  # polling the ban's end, which is real time
        assert reply == b"back"


async def _meshed(a: Node, b: Node, got: list[bytes]) -> None:
    """a and b subscribed to "t", b's messages reaching a."""

    async def on_message(sender: str, data: bytes) -> None:
        got.append(data)

    await a.net.subscribe("t", on_message)
    await b.net.subscribe("t", on_message)
    with trio.fail_after(10):
        while not got:  # wait for the mesh
            await b.net.publish("t", b"warmup")
            with trio.move_on_after(0.3):
                while not got:  # noqa: ASYNC110 - nothing to wait on but the list
                    await trio.sleep(0.01)


async def test_a_forwarder_of_bad_signatures_is_banned_and_dropped_unread():
    limits = HostLimits(ban_strikes=5, ban_s=60.0)
    target, forger = Node(limits=limits), Node()
    async with target.net.run(), forger.net.run():
        await forger.net.connect(target.net.listen_addrs()[0])
        got: list[bytes] = []
        await _meshed(target, forger, got)
        # the forger's py-libp2p then neither signs nor checks: its messages go out unsigned
        forger.net.pubsub.strict_signing = False
        with trio.fail_after(20):
            while not target.net.bans.is_banned(forger.ident.peer_id):
                await forger.net.publish("t", b"forged")
                await trio.sleep(0.02)
        assert _count(target, "pubsub", "bad_signature") > 5
        assert _count(target, "peer", "banned") == 1
        assert b"forged" not in got


async def test_a_busy_honest_publisher_is_rate_limited_but_never_banned():
    """Gossip over the rate limit is dropped, but it is no strike: an honest forwarder relays
    its whole mesh's rate, and one busy writer must not get it banned."""
    limits = HostLimits(gossip_per_s=5.0, gossip_burst=10, ban_strikes=5, ban_s=60.0)
    target, busy = Node(limits=limits), Node()
    async with target.net.run(), busy.net.run():
        await busy.net.connect(target.net.listen_addrs()[0])
        got: list[bytes] = []
        await _meshed(target, busy, got)
        for i in range(200):
            await busy.net.publish("t", b"busy %d" % i)
            await trio.sleep(0.003)  # paced: the publisher's own 32-message queue would drop
        with trio.fail_after(10):
            while _count(target, "pubsub", "rate_limited") < 100:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert not target.net.bans.is_banned(busy.ident.peer_id)
        assert _count(target, "peer", "banned") == 0
        assert busy.ident.peer_id in target.net.connected_peers()


async def test_dht_messages_over_the_limit_are_strikes_too():
    """DHT queries pipelined on streams, over the per-peer message limit: strikes, then a ban."""
    limits = HostLimits(streams_per_s=5.0, stream_burst=10, ban_strikes=3, ban_s=60.0)
    target, flooder = Node(limits=limits), Node()
    async with target.net.run(), flooder.net.run():
        await flooder.net.connect(target.net.listen_addrs()[0])
        query = KadMessage()
        query.type = KadMessage.MessageType.FIND_NODE
        query.key = flooder.net.host.get_id().to_bytes()
        frame = encode_uvarint(len(query.SerializeToString())) + query.SerializeToString()
        # few streams (within the stream limit's burst), many messages on each
        with trio.fail_after(20):
            for _ in range(8):
                if target.net.bans.is_banned(flooder.ident.peer_id):
                    break
                with contextlib.suppress(Exception):  # reset by the target
                    stream = await flooder.net.host.new_stream(
                        target.net.host.get_id(), [DHT_PROTOCOL]
                    )
                    for _ in range(20):
                        await stream.write(frame)
                        await trio.sleep(0.001)
                while _count(target, "dht", "rate_limited") < 1:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            while not target.net.bans.is_banned(flooder.ident.peer_id):  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert _count(target, "stream", "rate_limited") == 0  # messages, not streams
        assert _count(target, "dht", "rate_limited") >= 3
        assert _count(target, "peer", "banned") == 1


def test_a_ban_says_what_was_held_against_the_peer():
    clock = FakeClock()
    bans, banned = make_bans(clock, strikes=3)
    bans.penalize("evil", "stale")
    for _ in range(4):
        bans.strike("evil", "streams of /ipfs/kad/1.0.0")
    assert banned == ["evil"]
    assert bans.last_why == "strike: streams of /ipfs/kad/1.0.0 x4, stale x1"
    assert bans.why("evil") == "nothing"  # forgotten with the ban: the next one starts afresh
    assert bans.why("honest") == "nothing"
