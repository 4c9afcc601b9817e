"""Where a node's config lives and what `init` writes; the settings tree itself is
daemon.settings, whose names (Config, load, resolve, ConfigError...) this module also offers.

This module is what every CLI command imports: it stays light. The tree imports the settings
types of p2p and registry (and with them trio and libp2p), so it is imported on first use of
one of its names, never by `gridmesh status` and the other commands that only talk to a daemon.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from daemon.multiaddrs import (  # noqa: F401 - offered here (checks by text, stdlib only)
    BOOTSTRAP_EXAMPLE,
    LISTEN_EXAMPLE,
    TRANSPORT,
    bootstrap_error,
    listen_error,
)


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

# the names of daemon.settings offered here
_SETTINGS = frozenset(
    {
        "Config",
        "ConfigError",
        "ENV_PREFIX",
        "GRPCConfig",
        "P2PConfig",
        "RPCConfig",
        "RegistryConfig",
        "ResourcesConfig",
        "ShardsConfig",
        "load",
        "parse",
        "resolve",
        "with_overrides",
    }
)


def __getattr__(name: str) -> Any:
    if name in _SETTINGS:
        from daemon import settings

        return getattr(settings, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_home() -> Path:
    return Path(os.environ.get("GRIDMESH_HOME") or Path.home() / ".gridmesh")


def template_text() -> str:
    """The text `gridmesh init` writes to HOME/config.toml."""
    return (REPO_CONFIGS / "node.toml").read_text()


def network_profiles() -> list[str]:
    """The networks `gridmesh init --network NAME` knows: the profiles configs/NAME.toml that
    name their own network (`network = "NAME"`), sorted."""
    names = []
    for path in sorted(REPO_CONFIGS.glob("*.toml")):
        declared = path.read_text().partition("\nnetwork = ")[2].partition("\n")[0]
        if declared.split("#")[0].strip().strip('"') == path.stem:
            names.append(path.stem)
    return names


def profile_text(network: str) -> str:
    """What `gridmesh init --network NAME` writes to HOME/config.toml; ValueError naming the
    known networks for another name."""
    known = network_profiles()
    if network not in known:
        raise ValueError(f"unknown network {network[:64]!r} (known: {', '.join(known)})")
    return (REPO_CONFIGS / f"{network}.toml").read_text()


def init_text(network: str | None, rpc_url: str | None) -> str:
    """What `gridmesh init` writes: the template, or `network`'s profile with `rpc_url` as its
    [chain] rpc_url (checked: the result must load); ValueError says why not."""
    if network is None:
        if rpc_url is not None:
            raise ValueError("--rpc-url needs --network NAME")
        return template_text()
    text = profile_text(network)
    if rpc_url is not None:
        line = f"rpc_url = {json.dumps(rpc_url)}"
        text, count = re.subn(r'(?m)^rpc_url = ""$', lambda _: line, text, count=1)
        if count != 1:
            raise ValueError(f"the {network} profile has no [chain] rpc_url to set")
    from daemon import settings

    try:  # the profile itself loads (a test checks it): what fails is the URL given
        settings.parse(tomllib.loads(text), "--rpc-url" if rpc_url else f"configs/{network}.toml")
    except settings.ConfigError as exc:
        raise ValueError(str(exc)) from None
    return text


def profile_notes(text: str, home: Path) -> list[str]:
    """What `gridmesh init --network` tells its user about the profile it wrote to `home`."""
    from contracts.chain.records import record_path
    from daemon import settings

    config = settings.parse(tomllib.loads(text))
    notes = [f"network:        {config.network} (id {config.network_id})"]
    if not config.p2p.bootstrap:
        notes.append("bootstrap:      none in the profile: pass --bootstrap ADDR to the daemon")
    if config.chain.network != "devnet" and not config.chain.rpc_url:
        notes.append(
            f"chain:          {config.chain.network} needs an RPC URL: set [chain] rpc_url "
            "(or run init again with --rpc-url URL --force); until then paid work is off"
        )
    chain = config.chain.network
    if not record_path(home, chain).exists():  # the daemon then works unpaid (as it does today)
        notes.append(
            f"contracts:      none recorded for {chain} in {home}: this node works unpaid until "
            f"`gridmesh chain use --escrow ADDRESS` records a published deployment (or "
            f"`gridmesh chain deploy --network {chain}` makes one)"
        )
    return notes
