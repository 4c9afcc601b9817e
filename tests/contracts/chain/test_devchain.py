"""The embedded dev chain over real HTTP: funded accounts, transactions, anvil's testing methods,
reverts as anvil reports them, and bad requests answered without stopping the server."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from urllib.parse import urlsplit

from eth_abi import encode
from eth_account import Account
from eth_utils import keccak

from contracts.chain.devchain import MAX_BATCH, RunningChain, serve_in_thread
from tests.contracts.chain.rpc_helpers import post, reverter_initcode, rpc, rpc_error

FUNDS = 10**24  # eth-tester's 1,000,000 ether per account
GAS_PRICE = 2 * 10**9


def _transfer(chain: RunningChain, sender: int, to: str, value: int) -> dict:
    account = Account.from_key(chain.accounts[sender].private_key)
    tx = {
        "to": to,
        "value": value,
        "gas": 21000,
        "maxFeePerGas": GAS_PRICE,
        "maxPriorityFeePerGas": GAS_PRICE,
        "nonce": int(rpc(chain.url, "eth_getTransactionCount", [account.address, "latest"]), 16),
        "chainId": int(rpc(chain.url, "eth_chainId"), 16),
    }
    raw = account.sign_transaction(tx).raw_transaction
    tx_hash = rpc(chain.url, "eth_sendRawTransaction", ["0x" + raw.hex()])
    return rpc(chain.url, "eth_getTransactionReceipt", [tx_hash])


def _balance(chain: RunningChain, address: str) -> int:
    return int(rpc(chain.url, "eth_getBalance", [address, "latest"]), 16)


def test_accounts_funded_and_keys_printed_are_theirs(devchain: RunningChain) -> None:
    assert urlsplit(devchain.url).hostname == "127.0.0.1" and devchain.port > 0
    addresses = rpc(devchain.url, "eth_accounts")
    assert addresses == [a.address for a in devchain.accounts] and len(addresses) == 4
    for account in devchain.accounts:
        assert Account.from_key(account.private_key).address == account.address
        assert _balance(devchain, account.address) == FUNDS
    assert int(rpc(devchain.url, "eth_chainId"), 16) == devchain.chain.chain_id == 131277322940537
    assert rpc(devchain.url, "net_version") == "131277322940537"


def test_signed_transfer_moves_exactly_value_plus_gas(devchain: RunningChain) -> None:
    sender, receiver = devchain.accounts[1].address, devchain.accounts[2].address
    receipt = _transfer(devchain, 1, receiver, 12345)
    assert receipt["status"] == "0x1" and receipt["gasUsed"] == hex(21000)
    price = int(receipt["effectiveGasPrice"], 16)
    assert _balance(devchain, receiver) == FUNDS + 12345
    assert _balance(devchain, sender) == FUNDS - 12345 - 21000 * price
    assert rpc(devchain.url, "eth_blockNumber") == "0x1"
    block = rpc(devchain.url, "eth_getBlockByNumber", ["0x1", False])
    assert block["transactions"] == [receipt["transactionHash"]]
    assert len(block["logsBloom"]) == 2 + 512


def test_snapshot_and_revert(devchain: RunningChain) -> None:
    receiver = devchain.accounts[3].address
    snapshot = rpc(devchain.url, "evm_snapshot")
    _transfer(devchain, 0, receiver, 1)
    assert _balance(devchain, receiver) == FUNDS + 1
    assert rpc(devchain.url, "evm_revert", [snapshot]) is True
    assert _balance(devchain, receiver) == FUNDS
    assert rpc(devchain.url, "eth_blockNumber") == "0x0"
    assert rpc(devchain.url, "evm_revert", ["0x99"]) is False  # no such snapshot, as anvil


def test_increase_time_moves_block_timestamps(devchain: RunningChain) -> None:
    before = int(rpc(devchain.url, "eth_getBlockByNumber", ["latest", False])["timestamp"], 16)
    assert rpc(devchain.url, "evm_increaseTime", [3600]) == 3600
    assert rpc(devchain.url, "evm_increaseTime", ["0x3c"]) == 3660  # the total, as anvil
    assert rpc(devchain.url, "evm_mine") == "0x0"
    latest = rpc(devchain.url, "eth_getBlockByNumber", ["latest", False])
    assert latest["number"] == "0x1"
    assert int(latest["timestamp"], 16) >= before + 3660
    # a transaction's block is stamped after the jump too
    receipt = _transfer(devchain, 0, devchain.accounts[1].address, 1)
    block = rpc(devchain.url, "eth_getBlockByNumber", [receipt["blockNumber"], False])
    assert int(block["timestamp"], 16) >= before + 3660
    at = int(block["timestamp"], 16) + 500
    rpc(devchain.url, "evm_mine", [at])
    assert int(rpc(devchain.url, "eth_getBlockByNumber", ["latest", False])["timestamp"], 16) == at
    # the offset stays: blocks keep being stamped at least the wall clock + 3660 s (anvil's way)
    now = int(time.time())
    for _ in range(3):
        rpc(devchain.url, "evm_mine")
        latest = rpc(devchain.url, "eth_getBlockByNumber", ["latest", False])
        assert int(latest["timestamp"], 16) >= now + 3660
    assert rpc_error(devchain.url, "evm_increaseTime", [-5])["code"] == -32602


def test_revert_answered_as_anvil_does(devchain: RunningChain) -> None:
    data = keccak(text="UnknownJob(bytes32)")[:4] + encode(["bytes32"], [b"\x01" * 32])
    deployer = devchain.accounts[0].address
    tx_hash = rpc(
        devchain.url,
        "eth_sendTransaction",
        [{"from": deployer, "data": "0x" + reverter_initcode(data).hex(), "gas": "0x30000"}],
    )
    address = rpc(devchain.url, "eth_getTransactionReceipt", [tx_hash])["contractAddress"]
    assert rpc(devchain.url, "eth_getCode", [address, "latest"]).endswith(data.hex())
    for method in ("eth_call", "eth_estimateGas"):
        error = rpc_error(
            devchain.url,
            method,
            [{"from": deployer, "to": address}, "latest"][: 2 if method == "eth_call" else 1],
        )
        assert error == {"code": 3, "message": "execution reverted", "data": "0x" + data.hex()}
    reason = bytes.fromhex("08c379a0") + encode(["string"], ["too late"])
    tx_hash = rpc(
        devchain.url,
        "eth_sendTransaction",
        [{"from": deployer, "data": "0x" + reverter_initcode(reason).hex(), "gas": "0x30000"}],
    )
    address = rpc(devchain.url, "eth_getTransactionReceipt", [tx_hash])["contractAddress"]
    error = rpc_error(devchain.url, "eth_call", [{"from": deployer, "to": address}, "latest"])
    assert (
        error["message"] == "execution reverted: too late" and error["data"] == "0x" + reason.hex()
    )


def test_bad_requests_answered_and_server_keeps_serving() -> None:
    with serve_in_thread(port=0, accounts=1, max_body=4096) as chain:
        status, answer = post(chain.url, b"{not json")
        assert status == 200 and answer["error"]["code"] == -32700 and answer["id"] is None
        status, answer = post(chain.url, b"[" * 200 + b"]" * 200)
        assert answer["error"]["code"] == -32700 and "deep" in answer["error"]["message"]
        status, answer = post(
            chain.url, b'{"jsonrpc": "2.0", "id": 1, "method": "x", "params": NaN}'
        )
        assert answer["error"]["code"] == -32700
        assert rpc_error(chain.url, "eth_noSuchMethod")["code"] == -32601
        assert rpc_error(chain.url, "nonamespace")["code"] == -32601
        assert (
            rpc_error(chain.url, "eth_getBalance", ["not an address", "latest"])["code"] == -32602
        )
        status, answer = post(
            chain.url,
            json.dumps(
                {"jsonrpc": "2.0", "id": 2, "method": "eth_accounts", "params": {"a": 1}}
            ).encode(),
        )
        assert answer["error"]["code"] == -32602
        status, answer = post(chain.url, b'"just a string"')
        assert answer["error"]["code"] == -32600
        status, answer = post(chain.url, b"[]")
        assert answer["error"]["code"] == -32600
        # a batch: answers in order, the notification unanswered, a bad member answered alone
        batch = [
            {"jsonrpc": "2.0", "id": "a", "method": "eth_blockNumber"},
            {"jsonrpc": "2.0", "method": "eth_blockNumber"},
            {"jsonrpc": "1.0", "id": "b", "method": "eth_blockNumber"},
            {"jsonrpc": "2.0", "id": "c", "method": "eth_chainId"},
        ]
        status, answer = post(chain.url, json.dumps(batch).encode())
        assert [a["id"] for a in answer] == ["a", "b", "c"]
        assert answer[0]["result"] == "0x0" and answer[1]["error"]["code"] == -32600
        status, answer = post(chain.url, json.dumps(batch[1]).encode())
        assert status == 204 and answer is None
        # oversized: refused before its body is read, with a JSON-RPC error
        status, answer = post(chain.url, b"[" + b" " * 5000 + b"]")
        assert (
            status == 413
            and answer["error"]["code"] == -32600
            and "4096" in answer["error"]["message"]
        )
        status, answer = post(chain.url, b"{}", {"Content-Type": "text/plain"})
        assert status == 415
        parts = urlsplit(chain.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request("GET", "/")
        assert conn.getresponse().status == 405
        conn.close()
        assert rpc(chain.url, "eth_blockNumber") == "0x0"  # still serving


def test_batch_bounded(devchain: RunningChain) -> None:
    batch = [{"jsonrpc": "2.0", "id": i, "method": "eth_chainId"} for i in range(MAX_BATCH + 1)]
    status, answer = post(devchain.url, json.dumps(batch).encode())
    assert answer["error"]["code"] == -32600 and str(MAX_BATCH) in answer["error"]["message"]
    status, answer = post(devchain.url, json.dumps(batch[:MAX_BATCH]).encode())
    assert len(answer) == MAX_BATCH and answer[-1]["result"] == hex(131277322940537)


def test_connections_bounded() -> None:
    with serve_in_thread(port=0, accounts=1, max_connections=2) as chain:
        address = (chain.host, chain.port)
        idle = [socket.create_connection(address, timeout=10) for _ in range(2)]
        try:
            with socket.create_connection(address, timeout=10) as third:
                assert third.recv(100).startswith(b"HTTP/1.1 503")
        finally:
            for sock in idle:
                sock.close()
        # the slots come back once the idle connections are gone (polled, with a deadline)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert rpc(chain.url, "eth_blockNumber") == "0x0"
                break
            except (AssertionError, OSError):
                if time.monotonic() > deadline:
                    raise


def test_concurrent_clients_share_one_chain_safely(devchain: RunningChain) -> None:
    receiver = "0x" + "42" * 20
    errors: list[BaseException] = []

    def send(sender: int) -> None:
        try:
            for _ in range(3):
                assert _transfer(devchain, sender, receiver, 1)["status"] == "0x1"
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert _balance(devchain, receiver) == 12
    assert rpc(devchain.url, "eth_blockNumber") == hex(12)
