"""Paid generation through whole daemons (in one process, on memnet and trio's virtual clock),
with an in-memory escrow of JobEscrow's rules (tests/daemon/payments/paid_fakes.py; the same
flow against a real dev chain is test_paid_shards_chain.py).

A requester and shard servers: a paid generation gives exactly the tokens of an unpaid one,
every provider stores its signed receipts and a voucher whose cumulative amount is what they
add up to, and settlement pays exactly that minus the 1 % fee. Attacks as a real peer would
make them: a server whose receipt has a bad signature, a broken hash chain, a price over the
job's maximum or an output hash that is not what arrived is routed around (the step fails
over, nothing is acknowledged for it); vouchers for another job, over what the provider
signed or with a stale nonce are refused by the provider, which says why; paid sessions for
unknown or expired jobs are refused."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from contracts.eip712 import (
    Receipt,
    SignedReceipt,
    SignedVoucher,
    Signer,
    Voucher,
    decode_signed_receipt,
    encode_signed_receipt,
)
from daemon.api.client import RPCCallError
from daemon.node import IN_PROCESS, Daemon
from daemon.payments import wire
from daemon.payments.jobs import PaidJob
from tests.daemon.harness import FAST, MemoryCluster, RunningDaemon, inline_threads, memory_addr
from tests.daemon.payments.paid_fakes import DOMAIN, FEE_BPS, FakeEscrow, Ledger

LAYERS = 6
PROMPT = list(b"paid shards")
NEW_TOKENS = 12
JOB = bytes([0x11] * 32)
MAX_PRICE = 10
DEPOSIT = 10**9


@pytest.fixture(autouse=True)
def _inline(monkeypatch):
    inline_threads(monkeypatch)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, list[int]]:
    torch = pytest.importorskip("torch")
    from daemon.shards.model import greedy_generate, load_model, make_tiny

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the daemons (shards.torch_threads = 1)
    try:
        model_dir = make_tiny(tmp_path_factory.mktemp("tiny") / "tiny", layers=LAYERS, seed=7)
        with torch.no_grad():
            expected = greedy_generate([load_model(model_dir)], PROMPT, NEW_TOKENS)
    finally:
        torch.set_num_threads(before)
    return model_dir, expected


class PaidCluster(MemoryCluster):
    """Whole daemons whose Escrow is a `FakeEscrow` on one shared `Ledger`."""

    def __init__(self, root: Path, nursery: trio.Nursery, ledger: Ledger) -> None:
        super().__init__(root, nursery)
        self.ledger = ledger
        self.unchained: set[str] = set()  # homes (names) of daemons without a chain

    def escrow(self, home: Path, config: Any, ident: Any) -> FakeEscrow | None:
        if home.name in self.unchained:
            return None
        return FakeEscrow(self.ledger, Signer(ident.payout_key))

    async def add_priced(self, price: int, threshold: int = 10**12) -> RunningDaemon:
        self.settings = {**FAST, "market": {"price_per_unit": price, "settle_threshold": threshold}}
        bootstrap = [self.daemons[-1].addr] if self.daemons else []
        return await self.add(self.root / f"node{len(self.daemons)}", bootstrap)

    async def _launch(self, home: Path, bootstrap: list[str]) -> RunningDaemon:
        home.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before the daemon runs
        parts = replace(IN_PROCESS, detect_resources=self.detect_resources, escrow=self.escrow)
        daemon = Daemon(home, self.config(bootstrap), network=self._network, parts=parts)
        self._launched += 1
        running = RunningDaemon(daemon, self.hub.node(daemon.ident.peer_id), "")
        running.addr = memory_addr(self._launched, daemon.ident.peer_id)
        await self.nursery.start(self._run, running)
        return running


def payer_of(requester: RunningDaemon) -> Signer:
    return Signer(requester.daemon.ident.payout_key)


def address(daemon: RunningDaemon) -> bytes:
    return daemon.daemon.paid.provider.address


def create_job(
    net: PaidCluster,
    requester: RunningDaemon,
    job_id: bytes = JOB,
    *,
    on_chain: bool = True,
    deadline_s: float = 3600,
) -> None:
    """What `job create` leaves behind: a deposit on the (fake) chain and the job in the book."""
    deadline = time.time() + deadline_s
    if on_chain:
        net.ledger.deposit(job_id, payer_of(requester), DEPOSIT, MAX_PRICE, deadline)
    book = requester.daemon.paid.book
    book.add(PaidJob(job_id, MAX_PRICE, DEPOSIT, int(deadline), time.time()))


async def deploy(net: MemoryCluster, model_dir: Path, plan: list[tuple[RunningDaemon, int, int]]):
    rows = [{"peer_id": d.peer_id, "start": a, "end": b} for d, a, b in plan]
    result = await net.daemons[0].call(
        "block_deploy", {"model": "tiny", "model_dir": str(model_dir), "plan": rows}
    )
    assert all(r["ok"] for r in result["results"]), result

    async def seen() -> bool:
        listed = await net.daemons[0].call("block_list", {"model": "tiny"})
        return len(listed["announced"].get("tiny", [])) == len(plan)

    await net.wait_for(seen, 15, "every shard announced")


async def cluster(nursery: trio.Nursery, root: Path, prices: list[int]) -> PaidCluster:
    net = PaidCluster(root, nursery, Ledger())
    await net.add_priced(0)  # the requester
    for price in prices:
        await net.add_priced(price)
    await net.wait_for(net.all_found, 60, "all daemons to find each other")
    return net


async def settled(net: PaidCluster, providers: list[RunningDaemon]) -> None:
    """Wait until every provider's store holds nothing unsettled."""

    async def done() -> bool:
        return all(not p.daemon.paid.store.unsettled() for p in providers)

    await net.wait_for(done, 30, "settlement")


