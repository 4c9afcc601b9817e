"""`gridmesh chain ...`: serve the embedded development chain, deploy the contracts, show them.

web3 and eth-tester are imported inside the commands only, so `gridmesh --help` stays fast.
"""

from __future__ import annotations

import typer

from daemon.cli.common import fail

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
