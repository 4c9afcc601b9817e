"""Paid work through the CLI: `gridmesh fund`, `stake`, `unstake`, `withdraw`, `wallet`,
`earnings` and `job create|list|status|refund` against the payment JSON-RPC methods (a real
Dispatcher with daemon.payments.methods registered, Payments opened from a node's home as the
daemon opens it) and an in-process dev chain. Exact balances, one-line errors without
tracebacks, and the "no chain configured" answer of a node without a deployment."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from typer.testing import CliRunner, Result

from contracts.chain.records import write_record
from contracts.eip712 import SignedVoucher, Signer, Voucher, address_from_hex
from daemon import config as configuration
from daemon.api.client import _result
from daemon.api.jsonrpc import Dispatcher
from daemon.cli import common
from daemon.cli.jobs import parse_amount, show_amount
from daemon.cli.main import app
from daemon.errors import FailedPrecondition
from daemon.payments.methods import Payments, open_payments, register_payment_methods
from p2p import identity
from tests.daemon.payments.escrow_env import FEE_BPS, MIN_STAKE, UNBONDING_S, Env, deployed_chain

TUSD = 1_000_000


class _InProcessClient:
    """The CLI's RPC client, answered by a Dispatcher in the test's trio run."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def call(self, method: str, params: Any = None) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}})
        answer = trio.from_thread.run(self.dispatcher.handle, body.encode())
        return _result(json.loads(answer))


class Node:
    def __init__(self, home: Path, env: Env | None) -> None:
        self.home = home
        self.ident, _ = identity.init_identity(home)
        if env is not None:
            write_record(home, env.record)
            overrides = {"GRIDMESH_CHAIN__RPC_URL": env.chain.url}
        else:
            overrides = {}
        cfg = configuration.resolve(None, env=overrides, flags={})
        self.payments: Payments = open_payments(
            home, cfg, self.ident.peer_id, self.ident.payout_key
        )
        self.dispatcher = Dispatcher()
        register_payment_methods(self.dispatcher, self.payments)

    async def cli(self, *args: str) -> Result:
        runner = CliRunner()
        return await trio.to_thread.run_sync(
            lambda: runner.invoke(app, [*args, "--home", str(self.home)])
        )


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with deployed_chain(accounts=3) as running:
        yield running


@pytest.fixture
def nodes(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Node]]:
    made = {
        "payer": Node(tmp_path / "payer", env),
        "provider": Node(tmp_path / "provider", env),
        "bare": Node(tmp_path / "bare", None),
    }
    by_home = {node.home: node for node in made.values()}
    monkeypatch.setattr(
        common, "rpc_client", lambda home, timeout=30: _InProcessClient(by_home[home].dispatcher)
    )
    yield made
    for node in made.values():
        node.payments.close()


