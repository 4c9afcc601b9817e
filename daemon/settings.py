"""The node's settings: one typed tree, loaded from its defaults, a TOML file, the environment
and command-line flags (each over the one before), checked at load; an error names the source
(file, variable or flag), the key and why: `node.toml: p2p.peer_streams_per_s must be > 0.0
(got 0)`, `GRIDMESH_P2P__LISTEN: p2p.listen[0] 'foo' is not a listen multiaddr: ...`, `--rpc-port
70000 is not a TCP port (...)`.

Each setting is declared once. The daemon's own keys are declared here. A key that a lower
layer uses is declared by that layer's settings type, with its type, bounds (`msgspec.Meta`)
and default: p2p.discovery.DiscoverySettings, p2p.limits.HostLimits,
registry.replication.ReplicationSettings, registry.replica.Limits. A section *exposes* such
fields under their config keys (`Exposed`), and `Config.discovery()`, `host_limits()`,
`replication()` and `registry_limits()` build each service's settings from the tree.

Environment: `GRIDMESH_<SECTION>__<KEY>` sets `[section] key` (`GRIDMESH_P2P__LISTEN`,
`GRIDMESH_RPC__PORT`), `GRIDMESH_NETWORK_ID` the top-level key. A list is comma-separated, or
a TOML array (`["/ip4/127.0.0.1/tcp/0"]`); numbers and true/false are read as the key's type.
Other `GRIDMESH_` variables without a double underscore (`GRIDMESH_HOME`) are not settings;
one with a double underscore that names no key is refused.
"""

from __future__ import annotations

import re
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec

from daemon.errors import ConfigInvalid
from daemon.relay_config import RelayConfig
from daemon.sandbox.config import SandboxConfig
from daemon.sections import (
    ChainConfig,
    ClusterConfig,
    GRPCConfig,
    MarketConfig,
    P2PConfig,
    Problem,
    RegistryConfig,
    ResourcesConfig,
    RPCConfig,
    Section,
    ShardsConfig,
)
from daemon.serving.settings import ServingConfig
from daemon.verify.config import VerifySection
from p2p.discovery import DiscoverySettings
from p2p.limits import HostLimits
from p2p.network import NETWORK_ID_PATTERN
from registry.replica import Limits
from registry.replication import ReplicationSettings
from scheduler.election import ElectionSettings
from scheduler.swim_state import SwimSettings


class ConfigError(ConfigInvalid, ValueError):
    """A setting that cannot be used; the message names its source, its key and why."""


ENV_PREFIX = "GRIDMESH_"
NETWORK_NAME = r"^[a-z0-9][a-z0-9-]{0,31}$"
NETWORK_DOC = "a network name (1..32 lowercase letters, digits and '-', e.g. devnet, testnet)"
NETWORK_ID_DOC = "a network id (1..64 letters, digits, '.', '_' and '-'; empty: gridmesh-NAME)"

# -- the tree -----------------------------------------------------------------------------

SECTIONS = ("p2p", "rpc", "resources", "registry", "shards", "grpc", "chain", "market", "cluster")
SECTIONS += ("serving", "sandbox", "verify")
SECTIONS += ("relay",)


class Config(Section):
    """The whole tree; `discovery()` and its siblings are what each service is given."""

    # the gridmesh network this node is on (configs/NAME.toml is its profile: `gridmesh init
    # --network NAME`), and its id, part of every protocol id, gossip topic and DHT key (so
    # nodes of two networks never exchange records); an empty id is gridmesh-NAME
    network: Annotated[str, msgspec.Meta(pattern=NETWORK_NAME, description=NETWORK_DOC)] = "local"
    network_id: Annotated[
        str, msgspec.Meta(pattern=f"{NETWORK_ID_PATTERN}|^$", description=NETWORK_ID_DOC)
    ] = ""
    p2p: P2PConfig = P2PConfig()
    rpc: RPCConfig = RPCConfig()
    resources: ResourcesConfig = ResourcesConfig()
    registry: RegistryConfig = RegistryConfig()
    shards: ShardsConfig = ShardsConfig()
    grpc: GRPCConfig = GRPCConfig()
    chain: ChainConfig = ChainConfig()
    market: MarketConfig = MarketConfig()
    cluster: ClusterConfig = ClusterConfig()
    serving: ServingConfig = ServingConfig()
    sandbox: SandboxConfig = SandboxConfig()
    verify: VerifySection = VerifySection()
    relay: RelayConfig = RelayConfig()

    def __post_init__(self) -> None:
        if not self.network_id:
            msgspec.structs.force_setattr(self, "network_id", f"gridmesh-{self.network}")

    def problems(self) -> Iterator[Problem]:
        for name in SECTIONS:
            for key, why, others in getattr(self, name).problems():
                yield f"{name}.{key}", why, tuple(f"{name}.{other}" for other in others)

    def discovery(self) -> DiscoverySettings:
        return DiscoverySettings(
            network_id=self.network_id,
            **self.p2p.values_for(DiscoverySettings),
            **self.resources.values_for(DiscoverySettings),
        )

    def host_limits(self) -> HostLimits:
        limits = self.p2p.values_for(HostLimits)
        # a burst of two seconds' worth of gossip bytes
        return HostLimits(**limits, gossip_bytes_burst=2 * limits["gossip_bytes_per_s"])

    def replication(self) -> ReplicationSettings:
        return ReplicationSettings(
            network_id=self.network_id, **self.registry.values_for(ReplicationSettings)
        )

    def registry_limits(self) -> Limits:
        return Limits(**self.registry.values_for(Limits))

    def swim(self) -> SwimSettings:
        return SwimSettings(**self.cluster.values_for(SwimSettings))

    def election(self) -> ElectionSettings:
        return ElectionSettings(**self.cluster.values_for(ElectionSettings))


