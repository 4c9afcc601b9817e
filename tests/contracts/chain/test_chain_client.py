"""ChainClient against the dev chain over HTTP (and anvil when npm installed it): transactions
with gas and events from receipts, reverts named by their custom error, its own nonces, bounded
retries when nothing answers, trio callers never blocked."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from contracts.chain.client import ChainClient, TxResult
from contracts.chain.devchain import RunningChain, serve_in_thread
from contracts.chain.errors import ChainError, ChainUnreachable, ContractRevert
from contracts.deployment import Deployment, deploy_all

JOB = b"\x01" * 32


def _deploy(client: ChainClient, key: str) -> Deployment:
    return client.run_sync(
        lambda w3: deploy_all(w3, key, min_stake=100, unbonding_delay_s=60, half_life_s=3600)
    )


@pytest.fixture(scope="module")
def deployed() -> Iterator[tuple[RunningChain, Deployment]]:
    with serve_in_thread(port=0, accounts=3) as running:
        key = running.accounts[0].private_key
        with ChainClient(running.url, key) as client:
            deployment = _deploy(client, key)
        yield running, deployment


@pytest.fixture
def client(deployed: tuple[RunningChain, Deployment]) -> Iterator[ChainClient]:
    running, _ = deployed
    with ChainClient(running.url, running.accounts[1].private_key, poll_s=0.02) as client:
        yield client


async def test_transact_reports_gas_from_the_receipt_and_decoded_events(
    deployed: tuple[RunningChain, Deployment], client: ChainClient
) -> None:
    running, deployment = deployed
    token = client.bind("TestUSD", deployment.token)
    receiver = running.accounts[2].address
    before = await client.call(token, "balanceOf", receiver)
    result = await client.transact(token, "mint", receiver, 5_000)
    assert isinstance(result, TxResult) and result.gas_used > 21_000
    receipt = await client.run(lambda w3: w3.eth.get_transaction_receipt(result.tx_hash))
    assert result.gas_used == receipt["gasUsed"] and result.block == receipt["blockNumber"]
    (transfer,) = result.named("Transfer")
    assert transfer.args == {"from": "0x" + "00" * 20, "to": receiver, "value": 5_000}
    assert result.named("Minted")[0].args["by"] == client.address
    assert await client.call(token, "balanceOf", receiver) == before + 5_000
    assert await client.chain_id() == 131277322940537
    assert await client.balance_of() > 0


async def test_revert_named_by_custom_error_before_and_after_mining(
    deployed: tuple[RunningChain, Deployment], client: ChainClient
) -> None:
    _, deployment = deployed
    escrow = client.bind("JobEscrow", deployment.escrow)
    block = await client.block_number()
    with pytest.raises(ContractRevert) as caught:
        await client.transact(escrow, "refund", JOB)  # the estimate reverts: nothing is sent
    assert caught.value.error_name == "UnknownJob" and caught.value.args == (JOB,)
    assert str(caught.value) == f"JobEscrow.refund: reverted with UnknownJob(0x{JOB.hex()})"
    assert await client.block_number() == block
    # with the gas given there is no estimate: it is mined, fails, and is replayed for its name
    with pytest.raises(ContractRevert) as caught:
        await client.transact(escrow, "refund", JOB, gas=200_000)
    assert caught.value.error_name == "UnknownJob"
    assert await client.block_number() == block + 1
    token = client.bind("TestUSD", deployment.token)
    with pytest.raises(ContractRevert) as caught:
        await client.call(token, "mint", client.address, 10**30)
    assert caught.value.error_name == "MintCapExceeded"
    with pytest.raises(ChainError, match="out of gas"):
        await client.transact(token, "mint", client.address, 1, gas=30_000)
    # the nonces stayed right through all of that
    assert (await client.transact(token, "mint", client.address, 1)).gas_used > 0


async def test_concurrent_trio_callers_share_one_worker_and_one_nonce_sequence(
    deployed: tuple[RunningChain, Deployment], client: ChainClient
) -> None:
    _, deployment = deployed
    token = client.bind("TestUSD", deployment.token)
    results: list[TxResult] = []
    ticks = 0

    async def mint() -> None:
        results.append(await client.transact(token, "mint", client.address, 1))

    async def ticker() -> None:
        nonlocal ticks
        while len(results) < 5:
            ticks += 1
            await trio.lowlevel.checkpoint()  # runs only while the event loop is free

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        for _ in range(5):
            nursery.start_soon(mint)
    assert len({r.tx_hash for r in results}) == 5
    assert ticks > 5  # trio kept running while the worker sent transactions
    nonces = await client.run(
        lambda w3: sorted(w3.eth.get_transaction(r.tx_hash)["nonce"] for r in results)
    )
    assert nonces == list(range(nonces[0], nonces[0] + 5))


async def test_send_value_pays_gas_money_in_the_same_nonce_sequence(
    deployed: tuple[RunningChain, Deployment], client: ChainClient
) -> None:
    _, deployment = deployed
    receiver = "0x" + "5a" * 20  # not checksummed: taken as it is for the value sent
    sent = await client.send_value(receiver, 12_345)
    assert sent.gas_used == 21_000 and sent.events == ()
    assert await client.balance_of(receiver) == 12_345
    token = client.bind("TestUSD", deployment.token)
    with pytest.raises(ChainError, match="TestUSD.mint: InvalidAddress: web3.py only accepts"):
        await client.transact(token, "mint", receiver, 1)  # web3's rule for arguments
    checksummed = "0x5a5A5a5a5A5a5a5a5a5A5a5A5A5a5a5A5A5A5A5A"
    assert (await client.transact(token, "mint", checksummed, 1)).gas_used > 0
    assert client.send_value_sync(receiver, 1).block == sent.block + 2
    assert await client.balance_of(receiver) == 12_346


async def test_no_key_reads_only(deployed: tuple[RunningChain, Deployment]) -> None:
    running, deployment = deployed
    with ChainClient(running.url) as reader:
        token = reader.bind("TestUSD", deployment.token)
        assert await reader.call(token, "decimals") == 6
        with pytest.raises(ChainError, match="no key"):
            await reader.transact(token, "mint", running.accounts[0].address, 1)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_nothing_listening_is_a_clear_error_after_bounded_retries() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    with ChainClient(url, retries=3, backoff_s=0.01) as client:
        started = time.monotonic()
        with pytest.raises(ChainUnreachable) as caught:
            await client.chain_id()
        assert time.monotonic() - started < 5
    message = str(caught.value)
    assert url in message and "3 attempts" in message and "refused" in message.lower()


async def test_an_endpoint_that_never_answers_times_out_without_retrying() -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with ChainClient(url, timeout_s=0.3, retries=4, backoff_s=0.5) as client:
            started = time.monotonic()
            with pytest.raises(ChainUnreachable, match="did not answer within 0.3 s"):
                await client.block_number()
            assert time.monotonic() - started < 2  # one attempt: a read timeout is not retried


def test_closed_client_says_so(deployed: tuple[RunningChain, Deployment]) -> None:
    running, _ = deployed
    client = ChainClient(running.url)
    client.close()
    with pytest.raises(ChainError, match="closed"):
        client.chain_id_sync()


def _anvil_url(anvil_w3: Any) -> str:
    return anvil_w3.provider.endpoint_uri


async def test_same_client_against_anvil(anvil_w3: Any) -> None:
    """anvil from contracts/node_modules (SOL's `anvil_w3` fixture skips, saying why, when
    npm has not installed it)."""
    from eth_account import Account

    url = _anvil_url(anvil_w3)
    deployer = Account.create()
    anvil_w3.provider.make_request("anvil_setBalance", [deployer.address, hex(10**20)])
    key = "0x" + bytes(deployer.key).hex()
    with ChainClient(url, key, poll_s=0.02) as client:
        assert await client.chain_id() == 31337
        deployment = await client.run(
            lambda w3: deploy_all(w3, key, min_stake=100, unbonding_delay_s=60, half_life_s=3600)
        )
        escrow = client.bind("JobEscrow", deployment.escrow)
        with pytest.raises(ContractRevert) as caught:
            await client.transact(escrow, "refund", JOB)
        assert caught.value.error_name == "UnknownJob" and caught.value.args == (JOB,)
        with pytest.raises(ContractRevert) as caught:
            await client.transact(escrow, "refund", JOB, gas=200_000)
        assert caught.value.error_name == "UnknownJob"
        token = client.bind("TestUSD", deployment.token)
        result = await client.transact(token, "mint", deployer.address, 7)
        assert result.named("Transfer")[0].args["value"] == 7 and result.gas_used > 21_000


def test_deeply_nested_answer_is_an_error_not_a_crash() -> None:
    """py_ecc raises the recursion limit to 100,000 at import; a hostile endpoint's deeply
    nested JSON would then overflow the C stack. In a subprocess, so a crash fails only this."""
    import subprocess
    import sys

    code = """
