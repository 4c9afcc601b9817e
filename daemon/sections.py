"""The sections of the node's config: one typed table each (`[p2p]`, `[rpc]`, ...), with the
keys that lower layers' settings types expose under them (`Exposed`). The tree that holds
them, and how it is loaded and explained, is daemon.settings."""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, ClassVar, TypeVar

import msgspec

from daemon.cluster.coordinator_state import CoordinatorSettings, ScalingSettings
from daemon.multiaddrs import BOOTSTRAP_EXAMPLE, LISTEN_EXAMPLE, bootstrap_error, listen_error
from daemon.resources import EnergySettings
from p2p.discovery import DiscoverySettings
from p2p.limits import HostLimits
from p2p.records import PricePerUnit
from registry.replica import Limits
from registry.replication import ReplicationSettings
from scheduler.election import ElectionSettings
from scheduler.placement import PlacementWeights
from scheduler.swim_state import SwimSettings

# a `description` names what a value out of bounds is not: "70000 is not a TCP port (...)"
Port = Annotated[
    int, msgspec.Meta(ge=0, le=65535, description="a TCP port (0..65535; 0 picks a free one)")
]
Positive = Annotated[float, msgspec.Meta(gt=0)]
# (key, why, other keys the rule involves): a rule between keys of one section that it breaks
Problem = tuple[str, str, tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class Exposed:
    """Fields of a lower layer's settings dataclass that a config section offers as keys,
    with the field's type, bounds and default (unless `defaults` says otherwise)."""

    settings: type
    keys: Mapping[str, str]  # config key -> field name
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def fields(self) -> list[tuple[str, Any, Any]]:
        """(key, annotated type, default) of each exposed field."""
        hints = typing.get_type_hints(self.settings, include_extras=True)
        defaults = {f.name: f.default for f in dataclasses.fields(self.settings)}
        return [
            (key, hints[name], self.defaults.get(key, defaults[name]))
            for key, name in self.keys.items()
        ]


class Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A table of the config file."""

    exposed: ClassVar[tuple[Exposed, ...]] = ()

    def problems(self) -> Iterator[Problem]:
        """The rules between this section's keys that it breaks (bounds of single keys are
        their types' `msgspec.Meta`)."""
        return iter(())

    def values_for(self, settings: type) -> dict[str, Any]:
        """The fields of `settings` that this section sets, by field name."""
        return {
            name: getattr(self, key)
            for part in self.exposed
            if part.settings is settings
            for key, name in part.keys.items()
        }


S = TypeVar("S", bound=Section)


def exposing(base: type[S], *exposed: Exposed) -> type[S]:
    """`base` with the keys that `exposed` offers added as fields."""
    return msgspec.defstruct(
        base.__name__.removeprefix("_"),
        [field for part in exposed for field in part.fields()],
        bases=(base,),
        module=__name__,
        namespace={"exposed": exposed, "__doc__": base.__doc__},
        frozen=True,
        kw_only=True,
        forbid_unknown_fields=True,
    )


class _P2PConfig(Section):
    """[p2p]: where to listen, whom to join; the DHT deadline and the host's per-peer limits
    (README "Limits and quotas") are exposed from p2p."""

    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)
    bootstrap: tuple[str, ...] = ()
    reconnect_min_s: Positive = 1.0
    reconnect_max_s: Positive = 30.0
    ping_interval_s: Positive = 10.0

    def problems(self) -> Iterator[Problem]:
        if not self.listen:
            yield "listen", f"is empty: give at least one, e.g. {LISTEN_EXAMPLE}", ()
        for index, addr in enumerate(self.listen):
            if problem := listen_error(addr):
                yield f"listen[{index}]", f"{problem}; e.g. {LISTEN_EXAMPLE}", ()
        for index, addr in enumerate(self.bootstrap):
            if problem := bootstrap_error(addr):
                yield f"bootstrap[{index}]", f"{problem}; e.g. {BOOTSTRAP_EXAMPLE}", ()
        if self.reconnect_max_s < self.reconnect_min_s:
            why = f"must be at most reconnect_max_s ({self.reconnect_max_s})"
            yield "reconnect_min_s", why, ("reconnect_max_s",)
        limits = self.values_for(HostLimits)
        if limits["max_gossip_bytes"] > limits["gossip_bytes_per_s"]:
            why = f"must be at most peer_gossip_bytes_per_s ({limits['gossip_bytes_per_s']})"
            yield "max_gossip_bytes", why, ("peer_gossip_bytes_per_s",)


