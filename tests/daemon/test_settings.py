"""The settings tree (daemon.settings): file, environment and flags, each over the one before;
every mistake names its key and where it came from; each setting is declared once."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from daemon import sections, settings
from daemon.cli.main import app
from daemon.settings import Config, ConfigError, resolve
from p2p.discovery import DiscoverySettings
from p2p.limits import HostLimits
from registry.replica import Limits
from registry.replication import ReplicationSettings

NODE_TOML = Path(settings.__file__).resolve().parents[1] / "configs" / "node.toml"
PEER = "12D3KooWQQk2YcdHSkqWYZWhefsfH7ci8PACnWaNTJFtmssExvqk"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.toml"
    path.write_text(text)
    return path


def refused(*, path: Path | None = None, env=None, flags=None) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(path, env=env, flags=flags)
    return str(info.value)


# -- every mistake names the key and the source --------------------------------------------


def env(name: str, value: str) -> tuple[None, dict[str, str], None]:
    return None, {f"GRIDMESH_{name}": value}, None


def file(text: str) -> tuple[str, None, None]:
    return text, None, None


def flag(name: str, value: object) -> tuple[None, None, dict[str, object]]:
    return None, None, {name: value}


MISTAKES = [
    # wrong type
    (file("[rpc]\nport = 'x'\n"), "{file}: rpc.port must be an integer, not a string"),
    (env("RPC__PORT", "x"), "GRIDMESH_RPC__PORT: rpc.port must be an integer, not a string"),
    (file("[p2p]\npeer_stream_burst = 1.5\n"), "{file}: p2p.peer_stream_burst must be an int"),
    (file("[shards]\nlocal_sockets = 1\n"), "{file}: shards.local_sockets must be true or false"),
    (env("SHARDS__LOCAL_SOCKETS", "yes"), "GRIDMESH_SHARDS__LOCAL_SOCKETS: shards.local_sockets"),
    # out of range
    (file("[p2p]\npeer_streams_per_s = 0\n"), "{file}: p2p.peer_streams_per_s must be > 0"),
    (env("P2P__PEER_GOSSIP_BURST", "0"), "GRIDMESH_P2P__PEER_GOSSIP_BURST: p2p.peer_gossip_burst"),
    (file("[registry]\nmax_entry_bytes = 10\n"), "{file}: registry.max_entry_bytes must be >="),
    (env("RESOURCES__RECORD_VALIDITY_S", "7200"), "GRIDMESH_RESOURCES__RECORD_VALIDITY_S: reso"),
    (flag("--rpc-port", 70000), "--rpc-port 70000 is not a TCP port"),
    (env("GRPC__PORT", "-1"), "GRIDMESH_GRPC__PORT: grpc.port -1 is not a TCP port"),
    # rules between keys name the key that was set
    (file("[p2p]\nreconnect_min_s = 60.0\n"), "{file}: p2p.reconnect_min_s must be at most"),
    (env("REGISTRY__AUTHOR_MAX_BYTES", "2048"), "GRIDMESH_REGISTRY__AUTHOR_MAX_BYTES: registry"),
    # unknown keys
    (file("[p2p]\npeer_stream_per_s = 1\n"), "{file}: unknown key p2p.peer_stream_per_s"),
    (file("[rcp]\nport = 1\n"), "{file}: unknown top-level key rcp"),
    (env("RPC__PROT", "1"), "GRIDMESH_RPC__PROT: unknown key rpc.prot"),
    # bad multiaddrs, in the file, the environment and flags
    (file("[p2p]\nlisten = ['foo']\n"), "{file}: p2p.listen[0] 'foo' is not a listen multiaddr"),
    (file("[p2p]\nbootstrap = ['x']\n"), "{file}: p2p.bootstrap[0] 'x' is not a bootstrap"),
    (env("P2P__LISTEN", "foo"), "GRIDMESH_P2P__LISTEN: p2p.listen[0] 'foo' is not a listen"),
    (env("P2P__BOOTSTRAP", "garbage"), "GRIDMESH_P2P__BOOTSTRAP: p2p.bootstrap[0] 'garbage'"),
    (flag("--listen", ["foo"]), "--listen 'foo' is not a listen multiaddr"),
    (flag("--bootstrap", ["garbage"]), "--bootstrap 'garbage' is not a bootstrap multiaddr"),
    # the chain and prices
    (file("[chain]\nnetwork = 'mainnet'\n"), "{file}: chain.network 'mainnet' is not a network"),
    (env("CHAIN__NETWORK", "Anvil"), "GRIDMESH_CHAIN__NETWORK: chain.network 'Anvil' is not a"),
    (file("[chain]\nrpc_url = 'ftp://x'\n"), "{file}: chain.rpc_url 'ftp://x' is not an RPC URL"),
    (env("CHAIN__RPC_URL", "http://"), "GRIDMESH_CHAIN__RPC_URL: chain.rpc_url 'http://' is not"),
    (file("[market]\nprice_per_unit = -1\n"), "{file}: market.price_per_unit must be >= 0"),
    (file("[market]\nprice_per_unit = 1.5\n"), "{file}: market.price_per_unit must be an int"),
    (env("MARKET__PRICE_PER_UNIT", "x"), "GRIDMESH_MARKET__PRICE_PER_UNIT: market.price_per_unit"),
    (env("MARKET__PRICE_PER_UNIT", str(2**63)), "GRIDMESH_MARKET__PRICE_PER_UNIT: market.price"),
    (file("[market]\nmax_price_per_unit = -2\n"), "{file}: market.max_price_per_unit must be >="),
    (
        env("MARKET__MAX_PRICE_PER_UNIT", "ten"),
        "GRIDMESH_MARKET__MAX_PRICE_PER_UNIT: market.max_price_per_unit must be an integer or "
        "unset, not a string",
    ),
    (file("[market]\nmax_price = 1\n"), "{file}: unknown key market.max_price"),
    # a key of a table in a list of tables
    (
        file("[[serving.api_keys]]\nnme = 'x'\nkey = 'a-key-of-twenty-chars-and-more'\n"),
        "{file}: unknown key serving.api_keys.nme (known: name, ",
    ),
]


@pytest.mark.parametrize(("given", "expected"), MISTAKES)
def test_a_mistake_names_its_source_and_key(tmp_path, given, expected):
    toml, variables, flags = given
    path = write(tmp_path, toml) if toml is not None else None
    message = refused(path=path, env=variables, flags=flags)
    assert message.startswith(expected.format(file=path)), message


def test_the_source_named_is_the_layer_that_set_the_bad_value(tmp_path):
    path = write(tmp_path, "[rpc]\nport = 1234\n[p2p]\nlisten = ['/ip4/127.0.0.1/tcp/0']\n")
    # the file is fine; the variable over it is not, and the flag over that is fine again
    bad_env = {"GRIDMESH_P2P__LISTEN": "nope"}
    assert refused(path=path, env=bad_env).startswith("GRIDMESH_P2P__LISTEN: p2p.listen[0]")
    fixed = resolve(path, env=bad_env, flags={"--listen": ["/ip4/127.0.0.1/tcp/5"]})
    assert fixed.p2p.listen == ("/ip4/127.0.0.1/tcp/5",)
    # a rule between two keys names the one a layer set, not the default
    env = {"GRIDMESH_P2P__PEER_GOSSIP_BYTES_PER_S": "2048"}
    message = refused(path=path, env=env)
    assert message.startswith("GRIDMESH_P2P__PEER_GOSSIP_BYTES_PER_S: p2p.max_gossip_bytes must")


def test_a_file_section_that_is_not_a_table(tmp_path):
    path = write(tmp_path, "p2p = 3\n")
    assert refused(path=path).startswith(f"{path}: p2p must be a table")
    message = refused(path=path, env={"GRIDMESH_P2P__LISTEN": "/ip4/127.0.0.1/tcp/0"})
    assert message.startswith(f"{path}: p2p must be a table")


# -- layers --------------------------------------------------------------------------------


def test_environment_overrides_the_file_and_flags_override_the_environment(tmp_path):
    path = write(tmp_path, "network_id = 'file'\n[rpc]\nport = 1111\n[grpc]\nport = 1112\n")
    assert resolve(path).rpc.port == 1111
    env = {"GRIDMESH_RPC__PORT": "2222", "GRIDMESH_GRPC__PORT": "2223"}
    env["GRIDMESH_NETWORK_ID"] = "env"
    from_env = resolve(path, env=env)
    assert (from_env.network_id, from_env.rpc.port, from_env.grpc.port) == ("env", 2222, 2223)
    flagged = resolve(path, env=env, flags={"--rpc-port": 0, "--grpc-port": None})
    assert (flagged.rpc.port, flagged.grpc.port) == (0, 2223)
    # keys no layer sets keep the defaults
    assert flagged.registry == Config().registry


def test_environment_values_are_read_as_their_keys_types():
    two = "/ip4/127.0.0.1/tcp/0, /ip4/127.0.0.1/tcp/7"
    env = {
        "GRIDMESH_P2P__LISTEN": two,
        "GRIDMESH_P2P__BOOTSTRAP": f'["/ip4/203.0.113.7/tcp/4001/p2p/{PEER}"]',
        "GRIDMESH_P2P__PEER_STREAMS_PER_S": "50",
        "GRIDMESH_SHARDS__LOCAL_SOCKETS": "false",
        "GRIDMESH_SHARDS__DEVICE": "cuda:1",
        "GRIDMESH_REGISTRY__SYNC_TIMEOUT_S": "2.5",
    }
    cfg = resolve(env=env)
    assert cfg.p2p.listen == ("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/7")
    assert cfg.p2p.bootstrap == (f"/ip4/203.0.113.7/tcp/4001/p2p/{PEER}",)
    assert cfg.p2p.peer_streams_per_s == 50.0
    assert cfg.shards.local_sockets is False and cfg.shards.device == "cuda:1"
    assert cfg.replication().sync_timeout_s == 2.5
    assert resolve(env={"GRIDMESH_P2P__BOOTSTRAP": ""}).p2p.bootstrap == ()
    with pytest.raises(ConfigError, match="GRIDMESH_P2P__LISTEN: not a TOML array"):
        resolve(env={"GRIDMESH_P2P__LISTEN": "[unclosed"})


def test_the_chain_and_prices_take_their_layers_and_types(tmp_path):
    assert (Config().chain.network, Config().chain.rpc_url) == ("devnet", "")
    assert (Config().market.price_per_unit, Config().market.max_price_per_unit) == (0, None)
    path = write(tmp_path, "[chain]\nnetwork = 'anvil'\n[market]\nprice_per_unit = 7\n")
    cfg = resolve(path)
    assert (cfg.chain.network, cfg.market.price_per_unit) == ("anvil", 7)
    env = {
        "GRIDMESH_CHAIN__NETWORK": "base-sepolia",
        "GRIDMESH_CHAIN__RPC_URL": "https://sepolia.base.org",
        "GRIDMESH_MARKET__PRICE_PER_UNIT": "9",
        "GRIDMESH_MARKET__MAX_PRICE_PER_UNIT": "12",
    }
    cfg = resolve(path, env=env)
    assert (cfg.chain.network, cfg.chain.rpc_url) == ("base-sepolia", "https://sepolia.base.org")
    assert (cfg.market.price_per_unit, cfg.market.max_price_per_unit) == (9, 12)
    # an empty variable unsets an optional key that the file set
    path = write(tmp_path, "[market]\nmax_price_per_unit = 5\n")
    assert resolve(path).market.max_price_per_unit == 5
    unset = {"GRIDMESH_MARKET__MAX_PRICE_PER_UNIT": ""}
    assert resolve(path, env=unset).market.max_price_per_unit is None
    # every network the chain client names is accepted (base-sepolia without an RPC URL
    # too: a command's --rpc-url may give it, and the chain client refuses it without one);
    # prices up to an int64
    for network in sections.CHAIN_NETWORKS:
        assert settings.parse({"chain": {"network": network}}).chain.network == network
    assert settings.parse({"market": {"price_per_unit": 2**63 - 1}}).market.price_per_unit


def test_settings_names_the_networks_the_chain_client_defines():
    """The literal list here is CHAIN's contracts/chain/networks.py (once it exists)."""
    networks = pytest.importorskip("contracts.chain.networks")
    names = getattr(networks, "NETWORKS", None)
    if names is None:
        pytest.skip("contracts.chain.networks has no NETWORKS table yet")
    assert set(sections.CHAIN_NETWORKS) == set(names)