import http.server, threading
from contracts.chain.client import ChainClient
from contracts.chain.errors import ChainError

class Deep(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b"[" * 300000 + b"]" * 300000
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Deep)
threading.Thread(target=server.serve_forever, daemon=True).start()
with ChainClient(f"http://127.0.0.1:{server.server_address[1]}", retries=1) as client:
    try:
        client.chain_id_sync()
    except ChainError as exc:
        print("refused:", type(exc).__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "refused: ChainError"


async def test_two_clients_sharing_a_key_recover_their_nonces(
    deployed: tuple[RunningChain, Deployment],
) -> None:
    running, deployment = deployed
    key = running.accounts[2].private_key
    with ChainClient(running.url, key) as first, ChainClient(running.url, key) as second:
        token = first.bind("TestUSD", deployment.token)
        await first.transact(token, "mint", first.address, 1)
        await second.transact(token, "mint", first.address, 1)  # first's count is stale now
        assert (await first.transact(token, "mint", first.address, 1)).gas_used > 0
        assert (await second.transact(token, "mint", first.address, 1)).gas_used > 0


async def test_cancelled_trio_caller_returns_at_once() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with ChainClient(url, timeout_s=1, retries=1) as client:
            started = time.monotonic()
            with trio.move_on_after(0.1) as scope:
                await client.block_number()
            assert scope.cancelled_caught and time.monotonic() - started < 0.8
