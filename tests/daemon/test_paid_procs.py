"""Paid generation end to end in processes: a dev chain (in the test's process), shard servers
and a requester as `gridmesh daemon` processes. A paid generation produces signed receipts,
the requester's vouchers and on-chain settlements; after the refund every account's balance is
exactly right. A provider SIGKILLed mid-job is paid, once it comes back, for what it stored as
acknowledged and nothing more."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.devnet import Devnet, wait_for
from daemon.payments import devnet_chain as dc

torch = pytest.importorskip("torch")

from tests.daemon.shard_procs import PROMPT, reference_tokens, tiny_model  # noqa: E402

pytestmark = pytest.mark.procs

PRICE = 1000  # per layer-token, every provider


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory)


@pytest.fixture
def chain() -> Iterator[dc.DevnetChain]:
    with dc.DevnetChain() as running:
        yield running


def _paid_net(chain: dc.DevnetChain, root: Path, size: int) -> tuple[Devnet, list[dc.Party]]:
    """`size` daemons whose homes hold the deployment; every node funded. The devnet's config:
    its records stay valid 10 s, so a loaded machine's late republish does not hide a
    provider's payout address from the requester."""
    net = Devnet(
        size,
        root=root,
        env={
            "GRIDMESH_CHAIN__RPC_URL": chain.url,
            "GRIDMESH_MARKET__PRICE_PER_UNIT": str(PRICE),
            "GRIDMESH_MARKET__SETTLE_THRESHOLD": str(10**12),  # settle at session end only
        },
    )
    parties = [chain.prepare_home(root / f"node{i}", f"node{i}") for i in range(size)]
    chain.fund(parties, 100 * dc.TUSD)
    return net, parties


def _deploy(net: Devnet, model_dir: Path, plan: list[tuple[int, int, int]]) -> None:
    body = [{"peer_id": net.daemons[i].peer_id, "start": a, "end": b} for i, a, b in plan]
    result = net.daemons[0].call(
        "block_deploy", {"model": "tiny", "model_dir": str(model_dir), "plan": body}
    )
    assert all(r["ok"] for r in result["results"]), result
    wait_for(
        lambda: (
            len(net.daemons[0].call("block_list", {"model": "tiny"})["announced"]["tiny"])
            == len(plan)
        ),
        20,
        "the shards to be announced",
    )


def _earnings(home: Path) -> dict[str, dict[str, Any]]:
    """The provider's payments store, per job id."""
    from daemon.payments.store import earnings

    return {row["job_id"]: row for row in earnings(home)}


def _acknowledged(home: Path, job: str) -> int:
    """What the provider's store holds acknowledged for `job` (0 while its writer holds the
    database)."""
    try:
        return int(_earnings(home).get(job, {}).get("acknowledged") or 0)
    except sqlite3.OperationalError:
        return 0


def _route(net: Devnet, client: Any, gen: str) -> list[dict[str, Any]]:
    """The streaming generation's route once it has one; its error if it ended without."""
    state = client.call("generate_poll", {"job": gen})
    if state["done"]:
        logs = "\n".join(f"--- {d.home.name} ---\n{d.log_tail(15)}" for d in net.daemons)
        raise AssertionError(f"the generation ended early: {state['error']}\n{logs}")
    return state["route"]


def _settle_and_refund(
    chain: dc.DevnetChain, net: Devnet, requester: dc.Party, job: str, providers: list[dc.Party]
) -> tuple[dict[str, int], int]:
    chain.advance(dc.DEADLINE_S + 1)
    refunded = dc.refund(chain, net.daemons[0], requester, job, has_rpc=False)
    return dc.settled(chain, job, providers), refunded