GENERATE = {"model": "tiny", "token_ids": PROMPT, "max_tokens": NEW_TOKENS}


@pytest.mark.parametrize("relay", [False, True])
async def test_a_paid_generation_pays_each_provider_exactly_what_it_signed(
    autojump_clock, tmp_path, tiny, relay
):
    model_dir, expected = tiny
    prices = [3, 5, 7]
    async with trio.open_nursery() as nursery:
        net = await cluster(nursery, tmp_path, prices)
        requester, *servers = net.daemons
        await deploy(net, model_dir, [(d, 2 * i, 2 * i + 2) for i, d in enumerate(servers)])
        create_job(net, requester)
        result = await requester.call("generate", {**GENERATE, "job_id": JOB.hex(), "relay": relay})
        assert result["tokens"] == expected
        assert [h["peer_id"] for h in result["route"]] == [d.peer_id for d in servers]
        assert result["forwarding"] == ("relayed" if relay else "chained")
        payment = result["payment"]
        assert payment["receipts_refused"] == [] and payment["vouchers_refused"] == []
        await settled(net, servers)
        # one prefill of the prompt, then one token per step (the last one's step included)
        tokens = len(PROMPT) + NEW_TOKENS
        total = 0
        for server, price in zip(servers, prices, strict=True):
            account = server.daemon.paid.store.account(JOB, address(server))
            owed = 2 * tokens * price  # 2 layers per server
            assert account.receipts == 1 + NEW_TOKENS
            assert account.signed == account.acknowledged == account.settled == owed
            receipts = server.daemon.paid.store.receipts(JOB)
            assert sum(r.receipt.amount for r in receipts) == owed
            key = (JOB, address(server))
            assert net.ledger.paid[key] == owed
            fee = owed * FEE_BPS // 10_000
            payee = server.daemon.paid.provider.state()["address"]
            assert net.ledger.balances[payee] == owed - fee
            total += owed
        assert payment["acknowledged"] == total
        assert net.ledger.jobs[JOB].paid == total
        # the same tokens as free work
        free = await requester.call("generate", GENERATE)
        assert free["tokens"] == expected and "payment" not in free
        nursery.cancel_scope.cancel()


