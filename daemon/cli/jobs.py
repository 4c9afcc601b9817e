"""`gridmesh job ...`, `earnings`, `stake`, `unstake`, `withdraw`, `wallet` and `fund`: paid
work from the command line.

Everything but `fund` asks the running daemon (JSON-RPC), which holds the node's escrow
account (its payout key). `fund` talks to the chain directly: it gives an account gas and tUSD
from a development chain's first funded account, so it works before any daemon runs.
"""

from __future__ import annotations

import datetime
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import typer

from daemon.cli.common import HomeOption, JsonOption, call, fail, home_dir, print_json

DECIMALS = 6  # tUSD, like USDC
_AMOUNT = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*(tusd|usd)?\s*$", re.IGNORECASE)

job_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@job_app.callback()
def _group() -> None:
    """Paid jobs: lock a deposit in the escrow, generate under the job id, get the rest back.

    1. `gridmesh job create --deposit 5tUSD --max-price 10 --deadline 3600` (or -f job.yaml)
    prints a job id. 2. `gridmesh generate PROMPT --model M --job JOB` (or JSON-RPC
    `generate` with that `job_id`) runs as the job: each
    provider signs a receipt per step, this node acknowledges them and the providers settle
    on chain. 3. `gridmesh job status JOB` shows deposit, paid, acknowledged per provider.
    4. After the deadline, `gridmesh job refund JOB` returns what was not spent.
    Needs a chain: `gridmesh chain serve`, then `gridmesh chain deploy`, then restart the
    daemon (and `gridmesh fund` on a devnet)."""


def parse_amount(text: str) -> int:
    """ "5000000" (smallest units) or "5tUSD" / "5 usd" / "0.25tUSD" (whole tokens) as smallest
    units; typer.BadParameter says what is accepted."""
    match = _AMOUNT.match(text)
    if match is None:
        raise typer.BadParameter(
            f"{text!r}: give smallest units (5000000) or tokens with a unit (5tUSD, 0.25tUSD)"
        )
    number, unit = match.group(1).replace("_", ""), match.group(2)
    if unit is None:
        if "." in number:
            raise typer.BadParameter(f"{text!r}: smallest units are whole; for tokens add tUSD")
        return int(number)
    try:
        units = Decimal(number) * 10**DECIMALS
    except InvalidOperation:
        raise typer.BadParameter(f"{text!r} is not a number") from None
    if units != units.to_integral_value():
        raise typer.BadParameter(f"{text!r}: tUSD has {DECIMALS} decimals")
    return int(units)


def show_amount(units: int) -> str:
    """Smallest units as tUSD ("1.5 tUSD")."""
    whole, frac = divmod(units, 10**DECIMALS)
    text = f"{whole}.{frac:0{DECIMALS}d}".rstrip("0").rstrip(".")
    return f"{text} tUSD"


