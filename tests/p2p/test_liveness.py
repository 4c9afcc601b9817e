"""p2p.liveness against a scripted network on trio's virtual clock: who is taken for gone, and
who is spared (a dial that only timed out once, a round in which most peers missed)."""

from __future__ import annotations

import random

import trio

from p2p.liveness import Liveness
from p2p.network import NetworkError


class _Net:
    peer_id = "me"

    def __init__(self, peers: set[str]) -> None:
        self.connected = set(peers)
        self.silent: set[str] = set()  # pings unanswered (a partition)
        self.refusing: set[str] = set()  # dials refused at once (a killed node)
        self.hanging: set[str] = set()  # dials that time out (a loaded machine)
        self.talking: set[str] = set()  # silent to pings, but their messages arrive

    def connected_peers(self) -> set[str]:
        return set(self.connected)

    def now(self) -> float:
        return trio.current_time()

    def heard_at(self, peer_id: str) -> float | None:
        return trio.current_time() - 0.1 if peer_id in self.talking else None

    async def ping(self, peer_id: str) -> float:
        if peer_id in self.silent:
            await trio.sleep(2.0)
            raise NetworkError("ping timed out")
        await trio.sleep(0.01)
        return 10.0

    async def connect(self, addr: str, timeout_s: float = 5.0) -> str:
        peer_id = addr.rsplit("/", 1)[-1]
        if peer_id in self.refusing:
            raise NetworkError("connection refused")
        if peer_id in self.hanging:
            await trio.sleep(timeout_s)
            raise NetworkError("timed out")
        self.connected.add(peer_id)
        return peer_id


async def _running(net: _Net, live: Liveness, nursery: trio.Nursery) -> None:
    nursery.start_soon(live.run, lambda p: True, lambda p: [f"/p2p/{p}"])
    await trio.sleep(2)  # a round or two sees everyone connected


async def test_refused_at_once_is_gone_a_timeout_only_twice_in_a_row(autojump_clock):
    net = _Net({"killed", "slow", "well"})
    live = Liveness(net)
    async with trio.open_nursery() as nursery:
        await _running(net, live, nursery)
        net.refusing.add("killed")
        net.hanging.add("slow")
        net.connected -= {"killed", "slow"}
        await trio.sleep(7)
        assert set(live.lost()) == {"killed"}  # the slow one's first dial only timed out
        await trio.sleep(8)
        assert set(live.lost()) == {"killed", "slow"}  # its second did too
        net.hanging.clear()
        await trio.sleep(6)  # dialled again within recheck_s: back
        assert set(live.lost()) == {"killed"} and live.revived_total == 1
        nursery.cancel_scope.cancel()


async def test_one_silent_peer_is_gone_most_peers_silent_spares_them(autojump_clock):
    net = _Net({"a", "b", "c", "d"})
    live = Liveness(net)
    async with trio.open_nursery() as nursery:
        await _running(net, live, nursery)
        net.silent.add("a")
        await trio.sleep(12)
        assert set(live.lost()) == {"a"}
        net.silent.clear()
        await trio.sleep(2)
        assert live.lost() == {}
        net.silent |= {"a", "b"}  # half of 4 at once: our own trouble, counted for nobody
        await trio.sleep(20)
        assert live.lost() == {} and live.rounds_spared >= 3
        nursery.cancel_scope.cancel()


async def test_a_peer_whose_pings_fail_but_whose_messages_arrive_is_not_gone(autojump_clock):
    """Under a flood, py-libp2p's pings between honest nodes failed for seconds while their
    requests still flowed (bench/abuse.py): such a peer stays listed; one silent both ways
    does not."""
    net = _Net({"a", "b", "c", "d", "e"})
    live = Liveness(net)
    async with trio.open_nursery() as nursery:
        await _running(net, live, nursery)
        net.silent |= {"a", "b"}
        net.talking.add("a")
        await trio.sleep(12)
        assert set(live.lost()) == {"b"} and live.heard_spared >= 3
        nursery.cancel_scope.cancel()


async def test_a_silent_peer_without_a_record_is_not_marked_gone(autojump_clock):
    """A peer with no record listed (a hostile one, a tool) that stops answering pings has
    nothing to hide from `nodes_find`: it is not marked (nor logged) gone, round after
    round."""
    net = _Net({"hostile", "a", "b", "c"})
    live = Liveness(net)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(live.run, lambda p: p != "hostile", lambda p: [f"/p2p/{p}"])
        await trio.sleep(2)
        net.silent.add("hostile")
        await trio.sleep(12)
        assert live.lost() == {} and live.lost_total == 0
        nursery.cancel_scope.cancel()


class _CountingNet(_Net):
    def __init__(self, peers: set[str]) -> None:
        super().__init__(peers)
        self.pings: list[tuple[float, str]] = []

    async def ping(self, peer_id: str) -> float:
        self.pings.append((trio.current_time(), peer_id))
        return await super().ping(peer_id)


