"""Node configuration: defaults in code, a TOML file over them, command-line flags over both."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def _configs_dir() -> Path:
    """The profiles: daemon/configs in an installed wheel (pyproject.toml force-includes the
    repository's configs/ there), else configs/ of the source tree this module is in."""
    from importlib.resources import files

    shipped = files("daemon") / "configs"
    if shipped.is_dir():
        return Path(str(shipped))
    return Path(__file__).resolve().parent.parent / "configs"


REPO_CONFIGS = _configs_dir()
CONFIG_FILE = "config.toml"


class ConfigError(ValueError):
    pass


# A libp2p multiaddr this daemon can listen on or dial: /ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT.
TRANSPORT = re.compile(r"/(ip4|ip6|dns|dns4|dns6)/([^/]+)/tcp/(\d{1,5})")
# A base58btc peer id (Ed25519 ids start 12D3KooW, older RSA ids Qm).
_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{40,64}")
LISTEN_EXAMPLE = "/ip4/0.0.0.0/tcp/4001 (tcp/0 picks a free port)"
BOOTSTRAP_EXAMPLE = "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."


def _check_transport(addr: str) -> str | None:
    """Why `addr`'s /ip4|ip6|dns.../tcp/PORT part is wrong, or None (the rest unchecked)."""
    import ipaddress

    match = TRANSPORT.match(addr)
    if match is None:
        return "expected /ip4/ADDRESS/tcp/PORT (or /ip6/..., /dns/NAME/...)"
    proto, host, port = match.groups()
    if int(port) > 65535:
        return f"tcp port {port} is not a TCP port (0..65535)"
    try:
        if proto == "ip4":
            ipaddress.IPv4Address(host)
        elif proto == "ip6":
            ipaddress.IPv6Address(host)
    except ValueError:
        return f"{host[:40]!r} is not an {proto} address"
    return None


def listen_error(addr: str) -> str | None:
    """Why `addr` cannot be a listen multiaddr, or None."""
    problem = _check_transport(addr)
    if problem is None and not addr.startswith(("/ip4/", "/ip6/")):
        # py-libp2p listens on every interface for a /dns address: never what was meant
        problem = "listen on an address, /ip4/ADDRESS/... or /ip6/ADDRESS/... (not /dns)"
    elif problem is None and TRANSPORT.fullmatch(addr) is None:
        problem = "a listen address ends with /tcp/PORT"
    return problem and f"{addr[:80]!r} is not a listen multiaddr: {problem}"


def bootstrap_error(addr: str) -> str | None:
    """Why `addr` cannot be a bootstrap multiaddr (it must name the peer), or None."""
    problem = _check_transport(addr)
    if problem is None:
        rest = addr[TRANSPORT.match(addr).end() :]  # type: ignore[union-attr]
        if not rest.startswith("/p2p/"):
            problem = "it must end with /p2p/<peer id> of the node to join"
        elif not _PEER_ID.fullmatch(rest[5:]):
            problem = f"{rest[5:][:60]!r} is not a peer id (12D3KooW...)"
    return problem and f"{addr[:80]!r} is not a bootstrap multiaddr: {problem}"


@dataclass(frozen=True)
class P2PConfig:
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)
    bootstrap: tuple[str, ...] = ()
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0
    ping_interval_s: float = 10.0
    dht_timeout_s: float = 5.0
    # per-peer limits of the libp2p host (p2p.host.HostLimits; README "Limits and quotas")
    peer_streams_per_s: float = 200.0
    peer_stream_burst: int = 400
    peer_gossip_per_s: float = 200.0
    peer_gossip_burst: int = 400
    peer_gossip_bytes_per_s: int = 4194304
    max_gossip_bytes: int = 1048576
    hello_timeout_s: float = 5.0
    gossip_seen_ttl_s: int = 30
    max_connections_per_ip: int = 64


@dataclass(frozen=True)
class RPCConfig:
    port: int = 8645
    max_connections: int = 256  # beyond it, the slowest waiting connection is shed
    request_timeout_s: float = 10.0  # idle + head + body of one request, in total


@dataclass(frozen=True)
class ResourcesConfig:
    publish_interval_s: float = 30.0
    record_validity_s: float = 90.0
    max_clock_skew_s: float = 10.0


