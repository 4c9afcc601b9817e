"""p2p.peers.track_peers on a scripted network and trio's virtual clock: a peer silent to
pings and to everything else is disconnected; one whose pings fail while its messages still
arrive is kept."""

from __future__ import annotations

import trio

from p2p.network import NetworkError, PeerState
from p2p.peers import FROZEN_AFTER_S, track_peers


class _Net:
    def __init__(self, peers: set[str]) -> None:
        self.peers: dict[str, PeerState] = {}
        self.connected = set(peers)
        self.silent: set[str] = set()  # pings time out
        self.talking: set[str] = set()  # ... but their messages arrive

    def connected_peers(self) -> set[str]:
        return set(self.connected)

    def known_peers(self) -> set[str]:
        return set(self.connected)

    def peer_addrs(self, peer_id: str) -> list[str]:
        return [f"/p2p/{peer_id}"]

    def heard_at(self, peer_id: str) -> float | None:
        return trio.current_time() if peer_id in self.talking else None

    async def ping(self, peer_id: str) -> float:
        if peer_id in self.silent:
            await trio.sleep(2.0)
            raise NetworkError("ping timed out")
        return 1.0


async def test_a_peer_silent_every_way_is_dropped_one_still_talking_is_kept(autojump_clock):
    net = _Net({"frozen", "flooded", "fine"})
    dropped: list[str] = []

    async def disconnect(peer_id: str) -> None:
        dropped.append(peer_id)
        net.connected.discard(peer_id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(track_peers, net, 2.0, disconnect)
        await trio.sleep(5)
        net.silent |= {"frozen", "flooded"}
        net.talking.add("flooded")
        await trio.sleep(FROZEN_AFTER_S + 15)
        nursery.cancel_scope.cancel()
    assert dropped == ["frozen"]
    assert net.peers["flooded"].missed_pings >= 3 and net.peers["fine"].rtt_ms == 1.0
