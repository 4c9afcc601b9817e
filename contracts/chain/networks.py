"""The chains gridmesh knows by name, and the endpoint a node uses for one.

`devnet` is the embedded chain of `gridmesh chain serve` (eth-tester's chain id), `anvil` a
local anvil node, `base-sepolia` Base's public testnet, whose endpoint the user supplies (from
their RPC provider): no public endpoint is assumed. The node's config names one as `[chain]
network` and may give `[chain] rpc_url` (daemon.settings, which lists the same names).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from contracts.chain.errors import ChainError

ETH_TESTER_CHAIN_ID = 131277322940537  # eth-tester's fixed chain id ("web3py" in ASCII)


@dataclass(frozen=True)
class Network:
    name: str
    chain_id: int  # what the endpoint must answer to eth_chainId
    default_rpc_url: str  # "" when the user must give one
    description: str
    development: bool  # funded public accounts and evm_* testing methods
    dev_key: str = ""  # the public key of its first funded account (development only)


NETWORKS: dict[str, Network] = {
    network.name: network
    for network in (
        Network(
            "devnet",
            ETH_TESTER_CHAIN_ID,
            "http://127.0.0.1:8545",
            "the embedded development chain of `gridmesh chain serve`",
            True,
            "0x" + "00" * 31 + "01",  # eth-tester's first account
        ),
        Network(
            "anvil",
            31337,
            "http://127.0.0.1:8545",
            "a local anvil node",
            True,
            # anvil's first account (of its well-known test mnemonic)
            "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
        ),
        Network("base-sepolia", 84532, "", "Base Sepolia, the public testnet", False),
    )
}


def get(name: str) -> Network:
    """The network called `name`; ChainError lists the known ones."""
    try:
        return NETWORKS[name]
    except KeyError:
        known = ", ".join(NETWORKS)
        raise ChainError(f"unknown chain network {name!r} (known: {known})") from None


def endpoint(name: str, rpc_url: str | None = None) -> tuple[Network, str]:
    """The network and the RPC URL to use for it: `rpc_url` when given (a flag, `[chain]
    rpc_url`), else the network's default; a network without one needs `rpc_url`."""
    network = get(name)
    url = (rpc_url or "").strip() or network.default_rpc_url
    if not url:
        raise ChainError(
            f"{network.name} has no default RPC endpoint: give one with --rpc-url URL or "
            f'rpc_url = "https://..." under [chain] in config.toml (your RPC provider\'s '
            f"{network.name} URL; chain id {network.chain_id})"
        )
    check_url(url)
    return network, url


def check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ChainError(f"RPC URL {url!r} is not an http:// or https:// URL")


def check_chain_id(network: Network, url: str, chain_id: int) -> None:
    """ChainError unless the endpoint at `url` (which answered `chain_id`) is `network`."""
    if chain_id != network.chain_id:
        raise ChainError(
            f"the endpoint {url} is chain id {chain_id}, but {network.name} is chain id "
            f"{network.chain_id}: is --rpc-url (or [chain] rpc_url) the right endpoint?"
        )