@dataclass(frozen=True)
class RegistryConfig:
    sync_interval_s: float = 1.0
    sync_timeout_s: float = 1.0
    tombstone_horizon_s: float = 604800.0
    gc_interval_s: float = 60.0
    # limits (README, Limits and quotas: Registry): one entry as it travels, and what one
    # author's entries may take in every replica (all kinds together)
    max_entry_bytes: int = 65536
    author_max_entries: int = 10000
    author_max_bytes: int = 4194304


@dataclass(frozen=True)
class ShardsConfig:
    allow_remote_deploy: bool = False
    torch_threads: int = 0
    cache_gib: float = 0.0
    device: str = "auto"
    local_sockets: bool = True
    # shard stream limits (README: Limits and quotas, Shard streams)
    stream_idle_s: float = 30.0
    max_streams_per_peer: int = 40
    max_local_connections: int = 256


@dataclass(frozen=True)
class GRPCConfig:
    enabled: bool = True
    port: int = 0  # a free port: several daemons on one host; daemon.json has the address


@dataclass(frozen=True)
class Config:
    network_id: str = "gridmesh-local"
    p2p: P2PConfig = field(default_factory=P2PConfig)
    rpc: RPCConfig = field(default_factory=RPCConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    grpc: GRPCConfig = field(default_factory=GRPCConfig)

    def validate(self) -> Config:
        if not self.network_id or len(self.network_id) > 64:
            raise ConfigError("network_id must be 1 to 64 characters")
        if not 0 <= self.rpc.port <= 65535:
            raise ConfigError(f"rpc.port {self.rpc.port} is not a TCP port")
        if not 1 <= self.rpc.max_connections <= 65536:
            raise ConfigError("rpc.max_connections must be 1 to 65536")
        if not 0 < self.rpc.request_timeout_s <= 3600:
            raise ConfigError("rpc.request_timeout_s must be above 0 and at most 3600")
        if not 0 <= self.grpc.port <= 65535:
            raise ConfigError(f"grpc.port {self.grpc.port} is not a TCP port")
        if not self.p2p.listen:
            raise ConfigError(f"p2p.listen is empty: give at least one, e.g. {LISTEN_EXAMPLE}")
        for index, addr in enumerate(self.p2p.listen):
            if problem := listen_error(addr):
                raise ConfigError(f"p2p.listen[{index}] {problem}; e.g. {LISTEN_EXAMPLE}")
        for index, addr in enumerate(self.p2p.bootstrap):
            if problem := bootstrap_error(addr):
                raise ConfigError(f"p2p.bootstrap[{index}] {problem}; e.g. {BOOTSTRAP_EXAMPLE}")
        p2p = self.p2p
        if min(p2p.peer_streams_per_s, p2p.peer_gossip_per_s, p2p.hello_timeout_s) <= 0:
            raise ConfigError("p2p peer rates and hello_timeout_s must be positive")
        if min(p2p.peer_stream_burst, p2p.peer_gossip_burst, p2p.gossip_seen_ttl_s) < 1:
            raise ConfigError("p2p bursts and gossip_seen_ttl_s must be at least 1")
        if p2p.max_connections_per_ip < 1:
            raise ConfigError("p2p.max_connections_per_ip must be at least 1")
        if not 1024 <= p2p.max_gossip_bytes <= p2p.peer_gossip_bytes_per_s:
            raise ConfigError(
                "p2p.max_gossip_bytes must be at least 1024 and at most peer_gossip_bytes_per_s"
            )
        res = self.resources
        if not 0 < res.publish_interval_s < res.record_validity_s:
            raise ConfigError(
                "resources.publish_interval_s must be positive and below record_validity_s"
            )
        if res.record_validity_s > 3600:
            raise ConfigError("resources.record_validity_s must be at most 3600")
        reg = self.registry
        if min(reg.sync_interval_s, reg.sync_timeout_s, reg.gc_interval_s) <= 0:
            raise ConfigError("registry intervals and timeouts must be positive")
        if reg.tombstone_horizon_s < 60:
            raise ConfigError("registry.tombstone_horizon_s must be at least 60")
        if not 1024 <= reg.max_entry_bytes <= 262144:
            raise ConfigError("registry.max_entry_bytes must be 1024 to 262144")
        if reg.author_max_entries < 1 or reg.author_max_bytes < reg.max_entry_bytes:
            raise ConfigError(
                "registry.author_max_entries must be >= 1 and author_max_bytes >= max_entry_bytes"
            )
        if not re.fullmatch(r"auto|cpu|cuda(:\d{1,2})?", self.shards.device):
            raise ConfigError(
                f"shards.device {self.shards.device[:20]!r}: use auto, cpu, cuda or cuda:N"
            )
        if self.shards.cache_gib < 0:
            raise ConfigError("shards.cache_gib must be >= 0 (0: half the free memory)")
        if not 20.0 <= self.shards.stream_idle_s <= 3600:
            # a server replaces its pooled push streams after 10 s idle: stay well above
            raise ConfigError("shards.stream_idle_s must be 20..3600")
        if not 1 <= self.shards.max_streams_per_peer <= 4096:
            raise ConfigError("shards.max_streams_per_peer must be 1..4096")
        if not 2 <= self.shards.max_local_connections <= 65536:
            raise ConfigError("shards.max_local_connections must be 2..65536")
        if self.p2p.reconnect_min_s <= 0 or self.p2p.reconnect_max_s < self.p2p.reconnect_min_s:
            raise ConfigError("p2p.reconnect_min_s must be > 0 and <= reconnect_max_s")
        return self


def _section(cls: type, raw: Any, name: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown key {name}.{key} (known: {', '.join(known)})")
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name}.{key} must be a list of strings")
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise ConfigError(f"{name}.{key} must be a {type(default).__name__}")
        values[key] = value
    return cls(**values)


def parse(raw: dict[str, Any]) -> Config:
    top = {"network_id", "p2p", "rpc", "resources", "registry", "shards", "grpc"}
    unknown = set(raw) - top
    if unknown:
        raise ConfigError(f"unknown top-level keys: {', '.join(sorted(unknown))}")
    network_id = raw.get("network_id", Config.network_id)
    if not isinstance(network_id, str):
        raise ConfigError("network_id must be a string")
    return Config(
        network_id=network_id,
        p2p=_section(P2PConfig, raw.get("p2p"), "p2p"),
        rpc=_section(RPCConfig, raw.get("rpc"), "rpc"),
        resources=_section(ResourcesConfig, raw.get("resources"), "resources"),
        registry=_section(RegistryConfig, raw.get("registry"), "registry"),
        shards=_section(ShardsConfig, raw.get("shards"), "shards"),
        grpc=_section(GRPCConfig, raw.get("grpc"), "grpc"),
    ).validate()


def load(path: Path) -> Config:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, not text
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot read config file {path}: {reason}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        return parse(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def with_overrides(
    config: Config,
    *,
    listen: list[str] | None = None,
    bootstrap: list[str] | None = None,
    rpc_port: int | None = None,
    grpc_port: int | None = None,
) -> Config:
    """`config` with command-line flags applied; errors name the flag."""
    for addr in listen or ():
        if problem := listen_error(addr):
            raise ConfigError(f"--listen {problem}; e.g. {LISTEN_EXAMPLE}")
    for addr in bootstrap or ():
        if problem := bootstrap_error(addr):
            raise ConfigError(f"--bootstrap {problem}; e.g. {BOOTSTRAP_EXAMPLE}")
    for flag, port in (("--rpc-port", rpc_port), ("--grpc-port", grpc_port)):
        if port is not None and not 0 <= port <= 65535:
            raise ConfigError(f"{flag} {port} is not a TCP port (0..65535; 0 picks a free one)")
    p2p = config.p2p
    if listen:
        p2p = replace(p2p, listen=tuple(listen))
    if bootstrap:
        p2p = replace(p2p, bootstrap=tuple(bootstrap))
    rpc = config.rpc if rpc_port is None else replace(config.rpc, port=rpc_port)
    grpc = config.grpc if grpc_port is None else replace(config.grpc, port=grpc_port)
    return replace(config, p2p=p2p, rpc=rpc, grpc=grpc).validate()


def default_home() -> Path:
    return Path(os.environ.get("GRIDMESH_HOME") or Path.home() / ".gridmesh")


def template_text() -> str:
    """The text `gridmesh init` writes to HOME/config.toml."""
    return (REPO_CONFIGS / "node.toml").read_text()