def _when(unix: int | None) -> str:
    if not unix:
        return "-"
    stamp = datetime.datetime.fromtimestamp(unix, tz=datetime.UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S UTC")


def _load_spec(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        fail(f"{path} is not valid YAML: {exc}")
    if not isinstance(loaded, dict):
        fail(f"{path}: a job spec is a map of fields (name, billing, resources, ...)")
    return loaded


@job_app.command()
def create(
    file: Path | None = typer.Option(
        None,
        "-f",
        "--file",
        help="A job spec in YAML: gridmesh's fields (billing.deposit, billing.max_price_per_unit"
        ", billing.deadline_s) or OpenGrid's job.yaml (billing.max_price_per_hour_usd x "
        "deadline_s is the deposit). Flags given too override its billing.",
    ),
    deposit: str | None = typer.Option(
        None,
        "--deposit",
        help="What to lock for the job: smallest units (5000000) or tokens (5tUSD).",
    ),
    deposit_usd: float | None = typer.Option(
        None, "--deposit-usd", help="The deposit in dollars (1 tUSD = 1 USD)."
    ),
    max_price: int | None = typer.Option(
        None,
        "--max-price",
        min=0,
        help="Most the job pays per unit of work (one layer over one token), in smallest units; "
        "dearer providers are not used (default: [market] max_price_per_unit).",
    ),
    deadline: int | None = typer.Option(
        None,
        "--deadline",
        min=1,
        help="Seconds from now (chain time) until settlement closes and the refund opens.",
    ),
    name: str | None = typer.Option(None, "--name", help="A name for the job (shown by list)."),
    model: str | None = typer.Option(None, "--model", help="The model the job is for."),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Deposit for a new paid job and print its id.

    Example: `gridmesh job create --deposit 5tUSD --max-price 10 --deadline 3600`. The deposit
    comes from this node's payout address (`gridmesh wallet`), which needs tUSD and gas
    (`gridmesh fund` on a devnet)."""
    spec: dict[str, Any] = _load_spec(file) if file is not None else {}
    billing = dict(spec.get("billing") or {}) if isinstance(spec.get("billing"), dict) else {}
    if deposit is not None and deposit_usd is not None:
        fail("give --deposit or --deposit-usd, not both")
    if deposit is not None or deposit_usd is not None:  # replaces how the file says it
        for key in ("deposit", "deposit_usd", "max_price_per_hour", "max_price_per_hour_usd"):
            billing.pop(key, None)
    if deposit is not None:
        billing["deposit"] = parse_amount(deposit)
    if deposit_usd is not None:
        billing["deposit_usd"] = deposit_usd
    if max_price is not None:
        billing["max_price_per_unit"] = max_price
    if deadline is not None:
        billing["deadline_s"] = deadline
    if file is None and (
        "deadline_s" not in billing or not {"deposit", "deposit_usd"} & set(billing)
    ):
        fail("give --deposit (or --deposit-usd) and --deadline, or a job spec with -f job.yaml")
    if billing:
        spec["billing"] = billing
    if name is not None:
        spec["name"] = name
    if model is not None:
        spec["model"] = model
    job = call(home, "job_create", {"spec": spec}, timeout=180)
    if as_json:
        print_json(job)
        return
    typer.echo(job["job_id"])
    typer.echo(
        f"deposited {show_amount(job['deposit'])} from {job['payer']}; max price "
        f"{job['max_price_per_unit']}/unit; deadline {_when(job['deadline'])}",
        err=True,
    )
    typer.echo(f"use it: gridmesh generate PROMPT --model MODEL --job {job['job_id']}", err=True)


@job_app.command()
def status(
    job: str = typer.Argument(..., help="The job id (0x + 64 hex digits)."),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """What a job deposited, what it paid, what was acknowledged to and settled by each
    provider, its deadline and whether it was refunded."""
    state = call(home, "job_status", {"job": job})
    if as_json:
        print_json(state)
        return
    book, chain = state.get("book"), state.get("chain")
    typer.echo(f"job       {state['job_id']}" + (f" ({book['name']})" if book else ""))
    if book is None:
        typer.echo("book      not created by this node")
    elif book["state"] != "deposited":
        typer.echo(f"book      {book['state']} (the deposit has not been confirmed)")
    if chain is None:
        typer.echo(f"chain     {state.get('chain_error') or 'not on the chain'}")
    else:
        refunded = " (refunded)" if chain["refunded"] else ""
        typer.echo(f"deposit   {show_amount(chain['deposit'])} by {chain['payer']}")
        typer.echo(f"paid      {show_amount(chain['paid'])} (fees included)")
        typer.echo(f"remaining {show_amount(chain['remaining'])}{refunded}")
        typer.echo(f"max price {chain['max_price_per_unit']} per unit")
        passed = state.get("chain_time", 0) > chain["deadline"]
        typer.echo(
            f"deadline  {_when(chain['deadline'])}"
            + (
                " (passed: `gridmesh job refund` returns the rest)"
                if passed and not chain["refunded"]
                else ""
            )
        )
    for entry in state["providers"]:
        settled = entry.get("settled")
        typer.echo(
            f"provider  {entry['provider']}: acknowledged {show_amount(entry['acknowledged'])} "
            f"(voucher {entry['nonce']})"
            + (f", settled {show_amount(settled)}" if settled is not None else "")
        )


@job_app.command()
def refund(
    job: str = typer.Argument(..., help="The job id."),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Return what the job did not spend to this node (only after its deadline, once)."""
    result = call(home, "job_refund", {"job": job}, timeout=180)
    if as_json:
        print_json(result)
        return
    typer.echo(f"refunded {show_amount(result['refunded'])} (transaction {result['tx']})")


@job_app.command("list")
def list_jobs(home: Path | None = HomeOption, as_json: bool = JsonOption) -> None:
    """The jobs this node created, newest first."""
    jobs = call(home, "job_list", {})
    if as_json:
        print_json(jobs)
        return
    if not jobs:
        typer.echo("no jobs yet: `gridmesh job create --help` shows how to make one")
        return
    for job in jobs:
        typer.echo(
            f"{job['job_id']}  {job['name']:<16} {show_amount(job['deposit']):>14}  "
            f"max {job['max_price_per_unit']}/unit  until {_when(job['deadline'])}  {job['state']}"
        )


def earnings(home: Path | None = HomeOption, as_json: bool = JsonOption) -> None:
    """What this node earned as a provider, job by job.

    Per job: receipts signed, acknowledged by the requester, settled on chain, and pending;
    with this node's balance and stake."""
    result = call(home, "earnings", {})
    if as_json:
        print_json(result)
        return
    if "address" in result:
        _print_wallet(result)
    else:
        typer.echo(f"chain: {result.get('chain_error')}")
    if not result["jobs"]:
        typer.echo("no paid work yet")
        return
    for job in result["jobs"]:
        typer.echo(
            f"{job['job_id']}: {job['receipts']} receipts worth {show_amount(job['signed'])}; "
            f"acknowledged {show_amount(job['acknowledged'])}, settled "
            f"{show_amount(job['settled'])}, pending {show_amount(job['pending'])}"
        )


def wallet(home: Path | None = HomeOption, as_json: bool = JsonOption) -> None:
    """This node's account on the chain: tUSD, gas and stake.

    The account is the node's payout address (payout.key in the home), bound to its peer id."""
    result = call(home, "wallet", {})
    if as_json:
        print_json(result)
        return
    _print_wallet(result)


def _print_wallet(result: dict[str, Any]) -> None:
    stake_info = result["stake"]
    typer.echo(f"account   {result['address']} on {result['network']} (chain {result['chain_id']})")
    typer.echo(f"balance   {show_amount(result['balance'])}; gas {result['gas_balance']} wei")
    if not stake_info["registered"]:
        typer.echo("stake     not registered as a provider (`gridmesh stake AMOUNT`)")
        return
    state = "active" if stake_info["active"] else "NOT active (below the minimum stake)"
    if stake_info["slashed"]:
        state = "SLASHED"
    typer.echo(
        f"stake     {show_amount(stake_info['stake'])}, {state}; minimum "
        f"{show_amount(stake_info['min_stake'])}"
    )
    if stake_info["unbonding"]:
        typer.echo(
            f"unbonding {show_amount(stake_info['unbonding'])}, withdrawable from "
            f"{_when(stake_info['unbonding_ready_at'])}"
        )


AmountArgument = typer.Argument(..., help="Smallest units (100000000) or tokens (100tUSD).")


def stake(
    amount: str = AmountArgument, home: Path | None = HomeOption, as_json: bool = JsonOption
) -> None:
    """Stake tUSD so this node is paid for the work it serves.

    The first stake registers the node's peer id with its payout address. A provider is paid
    only while its stake is at least the minimum; one proven to sign two results for one step
    loses all of it. Example: `gridmesh stake 100tUSD`."""
    result = call(home, "stake", {"amount": parse_amount(amount)}, timeout=180)
    if as_json:
        print_json(result)
        return
    if result["newly_registered"]:
        typer.echo(f"registered peer id {result['peer_id']}")
    active = (
        "active"
        if result["active"]
        else f"not active yet (minimum {show_amount(result['min_stake'])})"
    )
    typer.echo(f"stake now {show_amount(result['stake'])}: {active}")


def unstake(
    amount: str = AmountArgument, home: Path | None = HomeOption, as_json: bool = JsonOption
) -> None:
    """Start unbonding AMOUNT of stake.

    `gridmesh withdraw` pays it out after the unbonding delay; until then it can still be
    slashed."""
    result = call(home, "unstake", {"amount": parse_amount(amount)}, timeout=180)
    if as_json:
        print_json(result)
        return
    typer.echo(
        f"unbonding {show_amount(result['unbonding'])}, withdrawable from "
        f"{_when(result['unbonding_ready_at'])}; stake left {show_amount(result['stake'])}"
    )


def withdraw(home: Path | None = HomeOption, as_json: bool = JsonOption) -> None:
    """Pay the stake whose unbonding delay is over to this node's payout address."""
    result = call(home, "withdraw", {}, timeout=180)
    if as_json:
        print_json(result)
        return
    typer.echo(
        f"withdrew {show_amount(result['withdrawn'])}; balance {show_amount(result['balance'])}"
    )


def fund(
    to: str | None = typer.Option(
        None, "--to", help="Address to fund (default: this node's payout address)."
    ),
    tusd: str = typer.Option("1000tUSD", "--tusd", help="tUSD to mint to it (0: none)."),
    eth: float | None = typer.Option(
        None,
        "--eth",
        min=0,
        help="Gas money (ETH) to send it: development chains only (default 10 there).",
        show_default=False,
    ),
    network: str | None = typer.Option(
        None,
        "--network",
        help="devnet, anvil or base-sepolia (default: [chain] network, else devnet).",
    ),
    rpc_url: str | None = typer.Option(None, "--rpc-url", help="The chain's JSON-RPC endpoint."),
    home: Path | None = HomeOption,
) -> None:
    """Give an account tUSD (and, on a development chain, gas).

    On devnet and anvil both come from the chain's first funded account (its key is public).
    On base-sepolia the node mints tUSD itself with its chain key (TestUSD's mint is open to
    anyone), paying the gas: get Base Sepolia ETH from a faucet first. Needs a deployment
    recorded for this home (`gridmesh chain deploy` or `gridmesh chain use`); no daemon needed.
    Example: `gridmesh fund --tusd 500tUSD`."""
    import trio

    from contracts.chain.client import ChainClient
    from contracts.chain.errors import ChainError
    from daemon.cli.chain import _endpoint
    from daemon.payments.escrow import Escrow, explain

    home = home_dir(home)
    net, url = _endpoint(home, None, network, rpc_url)
    units = parse_amount(tusd)
    if net.development:
        key, wei = net.dev_key, int(Decimal(str(10.0 if eth is None else eth)) * 10**18)
    elif eth:
        fail(
            f"{net.name} is not a development chain: nobody here can hand out its ETH; get "
            "some from a faucet for the payout address (`gridmesh fund` then mints tUSD)"
        )
    else:
        key, wei = _chain_key(home), 0
    target = to or _payout_address(home)
    try:
        with ChainClient(url, key, retries=3) as client:
            escrow = Escrow.from_home(client, home, net.name)

            async def run() -> tuple[int, int]:
                await escrow.check()  # the recorded chain, its contracts there
                if not net.development and units > 0 and await escrow.gas_balance() == 0:
                    fail(
                        f"{escrow.address} has no ETH on {net.name} to pay the gas of minting: "
                        "get test ETH from a faucet for that address first"
                    )
                if wei > 0:
                    await escrow.send_gas(target, wei)
                if units > 0:
                    await escrow.mint(units, to=target)
                return await escrow.token_balance(target), await escrow.gas_balance(target)

            balance, gas = trio.run(run)
    except ChainError as exc:
        fail(explain(exc))
    typer.echo(f"{target}: {show_amount(balance)}, {Decimal(gas) / 10**18} ETH")


def _chain_key(home: Path) -> str:
    """The key the node transacts with: $GRIDMESH_CHAIN_KEY, else its payout key."""
    from daemon.payments.wiring import chain_key
    from p2p import identity

    try:
        return chain_key(identity.load_identity(home))
    except Exception as exc:  # no identity yet, a broken key file
        fail(f"no node identity in {home} ({exc}): run `gridmesh init`")
        raise


def _payout_address(home: Path) -> str:
    from p2p import identity

    try:
        return identity.load_identity(home).payout_address
    except Exception as exc:  # no identity yet, a broken key file
        fail(f"no node identity in {home} ({exc}): run `gridmesh init` or give --to ADDRESS")
        raise


COMMANDS = (earnings, wallet, stake, unstake, withdraw, fund)