async def test_many_peers_are_pinged_a_few_a_round_in_turn_and_a_silent_one_is_suspected(
    autojump_clock,
):
    """30 connected peers, at most 4 pings a round: each round sends 4, every peer is pinged
    within 8 rounds, and a silent peer is announced (`on_lost`) at its first miss, pinged
    every round after, and gone after three."""
    peers = {f"p{i}" for i in range(30)}
    net = _CountingNet(peers)
    told: list[tuple[float, str]] = []
    live = Liveness(net, max_pings=4, on_lost=lambda p: told.append((trio.current_time(), p)))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(live.run, lambda p: True, lambda p: [f"/p2p/{p}"])
        await trio.sleep(8.5)  # virtual: rounds at 0, 1, ... 8
        per_round: dict[float, int] = {}
        for when, _ in net.pings:
            per_round[when] = per_round.get(when, 0) + 1
        assert max(per_round.values()) == 4
        assert {p for _, p in net.pings} == peers  # everyone had a turn
        assert told == []
        net.silent.add("p7")
        silenced = trio.current_time()
        while "p7" not in live.lost():  # noqa: ASYNC110
            await trio.sleep(0.5)  # virtual time (autojump clock)
        assert told and told[0][1] == "p7"
        assert told[0][0] - silenced <= 8 + 2 + 1  # its turn, then one ping timeout
        assert [p for _, p in told].count("p7") == 3  # two suspicions, then gone
        assert set(live.lost()) == {"p7"}
        nursery.cancel_scope.cancel()


async def test_nodes_that_met_the_same_peers_at_once_ping_each_in_different_rounds(
    autojump_clock,
):
    """60 nodes connected at the same moment to the same 40 peers (as every node that looked
    up a new record is), each pinging 4 a round (a cycle of 10 rounds): a peer cut off right
    after its turn is suspected by some node within a round and a ping timeout, not a cycle
    later. (Each node appended newcomers to its line in the same order, so all pinged a peer
    in the same round: a cut-off node took 11.25 s to leave every list at 200 nodes.)"""
    peers = {f"p{i}" for i in range(40)}
    nets = [_CountingNet(peers) for _ in range(60)]
    told: list[tuple[float, str]] = []
    lives = [
        Liveness(
            net,  # type: ignore[arg-type]
            max_pings=4,
            rng=random.Random(index),
            on_lost=lambda p: told.append((trio.current_time(), p)),
        )
        for index, net in enumerate(nets)
    ]
    async with trio.open_nursery() as nursery:
        for live in lives:
            nursery.start_soon(live.run, lambda p: True, lambda p: [f"/p2p/{p}"])
        await trio.sleep(12.5)  # virtual: more than a cycle, everyone in step
        for net in nets:  # each node still pings each peer once a cycle, in turn
            assert {p for when, p in net.pings if when < 10} == peers
        latest = max(when for net in nets for when, _ in net.pings)
        cut = min(p for net in nets for when, p in net.pings if when == latest)
        for net in nets:
            net.silent.add(cut)
        silenced = trio.current_time()
        while cut not in {p for _, p in told}:  # noqa: ASYNC110
            await trio.sleep(0.1)  # virtual time (autojump clock)
        assert trio.current_time() - silenced <= 1 + 2 + 1  # next round, one ping timeout
        nursery.cancel_scope.cancel()


async def test_a_departed_peer_is_dialled_less_and_less_often_then_forgotten(autojump_clock):
    """A peer that left for good (a flood's hostile peer, its record valid for an hour) is
    dialled again at once, then 5, 10, 20, 40 s apart, and forgotten after 6 dials: it was
    dialled every 5 s for as long as its record lasted. Seen again, it starts afresh."""
    net = _Net({"left", "stays"})
    dials: list[float] = []
    connect = net.connect

    async def counted(addr: str, timeout_s: float = 5.0) -> str:
        if addr.endswith("/left"):
            dials.append(trio.current_time())
        return await connect(addr, timeout_s)

    net.connect = counted  # type: ignore[method-assign]
    live = Liveness(net, recheck_s=5.0, max_rechecks=6)
    async with trio.open_nursery() as nursery:
        await _running(net, live, nursery)
        net.refusing.add("left")
        net.connected.discard("left")
        await trio.sleep(3600)  # its record's whole validity
        assert set(live.lost()) == {"left"}  # still unlisted
        # the redial when its connection closed, then 6 rechecks, the gaps doubling
        assert len(dials) == 7, dials
        gaps = [b - a for a, b in zip(dials[1:], dials[2:], strict=False)]
        # (rounds are probe_interval_s apart, plus their pings: a dial falls up to one late)
        assert all(w <= g < w + 1.5 for g, w in zip(gaps, [5, 10, 20, 40, 80], strict=True)), gaps
        assert dials[-1] - dials[0] < 200
        assert live.rechecks_total == 6 and live.forgotten_total == 1
        # it comes back (connects to us): listed again; gone again later, dialled afresh
        net.refusing.clear()
        net.connected.add("left")
        await trio.sleep(3)
        assert live.lost() == {} and live.revived_total == 1
        net.refusing.add("left")
        net.connected.discard("left")
        before = len(dials)
        await trio.sleep(30)
        assert set(live.lost()) == {"left"} and len(dials) - before == 4  # redial, 0, 5, 10
        nursery.cancel_scope.cancel()
