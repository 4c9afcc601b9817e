"""p2p.liveness against a scripted network on trio's virtual clock: who is taken for gone, and
who is spared (a dial that only timed out once, a round in which most peers missed)."""

from __future__ import annotations

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