def test_other_gridmesh_variables_are_not_settings():
    env = {"GRIDMESH_HOME": "/somewhere", "GRIDMESH_HYPOTHESIS": "explore", "PATH": "/bin"}
    assert resolve(env=env) == Config()


def test_with_overrides_applies_flags_to_a_loaded_config():
    base = resolve(env={"GRIDMESH_RPC__PORT": "1234"})
    cfg = settings.with_overrides(base, listen=["/ip4/127.0.0.1/tcp/0"], grpc_port=9)
    assert (cfg.p2p.listen, cfg.rpc.port, cfg.grpc.port) == (("/ip4/127.0.0.1/tcp/0",), 1234, 9)
    with pytest.raises(ConfigError, match="^--grpc-port 70000 is not a TCP port"):
        settings.with_overrides(base, grpc_port=70000)


# -- the documented keys -------------------------------------------------------------------


def _commented_keys(text: str) -> set[tuple[str, str]]:
    """(section, key) of each `# key = value` example line under a `[section]` header."""
    found, section = set(), ""
    for line in text.splitlines():
        if header := re.fullmatch(r"\[(\w+)\]", line.strip()):
            section = header[1]
        elif example := re.fullmatch(r"# (\w+) = \S.*", line.strip()):
            found.add((section, example[1]))
    return found