def tamper(kind: str, other: Signer, max_price: int):
    """A provider's receipts made bad the way `kind` says (re-signed with the provider's key
    where the signature itself is not the attack)."""

    def bad(raw: bytes, signer: Signer) -> bytes:
        signed = decode_signed_receipt(raw)
        r = signed.receipt
        fields = {name: getattr(r, name) for name in Receipt.__struct_fields__}
        if kind == "bad_signature":
            return encode_signed_receipt(SignedReceipt(r, other.sign(DOMAIN, r)))
        change = {
            "broken_chain": {"prev_receipt": bytes([0xEE] * 32)},
            "price_over_max": {"price_per_unit": max_price + 1},
            "output_mismatch": {"output_hash": bytes([0xEE] * 32)},
        }[kind]
        receipt = Receipt(**{**fields, **change})
        return encode_signed_receipt(SignedReceipt(receipt, signer.sign(DOMAIN, receipt)))

    return bad


@pytest.mark.parametrize(
    "kind", ["bad_signature", "broken_chain", "price_over_max", "output_mismatch"]
)
async def test_a_server_with_bad_receipts_is_routed_around_and_not_paid_for_them(
    autojump_clock, tmp_path, tiny, kind
):
    model_dir, expected = tiny
    async with trio.open_nursery() as nursery:
        # the cheap middle server cheats; a dearer replica of its range takes over
        net = await cluster(nursery, tmp_path, [3, 2, 4, 3])
        requester, first, cheat, honest, last = net.daemons
        plan = [(first, 0, 2), (cheat, 2, 4), (honest, 2, 4), (last, 4, 6)]
        await deploy(net, model_dir, plan)
        create_job(net, requester)
        provider = cheat.daemon.paid.provider
        sign, bad = provider.sign, tamper(kind, Signer(bytes([9] * 32)), MAX_PRICE)
        signed_steps = []

        async def cheating_sign(paid, received, sent, tokens):
            raw = await sign(paid, received, sent, tokens)
            signed_steps.append(raw)
            return bad(raw, provider.signer) if len(signed_steps) >= 3 else raw

        provider.sign = cheating_sign
        result = await requester.call("generate", {**GENERATE, "job_id": JOB.hex()})
        assert result["tokens"] == expected
        assert [r["peer_id"] for r in result["recoveries"]] == [cheat.peer_id]
        assert kind in result["recoveries"][0]["reason"], result["recoveries"]
        assert cheat.peer_id not in [h["peer_id"] for h in result["route"]]
        refused = result["payment"]["receipts_refused"]
        assert len(refused) == 1 and kind in refused[0] and cheat.peer_id in refused[0]
        await settled(net, [first, cheat, honest, last])
        # the cheat is paid for its two good receipts only, though it stored the third
        good = sum(decode_signed_receipt(raw).receipt.amount for raw in signed_steps[:2])
        account = cheat.daemon.paid.store.account(JOB, address(cheat))
        assert account.receipts == 3 and account.signed > good
        assert account.acknowledged == account.settled == good
        assert net.ledger.paid[(JOB, address(cheat))] == good
        for server in (first, honest, last):
            account = server.daemon.paid.store.account(JOB, address(server))
            assert account.acknowledged == account.settled > 0
            if server is last:  # it ran the failed step after the cheat: discarded, unpaid
                assert account.signed - account.acknowledged == 2 * 1 * 3
            else:
                assert account.signed == account.acknowledged
        nursery.cancel_scope.cancel()


async def offer(net: PaidCluster, requester: RunningDaemon, to: RunningDaemon, signed) -> Any:
    raw = await requester.daemon.net.request(to.peer_id, wire.VOUCHER_PROTOCOL, wire.offer(signed))
    return wire.decode(raw)


def voucher(payer: Signer, provider: bytes, amount: int, nonce: int, job: bytes = JOB):
    v = Voucher(
        job_id=job,
        provider=provider,
        cumulative_amount=amount,
        receipts_root=bytes(32),
        nonce=nonce,
    )
    return SignedVoucher(v, payer.sign(DOMAIN, v))