# -- loading ------------------------------------------------------------------------------

# command-line flag -> the key it sets
FLAGS: dict[str, tuple[str, str]] = {
    "--listen": ("p2p", "listen"),
    "--bootstrap": ("p2p", "bootstrap"),
    "--rpc-port": ("rpc", "port"),
    "--grpc-port": ("grpc", "port"),
}


class Layers:
    """Raw settings, each layer over the ones before, remembering where each key came from."""

    def __init__(self) -> None:
        self.raw: dict[str, Any] = {}
        self.sources: dict[tuple[str, ...], str] = {}

    def set(self, path: tuple[str, ...], value: Any, source: str) -> None:
        if len(path) == 1:
            self.raw[path[0]] = value
        else:
            section = self.raw.setdefault(path[0], {})
            if not isinstance(section, dict):
                raise ConfigError(_say(self.sources.get(path[:1], ""), path[0], "must be a table"))
            section[path[1]] = value
            self.sources.setdefault(path[:1], source)
        self.sources[path] = source

    def add_table(self, raw: Mapping[str, Any], source: str) -> None:
        """Every key of a parsed TOML document (or a dict in its shape)."""
        for key, value in raw.items():
            if isinstance(value, dict) and isinstance(self.raw.get(key, {}), dict):
                self.raw.setdefault(key, {})
                self.sources[(key,)] = source
                for inner, item in value.items():
                    self.set((key, inner), item, source)
            else:
                self.set((key,), value, source)

    def add_env(self, env: Mapping[str, str]) -> None:
        """The settings among environment variables (the module docstring has the scheme)."""
        for name in sorted(env):
            if not name.startswith(ENV_PREFIX):
                continue
            rest = name[len(ENV_PREFIX) :].lower()
            if "__" in rest:
                section, _, key = rest.partition("__")
                path: tuple[str, ...] = (section, key)
            elif rest in Config.__struct_fields__ and rest not in SECTIONS:
                path = (rest,)
            else:
                continue  # GRIDMESH_HOME and other variables that are not settings
            self.set(path, _from_text(env[name], _field_type(path), name), name)

    def source(self, path: tuple[str, ...]) -> str:
        """Where the key at `path` (or the table holding it) came from; "" for a default."""
        for end in range(len(path), 0, -1):
            if path[:end] in self.sources:
                return self.sources[path[:end]]
        return ""

    def build(self) -> Config:
        try:
            config = msgspec.convert(self.raw, Config)
        except msgspec.ValidationError as exc:
            raise ConfigError(self._explain(str(exc))) from None
        for key, why, others in config.problems():
            # the source of a key the rule involves that was set, else of its table
            paths = [_path(k) for k in (key, *others)]
            given = [self.sources[path] for path in paths if path in self.sources]
            raise ConfigError(_say(given[0] if given else self.source(paths[0]), key, why))
        return config

    def _explain(self, text: str) -> str:
        """msgspec's ValidationError text as `source: key: why`."""
        what, _, where = text.partition(" - at `$")
        steps: list[str | int] = [
            name or int(index) for name, index in re.findall(r"\.([^.\[`]+)|\[(\d+)\]", where)
        ]
        names = tuple(s for s in steps if isinstance(s, str))
        key = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")
        unknown = re.fullmatch(r"Object contains unknown field `(.+)`", what)
        if unknown:
            names += (unknown.group(1),)
            known = ", ".join(_element(_struct_of(names[:-1])).__struct_fields__)
            where_ = "top-level key" if len(names) == 1 else "key"
            text = f"unknown {where_} {'.'.join(names)} (known: {known})"
            return _say(self.source(names), text, "")
        value = _lookup(self.raw, steps)
        got = f" (got {value!r})" if value is not _MISSING else ""
        if kinds := re.fullmatch(r"Expected `([\w |]+)`, got `(\w+)`", what):
            arms = kinds[1].split(" | ")  # an optional key: "int | null"
            expected = " or ".join("unset" if k == "null" else _NOUNS.get(k, k) for k in arms)
            if typing.get_args(_field_type(names)) == (str, ...):
                expected = "a list of strings"
            why = f"must be {expected}, not {_NOUNS.get(kinds[2], kinds[2])}{got}"
        elif bound := re.fullmatch(r"Expected `\w+` (.+)", what):
            what_it_is = _description(_field_type(names))
            why = f"{value!r} is not {what_it_is}" if what_it_is else f"must be {bound[1]}{got}"
        else:
            why = what
        return _say(self.source(names), key, why)