P2PConfig = exposing(
    _P2PConfig,
    Exposed(DiscoverySettings, {"dht_timeout_s": "dht_timeout_s"}),
    Exposed(
        HostLimits,
        {
            "peer_streams_per_s": "streams_per_s",
            "peer_stream_burst": "stream_burst",
            "peer_gossip_per_s": "gossip_per_s",
            "peer_gossip_burst": "gossip_burst",
            "peer_gossip_bytes_per_s": "gossip_bytes_per_s",
            "max_gossip_bytes": "max_gossip_bytes",
            "hello_timeout_s": "hello_timeout_s",
            "gossip_seen_ttl_s": "seen_ttl_s",
            "max_connections_per_ip": "max_connections_per_ip",
            "max_connections": "max_connections",
            "peer_max_connections": "max_connections_per_peer",
            "connection_max_buffered_bytes": "max_buffered_bytes_per_connection",
            "max_buffered_bytes": "max_buffered_bytes",
            "peer_inbound_bytes_per_s": "inbound_bytes_per_s",
            "peer_inbound_bytes_burst": "inbound_bytes_burst",
            "peer_inbound_halving_score": "inbound_halving_score",
            "peer_min_inbound_bytes_per_s": "min_inbound_bytes_per_s",
            "ban_strikes": "ban_strikes",
            "ban_window_s": "ban_window_s",
            "ban_s": "ban_s",
            "peer_max_streams": "max_streams_per_peer",
            "protocol_max_streams": "max_streams_per_protocol",
            "peer_score_threshold": "score_threshold",
            "peer_score_half_life_s": "score_half_life_s",
        },
    ),
)


class RPCConfig(Section):
    """[rpc]: the JSON-RPC server on 127.0.0.1."""

    port: Port = 8645
    # beyond it, the slowest waiting connection is shed
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 256
    # idle + head + body of one request, in total
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0


class _ResourcesConfig(Section):
    """[resources]: this node's signed resource record (exposed from p2p.discovery)."""

    def problems(self) -> Iterator[Problem]:
        discovery = self.values_for(DiscoverySettings)
        if discovery["publish_interval_s"] >= discovery["record_validity_s"]:
            why = (
                f"must be below record_validity_s ({discovery['record_validity_s']}): a record "
                "is republished before it expires"
            )
            yield "publish_interval_s", why, ("record_validity_s",)


ResourcesConfig = exposing(
    _ResourcesConfig,
    Exposed(
        DiscoverySettings,
        {key: key for key in ("publish_interval_s", "record_validity_s", "max_clock_skew_s")},
    ),
    Exposed(EnergySettings, {key: key for key in ("energy_price_per_kwh", "carbon_g_per_kwh")}),
)


class _RegistryConfig(Section):
    """[registry]: anti-entropy (registry.replication) and the replica's limits
    (registry.replica, README "Limits and quotas")."""

    def problems(self) -> Iterator[Problem]:
        limits = self.values_for(Limits)
        if limits["author_max_bytes"] < limits["max_entry_bytes"]:
            why = f"must be at least max_entry_bytes ({limits['max_entry_bytes']})"
            yield "author_max_bytes", why, ("max_entry_bytes",)


RegistryConfig = exposing(
    _RegistryConfig,
    Exposed(
        ReplicationSettings,
        {
            k: k
            for k in ("sync_interval_s", "sync_timeout_s", "tombstone_horizon_s", "gc_interval_s")
        },
        # a daemon's requests cross real links: twice the simulations' 0.5 s
        defaults={"sync_timeout_s": 1.0},
    ),
    Exposed(
        Limits,
        {
            k: k
            for k in (
                "max_entry_bytes",
                "author_max_entries",
                "author_max_bytes",
                "author_bytes_per_s",
                "author_bytes_burst",
            )
        },
    ),
)


class ShardsConfig(Section):
    """[shards]: serving model shards (daemon.shards)."""

    allow_remote_deploy: bool = False
    torch_threads: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: torch's default
    cache_gib: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # 0: half the free memory
    device: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^(auto|cpu|cuda(:\d{1,2})?)$",
            description="a device (use auto, cpu, cuda or cuda:N)",
        ),
    ] = "auto"
    local_sockets: bool = True
    # shard stream limits (README: Limits and quotas, Shard streams); a server replaces its
    # pooled push streams after 10 s idle: stay well above
    stream_idle_s: Annotated[float, msgspec.Meta(ge=20, le=3600)] = 30.0
    max_streams_per_peer: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 40
    max_local_connections: Annotated[int, msgspec.Meta(ge=2, le=65536)] = 256
    # continuous batching (daemon.shards.batching): the most steps in one forward pass (1: no
    # batching), and how long a batch may wait for the sessions due back
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=256)] = 32
    batch_window_s: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.005
    # pipelining: a batch takes at most its share of the sessions of deep chains, so the hops
    # of a chain compute at once (off where every hop shares one machine's cores)
    pipeline: bool = True
    # CPU float32 weights in oneDNN's layout for batched products (daemon.shards.model.linear):
    # batches of 4+ steps ~25 % faster, a lone step ~50 % slower
    batched_layout: bool = False


class GRPCConfig(Section):
    """[grpc]: the gRPC inference API on 127.0.0.1."""

    enabled: bool = True
    port: Port = 0  # a free port: several daemons on one host; daemon.json has the address


