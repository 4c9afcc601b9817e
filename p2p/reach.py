"""Reachability of a libp2p host: AutoNAT, circuit relay v2, DCUtR hole punching, UPnP.

A part of the libp2p adapter (p2p.host); every py-libp2p 0.8.1 workaround it needs is here:
- AutoNAT's server answers a dial-back with `host.connect()`, which returns at once for a
  peer that is already connected: every node would be told it is public. Our server dials
  the asked address anew, up to the security handshake (`FreshDialAutoNAT`).
- AutoNAT's client sends only our listen addresses, which behind a NAT never match the IP the
  server observes, so the server refuses instead of failing the dial. We add the addresses a
  NAT would map (the IP peers observe us at, with our listen port: the prediction DCUtR makes
  too), count a refusal as no vote, and count votes from direct connections only. Each server
  is asked only what it could dial (`_for_server`): loopback addresses only on our host,
  private ones only from our LAN or NAT (it never learns them otherwise).
- The swarm never dials `/p2p-circuit` addresses (it has no relay transport): `dial` dials
  them through `CircuitV2Transport` itself, and the swarm's `dial_peer` (what every new
  stream, DHT query and hello uses) falls back to a peer's relayed addresses when its direct
  ones fail, so a private peer learned from the DHT is reached through its relay.
- `CircuitV2Transport` with the client role reserves a slot on the relay before every dial
  through it, so dialers would fill a relay's slots: it runs without that role (our
  reservations are made explicitly, `reserve_on`).
- DCUtR's own driver (a loop that looks for relayed connections every 2 s) made every
  daemon's pings to its peers time out after a hostile peer's garbage (tests/daemon/
  test_procs.py::test_bad_input_is_counted_and_daemon_keeps_serving failed with it and
  passed without it; the cause inside it was not found): it is replaced by
  `_drive_hole_punches`, which punches to peers reached only through a relay, in the
  background, at most every PUNCH_RETRY_S.
- The transport's reservation refresher runs in whatever nursery it is given: ours, so that
  it stops with the host.
- The relay and DCUtR handlers refuse garbage silently: the first message of every hop, stop
  and DCUtR stream is checked, counted and held against its sender first (p2p.reachguard).

What the node advertises (`host.get_addrs()`: identify, the signed peer record, the DHT
resource record, Kademlia's answers about us, a relay's reservation answer) is built here
(`_get_addrs`, filtered and ordered by `p2p.addrs.advertised`): its listen addresses
(0.0.0.0 replaced by this host's), the observed addresses peers confirmed, and its relayed
addresses. An address a peer saw us at is advertised only once confirmed: AutoNAT dialled us
back on it lately (the server names the address it reached, which must be one we asked it to
try), or at least OBSERVERS_NEEDED peers in distinct observer groups (py-libp2p's
ObservedAddrManager groups IPv4 peers by address, IPv6 ones by /56) saw it on a port we listen
on; py-libp2p alone waits for 4. DCUtR still sends the unconfirmed prediction (observed IP,
listen port) to the one peer it punches a hole to: that is the point of hole punching. What
peers tell us of addresses (identify, Kademlia, DCUtR's) is checked before py-libp2p stores or
dials it, and what identify and Kademlia send is tailored to each peer: `p2p.addrguard`.

A node is `public` once `confirmations` peers reached it on a fresh connection, `private` once
that many could not; until then `unknown`. A private node reserves a slot on up to `relays`
peers that serve the relay hop protocol (peers it learned from the DHT and hello) and
advertises `/…/p2p/RELAY/p2p-circuit` addresses. With `serve`, a node relays for others
within `RelayLimits` (reservations, circuits, bytes and seconds per circuit).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import multiaddr
import trio
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2 import CircuitV2Protocol, CircuitV2Transport, DCUtRProtocol
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID as STOP_PROTOCOL
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.tools.anyio_service import background_trio_service

from p2p.addrs import LOCAL, advertised, check_addr, dial_order, dialable_addrs, local_only
from p2p.bans import PeerBans
from p2p.hostaddrs import dial_resolved, on_listen_ports
from p2p.limits import RejectHook
from p2p.reachguard import DCUTR, HOP, STOP, FirstMessageCheck

log = logging.getLogger(__name__)

PUBLIC, PRIVATE, UNKNOWN = "public", "private", "unknown"
DIRECT, RELAYED = "direct", "relayed"
AUTONAT_TIMEOUT_S = 10.0
RESERVE_TIMEOUT_S = 10.0
PUNCH_POLL_S = 1.0  # how often relayed-only peers are looked for
PUNCH_RETRY_S = 30.0  # a peer is punched to at most this often
PUNCH_TIMEOUT_S = 30.0
OBSERVERS_NEEDED = 2  # peers that must see us at an address before we advertise it
CONFIRMED_MIN_S = 60.0  # an AutoNAT confirmation lasts 3 check rounds, at least this long
ADDRS_FRESH_S = 1.0  # what we advertise is rebuilt at most this often (pubsub asks per RPC)


@dataclass(frozen=True)
class ReachSettings:
    """How a node finds out whether it is reachable, and helps others (`[relay]` in the
    config; README "Networks")."""

    # serve circuit relay v2 for others (only while AutoNAT says this node is public)
    serve: bool = False
    max_reservations: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 32
    max_circuits: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 16  # per reserving peer
    circuit_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 << 20
    circuit_s: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 600
    reservation_ttl_s: Annotated[int, msgspec.Meta(ge=10, le=86400)] = 3600
    # when private: relays to hold a reservation on
    relays: Annotated[int, msgspec.Meta(ge=0, le=8)] = 2
    # AutoNAT: peers that must agree before the status flips, and how often to ask
    confirmations: Annotated[int, msgspec.Meta(ge=1, le=16)] = 3
    check_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    hole_punch: bool = True
    upnp: bool = False

    def relay_limits(self) -> RelayLimits:
        return RelayLimits(
            duration=self.circuit_s,
            data=self.circuit_bytes,
            max_circuit_conns=self.max_circuits,
            max_reservations=self.max_reservations,
            reservation_ttl=self.reservation_ttl_s,
        )


def reach_info(net: Any) -> dict[str, Any]:
    """What `node_info` shows of a network's reachability (`unknown` where it has none, as
    on the in-memory network)."""
    reach = getattr(net, "reach", None)
    if isinstance(reach, Reachability):
        return reach.info()
    return {"reachability": UNKNOWN, "observed_addrs": [], "relayed_addrs": [], "relays": []}


def connection_of(net: Any, peer_id: str) -> str | None:
    """`direct` or `relayed` for a connected peer of a libp2p network; None otherwise."""
    reach = getattr(net, "reach", None)
    return reach.connection_kind(peer_id) if isinstance(reach, Reachability) else None


def is_circuit(addr: multiaddr.Multiaddr | str) -> bool:
    return "/p2p-circuit" in str(addr)


def tally(votes: dict[str, bool], confirmations: int, current: str) -> str:
    """The status after `votes` (peer -> reached us): flips only when `confirmations` agree."""
    reached = sum(votes.values())
    if reached >= confirmations:
        return PUBLIC
    if len(votes) - reached >= confirmations:
        return PRIVATE
    return current


class FreshDialAutoNAT(AutoNATService):
    """AutoNAT whose server dials back on a new connection (see the module docstring).

    The dial-back goes as far as the security handshake, which proves the peer's identity,
    and is then closed: it never joins either swarm. (A full connection, closed at once, was
    taken by the dialled peer as its newest connection to us and its next streams failed.)"""

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        swarm = self.host.get_network()
        for addr in addrs:
            maddr = multiaddr.Multiaddr(addr)
            raw = None
            try:
                with trio.fail_after(AUTONAT_TIMEOUT_S / 2):
                    transport = swarm.transport_manager.transport_for_dialing(maddr)  # type: ignore[attr-defined]
                    raw = await transport.dial(maddr)
                    await swarm.upgrader.upgrade_security(raw, True, peer_id)  # type: ignore[attr-defined]
                return bytes(addr)
            except Exception:
                continue
            finally:
                if raw is not None:
                    with contextlib.suppress(Exception):
                        await raw.close()
        return None


class Reachability:
    """AutoNAT status, relay service and reservations, DCUtR and UPnP for one host."""

    def __init__(
        self,
        host: Any,
        settings: ReachSettings,
        on_reject: RejectHook | None = None,
        bans: PeerBans | None = None,
        reach_of: Callable[[ID], int] | None = None,
    ) -> None:
        """`reach_of(peer)`: the widest scope of our addresses `peer` could dial
        (`p2p.addrguard.AddrGuard.reach_of`; None: every scope, as on one host)."""
        self.host = host
        self._reach_of = reach_of or (lambda peer: LOCAL)
        self.settings = settings
        self._on_reject = on_reject or (lambda source, reason: None)
        # every relay and DCUtR stream's first message, checked and counted (p2p.reachguard)
        self.checks = FirstMessageCheck(self._on_reject, bans)
        self.status = UNKNOWN
        self.votes: dict[str, bool] = {}
        self.relayed: dict[str, list[multiaddr.Multiaddr]] = {}  # relay peer id -> our addrs
        self.confirmed: dict[str, float] = {}  # address AutoNAT reached us at -> when (monotonic)
        self.upnp_addr: str | None = None
        self.autonat = FreshDialAutoNAT(host, serve=True, confirmations=settings.confirmations)
        self.relay = CircuitV2Protocol(host, settings.relay_limits(), allow_hop=settings.serve)
        # without the CLIENT role: its dials would also take a reservation slot on the relay
        config = RelayConfig(roles=RelayRole.STOP)
        self.transport = CircuitV2Transport(host, self.relay, config)
        self.dcutr = DCUtRProtocol(host) if settings.hole_punch else None
        if self.dcutr is not None:  # its own driver slowed every peer down: ours instead
            self.dcutr._auto_drive_loop = trio.sleep_forever  # type: ignore[method-assign]
        self._punched: dict[str, float] = {}  # peer -> when we last tried to punch to it
        self._nursery: trio.Nursery | None = None
        self.refused_hops = 0  # relay requests refused while we were not known to be public
        self.circuit_dials = 0  # connections we opened through a relay
        self._host_addrs = host.get_addrs
        # (when built, monotonic; what) of `_get_addrs`: see ADDRS_FRESH_S
        self._addrs_memo: tuple[float, list[multiaddr.Multiaddr]] | None = None
        self._watch_observations()
        swarm = host.get_network()
        self._swarm_dial_peer = swarm.dial_peer
        swarm.dial_peer = self._dial_peer  # direct first, then through relays (docstring)
        host.get_addrs = self._get_addrs  # identify and our records announce relayed addresses

    # -- what node_info shows ------------------------------------------------------------

    def observed_addrs(self) -> list[str]:
        """Addresses peers saw our direct connections come from (identify)."""
        manager = getattr(self.host, "_observed_addr_manager", None)
        if manager is None:
            return []
        return sorted({str(a) for a in manager.addrs(min_observers=1) if not is_circuit(a)})

    def connection_kind(self, peer_id: str) -> str | None:
        """`direct` if any connection to the peer is direct, `relayed` if all are relayed."""
        try:
            conns = self.host.get_network().get_connections(ID.from_base58(peer_id))
        except Exception:
            return None
        kinds = set()
        for conn in conns or []:
            try:
                addrs = conn.get_transport_addresses()
            except Exception:
                addrs = []
            kinds.add(RELAYED if any(is_circuit(a) for a in addrs) else DIRECT)
        if not kinds:
            return None
        return DIRECT if DIRECT in kinds else RELAYED

    def relayed_addrs(self) -> list[multiaddr.Multiaddr]:
        return [a for addrs in self.relayed.values() for a in addrs]

    def confirmed_addrs(self) -> list[multiaddr.Multiaddr]:
        """Observed addresses peers confirmed (see the module docstring): AutoNAT reached us
        there lately, or OBSERVERS_NEEDED peers saw us there on a port we listen on."""
        now, ttl = time.monotonic(), max(3 * self.settings.check_s, CONFIRMED_MIN_S)
        for addr in [a for a, at in self.confirmed.items() if now - at > ttl]:
            del self.confirmed[addr]
        out = [multiaddr.Multiaddr(a) for a in self.confirmed]
        manager = getattr(self.host, "_observed_addr_manager", None)
        if manager is not None:
            with contextlib.suppress(Exception):  # py-libp2p's bookkeeping: never fail get_addrs
                seen = [
                    a for a in manager.addrs(min_observers=OBSERVERS_NEEDED) if not is_circuit(a)
                ]
                out += on_listen_ports(seen, self.host.get_transport_addrs())
        return out

    def _confirm(self, reached: bytes | None, candidates: list[bytes]) -> None:
        """AutoNAT reached us at `reached`: remember it, if it is one we asked to be tried
        (a server's word for any other address is worth nothing)."""
        if reached is not None and reached in candidates:
            with contextlib.suppress(Exception):
                self.confirmed[str(multiaddr.Multiaddr(reached))] = time.monotonic()
                self._addrs_changed()

    def info(self) -> dict[str, Any]:
        return {
            "reachability": self.status,
            "observed_addrs": self.observed_addrs(),
            "relayed_addrs": [str(a) for a in self.relayed_addrs()],
            "confirmed_addrs": [str(a) for a in self.confirmed_addrs()],
            "relays": sorted(self.relayed),
            "relay_serving": self.serving,
            "upnp_addr": self.upnp_addr,
            "circuit_dials": self.circuit_dials,
        }

    @property
    def serving(self) -> bool:
        return self.settings.serve and self.status == PUBLIC

    # -- running -------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Reachability]:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(background_trio_service(self.relay))
            await self.relay.event_started.wait()
            handlers, check = self.host.get_mux().handlers, self.checks.wrap
            if self.settings.serve:  # relay only while AutoNAT says we are public
                self._serve_hop = check(HOP, handlers[HOP_PROTOCOL])
                self.host.set_stream_handler(HOP_PROTOCOL, self._hop_if_public)
            self.host.set_stream_handler(STOP_PROTOCOL, check(STOP, handlers[STOP_PROTOCOL]))
            if self.dcutr is not None:
                await stack.enter_async_context(background_trio_service(self.dcutr))
                await self.dcutr.event_started.wait()
                handler = handlers[DCUTR_PROTOCOL]
                self.host.set_stream_handler(DCUTR_PROTOCOL, check(DCUTR, handler))
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            self._nursery.start_soon(self._loop)
            if self.dcutr is not None:
                self._nursery.start_soon(self._drive_hole_punches)
            if self.settings.upnp:
                self._nursery.start_soon(self._try_upnp)
            try:
                yield self
            finally:
                self._nursery.cancel_scope.cancel()

    async def _hop_if_public(self, stream: Any) -> None:
        if not self.serving:
            self.refused_hops += 1
            self._on_reject("stream", "hop_not_serving")
            await stream.reset()
            return
        await self._serve_hop(stream)

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.check()
            if self.status == PRIVATE:
                with contextlib.suppress(Exception):
                    await self.reserve()
            # ask again soon while nobody has told us yet (peers are still connecting)
            await trio.sleep(
                self.settings.check_s if self.votes else min(1.0, self.settings.check_s)
            )

    async def _drive_hole_punches(self) -> None:
        """Every PUNCH_POLL_S, try DCUtR (in the background) with each peer we reach only
        through a relay, at most once per PUNCH_RETRY_S."""
        while True:
            await trio.sleep(PUNCH_POLL_S)
            now = trio.current_time()
            for peer in self.host.get_connected_peers():
                peer_id = peer.to_base58()
                if self.connection_kind(peer_id) != RELAYED:
                    continue
                if now - self._punched.get(peer_id, -PUNCH_RETRY_S) < PUNCH_RETRY_S:
                    continue
                self._punched[peer_id] = now
                assert self._nursery is not None
                self._nursery.start_soon(self._punch, peer_id)
            for peer_id in [p for p, t in self._punched.items() if now - t > 10 * PUNCH_RETRY_S]:
                del self._punched[peer_id]  # bounded: peers long gone are forgotten

    async def _punch(self, peer_id: str) -> None:
        with contextlib.suppress(Exception), trio.move_on_after(PUNCH_TIMEOUT_S):
            await self.hole_punch(peer_id)

    def _direct_peers(self) -> list[ID]:
        peers = []
        for peer in self.host.get_connected_peers():
            if self.connection_kind(peer.to_base58()) == DIRECT:
                peers.append(peer)
        return peers

    def _candidate_addrs(self) -> list[bytes]:
        """Our listen addresses (0.0.0.0 replaced by this host's) plus the NAT mappings
        peers' observations predict."""
        out = dialable_addrs(
            [multiaddr.Multiaddr(str(a).split("/p2p/")[0]) for a in self.host.get_transport_addrs()]
        )
        ports = {a.value_for_protocol("tcp") for a in out if "/tcp/" in str(a)}
        for seen in self.observed_addrs():
            ip_proto = "ip6" if seen.startswith("/ip6/") else "ip4"
            ip = multiaddr.Multiaddr(seen).value_for_protocol(ip_proto)
            out += [multiaddr.Multiaddr(f"/{ip_proto}/{ip}/tcp/{port}") for port in ports]
        return list({a.to_bytes(): None for a in out if not is_circuit(a)})

    def _for_server(self, peer: ID, candidates: list[bytes]) -> list[bytes]:
        """The `candidates` an AutoNAT server `peer` is asked to dial back: only those it
        could (loopback ones only on our host, private ones only from our LAN or NAT; the
        server dials only at the IP it sees us at anyway), so our local addresses are
        never told to a peer beyond them."""
        widest = self._reach_of(peer)
        asked = []
        for addr in candidates:
            with contextlib.suppress(Exception):  # (our own, built above: never unusable)
                if check_addr(str(multiaddr.Multiaddr(addr)), "")[1] <= widest:
                    asked.append(addr)
        return asked

    async def check(self) -> str:
        """Ask directly connected peers to dial us back; update and return the status."""
        candidates = self._candidate_addrs()
        for peer in self._direct_peers()[: 2 * self.settings.confirmations]:
            asked = self._for_server(peer, candidates)
            if not asked:  # nothing it could dial back (we are on loopback alone): no vote
                self.votes.pop(peer.to_base58(), None)
                continue
            try:
                status, reached = await self.autonat.query_server(peer, asked, AUTONAT_TIMEOUT_S)
            except Exception as exc:  # a peer without AutoNAT, or gone: no vote
                log.debug("AutoNAT query to %s failed: %r", peer, exc)
                continue
            if status == AutoNATMessage.OK:
                self.votes[peer.to_base58()] = True
                self._confirm(reached, asked)
            elif status == AutoNATMessage.E_DIAL_ERROR:
                self.votes[peer.to_base58()] = False
            else:  # refused (relayed, or no address at its observed IP): no vote
                self.votes.pop(peer.to_base58(), None)
        was, self.status = self.status, tally(self.votes, self.settings.confirmations, self.status)
        if was == PRIVATE and self.status == PUBLIC:
            self.relayed.clear()  # reachable directly now: relayed addresses only slow peers
            self._addrs_changed()
        return self.status

    def _relay_candidates(self) -> list[ID]:
        store = self.host.get_peerstore()
        out = []
        for peer in self._direct_peers():
            with contextlib.suppress(Exception):
                if HOP_PROTOCOL in store.get_protocols(peer):
                    out.append(peer)
        return out

    async def reserve(self) -> list[str]:
        """Hold reservations on up to `relays` relays; returns the relays held."""
        connected = {p.to_base58() for p in self.host.get_connected_peers()}
        for gone in set(self.relayed) - connected:
            del self.relayed[gone]
            self._addrs_changed()
        for relay in self._relay_candidates():
            if len(self.relayed) >= self.settings.relays:
                break
            if relay.to_base58() in self.relayed:
                continue
            await self.reserve_on(relay)
        return sorted(self.relayed)

    async def reserve_on(self, relay: ID) -> bool:
        """Reserve a slot on `relay` and advertise the relayed addresses it gives us."""
        assert self._nursery is not None, "reserve_on() needs running()"
        try:
            with trio.fail_after(RESERVE_TIMEOUT_S):
                stream = await self.host.new_stream(relay, [HOP_PROTOCOL])
                ok = await self.transport.reserve(stream, relay, self._nursery)
        except Exception as exc:
            log.info("reservation on relay %s failed: %r", relay, exc)
            return False
        if not ok:
            log.info("relay %s refused a reservation", relay)
            return False
        suffix = f"/p2p/{relay.to_base58()}/p2p-circuit"
        addrs = [
            multiaddr.Multiaddr(str(a).split("/p2p/")[0] + suffix)
            for a in self.host.get_peerstore().addrs(relay)
            if not is_circuit(a) and "/tcp/" in str(a)
        ]
        self.relayed[relay.to_base58()] = addrs
        self._addrs_changed()
        log.info("reserved a slot on relay %s: %s", relay, [str(a) for a in addrs])
        return True

    async def dial(self, target: multiaddr.Multiaddr, info: PeerInfo) -> None:
        """Dial exactly `target`: through the relay it names (.../p2p/RELAY/p2p-circuit/
        p2p/PEER), which the swarm cannot do, or directly (a /dns4 name resolved now)."""
        if is_circuit(target):
            await self.transport.dial(target)
            self.circuit_dials += 1
            return
        dial = self.host.get_network().dial_addr
        await dial_resolved(dial, info.addrs[0], info.peer_id)

    async def _dial_peer(self, peer_id: ID) -> list[Any]:
        try:
            return await self._swarm_dial_peer(peer_id)  # type: ignore[no-any-return]
        except Exception as direct_failed:
            circuits = {
                str(a).split("/p2p-circuit")[0] + f"/p2p-circuit/p2p/{peer_id}"
                for a in self.host.get_peerstore().addrs(peer_id)
                if is_circuit(a)
            }
            # the peer's word (identify): only usable relays, loopback ones only from loopback
            own = [str(a) for a in self.host.get_transport_addrs()]
            usable = dial_order(sorted(circuits), peer_id.to_base58(), local=local_only(own))
            for addr in usable:
                try:
                    with trio.fail_after(RESERVE_TIMEOUT_S):
                        conn = await self.transport.dial(multiaddr.Multiaddr(addr))
                    self.circuit_dials += 1
                    return [conn]
                except Exception as exc:
                    log.debug("dialling %s through %s failed: %r", peer_id, addr, exc)
            raise direct_failed

    def _get_addrs(self) -> list[multiaddr.Multiaddr]:
        """`host.get_addrs()`: what this host tells every peer (see the module docstring),
        each ending in /p2p/<our id>. Relayed addresses are added here: py-libp2p's own
        get_addrs strips every address after its first /p2p/ part (.../p2p/RELAY/p2p-circuit
        would become ...). Built at most every ADDRS_FRESH_S and when our reservations or
        confirmations change: pubsub asks for it with every RPC it sends."""
        now = time.monotonic()
        if self._addrs_memo is not None and now - self._addrs_memo[0] < ADDRS_FRESH_S:
            return list(self._addrs_memo[1])
        me = multiaddr.Multiaddr(f"/p2p/{self.host.get_id()}")
        direct = self._host_addrs() + self.confirmed_addrs()
        addrs = [a.encapsulate(me) for a in advertised(direct, self.relayed_addrs())]
        self._addrs_memo = (now, addrs)
        return list(addrs)

    def _addrs_changed(self) -> None:
        self._addrs_memo = None

    def _watch_observations(self) -> None:
        """What peers see us at (identify's observations) feeds `_get_addrs`: a change
        rebuilds it at once."""
        manager = getattr(self.host, "_observed_addr_manager", None)
        for name in ("record_observation", "remove_conn"):
            method = getattr(manager, name, None)
            if method is None:
                continue

            def changed(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
                try:
                    return _method(*args, **kwargs)
                finally:
                    self._addrs_changed()

            setattr(manager, name, changed)

    async def hole_punch(self, peer_id: str) -> bool:
        """Try DCUtR now; True once a direct connection to the peer exists."""
        if self.dcutr is None:
            return False
        return bool(await self.dcutr.initiate_hole_punch(ID.from_base58(peer_id)))

    async def _try_upnp(self) -> None:
        """Map our listen ports on an IGD router if one answers (py-libp2p's UPnP)."""
        try:
            from libp2p.discovery.upnp.upnp import UpnpManager

            upnp = UpnpManager()
            if not await upnp.discover():
                log.info("UPnP: no router offers port mapping")
                return
            for addr in self.host.get_transport_addrs():
                port = int(multiaddr.Multiaddr(str(addr)).value_for_protocol("tcp"))
                if await upnp.add_port_mapping(port, "TCP"):
                    self.upnp_addr = f"/ip4/{upnp.get_external_ip()}/tcp/{port}"
                    log.info("UPnP: mapped %s", self.upnp_addr)
                    return
        except Exception as exc:
            log.info("UPnP failed: %r", exc)