_NOUNS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "array": "a list",
    "object": "a table",
    "null": "empty",
}
_MISSING = object()


def _say(source: str, key: str, why: str) -> str:
    """`source: key why`; a flag stands for its key: `--rpc-port 70000 is not a TCP port`."""
    if source.startswith("--"):
        return f"{source} {why}"
    text = f"{key} {why}".rstrip()
    return f"{source}: {text}" if source else text


def _path(key: str) -> tuple[str, ...]:
    """("p2p", "listen") of "p2p.listen[0]"."""
    return tuple(re.sub(r"\[\d+\]", "", key).split("."))


def _lookup(raw: Any, steps: list[str | int]) -> Any:
    for step in steps:
        try:
            raw = raw[step]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return raw


def _struct_of(names: tuple[str, ...]) -> type:
    kind: Any = Config
    for name in names:
        kind = typing.get_type_hints(_element(kind), include_extras=True)[name]
    return kind


def _element(kind: Any) -> Any:
    """The struct inside an annotated, optional or container type (`tuple[ApiKey, ...] |
    None` -> ApiKey): what the keys of a table in a list of tables belong to."""
    while True:
        if typing.get_origin(kind) is Annotated:
            kind = kind.__origin__
        elif args := [a for a in typing.get_args(kind) if a not in (type(None), Ellipsis)]:
            kind = args[-1]  # a union's struct arm, a list's or a dict's value
        else:
            return kind


def _field_type(names: tuple[str, ...]) -> Any:
    """The annotated type of the key at `names`, or None where there is no such key."""
    try:
        return _struct_of(names)
    except (KeyError, AttributeError, TypeError):
        return None


def _description(kind: Any) -> str:
    metas = getattr(kind, "__metadata__", ())
    return next((m.description for m in metas if isinstance(m, msgspec.Meta) and m.description), "")


def _from_text(text: str, kind: Any, name: str) -> Any:
    """An environment variable's text as a value of the key's type (the check comes later);
    for an optional key, an empty text is None (unset)."""
    base = kind.__origin__ if typing.get_origin(kind) is Annotated else kind
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        arms = [arm for arm in typing.get_args(base) if arm is not type(None)]
        if len(arms) == 1 < len(typing.get_args(base)):
            return None if not text.strip() else _from_text(text, arms[0], name)
    if typing.get_origin(base) in (tuple, list):
        if text.lstrip().startswith("["):
            try:
                return tomllib.loads(f"value = {text}")["value"]
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{name}: not a TOML array: {exc}") from None
        return [part.strip() for part in text.split(",") if part.strip()]
    if base in (int, float, bool):
        try:
            return msgspec.convert(text.strip(), base, strict=False)
        except msgspec.ValidationError:
            return text  # refused with the key's expected type when the tree is built
    return text


def parse(raw: Mapping[str, Any], source: str = "") -> Config:
    """A config from a parsed TOML document (or a dict in its shape)."""
    layers = Layers()
    layers.add_table(raw, source)
    return layers.build()


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, not text
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot read config file {path}: {reason}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load(path: Path) -> Config:
    """The config in the TOML file at `path` (over the defaults)."""
    return parse(_read(path), str(path))


def resolve(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults, then the file at `path`, then `env`'s GRIDMESH_ settings, then `flags`
    (flag name -> value; None or an empty list: not given)."""
    layers = Layers()
    if path is not None:
        layers.add_table(_read(path), str(path))
    layers.add_env(env or {})
    _add_flags(layers, flags or {})
    return layers.build()


def with_overrides(
    config: Config,
    *,
    listen: list[str] | None = None,
    bootstrap: list[str] | None = None,
    rpc_port: int | None = None,
    grpc_port: int | None = None,
) -> Config:
    """`config` with command-line flags applied; errors name the flag."""
    layers = Layers()
    layers.add_table(msgspec.to_builtins(config), "")
    flags = {"--listen": listen, "--bootstrap": bootstrap, "--rpc-port": rpc_port}
    _add_flags(layers, {**flags, "--grpc-port": grpc_port})
    return layers.build()


def _add_flags(layers: Layers, flags: Mapping[str, Any]) -> None:
    for flag, value in flags.items():
        if value is None or value == []:
            continue
        layers.set(FLAGS[flag], list(value) if isinstance(value, tuple) else value, flag)
