"""The devnet's chain (daemon/payments/devnet_chain.py): a node's home gets the deployment
record and a funded payout account, providers stake, balances and the exact check of who got
what after a job."""

from __future__ import annotations

from pathlib import Path

from contracts.chain.records import read_record
from daemon.payments import devnet_chain as dc


def test_homes_funded_staked_and_balances_read(tmp_path: Path) -> None:
    with dc.DevnetChain() as chain:
        payer = chain.prepare_home(tmp_path / "a", "a")
        provider = chain.prepare_home(tmp_path / "b", "b")
        assert read_record(tmp_path / "a", "devnet") == chain.record
        chain.fund([payer, provider], 200 * dc.TUSD)
        chain.stake(provider, "12D3KooW-b")
        balances = chain.balances([payer, provider])
        assert balances == {
            "a": 200 * dc.TUSD,
            "b": 100 * dc.TUSD,
            "JobEscrow": 0,
            "ProviderRegistry": dc.MIN_STAKE,
        }
        start = chain.chain_time()
        chain.advance(1000)
        assert chain.chain_time() >= start + 1000


def test_check_balances_names_what_does_not_add_up() -> None:
    requester, p1, p2 = dc.Party("r", "0xR"), dc.Party("p1", "0x1"), dc.Party("p2", "0x2")
    before = {"r": 1000, "p1": 0, "p2": 0, "fees": 0, "JobEscrow": 0}
    paid = {"0x1": 300, "0x2": 100}
    after = {"r": 600, "p1": 297, "p2": 99, "fees": 4, "JobEscrow": 0}
    assert dc.check_balances(before, after, requester, [p1, p2], paid) == []
    wrong = dc.check_balances(
        before, {**after, "p2": 100, "fees": 3, "r": 601, "JobEscrow": 1}, requester, [p1, p2], paid
    )
    assert wrong == [
        "p2 got 100, expected 99",
        "fee recipient got 3, expected 4",
        "r spent 399, expected 400",
        "JobEscrow still holds part of the deposit",
    ]
    rows = list(dc.balance_rows({"a": 1_000_000, "b": 5}, {"a": 500_000, "b": 5}))
    assert rows == [
        ("a", "1 tUSD", "0.5 tUSD", "-0.5 tUSD"),
        ("b", "0.000005 tUSD", "0.000005 tUSD", " 0 tUSD"),
    ]
