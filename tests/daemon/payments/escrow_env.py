"""A dev chain served in-process with the contracts deployed, and `Escrow`s on it for dev
accounts: what the escrow, job book and CLI tests share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from contracts.chain.client import ChainClient
from contracts.chain.devchain import RunningChain, serve_in_thread
from contracts.chain.records import DeploymentRecord
from contracts.deployment import deploy_all
from daemon.payments.escrow import Escrow

MIN_STAKE = 100_000_000  # 100 tUSD
UNBONDING_S = 600
FEE_BPS = 100


@dataclass
class Env:
    chain: RunningChain
    record: DeploymentRecord
    fee_recipient: str  # the deployer, account 0
    stack: ExitStack = field(repr=False)

    def key(self, index: int) -> str:
        return self.chain.accounts[index].private_key

    def escrow(self, index: int, **kwargs: Any) -> Escrow:
        """An Escrow for dev account `index` (its own client, closed with the env)."""
        client = self.stack.enter_context(ChainClient(self.chain.url, self.key(index)))
        return Escrow(client, self.record.as_json(), **kwargs)

    def rpc(self, method: str, *params: Any) -> Any:
        with ChainClient(self.chain.url) as client:
            return client.run_sync(lambda w3: w3.provider.make_request(method, list(params)))

    def advance(self, seconds: int) -> None:
        """Move the chain's clock on and mine a block at the new time."""
        self.rpc("evm_increaseTime", seconds)
        self.rpc("evm_mine")

    def now(self) -> int:
        with ChainClient(self.chain.url) as client:
            return client.run_sync(lambda w3: int(w3.eth.get_block("latest")["timestamp"]))


@contextmanager
def deployed_chain(accounts: int = 5) -> Iterator[Env]:
    with ExitStack() as stack:
        chain = stack.enter_context(serve_in_thread(port=0, accounts=accounts))
        key = chain.accounts[0].private_key
        with ChainClient(chain.url, key) as client:
            deployment = client.run_sync(
                lambda w3: deploy_all(
                    w3,
                    key,
                    min_stake=MIN_STAKE,
                    unbonding_delay_s=UNBONDING_S,
                    fee_bps=FEE_BPS,
                    half_life_s=3600,
                )
            )
        record = DeploymentRecord(
            "devnet",
            deployment.chain_id,
            deployment.addresses(),
            deployment.block,
            deployment.deployer,
        )
        yield Env(chain, record, deployment.fee_recipient, stack)