def _ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def _refused(result: Result, *needles: str, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output
    return result.output


async def test_paid_job_from_the_command_line(env: Env, nodes: dict[str, Node]) -> None:
    payer, provider = nodes["payer"], nodes["provider"]
    url = ["--rpc-url", env.chain.url]
    out = _ok(await payer.cli("fund", "--tusd", "20tUSD", "--eth", "1", *url))
    assert f"{payer.ident.payout_address}: 20 tUSD, 1 ETH" in out
    _ok(await provider.cli("fund", "--tusd", "150tUSD", *url))

    out = _ok(await provider.cli("stake", "100tUSD"))
    assert f"registered peer id {provider.ident.peer_id}" in out
    assert "stake now 100 tUSD: active" in out
    out = _ok(await provider.cli("wallet"))
    assert provider.ident.payout_address in out and "balance   50 tUSD" in out

    out = _ok(
        await payer.cli(
            "job",
            "create",
            "--deposit",
            "5tUSD",
            "--max-price",
            "10",
            "--deadline",
            "600",
            "--name",
            "demo",
        )
    )
    job = out.splitlines()[0]
    assert job.startswith("0x") and len(job) == 66
    assert "deposited 5 tUSD" in out and f"--job {job}" in out
    listed = json.loads(_ok(await payer.cli("job", "list", "--json")))
    assert [(j["job_id"], j["name"], j["deposit"], j["state"]) for j in listed] == [
        (job, "demo", 5 * TUSD, "deposited")
    ]

    # the requester acknowledges 1.5 tUSD to the provider, which settles it (PAYFLOW's flow)
    job_id = bytes.fromhex(job[2:])
    escrow = payer.payments.escrow
    assert escrow is not None
    voucher = Voucher(
        job_id=job_id,
        provider=address_from_hex(provider.ident.payout_address),
        cumulative_amount=1_500_000,
        receipts_root=secrets.token_bytes(32),
        nonce=1,
    )
    signed = SignedVoucher(voucher, Signer(payer.ident.payout_key).sign(escrow.domain, voucher))
    payer.payments.book.record_acknowledged(job_id, voucher.provider, 1_500_000, 1)
    await provider.payments.escrow.settle(signed)
    state = json.loads(_ok(await payer.cli("job", "status", job, "--json")))
    assert state["chain"]["paid"] == 1_500_000 and state["chain"]["remaining"] == 3_500_000
    assert state["providers"] == [
        {
            "provider": provider.ident.payout_address,
            "acknowledged": 1_500_000,
            "nonce": 1,
            "settled": 1_500_000,
        }
    ]
    out = _ok(await payer.cli("job", "status", job))
    assert "paid      1.5 tUSD" in out and "remaining 3.5 tUSD" in out
    assert "acknowledged 1.5 tUSD (voucher 1), settled 1.5 tUSD" in out

    _refused(await payer.cli("job", "refund", job), "DeadlineNotReached", "only after its deadline")
    env.advance(601)
    assert "passed: `gridmesh job refund`" in _ok(await payer.cli("job", "status", job))
    out = _ok(await payer.cli("job", "refund", job))
    assert "refunded 3.5 tUSD" in out
    fee = 1_500_000 * FEE_BPS // 10_000
    assert await escrow.token_balance() == 20 * TUSD - 1_500_000
    assert await escrow.token_balance(provider.ident.payout_address) == 50 * TUSD + 1_500_000 - fee
    _refused(await payer.cli("job", "refund", job), "AlreadyRefunded")

    out = _ok(await provider.cli("unstake", "60tUSD"))
    assert "unbonding 60 tUSD" in out and "stake left 40 tUSD" in out
    assert "NOT active" in _ok(await provider.cli("wallet"))
    _refused(await provider.cli("withdraw"), "unbonding until chain time")
    env.advance(UNBONDING_S)
    out = _ok(await provider.cli("withdraw"))
    assert f"withdrew 60 tUSD; balance {show_amount(110 * TUSD + 1_500_000 - fee)}" in out
    _refused(await provider.cli("withdraw"), "nothing is unbonding")
    earned = json.loads(_ok(await provider.cli("earnings", "--json")))
    assert earned["jobs"] == [] and earned["stake"]["stake"] == MIN_STAKE - 60 * TUSD
    assert "no paid work yet" in _ok(await provider.cli("earnings"))


async def test_job_specs_from_files_and_bad_input(
    env: Env, nodes: dict[str, Node], tmp_path: Path
) -> None:
    payer = nodes["payer"]
    _ok(await payer.cli("fund", "--tusd", "3tUSD", "--eth", "1", "--rpc-url", env.chain.url))
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "apiVersion: opengrid/v1\nkind: Job\nname: hourly\n"
        "billing:\n  max_price_per_hour_usd: 2\n  deadline_s: 1800\n  max_price_per_unit: 4\n"
    )
    job = json.loads(_ok(await payer.cli("job", "create", "-f", str(spec), "--json")))
    assert (job["name"], job["deposit"], job["max_price_per_unit"]) == ("hourly", TUSD, 4)
    # flags override the file's billing
    out = _ok(await payer.cli("job", "create", "-f", str(spec), "--deposit", "0.5tUSD", "--json"))
    assert json.loads(out)["deposit"] == 500_000

    spec.write_text("kind: Job\nimage: ubuntu\nbilling: {deadline_s: 60, deposit: 1}\n")
    _refused(await payer.cli("job", "create", "-f", str(spec)), "`image` does not apply")
    _refused(await payer.cli("job", "create", "--deposit", "5tUSD"), "--deadline")
    _refused(
        await payer.cli("job", "create", "--deposit", "0.0000001tUSD", "--deadline", "9"),
        "6 decimals",
        code=2,
    )
    _refused(await payer.cli("job", "status", "0x1234"), "64 hex digits")
    _refused(await payer.cli("job", "status", "0x" + "77" * 32), "neither in this node's job book")
    poor = await payer.cli(
        "job", "create", "--deposit", "900000tUSD", "--deadline", "60", "--max-price", "1"
    )
    _refused(poor, "ERC20InsufficientBalance", "`gridmesh fund` gives some")
    assert len(json.loads(_ok(await payer.cli("job", "list", "--json")))) == 2