async def test_bad_vouchers_and_unfunded_jobs_are_refused_by_providers(
    autojump_clock, tmp_path, tiny
):
    model_dir, expected = tiny
    async with trio.open_nursery() as nursery:
        net = await cluster(nursery, tmp_path, [1])
        requester, server = net.daemons
        await deploy(net, model_dir, [(server, 0, LAYERS)])
        # a job this daemon never created
        with pytest.raises(RPCCallError) as err:
            await requester.call("generate", {**GENERATE, "job_id": "ab" * 32})
        assert "not in this node's job book" in err.value.message
        # in the book but unknown to the escrow, and one past its deadline
        create_job(net, requester, bytes([1] * 32), on_chain=False)
        create_job(net, requester, bytes([2] * 32), deadline_s=-1)
        for job, code in ((bytes([1] * 32), "unknown_job"), (bytes([2] * 32), "job_expired")):
            with pytest.raises(RPCCallError) as err:
                await requester.call("generate", {**GENERATE, "job_id": job.hex()})
            assert code in err.value.message, err.value.message
        assert server.daemon.paid.store.accounts() == []  # no receipt: no free work either
        # a paid generation, then vouchers as a hostile requester would send them
        create_job(net, requester)
        result = await requester.call("generate", {**GENERATE, "job_id": JOB.hex()})
        assert result["tokens"] == expected
        owed = LAYERS * (len(PROMPT) + NEW_TOKENS) * 1
        account = server.daemon.paid.store.account(JOB, address(server))
        assert account.acknowledged == owed and account.voucher.voucher.nonce >= 1
        nonce = account.voucher.voucher.nonce
        payer, me = payer_of(requester), address(server)
        cases = [
            (voucher(payer, me, owed, nonce + 1, job=bytes([3] * 32)), "unknown_job"),
            (voucher(payer, me, owed + 1, nonce + 1), "over_signed"),
            (voucher(payer, me, owed, nonce), "stale_voucher"),
            (voucher(Signer(bytes([9] * 32)), me, owed, nonce + 1), "bad_signature"),
        ]
        for signed, code in cases:
            reply = await offer(net, requester, server, signed)
            assert isinstance(reply, wire.Refused) and reply.code == code, reply
            assert reply.message
        assert server.daemon.paid.store.account(JOB, me).voucher == account.voucher
        nursery.cancel_scope.cancel()


async def test_a_server_without_a_chain_refuses_paid_sessions_and_is_routed_around(
    autojump_clock, tmp_path, tiny
):
    model_dir, expected = tiny
    async with trio.open_nursery() as nursery:
        net = PaidCluster(tmp_path, nursery, Ledger())
        net.unchained.add("node1")  # the cheaper server does free work only
        for price in (0, 1, 2):
            await net.add_priced(price)
        await net.wait_for(net.all_found, 60, "all daemons to find each other")
        requester, free_only, paid = net.daemons
        assert free_only.daemon.paid is None and free_only.daemon.escrow is None
        await deploy(net, model_dir, [(free_only, 0, LAYERS), (paid, 0, LAYERS)])
        create_job(net, requester)
        free = await requester.call("generate", GENERATE)
        assert free["tokens"] == expected
        assert [h["peer_id"] for h in free["route"]] == [free_only.peer_id]  # the cheaper
        result = await requester.call("generate", {**GENERATE, "job_id": JOB.hex()})
        assert result["tokens"] == expected
        assert [h["peer_id"] for h in result["route"]] == [paid.peer_id]
        assert [r["peer_id"] for r in result["recoveries"]] == [free_only.peer_id]
        assert "unpaid" in result["recoveries"][0]["reason"]
        nursery.cancel_scope.cancel()


def test_the_paid_fields_of_shard_frames_are_bounded():
    from daemon.shards import wire as shard_wire

    opened = shard_wire.Open(model="tiny", start=0, end=2, max_length=8, job=JOB)
    header, _ = shard_wire.decode(shard_wire.encode(opened))
    assert header == opened
    result = shard_wire.Result(step=3, receipt=b"r" * 4096)
    assert shard_wire.decode(shard_wire.encode(result))[0] == result
    base = {"op": "open", "model": "tiny", "start": 0, "end": 2, "max_length": 8}
    bad = [
        {**base, "job": bytes(31)},
        {**base, "job": bytes(33)},
        {**base, "job": "11" * 32},  # bytes, not hex text
        {"op": "result", "receipt": b"r" * 4097},
        {"op": "partial", "step": 1, "position": 0, "receipt": b""},
    ]
    for header in bad:
        with pytest.raises(shard_wire.WireError) as err:
            shard_wire.decode(shard_wire.encode(header))
        assert err.value.reason == "bad_header", header