# the networks contracts.chain.networks defines (the CHAIN engineer's list; settings names
# them as a literal so that loading a config never imports the chain client)
CHAIN_NETWORKS = ("devnet", "anvil", "base-sepolia")
_NETWORK_PATTERN = f"^({'|'.join(re.escape(name) for name in CHAIN_NETWORKS)})$"
_NETWORK_DOC = f"a network (use {', '.join(CHAIN_NETWORKS[:-1])} or {CHAIN_NETWORKS[-1]})"


class ChainConfig(Section):
    """[chain]: the chain this node settles on (contracts.chain.networks). A network without
    a default endpoint (base-sepolia) and no `rpc_url` is refused where it is used
    (`networks.endpoint`), not at load: a command's --rpc-url flag may supply it."""

    network: Annotated[
        str,
        msgspec.Meta(pattern=_NETWORK_PATTERN, description=_NETWORK_DOC),
    ] = "devnet"
    # empty: the network's default endpoint
    rpc_url: Annotated[
        str,
        msgspec.Meta(
            max_length=2048,
            pattern=r"^(https?://[^\s/?#]+[^\s]*)?$",
            description="an RPC URL (http://HOST... or https://HOST...; empty: the network's "
            "default)",
        ),
    ] = ""


class MarketConfig(Section):
    """[market]: prices, in the stablecoin's smallest unit per unit of work (one layer run
    over one token). This node's price travels in its signed resource record and its shard
    announcements; `max_price_per_unit` is what this node, as a requester, pays at most when
    a call names no maximum (None: no maximum)."""

    price_per_unit: PricePerUnit = 0  # 0: free
    max_price_per_unit: PricePerUnit | None = None
    # as a provider: settle a job on chain once its acknowledged, unsettled amount reaches
    # this (smallest units; also at the end of the job's last session here, and at start)
    settle_threshold: Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)] = 1_000_000


class _ClusterConfig(Section):
    """[cluster]: failure detection (scheduler.swim) and coordinator election
    (scheduler.election) in the clusters this node belongs to, and their runtime
    (daemon.cluster.runtime). The defaults declare a crashed member dead within 5 s in
    clusters of up to 100 members and replace a dead coordinator within 3 s (p99)."""

    # how often the registry's change counter is looked at (membership changes)
    watch_interval_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.25
    # one coordinator command's delivery to one member
    command_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0
    # a coordinator retries telling workers (who get no heartbeats) of itself this often
    announce_retry_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 1.0
    # clusters run at once; this node's further memberships are left out (counted)
    max_clusters: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16

    def problems(self) -> Iterator[Problem]:
        swim = self.values_for(SwimSettings)
        if swim["probe_timeout_s"] >= swim["probe_interval_s"]:
            why = f"must be below probe_interval_s ({swim['probe_interval_s']})"
            yield "probe_timeout_s", why, ("probe_interval_s",)
        keys = {name: key for part in self.exposed for key, name in part.keys.items()}
        try:
            ElectionSettings(**self.values_for(ElectionSettings))
        except ValueError as exc:  # its rules between keys (the lease below the timeouts)
            name, _, why = str(exc).partition(" ")
            others = tuple(k for f, k in keys.items() if f in why and k != keys.get(name))
            yield keys.get(name, name), why, others


ClusterConfig = exposing(
    _ClusterConfig,
    Exposed(
        SwimSettings,
        {
            k: k
            for k in (
                "probe_interval_s",
                "probe_timeout_s",
                "indirect_checks",
                "nack_ratio",
                "suspicion_mult",
                "suspicion_max_timeout_mult",
                "retransmit_mult",
                "gossip_interval_s",
                "gossip_nodes",
                "gossip_to_the_dead_s",
                "reconnect_interval_s",
                "max_piggyback",
                "awareness_max_multiplier",
                "max_relays",
                "pause_threshold_s",
            )
        },
    ),
    Exposed(
        ElectionSettings,
        {
            "heartbeat_s": "heartbeat_s",
            "election_timeout_min_s": "election_timeout_min_s",
            "election_timeout_max_s": "election_timeout_max_s",
            "lease_s": "lease_s",
            "step_down_s": "step_down_s",
            "max_clock_rate_error": "max_rate_error",
        },
    ),
    Exposed(
        PlacementWeights,
        {
            f"placement_{k}": k
            for k in (
                "memory",
                "throughput",
                "rtt",
                "energy",
                "carbon",
                "unknown_rtt_ms",
                "memory_fraction",
                "max_nodes_per_chain",
                "kv_reserve_tokens",
            )
        },
    ),
    Exposed(
        ScalingSettings,
        {
            f"scale_{k}": k
            for k in (
                "up_utilisation",
                "up_queue",
                "down_utilisation",
                "up_after_s",
                "down_after_s",
            )
        },
    ),
    Exposed(
        CoordinatorSettings,
        {
            k: k
            for k in (
                "reconcile_interval_s",
                "assign_timeout_s",
                "failed_cooldown_s",
                "forward_timeout_s",
                "adopt_timeout_s",
            )
        },
    ),
)
