"""ReputationRegistry: scores only the escrow writes, halving every halfLife seconds (linearly
between halvings), zeroed by a slash. Runs on the embedded chain and on anvil (conftest.py)."""

from __future__ import annotations

from typing import Any

from eth_utils import keccak
from web3.logs import DISCARD

TOKEN = 10**6
HALF_LIFE = 100_000
JOB = keccak(b"job one")


def decayed(score: int, elapsed: int) -> int:
    """The contract's rule, in Python."""
    halvings, rest = divmod(elapsed, HALF_LIFE)
    score = score >> halvings if halvings < 256 else 0
    return score - score * rest // (2 * HALF_LIFE)


def _standalone(chain: Any) -> Any:
    """A registry whose escrow is the test account "outsider", so the test writes directly.

    A score of 1000 with a half-life of 100,000 s stays exact to the unit if a block lands up
    to 199 s later than asked (anvil stamps blocks with the wall clock plus its offset)."""
    registry = chain.deploy("ReputationRegistry", HALF_LIFE)
    chain.send("deployer", registry.functions.setEscrow(chain.addr("outsider")))
    return registry


def test_score_halves_every_half_life(chain: Any) -> None:
    registry = _standalone(chain)
    provider = chain.addr("provider")
    score = registry.functions.scoreOf(provider)
    receipt = chain.send("outsider", registry.functions.recordSettlement(provider, 1000))
    start = chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    assert score.call() == 1000

    def at(elapsed: int) -> int:
        chain.advance(start + elapsed - chain.now())
        return score.call()

    assert [decayed(1000, t * HALF_LIFE // 2) for t in (1, 2, 3, 4)] == [750, 500, 375, 250]
    assert at(HALF_LIFE // 2) == 750  # linear between halvings: 1000 - 1000 * 500 / 2000
    assert at(HALF_LIFE) == 500
    assert at(HALF_LIFE * 3 // 2) == 375
    assert at(2 * HALF_LIFE) == 250
    assert at(10 * HALF_LIFE) == 0  # 1000 >> 10
    assert at(300 * HALF_LIFE) == 0  # past 256 halvings: no shift overflow


def test_decay_applies_before_each_update(chain: Any) -> None:
    registry = _standalone(chain)
    provider = chain.addr("provider")
    receipt = chain.send("outsider", registry.functions.recordSettlement(provider, 1000))
    start = chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    chain.advance(start + HALF_LIFE - 1 - chain.now())
    receipt = chain.send("outsider", registry.functions.recordSettlement(provider, 1000))
    # anvil may mine the next block in the same second as the last, eth-tester one second on
    elapsed = chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"] - start
    assert HALF_LIFE - 1 <= elapsed <= HALF_LIFE
    expected = decayed(1000, elapsed) + 1000  # 1500, or 1501 one second short
    assert expected in (1500, 1501)
    event = registry.events.SettlementRecorded().process_receipt(receipt, errors=DISCARD)[0]
    assert (event["args"]["amount"], event["args"]["score"]) == (1000, expected)
    assert event["args"]["settlements"] == 2
    score, _updated, settlements, slashes = registry.functions.recordOf(provider).call()
    assert (score, settlements, slashes) == (expected, 2, 0)


def test_a_slash_zeroes_the_score(chain: Any) -> None:
    registry = _standalone(chain)
    provider = chain.addr("provider")
    chain.send("outsider", registry.functions.recordSettlement(provider, 1000))
    receipt = chain.send("outsider", registry.functions.recordSlash(provider))
    event = registry.events.SlashRecorded().process_receipt(receipt, errors=DISCARD)[0]["args"]
    assert (event["provider"], event["previousScore"], event["slashes"]) == (provider, 1000, 1)
    assert registry.functions.scoreOf(provider).call() == 0
    assert tuple(registry.functions.recordOf(provider).call())[2:] == (1, 1)  # settlements, slashes
    assert registry.functions.scoreOf(chain.addr("provider2")).call() == 0


def test_only_the_escrow_updates_scores(chain: Any) -> None:
    reputation = chain.reputation.functions
    provider = chain.addr("provider")
    for who in ("outsider", "deployer", "provider"):
        with chain.reverts("NotEscrow"):
            chain.send(who, reputation.recordSettlement(provider, 10**12))
        with chain.reverts("NotEscrow"):
            chain.send(who, reputation.recordSlash(chain.addr("provider2")))
    with chain.reverts("EscrowAlreadySet"):
        chain.send("deployer", reputation.setEscrow(chain.addr("outsider")))
    with chain.reverts("NotDeployer"):
        chain.send("outsider", reputation.setEscrow(chain.addr("outsider")))
    assert reputation.scoreOf(provider).call() == 0
    # the escrow raises it by what a settlement pays, the fee included
    chain.deposit(JOB, 100 * TOKEN)
    voucher = chain.voucher(JOB, 12_345_678, 1)
    receipt = chain.settle(voucher, chain.sign("payer", "Voucher", voucher))
    event = chain.reputation.events.SettlementRecorded().process_receipt(receipt, errors=DISCARD)
    assert event[0]["args"]["provider"] == provider
    assert reputation.scoreOf(provider).call() == 12_345_678


def test_scores_saturate_instead_of_reverting_a_settlement(chain: Any) -> None:
    registry = _standalone(chain)
    provider = chain.addr("provider")
    chain.send("outsider", registry.functions.recordSettlement(provider, 2**256 - 1))
    assert registry.functions.scoreOf(provider).call() == 2**128 - 1
    chain.send("outsider", registry.functions.recordSettlement(provider, 2**128))
    assert registry.functions.scoreOf(provider).call() == 2**128 - 1


def test_a_zero_half_life_is_refused(chain: Any) -> None:
    with chain.reverts("ZeroHalfLife"):
        chain.deploy("ReputationRegistry", 0)