def test_paid_generation_pays_exactly_what_was_acknowledged(
    tmp_path: Path, model_dir: Path, chain: dc.DevnetChain
) -> None:
    new_tokens = 12
    expected = reference_tokens(model_dir, new_tokens)
    net, parties = _paid_net(chain, tmp_path / "net", 4)
    requester, providers = parties[0], parties[1:]
    fees = dc.Party("fees", chain.fee_recipient)
    with net:
        net.wait_all_found(30)
        for party, daemon in zip(providers, net.daemons[1:], strict=True):
            chain.stake(party, daemon.peer_id)
        _deploy(net, model_dir, [(1, 0, 2), (2, 2, 4), (3, 4, 6)])
        before = chain.balances([*parties, fees])
        job = dc.create_job(chain, net.daemons[0], requester, has_rpc=False)
        answer = net.daemons[0].call(
            "generate",
            {"model": "tiny", "token_ids": PROMPT, "max_tokens": new_tokens, "job_id": job},
        )
        assert answer["tokens"] == expected
        # every layer-token of the generation, at the providers' price, two layers each
        owed = 2 * (len(PROMPT) + new_tokens) * PRICE
        acked = wait_for(
            lambda: (a := dc.acknowledged(net.daemons[0], job)) and len(a) == 3 and a,
            30,
            "vouchers to all three providers",
        )
        assert acked == {p.address: owed for p in providers}
        wait_for(
            lambda: dc.settled(chain, job, providers) == acked,
            60,
            "the providers to settle at the session's end",
            poll_s=0.5,
        )
        for party, daemon in zip(providers, net.daemons[1:], strict=True):
            row = _earnings(daemon.home)[job]
            assert row["receipts"] == new_tokens + 1  # one per step: the prompt's, then one a token
            assert row["signed"] == row["acknowledged"] == row["settled"] == owed, row
            assert row["pending"] == 0 and row["provider"] == party.address
        paid, refunded = _settle_and_refund(chain, net, requester, job, providers)
    after = chain.balances([*parties, fees])
    assert refunded == dc.DEPOSIT - 3 * owed
    assert dc.check_balances(before, after, requester, providers, paid) == []
    assert after[requester.name] == before[requester.name] - 3 * owed
    fee = owed * dc.FEE_BPS // 10_000
    assert all(after[p.name] == before[p.name] + owed - fee for p in providers)
    assert after["fees"] == before["fees"] + 3 * fee


def test_a_provider_killed_mid_job_is_paid_what_it_holds_acknowledged(
    tmp_path: Path, model_dir: Path, chain: dc.DevnetChain
) -> None:
    long = 80  # long enough that the kill lands mid-generation
    expected = reference_tokens(model_dir, long)
    net, parties = _paid_net(chain, tmp_path / "net", 5)
    requester, providers = parties[0], parties[1:]
    fees = dc.Party("fees", chain.fee_recipient)
    with net:
        net.wait_all_found(30)
        for party, daemon in zip(providers, net.daemons[1:], strict=True):
            chain.stake(party, daemon.peer_id)
        _deploy(net, model_dir, [(1, 0, 2), (2, 2, 4), (3, 2, 4), (4, 4, 6)])
        before = chain.balances([*parties, fees])
        job = dc.create_job(chain, net.daemons[0], requester, has_rpc=False)
        client = net.daemons[0]
        params = {"model": "tiny", "token_ids": PROMPT, "max_tokens": long, "stream": True}
        gen = client.call("generate", {**params, "job_id": job})["job"]
        route = wait_for(lambda: _route(net, client, gen), 30, "route")
        victim = next(d for d in net.daemons if d.peer_id == route[1]["peer_id"])
        victim_party = parties[net.daemons.index(victim)]
        wait_for(
            lambda: client.call("generate_poll", {"job": gen})["n_tokens"] >= 5, 30, "5 tokens"
        )
        # the voucher acknowledging its receipts comes back asynchronously: on a loaded
        # machine 5 tokens may pass before the first one is stored
        wait_for(lambda: _acknowledged(victim.home, job) > 0, 30, "a stored acknowledgement")
        victim.kill()
        state = wait_for(
            lambda: (s := client.call("generate_poll", {"job": gen}))["done"] and s, 90, "the end"
        )
        assert state["error"] is None and state["tokens"] == expected
        if not state["recoveries"]:
            pytest.fail(f"the kill came too late to test failover: {state['n_tokens']} tokens")
        stored = _earnings(victim.home)[job]  # what the victim held when it died
        assert 0 < stored["acknowledged"] <= stored["signed"]
        acked = wait_for(
            lambda: (a := dc.acknowledged(client, job)) and len(a) == 4 and a, 30, "vouchers"
        )
        assert stored["acknowledged"] <= acked[victim_party.address]
        survivors = [p for p in providers if p is not victim_party]
        wait_for(
            lambda: all(
                dc.settled(chain, job, [p])[p.address] == acked[p.address] for p in survivors
            ),
            60,
            "the live providers to settle",
            poll_s=0.5,
        )
        assert dc.settled(chain, job, [victim_party])[victim_party.address] == 0
        victim.start()  # back before the deadline: it settles what it stored at start
        wait_for(
            lambda: (
                dc.settled(chain, job, [victim_party])[victim_party.address]
                == stored["acknowledged"]
            ),
            60,
            "the restarted provider to settle what it held acknowledged",
            poll_s=0.5,
        )
        paid, refunded = _settle_and_refund(chain, net, requester, job, providers)
    after = chain.balances([*parties, fees])
    assert paid[victim_party.address] == stored["acknowledged"]  # and nothing more
    assert refunded == dc.DEPOSIT - sum(paid.values())
    assert dc.check_balances(before, after, requester, providers, paid) == []
