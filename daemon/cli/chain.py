"""`gridmesh chain ...`: serve the embedded development chain, deploy the contracts, show them.

web3 and eth-tester are imported inside the commands only, so `gridmesh --help` stays fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from contracts.chain.errors import ChainError, ChainUnreachable
from daemon import config as configuration
from daemon.cli.common import HomeOption, JsonOption, fail, home_dir, print_json

chain_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@chain_app.callback()
def _group() -> None:
    """The chain that pays for work.

    Try it locally: `gridmesh chain serve` in one terminal (a real EVM, funded accounts),
    then `gridmesh chain deploy --network devnet` in another, and `gridmesh chain info`.
    Networks: devnet (that chain, http://127.0.0.1:8545), anvil (chain id 31337),
    base-sepolia (chain id 84532: give its RPC URL with --rpc-url or rpc_url in config.toml)."""


@chain_app.command()
def serve(
    port: int = typer.Option(
        8545, "--port", min=0, max=65535, help="TCP port (0 picks a free one and prints it)."
    ),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to bind. Keep 127.0.0.1: the development accounts' keys are public, so "
        "anyone who can reach the port can spend from them.",
    ),
    accounts: int = typer.Option(
        10, "--accounts", min=1, max=1000, help="Funded development accounts to create."
    ),
) -> None:
    """Run a development chain (py-evm) as Ethereum JSON-RPC over HTTP until Ctrl-C.

    Its accounts hold 1,000,000 ETH each; their private keys are printed because they are
    public development keys, never to be used anywhere else. Besides the eth_* methods it
    answers evm_increaseTime, evm_mine, evm_snapshot and evm_revert as anvil does. The chain
    lives in memory: stopping it forgets every block."""
    from contracts.chain.devchain import DevChain, make_server

    try:
        running = make_server(DevChain(accounts), host, port)
    except OSError as exc:
        hint = " (is another chain already serving there? try --port 0)" if exc.errno == 98 else ""
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}")
    typer.echo(f"gridmesh dev chain: chain id {running.chain.chain_id}, listening on {running.url}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(
            f"warning: bound to {host}: anyone who reaches this port can use the keys below",
            err=True,
        )
    typer.echo("\nAvailable accounts (public development keys: never send real funds to them)")
    for index, account in enumerate(running.accounts):
        typer.echo(f"({index}) {account.address}  private key {account.private_key}")
    typer.echo("\nCtrl-C stops it.", err=True)
    try:
        running.server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        typer.echo("stopped", err=True)
    finally:
        running.server.server_close()


NetworkOption = typer.Option(
    None,
    "--network",
    help="devnet, anvil or base-sepolia (default: \\[chain] network in config.toml, else devnet).",
    show_default=False,
)
RpcUrlOption = typer.Option(
    None,
    "--rpc-url",
    help="The network's JSON-RPC endpoint (default: \\[chain] rpc_url, else the network's own; "
    "base-sepolia has none: give your RPC provider's URL).",
    show_default=False,
)
ConfigOption = typer.Option(
    None, "--config", help="Config file (default: HOME/config.toml if present).", show_default=False
)


def _endpoint(
    home: Path, config: Path | None, network: str | None, rpc_url: str | None
) -> tuple[Any, str]:
    """(network, RPC URL): flags, else [chain] of the config, else the network's defaults."""
    from contracts.chain import networks

    configured_network, configured_url = "devnet", ""
    config_path = config or home / configuration.CONFIG_FILE
    try:  # defaults < the file < GRIDMESH_CHAIN__NETWORK / GRIDMESH_CHAIN__RPC_URL
        cfg = configuration.resolve(
            config_path if config is not None or config_path.exists() else None,
            env=os.environ,
            flags={},
        )
    except configuration.ConfigError as exc:
        fail(str(exc))
    section = getattr(cfg, "chain", None)
    if section is not None:
        configured_network, configured_url = section.network, section.rpc_url
    name = network or configured_network
    # the configured URL belongs to the configured network only
    url = rpc_url or (configured_url if name == configured_network else "")
    try:
        return networks.endpoint(name, url)
    except ChainError as exc:
        fail(str(exc))
        raise  # unreachable: fail exits


def _reach(client: Any, network: Any, url: str) -> int:
    """The endpoint's chain id, or one line saying why there is none."""
    try:
        return client.chain_id_sync()
    except ChainUnreachable as exc:
        fail(f"{exc}; {_start_hint(network)}")
    except ChainError as exc:
        fail(str(exc))
    raise AssertionError("unreachable")


def _start_hint(network: Any) -> str:
    return {
        "devnet": "is it running? start it with `gridmesh chain serve`",
        "anvil": "is anvil running? (npm installs it as contracts/node_modules/.bin/anvil)",
    }.get(network.name, "is --rpc-url (or [chain] rpc_url) right?")


@chain_app.command()
def deploy(
    network: str | None = NetworkOption,
    rpc_url: str | None = RpcUrlOption,
    force: bool = typer.Option(
        False, "--force", help="Deploy even if HOME/chain/NETWORK.json records a deployment."
    ),
    min_stake: int = typer.Option(
        100_000_000,
        "--min-stake",
        min=1,
        help="Least stake a provider needs, in tUSD's "
        "smallest unit (6 decimals: 100000000 = 100 tUSD).",
    ),
    unbonding_delay: int = typer.Option(
        7 * 24 * 3600,
        "--unbonding-delay",
        min=0,
        help="Seconds between asking to unstake and withdrawing.",
    ),
    half_life: int = typer.Option(
        30 * 24 * 3600, "--half-life", min=1, help="Seconds in which a reputation score halves."
    ),
    fee_bps: int = typer.Option(
        100, "--fee-bps", min=0, max=10_000, help="Protocol fee in basis points (100 = 1%)."
    ),
    fee_recipient: str | None = typer.Option(
        None, "--fee-recipient", help="Address paid the fee (default: the deployer)."
    ),
    node_key: bool = typer.Option(
        False,
        "--node-key",
        help="On devnet and anvil, deploy from this node's chain key "
        "instead of the chain's first funded development account.",
    ),
    home: Path | None = HomeOption,
    config: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Deploy the contracts and record their addresses in HOME/chain/NETWORK.json.

    It deploys TestUSD, ReputationRegistry, ProviderRegistry and JobEscrow.
    On devnet and anvil the deployer is the chain's first development account (a public key).
    Elsewhere it is this node's chain key, which needs the network's ETH for gas:
    $GRIDMESH_CHAIN_KEY, else the node's payout key (HOME/payout.key, from `gridmesh init`).
    A recorded deployment still alive, or made on another chain id, is kept unless --force."""
    from contracts.chain import networks, records
    from contracts.chain.client import ChainClient
    from contracts.chain.keys import load_key
    from contracts.deployment import deploy_all

    home = home_dir(home)
    net, url = _endpoint(home, config, network, rpc_url)
    try:
        key = net.dev_key if net.development and not node_key else load_key(home).private_key
    except ChainError as exc:
        fail(str(exc))
    path = records.record_path(home, net.name)
    with ChainClient(url, key, retries=3) as client:
        chain_id = _reach(client, net, url)
        try:
            existing = records.read_record(home, net.name)
            alive = (
                existing is not None
                and existing.chain_id == chain_id
                and _has_code(client, existing.addresses.get("JobEscrow"))
            )
            records.check_redeploy(existing, path, chain_id, url, escrow_alive=alive, force=force)
            networks.check_chain_id(net, url, chain_id)
            if client.run_sync(lambda w3: w3.eth.get_balance(client.address)) == 0:
                fail(f"the deployer {client.address} has no funds on {net.name} to pay for gas")
            if not as_json:
                typer.echo(
                    f"deploying from {client.address} to {net.name} (chain id {chain_id}) at "
                    f"{url} ...",
                    err=True,
                )
            deployment = client.run_sync(
                lambda w3: deploy_all(
                    w3,
                    key,
                    min_stake=min_stake,
                    unbonding_delay_s=unbonding_delay,
                    fee_bps=fee_bps,
                    fee_recipient=fee_recipient,
                    half_life_s=half_life,
                )
            )
        except ChainError as exc:
            fail(str(exc))
    record = records.DeploymentRecord(
        net.name, chain_id, deployment.addresses(), deployment.block, deployment.deployer
    )
    try:
        written = records.write_record(home, record)
    except OSError as exc:
        fail(
            f"deployed, but cannot write {path}: {exc.strerror or exc}; addresses: "
            f"{json.dumps(record.addresses)}"
        )
    if as_json:
        print_json({**record.as_json(), "record": str(written), "gasUsed": deployment.gas_used})
        return
    for name, address in record.addresses.items():
        typer.echo(f"{name:<19} {address}")
    typer.echo(f"block {record.block}; recorded in {written}")


@chain_app.command()
def use(
    escrow: str = typer.Option(
        ...,
        "--escrow",
        help="The JobEscrow address the network's operators published (0x + 40 hex digits).",
        show_default=False,
    ),
    network: str | None = NetworkOption,
    rpc_url: str | None = RpcUrlOption,
    force: bool = typer.Option(
        False, "--force", help="Replace a record of another deployment in HOME/chain/NETWORK.json."
    ),
    home: Path | None = HomeOption,
    config: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Record a deployment someone else made, from its JobEscrow address alone.

    The other three contracts are read from JobEscrow itself (token, providers, reputation)
    and checked: each has code, and ProviderRegistry and ReputationRegistry name this JobEscrow
    as theirs. Nothing is sent: no gas is needed. Then restart the daemon to do paid work.
    Example: `gridmesh chain use --escrow 0x...` (network and URL from [chain] in config.toml)."""
    from contracts.chain import networks, records
    from contracts.chain.client import ChainClient

    home = home_dir(home)
    net, url = _endpoint(home, config, network, rpc_url)
    try:
        existing = records.read_record(home, net.name)
    except ChainError as exc:
        fail(str(exc))
    with ChainClient(url, retries=3) as client:
        chain_id = _reach(client, net, url)
        try:
            networks.check_chain_id(net, url, chain_id)
            addresses, block = _published(client, escrow)
        except ChainError as exc:
            fail(str(exc))
    if existing is not None and not force and existing.addresses != addresses:
        fail(
            f"{records.record_path(home, net.name)} records another deployment (JobEscrow "
            f"{existing.addresses.get('JobEscrow', '?')}, chain id {existing.chain_id}): add "
            "--force to replace it"
        )
    record = records.DeploymentRecord(net.name, chain_id, addresses, block)
    try:
        written = records.write_record(home, record)
    except OSError as exc:
        fail(f"cannot write {records.record_path(home, net.name)}: {exc.strerror or exc}")
    if as_json:
        print_json({**record.as_json(), "record": str(written)})
        return
    for name, address in record.addresses.items():
        typer.echo(f"{name:<19} {address}")
    typer.echo(f"recorded in {written}; restart the daemon to do paid work")


def _published(client: Any, escrow: str) -> tuple[dict[str, str], int]:
    """The four addresses of the deployment whose JobEscrow is at `escrow`, and the block they
    were read at; ChainError says what does not fit."""
    from web3 import Web3

    if not Web3.is_address(escrow):
        raise ChainError(f"--escrow {escrow!r} is not an address (0x + 40 hex digits)")
    escrow = Web3.to_checksum_address(escrow)
    if not _has_code(client, escrow):
        raise ChainError(f"no contract at {escrow} on chain id {client.chain_id_sync()}")
    bound = client.bind("JobEscrow", escrow)
    try:
        addresses = {
            "TestUSD": client.call_sync(bound, "token"),
            "ReputationRegistry": client.call_sync(bound, "reputation"),
            "ProviderRegistry": client.call_sync(bound, "providers"),
        }
        for name in ("ReputationRegistry", "ProviderRegistry"):
            if not _has_code(client, addresses[name]):
                raise ChainError(f"no {name} at {addresses[name]}")
            owner = client.call_sync(client.bind(name, addresses[name]), "escrow")
            if Web3.to_checksum_address(owner) != escrow:
                raise ChainError(f"{name} at {addresses[name]} belongs to JobEscrow {owner}")
        if not _has_code(client, addresses["TestUSD"]):
            raise ChainError(f"no TestUSD at {addresses['TestUSD']}")
    except ChainError as exc:
        raise ChainError(f"{escrow} is not a gridmesh JobEscrow: {exc}") from None
    block = client.run_sync(lambda w3: int(w3.eth.block_number))
    return {**addresses, "JobEscrow": escrow}, block


def _has_code(client: Any, address: str | None) -> bool:
    if not address:
        return False
    return len(client.run_sync(lambda w3: w3.eth.get_code(address))) > 0


@chain_app.command()
def info(
    network: str | None = NetworkOption,
    rpc_url: str | None = RpcUrlOption,
    home: Path | None = HomeOption,
    config: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Show the deployment recorded for a network and what its endpoint says now (chain id,
    latest block, whether the recorded contracts are there)."""
    from contracts.chain import records
    from contracts.chain.client import ChainClient

    home = home_dir(home)
    net, url = _endpoint(home, config, network, rpc_url)
    try:
        record = records.read_record(home, net.name)
    except ChainError as exc:
        fail(str(exc))
    endpoint: dict[str, Any] = {"url": url}
    with ChainClient(url, retries=2, timeout_s=10) as client:
        try:
            endpoint["chainId"] = client.chain_id_sync()
            endpoint["block"] = client.run_sync(lambda w3: int(w3.eth.block_number))
            if record is not None and record.chain_id == endpoint["chainId"]:
                endpoint["contractsPresent"] = _has_code(client, record.addresses.get("JobEscrow"))
        except ChainUnreachable as exc:
            endpoint["error"] = f"{exc}; {_start_hint(net)}"
        except ChainError as exc:
            endpoint["error"] = str(exc)
    path = records.record_path(home, net.name)
    if as_json:
        print_json(
            {
                "network": net.name,
                "record": record.as_json() if record else None,
                "recordPath": str(path),
                "endpoint": endpoint,
            }
        )
        return
    typer.echo(f"network:   {net.name} ({net.description}; chain id {net.chain_id})")
    if "error" in endpoint:
        typer.echo(f"endpoint:  {url}: not answering ({endpoint['error']})")
    else:
        typer.echo(f"endpoint:  {url}: chain id {endpoint['chainId']}, block {endpoint['block']}")
    if record is None:
        typer.echo(
            f"deployed:  nothing recorded in {path}; run `gridmesh chain deploy "
            f"--network {net.name}`"
        )
        return
    typer.echo(
        f"deployed:  chain id {record.chain_id}, block {record.block}, by "
        f"{record.deployer or '?'} (recorded in {path})"
    )
    for name, address in record.addresses.items():
        typer.echo(f"  {name:<19} {address}")
    if "chainId" in endpoint and endpoint["chainId"] != record.chain_id:
        typer.echo(
            f"warning: the endpoint is chain id {endpoint['chainId']}, not the recorded "
            f"{record.chain_id}: these addresses are not there",
            err=True,
        )
    elif endpoint.get("contractsPresent") is False:
        typer.echo(
            "warning: no contract at the recorded JobEscrow address (a restarted dev "
            "chain?): `gridmesh chain deploy` deploys anew",
            err=True,
        )
