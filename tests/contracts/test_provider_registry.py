"""ProviderRegistry: peer id <-> payout address, stake, unbonding, and slashing through the
escrow's equivocation proofs (real ones slash; forged or non-conflicting ones do not). Runs on
the embedded chain and on anvil (see conftest.py); receipts are signed with eth-account."""

from __future__ import annotations

from typing import Any

from eth_utils import keccak
from web3.logs import DISCARD

TOKEN = 10**6
MIN_STAKE = 100 * TOKEN
UNBONDING_DELAY_S = 7 * 24 * 3600
JOB = keccak(b"job one")


def test_register_binds_one_peer_id_to_one_payout_address(chain: Any) -> None:
    providers = chain.providers.functions
    receipt = chain.send("outsider", providers.register(b"12D3KooW-outsider"))
    event = chain.providers.events.Registered().process_receipt(receipt, errors=DISCARD)[0]["args"]
    assert event["provider"] == chain.addr("outsider")
    assert event["peerIdHash"] == keccak(b"12D3KooW-outsider")
    assert event["peerId"] == b"12D3KooW-outsider"
    assert providers.payoutOf(keccak(b"12D3KooW-outsider")).call() == chain.addr("outsider")
    assert providers.peerIdOf(chain.addr("outsider")).call() == b"12D3KooW-outsider"
    assert providers.payoutOf(keccak(b"nobody")).call() == "0x" + "00" * 20
    with chain.reverts("AlreadyRegistered"):
        chain.send("outsider", providers.register(b"another peer id"))
    with chain.reverts("PeerIdTaken"):
        chain.send("payer", providers.register(b"12D3KooW-outsider"))
    with chain.reverts("EmptyPeerId"):
        chain.send("payer", providers.register(b""))


def test_active_needs_registration_and_the_minimum_stake(chain: Any) -> None:
    providers = chain.providers.functions
    outsider = chain.addr("outsider")
    chain.send("outsider", chain.token.functions.mint(outsider, MIN_STAKE))
    chain.send("outsider", chain.token.functions.approve(chain.providers.address, MIN_STAKE))
    with chain.reverts("NotRegistered"):
        chain.send("outsider", providers.stake(MIN_STAKE))
    chain.send("outsider", providers.register(b"peer-outsider"))
    chain.send("outsider", providers.stake(MIN_STAKE - 1))
    assert providers.isActive(outsider).call() is False
    with chain.reverts("ZeroAmount"):
        chain.send("outsider", providers.stake(0))
    receipt = chain.send("outsider", providers.stake(1))
    event = chain.providers.events.Staked().process_receipt(receipt, errors=DISCARD)[0]["args"]
    assert dict(event) == {"provider": outsider, "amount": 1, "stake": MIN_STAKE}
    assert providers.isActive(outsider).call() is True
    assert providers.stakeOf(outsider).call() == MIN_STAKE
    assert chain.balance(chain.providers.address) == 3 * MIN_STAKE  # with the fixture's two
    assert providers.isActive(chain.addr("payer")).call() is False


def test_unstake_respects_the_unbonding_delay(chain: Any) -> None:
    providers = chain.providers.functions
    provider = chain.addr("provider")
    with chain.reverts("InsufficientStake"):
        chain.send("provider", providers.requestUnstake(MIN_STAKE + 1))
    with chain.reverts("NothingUnbonding"):
        chain.send("provider", providers.withdrawUnstaked())
    receipt = chain.send("provider", providers.requestUnstake(40 * TOKEN))
    requested_at = chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    ready_at = requested_at + UNBONDING_DELAY_S
    event = chain.providers.events.UnstakeRequested().process_receipt(receipt, errors=DISCARD)
    assert dict(event[0]["args"]) == {
        "provider": provider,
        "amount": 40 * TOKEN,
        "stake": 60 * TOKEN,
        "unbonding": 40 * TOKEN,
        "readyAt": ready_at,
    }
    assert providers.stakeOf(provider).call() == 60 * TOKEN
    assert providers.unbondingOf(provider).call() == [40 * TOKEN, ready_at]
    assert providers.isActive(provider).call() is False  # below the minimum now
    with chain.reverts("UnbondingNotOver"):
        chain.send("provider", providers.withdrawUnstaked())
    chain.advance(ready_at - chain.now() - 30)
    with chain.reverts("UnbondingNotOver"):
        chain.send("provider", providers.withdrawUnstaked())
    chain.advance(30)
    before = chain.balance("provider")
    receipt = chain.send("provider", providers.withdrawUnstaked())
    event = chain.providers.events.Unstaked().process_receipt(receipt, errors=DISCARD)[0]["args"]
    assert dict(event) == {"provider": provider, "amount": 40 * TOKEN}
    assert chain.balance("provider") - before == 40 * TOKEN
    assert providers.unbondingOf(provider).call() == [0, ready_at]
    with chain.reverts("NothingUnbonding"):
        chain.send("provider", providers.withdrawUnstaked())
    assert chain.balance(chain.providers.address) == 2 * MIN_STAKE - 40 * TOKEN


def test_only_the_escrow_slashes_and_the_escrow_is_set_once(chain: Any) -> None:
    providers = chain.providers.functions
    with chain.reverts("NotEscrow"):
        chain.send("outsider", providers.slash(chain.addr("provider")))
    with chain.reverts("NotEscrow"):
        chain.send("deployer", providers.slash(chain.addr("provider")))
    with chain.reverts("EscrowAlreadySet"):
        chain.send("deployer", providers.setEscrow(chain.addr("outsider")))
    with chain.reverts("NotDeployer"):
        chain.send("outsider", providers.setEscrow(chain.addr("outsider")))
    assert providers.escrow().call() == chain.escrow.address
    assert providers.stakeOf(chain.addr("provider")).call() == MIN_STAKE


