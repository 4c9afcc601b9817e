"""The devnet's chain (`make devnet`): an embedded dev chain served from the devnet's process,
the contracts deployed on it, every node's home given the deployment record and its payout
account gas and tUSD, providers registered and staked, and each party's balance.

Synchronous on purpose (the devnet is a script): each chain operation runs an `Escrow` in a
short trio run. The chain's first development account deploys, funds and receives the fees.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

T = TypeVar("T")

FEE_BPS = 100  # 1 %
MIN_STAKE = 100_000_000  # 100 tUSD
UNBONDING_S = 3600
GAS_WEI = 10 * 10**18
TUSD = 10**6


@dataclass
class Party:
    """Someone whose balance the devnet shows: a node's payout account, the fee recipient."""

    name: str
    address: str
    key: str = field(default="", repr=False)  # the node's payout key (hex), "" if not ours


class DevnetChain:
    """A dev chain in this process with gridmesh's contracts on it."""

    def __init__(self, accounts: int = 4) -> None:
        self._stack = ExitStack()
        self._accounts = accounts
        self.url = ""
        self.record: Any = None  # contracts.chain.records.DeploymentRecord
        self.dev_key = ""
        self.fee_recipient = ""

    def start(self) -> DevnetChain:
        from contracts.chain.client import ChainClient
        from contracts.chain.devchain import serve_in_thread
        from contracts.chain.records import DeploymentRecord
        from contracts.deployment import deploy_all

        running = self._stack.enter_context(serve_in_thread(port=0, accounts=self._accounts))
        self.url = running.url
        self.dev_key = running.accounts[0].private_key
        with ChainClient(self.url, self.dev_key) as client:
            deployment = client.run_sync(
                lambda w3: deploy_all(
                    w3,
                    self.dev_key,
                    min_stake=MIN_STAKE,
                    unbonding_delay_s=UNBONDING_S,
                    fee_bps=FEE_BPS,
                    half_life_s=30 * 24 * 3600,
                )
            )
        self.fee_recipient = deployment.fee_recipient
        self.record = DeploymentRecord(
            "devnet",
            deployment.chain_id,
            deployment.addresses(),
            deployment.block,
            deployment.deployer,
        )
        return self

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> DevnetChain:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running Escrow operations -----------------------------------------------------------

    def run(self, key: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """`await fn(escrow)` with an Escrow signing with `key`, in a trio run of its own."""
        from contracts.chain.client import ChainClient
        from daemon.payments.escrow import Escrow

        async def main() -> T:
            with ChainClient(self.url, key) as client:
                return await fn(Escrow(client, self.record))

        return trio.run(main)

    def prepare_home(self, home: Path, name: str) -> Party:
        """Give a node's home its identity (if it has none) and the deployment record; the
        node's payout account as a Party."""
        from contracts.chain.records import write_record
        from p2p import identity

        ident, _ = identity.init_identity(home)
        write_record(home, self.record)
        return Party(name, ident.payout_address, "0x" + ident.payout_key.hex())

    def fund(self, parties: list[Party], tusd: int, wei: int = GAS_WEI) -> None:
        """Gas and `tusd` (smallest units) to each party, from the first dev account."""

        async def fund(escrow: Any) -> None:
            for party in parties:
                await escrow.send_gas(party.address, wei)
                await escrow.mint(tusd, to=party.address)

        self.run(self.dev_key, fund)

    def stake(self, party: Party, peer_id: str, amount: int = MIN_STAKE) -> None:
        """Register `party` (a provider) for `peer_id` and stake `amount`."""

        async def stake(escrow: Any) -> None:
            await escrow.register(peer_id)
            await escrow.stake(amount)

        self.run(party.key, stake)

    def balances(self, parties: list[Party]) -> dict[str, int]:
        """tUSD per party name, plus what JobEscrow and ProviderRegistry hold."""

        async def read(escrow: Any) -> dict[str, int]:
            out = {p.name: await escrow.token_balance(p.address) for p in parties}
            out["JobEscrow"] = await escrow.token_balance(escrow.escrow.address)
            out["ProviderRegistry"] = await escrow.token_balance(escrow.providers.address)
            return out

        return self.run(self.dev_key, read)

    def chain_time(self) -> int:
        return self.run(self.dev_key, lambda escrow: escrow.chain_time())

    def advance(self, seconds: int) -> None:
        """Move the chain's clock on `seconds` and mine a block."""

        async def advance(escrow: Any) -> None:
            def move(w3: Any) -> None:
                w3.provider.make_request("evm_increaseTime", [seconds])
                w3.provider.make_request("evm_mine", [])

            await escrow.client.run(move)

        self.run(self.dev_key, advance)


def balance_rows(
    before: dict[str, int], after: dict[str, int]
) -> Iterator[tuple[str, str, str, str]]:
    """(party, before, after, change) in tUSD, for a table."""
    from daemon.cli.jobs import show_amount

    for name in before:
        delta = after[name] - before[name]
        sign = "+" if delta > 0 else ("-" if delta < 0 else " ")
        yield (
            name,
            show_amount(before[name]),
            show_amount(after[name]),
            f"{sign}{show_amount(abs(delta))}",
        )


# -- the devnet's paid demo ----------------------------------------------------------------

PRICE_PER_UNIT = 1000  # what the devnet's providers charge per layer-token (0.001 tUSD)
DEPOSIT = 5 * TUSD
DEADLINE_S = 600


def methods_of(daemon: Any) -> dict[str, list[str]]:
    """The daemon's JSON-RPC methods and their parameter names."""
    return {m["name"]: [p["name"] for p in m["params"]] for m in daemon.call("rpc_methods")}


def create_job(chain: DevnetChain, requester: Any, party: Party, has_rpc: bool) -> str:
    """A paid job of `requester` (its JSON-RPC job_create when it has it, else deposited
    here with its key into its job book); the job id in hex."""
    spec = {
        "name": "devnet-demo",
        "billing": {
            "deposit": DEPOSIT,
            "max_price_per_unit": PRICE_PER_UNIT,
            "deadline_s": DEADLINE_S,
        },
    }
    if has_rpc:
        return str(requester.call("job_create", {"spec": spec}, timeout=120)["job_id"])
    from daemon.payments.job_spec import parse_job_spec
    from daemon.payments.jobs import JobBook
    from daemon.payments.jobs import create_job as deposit

    with JobBook(requester.home) as book:
        job = chain.run(party.key, lambda escrow: deposit(book, escrow, parse_job_spec(spec)))
    return "0x" + job.job_id.hex()


def acknowledged(requester: Any, job_id: str) -> dict[str, int]:
    """What the requester acknowledged per provider address (its job book)."""
    from daemon.payments.jobs import JobBook

    with JobBook(requester.home) as book:
        found = book.acknowledged(bytes.fromhex(job_id[2:]))
    return {address: a.cumulative for address, a in found.items()}


def settled(chain: DevnetChain, job_id: str, providers: list[Party]) -> dict[str, int]:
    async def read(escrow: Any) -> dict[str, int]:
        job = bytes.fromhex(job_id[2:])
        return {p.address: await escrow.paid(job, p.address) for p in providers}

    return chain.run(chain.dev_key, read)


def refund(chain: DevnetChain, requester: Any, party: Party, job_id: str, has_rpc: bool) -> int:
    """Refund the job after its deadline (JSON-RPC job_refund when there is one)."""
    if has_rpc:
        return int(requester.call("job_refund", {"job": job_id}, timeout=120)["refunded"])

    async def take_back(escrow: Any) -> int:
        result = await escrow.refund(bytes.fromhex(job_id[2:]))
        return int(result.named("Refunded")[0].args["amount"])

    return chain.run(party.key, take_back)


def check_balances(
    before: dict[str, int],
    after: dict[str, int],
    requester: Party,
    providers: list[Party],
    paid: dict[str, int],
) -> list[str]:
    """What does not add up (empty when every balance is exactly right): each provider got
    what it was paid less the 1 % fee, the fee recipient the fees, the requester lost exactly
    what was paid, the escrow holds nothing of the job."""
    wrong = []
    fees = 0
    for party in providers:
        amount = paid.get(party.address, 0)
        fee = amount * FEE_BPS // 10_000
        fees += fee
        got = after[party.name] - before[party.name]
        if got != amount - fee:
            wrong.append(f"{party.name} got {got}, expected {amount - fee}")
    if after["fees"] - before["fees"] != fees:
        wrong.append(f"fee recipient got {after['fees'] - before['fees']}, expected {fees}")
    spent = before[requester.name] - after[requester.name]
    if spent != sum(paid.values()):
        wrong.append(f"{requester.name} spent {spent}, expected {sum(paid.values())}")
    if after["JobEscrow"] != before["JobEscrow"]:
        wrong.append("JobEscrow still holds part of the deposit")
    return wrong
