"""TestUSD: 6 decimals, symbol tUSD, an open faucet capped per call. Runs on the embedded chain
and on anvil (see conftest.py)."""

from __future__ import annotations

from typing import Any

from web3.logs import DISCARD

MINT_CAP = 1_000_000 * 10**6


def test_metadata(chain: Any) -> None:
    token = chain.token.functions
    assert token.decimals().call() == 6
    assert token.symbol().call() == "tUSD"
    assert token.name().call() == "gridmesh Test USD"
    assert token.MINT_CAP().call() == MINT_CAP


def test_anyone_mints_up_to_the_cap_per_call(chain: Any) -> None:
    token = chain.token.functions
    outsider = chain.addr("outsider")
    supply = token.totalSupply().call()
    receipt = chain.send("outsider", token.mint(chain.addr("provider2"), MINT_CAP))
    minted = chain.token.events.Minted().process_receipt(receipt, errors=DISCARD)[0]["args"]
    assert (minted["by"], minted["to"], minted["amount"]) == (
        outsider,
        chain.addr("provider2"),
        MINT_CAP,
    )
    transfer = chain.token.events.Transfer().process_receipt(receipt, errors=DISCARD)[0]["args"]
    assert (transfer["from"], transfer["value"]) == ("0x" + "00" * 20, MINT_CAP)
    assert token.totalSupply().call() == supply + MINT_CAP
    with chain.reverts("MintCapExceeded"):
        chain.send("outsider", token.mint(outsider, MINT_CAP + 1))
    assert chain.balance("outsider") == 0
    assert token.totalSupply().call() == supply + MINT_CAP


def test_transfers_are_plain_erc20(chain: Any) -> None:
    token = chain.token.functions
    chain.send("outsider", token.mint(chain.addr("outsider"), 5))
    chain.send("outsider", token.transfer(chain.addr("fee"), 2))
    assert (chain.balance("outsider"), chain.balance("fee")) == (3, 2)
    with chain.reverts("ERC20InsufficientBalance"):
        chain.send("outsider", token.transfer(chain.addr("fee"), 4))
    with chain.reverts("ERC20InsufficientAllowance"):  # OpenZeppelin's own errors decode too
        chain.send("fee", token.transferFrom(chain.addr("outsider"), chain.addr("fee"), 1))