def _signed_pair(chain: Any, signer_b: str = "provider", **b_fields: Any) -> list[Any]:
    """Receipts a and b (b differs by `b_fields`, a different output by default), signed."""
    a = chain.receipt(JOB)
    b = chain.receipt(JOB, **{"outputHash": keccak(b"a different output"), **b_fields})
    return [
        chain.as_tuple("Receipt", a),
        chain.sign("provider", "Receipt", a),
        chain.as_tuple("Receipt", b),
        chain.sign(signer_b, "Receipt", b),
    ]


def test_equivocation_slashes_active_and_unbonding_stake(chain: Any) -> None:
    providers = chain.providers.functions
    provider = chain.addr("provider")
    chain.deposit(JOB, 100 * TOKEN)
    voucher = chain.voucher(JOB, 10 * TOKEN, 1)
    signature = chain.sign("payer", "Voucher", voucher)
    chain.settle(voucher, signature)
    assert chain.reputation.functions.scoreOf(provider).call() == 10 * TOKEN
    chain.send("provider", providers.requestUnstake(30 * TOKEN))  # unbonding is still slashable
    fee_before = chain.balance("fee")

    receipt = chain.send(
        "outsider", chain.escrow.functions.reportEquivocation(*_signed_pair(chain))
    )
    event = chain.escrow.events.EquivocationReported().process_receipt(receipt, errors=DISCARD)
    args = event[0]["args"]
    assert (args["provider"], args["reporter"], args["slashed"]) == (
        provider,
        chain.addr("outsider"),
        MIN_STAKE,
    )
    assert (args["jobId"], args["step"]) == (JOB, 7)
    slashed = chain.providers.events.Slashed().process_receipt(receipt, errors=DISCARD)[0]["args"]
    assert (slashed["amount"], slashed["recipient"]) == (MIN_STAKE, chain.addr("fee"))
    assert chain.balance("fee") - fee_before == MIN_STAKE
    assert providers.stakeOf(provider).call() == 0
    assert providers.unbondingOf(provider).call()[0] == 0
    assert providers.isActive(provider).call() is False
    assert providers.isSlashed(provider).call() is True
    record = chain.reputation.functions.recordOf(provider).call()
    assert (record[0], record[3]) == (0, 1)  # score gone, one slash
    assert chain.reputation.functions.scoreOf(provider).call() == 0

    later = chain.voucher(JOB, 20 * TOKEN, 2)
    with chain.reverts("ProviderNotActive"):  # a slashed provider is paid nothing more
        chain.settle(later, chain.sign("payer", "Voucher", later))
    with chain.reverts("ProviderSlashed"):
        chain.send("outsider", chain.escrow.functions.reportEquivocation(*_signed_pair(chain)))
    chain.advance(UNBONDING_DELAY_S + 1)
    with chain.reverts("ProviderSlashed"):
        chain.send("provider", providers.withdrawUnstaked())
    assert providers.stakeOf(chain.addr("provider2")).call() == MIN_STAKE  # others untouched


def test_forged_equivocation_proofs_do_not_slash(chain: Any) -> None:
    report = chain.escrow.functions.reportEquivocation
    provider = chain.addr("provider")
    a, sig_a, b, sig_b = _signed_pair(chain)
    forged = [
        _signed_pair(chain, signer_b="provider2"),  # b signed by someone else
        [a, sig_a, b, b"\x02" * 65],  # a garbage signature
        [a, sig_a, b, sig_b[:30]],  # a truncated one
        [a, sig_a, b, sig_a],  # a's signature on b
    ]
    for proof in forged:
        with chain.reverts("BadSignature"):
            chain.send("outsider", report(*proof))
    # receipts naming provider2 but signed by provider: the signer is not the provider named
    a2 = chain.receipt(JOB, provider="provider2")
    b2 = chain.receipt(JOB, provider="provider2", outputHash=keccak(b"other"))
    with chain.reverts("BadSignature"):
        chain.send(
            "outsider",
            report(
                chain.as_tuple("Receipt", a2),
                chain.sign("provider", "Receipt", a2),
                chain.as_tuple("Receipt", b2),
                chain.sign("provider", "Receipt", b2),
            ),
        )
    # signed for another chain's domain
    a3, b3 = chain.receipt(JOB), chain.receipt(JOB, outputHash=keccak(b"other"))
    with chain.reverts("BadSignature"):
        chain.send(
            "outsider",
            report(
                chain.as_tuple("Receipt", a3),
                chain.sign("provider", "Receipt", a3, chain_id=1),
                chain.as_tuple("Receipt", b3),
                chain.sign("provider", "Receipt", b3, chain_id=1),
            ),
        )
    assert chain.providers.functions.stakeOf(provider).call() == MIN_STAKE
    assert chain.providers.functions.isActive(provider).call() is True


def test_non_conflicting_receipts_do_not_slash(chain: Any) -> None:
    report = chain.escrow.functions.reportEquivocation
    same_output = {"outputHash": keccak(b"output")}  # the receipt's default output
    honest = [
        same_output,  # the same result twice is no lie
        {"step": 8},  # different steps may differ
        {"session": keccak(b"session-2")},
        {"jobId": keccak(b"another job")},
        {"provider": "provider2"},
    ]
    for change in honest:
        with chain.reverts("NotEquivocation"):
            chain.send("outsider", report(*_signed_pair(chain, **change)))
    assert chain.providers.functions.stakeOf(chain.addr("provider")).call() == MIN_STAKE
    assert chain.providers.functions.isSlashed(chain.addr("provider")).call() is False