async def test_a_node_without_a_chain_says_how_to_get_one(nodes: dict[str, Node]) -> None:
    bare = nodes["bare"]
    assert bare.payments.escrow is None
    for args in (
        ("job", "create", "--deposit", "1", "--deadline", "60", "--max-price", "1"),
        ("stake", "1tUSD"),
        ("withdraw",),
        ("wallet",),
        ("job", "refund", "0x" + "11" * 32),
    ):
        _refused(
            await bare.cli(*args), "no chain configured", "gridmesh chain deploy --network devnet"
        )
    assert "no jobs yet" in _ok(await bare.cli("job", "list"))
    assert "chain: no chain configured" in _ok(await bare.cli("earnings"))


def test_amounts() -> None:
    assert parse_amount("5000000") == 5 * TUSD
    assert parse_amount("5tUSD") == parse_amount("5 usd") == 5 * TUSD
    assert parse_amount("0.25tUSD") == 250_000
    assert parse_amount("1_000") == 1000
    for bad in ("5.5", "-1", "1e6", "5 eth", "0.0000001tUSD"):
        with pytest.raises(Exception, match=r"5tUSD|tUSD|decimals|whole"):
            parse_amount(bad)
    assert show_amount(1_500_000) == "1.5 tUSD" and show_amount(0) == "0 tUSD"
    assert show_amount(20 * TUSD) == "20 tUSD"


def test_payments_of_a_daemon_share_its_escrow_and_job_book(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from daemon.payments.jobs import JobBook

    cfg = configuration.resolve(None, env={"GRIDMESH_MARKET__MAX_PRICE_PER_UNIT": "9"}, flags={})
    ident, _ = identity.init_identity(tmp_path)
    with JobBook(tmp_path) as book:
        escrow = object()
        daemon = SimpleNamespace(
            home=tmp_path, ident=ident, config=cfg, escrow=escrow, paid=SimpleNamespace(book=book)
        )
        payments = Payments.of_daemon(daemon)
        assert payments.escrow is escrow and payments.book is book
        assert payments.default_max_price == 9 and payments.peer_id == ident.peer_id
        payments.close()  # the daemon's to close: the book stays open
        assert book.list() == []
    bare = Payments.of_daemon(SimpleNamespace(home=tmp_path, ident=ident, config=cfg))
    assert bare.escrow is None
    with pytest.raises(FailedPrecondition, match="no chain configured"):
        bare.need_escrow()
    bare.close()


def test_a_deployment_that_cannot_be_used_turns_paid_work_off_saying_why(tmp_path: Path) -> None:
    ident, _ = identity.init_identity(tmp_path)
    (tmp_path / "chain").mkdir()
    (tmp_path / "chain" / "devnet.json").write_text('{"network": "devnet"}')  # broken
    cfg = configuration.resolve(None, env={}, flags={})
    payments = open_payments(tmp_path, cfg, ident.peer_id, ident.payout_key)
    assert payments.escrow is None
    with pytest.raises(FailedPrecondition) as why:
        payments.need_escrow()
    assert "the chain is not usable" in str(why.value) and "devnet.json" in str(why.value)
    payments.close()
    anvil = configuration.resolve(None, env={"GRIDMESH_CHAIN__NETWORK": "anvil"}, flags={})
    other = open_payments(tmp_path, anvil, ident.peer_id, ident.payout_key)  # no anvil record
    with pytest.raises(FailedPrecondition, match="network 'anvil'"):
        other.need_escrow()
    other.close()
