"""[relay]: reachability (README "Networks"): whether this node relays for others once AutoNAT
says it is public, the limits on what it relays, how many relays it reserves a slot on when it
is private, hole punching and UPnP. The keys are p2p.reach.ReachSettings' fields.

A section of the settings tree (daemon.settings.Config.relay), kept beside nothing else: the
code it configures is p2p.reach, which may not import the daemon.
"""

from __future__ import annotations

from daemon.sections import Exposed, Section, exposing
from p2p.reach import ReachSettings


class _RelayConfig(Section):
    """[relay]: AutoNAT, circuit relay v2 (serving and reservations), DCUtR, UPnP."""

    def reach(self) -> ReachSettings:
        """The settings p2p.reach runs with."""
        return ReachSettings(**self.values_for(ReachSettings))


RelayConfig = exposing(
    _RelayConfig,
    Exposed(
        ReachSettings,
        {
            "serve": "serve",
            "max_reservations": "max_reservations",
            "max_circuits": "max_circuits",
            "circuit_bytes": "circuit_bytes",
            "circuit_s": "circuit_s",
            "reservation_ttl_s": "reservation_ttl_s",
            "relays": "relays",
            "confirmations": "confirmations",
            "check_s": "check_s",
            "hole_punch": "hole_punch",
            "upnp": "upnp",
        },
    ),
)
