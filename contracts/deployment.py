"""Deploys gridmesh's contracts with signed raw transactions (eth-tester, anvil and public
chains alike: nothing relies on the node holding keys).

`deploy_all` deploys TestUSD, ReputationRegistry, ProviderRegistry and JobEscrow, then names the
escrow in both registries. `send` signs, sends and waits for one transaction and refuses a
failed one; gas is whatever its receipt says (`gasUsed`), never an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from contracts import artifacts

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from web3 import Web3
    from web3.types import TxReceipt

RECEIPT_TIMEOUT_S = 120.0
CONTRACTS = ("TestUSD", "ReputationRegistry", "ProviderRegistry", "JobEscrow")


class TransactionFailed(Exception):
    """A transaction was mined with status 0."""

    def __init__(self, what: str, receipt: Any) -> None:
        self.receipt = receipt
        tx_hash = receipt["transactionHash"].hex()
        super().__init__(f"{what}: transaction {tx_hash} failed (status 0)")


@dataclass(frozen=True)
class Deployment:
    """Where the contracts live on one chain, and what deploying them cost."""

    chain_id: int
    deployer: str
    token: str  # TestUSD
    reputation: str  # ReputationRegistry
    providers: str  # ProviderRegistry
    escrow: str  # JobEscrow
    fee_recipient: str
    block: int  # the block of the last deployment transaction
    gas_used: dict[str, int] = field(default_factory=dict)

    def addresses(self) -> dict[str, str]:
        """Checksummed address by contract name."""
        return {
            "TestUSD": self.token,
            "ReputationRegistry": self.reputation,
            "ProviderRegistry": self.providers,
            "JobEscrow": self.escrow,
        }


def send(
    w3: Web3,
    account: LocalAccount,
    call: Any,
    *,
    what: str = "transaction",
    tx: dict[str, Any] | None = None,
    timeout: float = RECEIPT_TIMEOUT_S,
) -> TxReceipt:
    """Signs `call` (a web3 contract function or constructor) with `account`, sends it raw,
    waits for its receipt and raises TransactionFailed unless it succeeded.

    web3 estimates gas while building the transaction, so a call that would revert raises
    web3's ContractLogicError/ContractCustomError (with the revert data) before anything is sent.
    """
    params: dict[str, Any] = {
        "from": account.address,
        "nonce": w3.eth.get_transaction_count(account.address, "pending"),
        "chainId": w3.eth.chain_id,
    }
    params.update(tx or {})
    built = call.build_transaction(params)
    signed = account.sign_transaction(built)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout)
    if receipt["status"] != 1:
        raise TransactionFailed(what, receipt)
    return receipt


def deploy_contract(
    w3: Web3, account: LocalAccount, name: str, *args: Any
) -> tuple[str, TxReceipt]:
    """Deploys the committed artifact `name`; returns its address and the receipt."""
    artifact = artifacts.load(name)
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    receipt = send(w3, account, factory.constructor(*args), what=f"deploy {name}")
    return receipt["contractAddress"], receipt


def deploy_all(
    w3: Web3,
    deployer_key: str,
    *,
    min_stake: int,
    unbonding_delay_s: int,
    fee_bps: int = 100,
    fee_recipient: str | None = None,
    half_life_s: int,
) -> Deployment:
    """Deploys the four contracts from the account of `deployer_key` (hex) and wires the
    escrow into both registries. The fee recipient defaults to the deployer."""
    from eth_account import Account
    from web3 import Web3

    account = Account.from_key(deployer_key)
    recipient = Web3.to_checksum_address(fee_recipient or account.address)
    gas: dict[str, int] = {}

    def deploy(name: str, *args: Any) -> str:
        address, receipt = deploy_contract(w3, account, name, *args)
        gas[name] = receipt["gasUsed"]
        return address

    token = deploy("TestUSD")
    reputation = deploy("ReputationRegistry", half_life_s)
    providers = deploy("ProviderRegistry", token, min_stake, unbonding_delay_s)
    escrow = deploy("JobEscrow", token, providers, reputation, fee_bps, recipient)
    block = 0
    for name, address in (("ProviderRegistry", providers), ("ReputationRegistry", reputation)):
        contract = w3.eth.contract(address=address, abi=artifacts.load(name).abi)
        receipt = send(w3, account, contract.functions.setEscrow(escrow), what=f"{name}.setEscrow")
        gas[f"{name}.setEscrow"] = receipt["gasUsed"]
        block = receipt["blockNumber"]
    return Deployment(
        chain_id=w3.eth.chain_id,
        deployer=account.address,
        token=token,
        reputation=reputation,
        providers=providers,
        escrow=escrow,
        fee_recipient=recipient,
        block=block,
        gas_used=gas,
    )
