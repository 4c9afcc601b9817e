"""Real libp2p hosts (127.0.0.1, one process) for registry tests that attack over the wire."""

from __future__ import annotations

from collections.abc import Callable

from p2p import identity, records
from p2p.host import HostLimits, Libp2pNetwork


class NoRecords:
    """A DHT validator for tests that put no DHT records."""

    def validate(self, key: str, value: bytes) -> None:
        raise ValueError("no records in this test")

    def select(self, key: str, values: list[bytes]) -> int:
        return 0


def unbanning_host(
    ident: identity.NodeIdentity,
    network_id: str,
    on_reject: Callable[[str, str], None] | None = None,
    **limits: int,
) -> Libp2pNetwork:
    """A host that never bans or slows a peer by its score (the threshold is out of reach and
    the inbound floor is the full rate): for tests that count or relay what a hostile peer
    sends, not how it is punished (bans by score: tests/daemon/test_hostile_peer_scored.py;
    the floor: tests/p2p/test_inbound_budget.py). `limits`: further HostLimits fields."""
    return Libp2pNetwork(
        ident,
        network_id=network_id,
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht_namespace=records.NAMESPACE,
        dht_validator=NoRecords(),
        on_reject=on_reject,
        limits=HostLimits(score_threshold=-1e9, min_inbound_bytes_per_s=1 << 26, **limits),
    )