def test_every_key_documented_in_node_toml_parses_and_is_its_default():
    documented = tomllib.loads(NODE_TOML.read_text())
    assert settings.load(NODE_TOML) == Config()
    defaults = Config()
    # the file documents every key of the tree, and no other; TOML has no null, so a key
    # that is unset by default is documented as a commented example (`# key = value`)
    assert set(documented) == set(Config.__struct_fields__)
    examples = _commented_keys(NODE_TOML.read_text())
    for name, value in documented.items():
        if not isinstance(value, dict):
            assert settings.parse({name: value}) == defaults
            continue
        fields = set(getattr(defaults, name).__struct_fields__)
        unset = {key for key in fields if getattr(getattr(defaults, name), key) is None}
        assert set(value) == fields - unset, name
        assert {(name, key) for key in unset} <= examples, name
        for key, item in value.items():  # each alone parses, to its default
            section = getattr(settings.parse({name: {key: item}}, "node.toml"), name)
            assert getattr(section, key) == getattr(getattr(defaults, name), key), (name, key)


# -- each setting declared once ------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "settings_type", "field"),
    [
        ("p2p", "dht_timeout_s", DiscoverySettings, "dht_timeout_s"),
        ("resources", "record_validity_s", DiscoverySettings, "record_validity_s"),
        ("resources", "publish_interval_s", DiscoverySettings, "publish_interval_s"),
        ("resources", "max_clock_skew_s", DiscoverySettings, "max_clock_skew_s"),
        ("registry", "sync_interval_s", ReplicationSettings, "sync_interval_s"),
        ("registry", "tombstone_horizon_s", ReplicationSettings, "tombstone_horizon_s"),
        ("registry", "gc_interval_s", ReplicationSettings, "gc_interval_s"),
        ("registry", "max_entry_bytes", Limits, "max_entry_bytes"),
        ("registry", "author_max_entries", Limits, "author_max_entries"),
        ("registry", "author_max_bytes", Limits, "author_max_bytes"),
        ("p2p", "peer_streams_per_s", HostLimits, "streams_per_s"),
        ("p2p", "peer_stream_burst", HostLimits, "stream_burst"),
        ("p2p", "peer_gossip_per_s", HostLimits, "gossip_per_s"),
        ("p2p", "peer_gossip_burst", HostLimits, "gossip_burst"),
        ("p2p", "peer_gossip_bytes_per_s", HostLimits, "gossip_bytes_per_s"),
        ("p2p", "max_gossip_bytes", HostLimits, "max_gossip_bytes"),
        ("p2p", "hello_timeout_s", HostLimits, "hello_timeout_s"),
        ("p2p", "gossip_seen_ttl_s", HostLimits, "seen_ttl_s"),
        ("p2p", "max_connections_per_ip", HostLimits, "max_connections_per_ip"),
        ("p2p", "ban_strikes", HostLimits, "ban_strikes"),
        ("p2p", "ban_window_s", HostLimits, "ban_window_s"),
        ("p2p", "ban_s", HostLimits, "ban_s"),
    ],
)
def test_a_lower_layers_key_takes_its_type_and_bounds_from_that_layer(
    section, key, settings_type, field
):
    section_type = typing.get_type_hints(Config)[section]
    declared = typing.get_type_hints(settings_type, include_extras=True)[field]
    assert typing.get_type_hints(section_type, include_extras=True)[key] == declared
    assert typing.get_origin(declared) is typing.Annotated  # it has bounds
    defaults = {f.name: f.default for f in dataclasses.fields(settings_type)}
    assert getattr(section_type(), key) == defaults[field]