async def test_a_provider_killed_mid_job_is_paid_for_what_was_acknowledged_when_back(
    autojump_clock, tmp_path, tiny
):
    model_dir, expected = tiny
    async with trio.open_nursery() as nursery:
        net = await cluster(nursery, tmp_path, [3, 2, 4, 3])
        requester, first, victim, spare, last = net.daemons
        await deploy(net, model_dir, [(first, 0, 2), (victim, 2, 4), (spare, 2, 4), (last, 4, 6)])
        create_job(net, requester)
        # steps take a little (virtual) time, as compute does: vouchers (requests, which take
        # the network's latency) reach the victim between its steps, as they would for real
        provider = victim.daemon.paid.provider
        sign = provider.sign

        async def slow_sign(*args: Any) -> bytes:
            await trio.sleep(0.01)  # virtual time (autojump clock)
            return await sign(*args)

        provider.sign = slow_sign
        job = (await requester.call("generate", {**GENERATE, "job_id": JOB.hex(), "stream": True}))[
            "job"
        ]
        requester.at_token(job, 8, lambda: net.kill(victim))  # SIGKILL, mid-generation

        async def finished() -> dict | None:
            state = await requester.call("generate_poll", {"job": job})
            return state if state["done"] else None

        state = await net.wait_for(finished, 60, "the generation to end")
        assert state["error"] is None and state["tokens"] == expected
        assert [r["peer_id"] for r in state["recoveries"]] == [victim.peer_id]
        assert victim.stopped.is_set()
        key = (JOB, address(victim))
        assert key not in net.ledger.paid  # it never reached a session end or the threshold
        back = await net.restart(victim, bootstrap=[requester.addr])
        account = back.daemon.paid.store.account(JOB, address(back))
        # what the requester acknowledged before the kill is in the store, and is settled
        # at start: exactly that, nothing for receipts it signed but was not vouched for
        assert 0 < account.acknowledged <= account.signed
        # (the requester's book may hold a later voucher that never arrived: it records each
        # before sending it; a later voucher of the job would carry that amount on)
        acked = requester.daemon.paid.book.acknowledged(JOB)
        assert acked[back.daemon.escrow.address].cumulative >= account.acknowledged

        async def paid() -> bool:
            return net.ledger.paid.get(key) == account.acknowledged

        await net.wait_for(paid, 10, "the restarted provider to settle")
        assert not back.daemon.paid.store.unsettled()
        nursery.cancel_scope.cancel()


async def test_a_peer_that_learnt_a_job_id_gets_no_work_under_it(autojump_clock, tmp_path, tiny):
    """Mallory puts the requester's job id in its own job book (as if it had deposited) and
    opens paid sessions with it: the provider sees that the opener's signed payout address
    is not the job's payer and refuses, so the job's payer is never billed for Mallory."""
    model_dir, _ = tiny
    async with trio.open_nursery() as nursery:
        net = await cluster(nursery, tmp_path, [1])
        requester, server = net.daemons
        mallory = await net.add_priced(0)
        await net.wait_for(net.all_found, 60, "mallory to be found")
        await deploy(net, model_dir, [(server, 0, LAYERS)])
        create_job(net, requester)
        book = mallory.daemon.paid.book
        book.add(PaidJob(JOB, MAX_PRICE, DEPOSIT, int(time.time()) + 3600, time.time()))
        with pytest.raises(RPCCallError) as err:
            await mallory.call("generate", {**GENERATE, "job_id": JOB.hex()})
        assert "not_payer" in err.value.message, err.value.message
        assert server.daemon.paid.store.receipts(JOB) == []
        nursery.cancel_scope.cancel()