def test_the_services_settings_are_built_from_the_tree():
    env = {
        "GRIDMESH_NETWORK_ID": "netx",
        "GRIDMESH_P2P__DHT_TIMEOUT_S": "3",
        "GRIDMESH_P2P__PEER_GOSSIP_BYTES_PER_S": "2097152",
        "GRIDMESH_P2P__GOSSIP_SEEN_TTL_S": "45",
        "GRIDMESH_RESOURCES__RECORD_VALIDITY_S": "120",
        "GRIDMESH_REGISTRY__GC_INTERVAL_S": "5",
        "GRIDMESH_REGISTRY__AUTHOR_MAX_ENTRIES": "7",
    }
    cfg = resolve(env=env)
    assert cfg.discovery() == DiscoverySettings(
        network_id="netx", dht_timeout_s=3.0, record_validity_s=120.0
    )
    assert cfg.host_limits() == HostLimits(
        gossip_bytes_per_s=2097152, gossip_bytes_burst=2 * 2097152, seen_ttl_s=45
    )
    assert cfg.replication() == ReplicationSettings(
        network_id="netx", sync_timeout_s=1.0, gc_interval_s=5.0
    )
    assert cfg.registry_limits() == Limits(author_max_entries=7)
    # the defaults are the services' own defaults, but for the daemon's sync timeout
    default = Config()
    assert default.host_limits() == HostLimits()
    assert default.registry_limits() == Limits()
    assert default.discovery() == DiscoverySettings(network_id="gridmesh-local")


# -- the CLI -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--listen", "foo"], {}, "gridmesh: --listen 'foo' is not a listen multiaddr"),
        (["--bootstrap", "garbage"], {}, "gridmesh: --bootstrap 'garbage' is not a bootstrap"),
        ([], {"GRIDMESH_P2P__LISTEN": "foo"}, "gridmesh: GRIDMESH_P2P__LISTEN: p2p.listen[0]"),
        ([], {"GRIDMESH_RPC__PORTT": "1"}, "gridmesh: GRIDMESH_RPC__PORTT: unknown key rpc.portt"),
    ],
)
def test_the_daemon_command_refuses_in_one_line(tmp_path, args, env, needle):
    home = ["--home", str(tmp_path / "h")]
    result = CliRunner().invoke(app, ["daemon", *home, *args], env=env)
    assert result.exit_code == 1, result.output
    assert result.output.strip().startswith(needle), result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "h" / "daemon.json").exists()


def test_the_config_module_stays_light():
    """`daemon.config` is what every CLI command imports: the tree (and trio) only on use."""
    code = (
        "import sys\n"
        "from daemon import config\n"
        "config.default_home()\n"
        "assert 'trio' not in sys.modules and 'daemon.settings' not in sys.modules\n"
        "assert config.Config is __import__('daemon.settings').settings.Config\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_config_error_is_a_gridmesh_error_of_the_config_kind():
    """Config mistakes map through the one error table like every other failure."""
    from daemon import errors
    from daemon.settings import ConfigError

    error = ConfigError("x.toml: p2p.listen is empty")
    assert isinstance(error, errors.ConfigInvalid) and isinstance(error, ValueError)
    assert errors.status_of(error) == errors.status_of(errors.ConfigInvalid("x"))
    assert error.message == str(error) == "x.toml: p2p.listen is empty"


def test_placement_scaling_coordinator_and_energy_keys_reach_their_settings():
    from daemon.cluster.coordinator_state import CoordinatorSettings, ScalingSettings
    from daemon.resources import EnergySettings
    from scheduler.placement import PlacementWeights

    config = settings.parse(
        {
            "cluster": {"placement_rtt": 2.5, "scale_up_after_s": 7.0, "adopt_timeout_s": 3.0},
            "resources": {"energy_price_per_kwh": 0.3, "carbon_g_per_kwh": 420.0},
        }
    )
    assert PlacementWeights(**config.cluster.values_for(PlacementWeights)).rtt == 2.5
    assert ScalingSettings(**config.cluster.values_for(ScalingSettings)).up_after_s == 7.0
    assert (
        CoordinatorSettings(**config.cluster.values_for(CoordinatorSettings)).adopt_timeout_s == 3
    )
    energy = EnergySettings(**config.resources.values_for(EnergySettings))
    assert (energy.energy_price_per_kwh, energy.carbon_g_per_kwh) == (0.3, 420.0)
    # their bounds come from the settings dataclasses, and a refusal names the key
    with pytest.raises(ConfigError, match="placement_memory_fraction"):
        settings.parse({"cluster": {"placement_memory_fraction": 1.5}})
    with pytest.raises(ConfigError, match="energy_price_per_kwh"):
        settings.parse({"resources": {"energy_price_per_kwh": -1}})
