"""A revert is named by its custom error however the node wrapped it (contracts.chain.errors)."""

from __future__ import annotations

import pickle

import pytest
from eth_abi import encode
from eth_utils import keccak

from contracts.chain.errors import (
    ERROR_STRING_SELECTOR,
    PANIC_SELECTOR,
    ContractRevert,
    as_revert,
    decode_revert,
    revert_data,
)

ABI = [
    {"type": "error", "name": "UnknownJob", "inputs": [{"name": "jobId", "type": "bytes32"}]},
    {
        "type": "error",
        "name": "OverDeposit",
        "inputs": [
            {"name": "paid", "type": "uint256"},
            {"name": "deposit", "type": "uint256"},
        ],
    },
    {
        "type": "error",
        "name": "BadVoucher",
        "inputs": [
            {
                "name": "v",
                "type": "tuple",
                "components": [
                    {"name": "provider", "type": "address"},
                    {"name": "nonce", "type": "uint64"},
                ],
            }
        ],
    },
    {"type": "function", "name": "f", "inputs": [], "outputs": [], "stateMutability": "view"},
]
JOB = bytes(range(32))
UNKNOWN_JOB = keccak(text="UnknownJob(bytes32)")[:4] + encode(["bytes32"], [JOB])


def test_custom_error_named_with_its_arguments() -> None:
    revert = decode_revert(UNKNOWN_JOB, ABI)
    assert revert.error_name == "UnknownJob"
    assert revert.args == (JOB,)
    assert revert.selector == "0x" + keccak(text="UnknownJob(bytes32)")[:4].hex()
    assert str(revert) == f"reverted with UnknownJob(0x{JOB.hex()})"
    over = keccak(text="OverDeposit(uint256,uint256)")[:4] + encode(["uint256", "uint256"], [7, 5])
    assert decode_revert(over, {"JobEscrow": ABI}).args == (7, 5)


def test_struct_arguments_and_unknown_selectors() -> None:
    address = "0x" + "11" * 20
    data = keccak(text="BadVoucher((address,uint64))")[:4] + encode(
        ["(address,uint64)"], [(address, 3)]
    )
    assert decode_revert(data, [ABI]).args == ((address, 3),)
    unknown = bytes.fromhex("deadbeef") + b"\x00" * 32
    revert = decode_revert(unknown, ABI)
    assert revert.error_name == "0xdeadbeef" and "0xdeadbeef" in str(revert)


def test_error_string_panic_and_empty() -> None:
    reason = decode_revert(ERROR_STRING_SELECTOR + encode(["string"], ["no way"]), ABI)
    assert (reason.error_name, reason.args, str(reason)) == (
        "Error",
        ("no way",),
        "reverted: no way",
    )
    panic = decode_revert(PANIC_SELECTOR + encode(["uint256"], [0x11]), ABI)
    assert panic.error_name == "Panic" and "overflow" in str(panic)
    empty = decode_revert(b"", ABI)
    assert empty.error_name == "" and str(empty) == "reverted without a reason"


def test_revert_pickles() -> None:
    revert = decode_revert(UNKNOWN_JOB, ABI, context="JobEscrow.settle")
    again = pickle.loads(pickle.dumps(revert))
    assert (again.error_name, again.args, str(again)) == (
        revert.error_name,
        revert.args,
        str(revert),
    )


def _web3_errors() -> list[BaseException]:
    from web3.exceptions import ContractCustomError, Web3RPCError

    rpc = Web3RPCError(
        "boom",
        rpc_response={
            "jsonrpc": "2.0",
            "id": 1,
            "error": {"code": 3, "message": "execution reverted", "data": "0x" + UNKNOWN_JOB.hex()},
        },
    )
    return [ContractCustomError("0x" + UNKNOWN_JOB.hex(), data="0x" + UNKNOWN_JOB.hex()), rpc]


def _tester_errors() -> list[BaseException]:
    from eth.exceptions import Revert
    from eth_tester.exceptions import TransactionFailed

    return [TransactionFailed(Revert(UNKNOWN_JOB)), TransactionFailed(str(UNKNOWN_JOB))]


@pytest.mark.parametrize(
    "source",
    [
        # anvil / geth / our dev chain
        {"code": 3, "message": "execution reverted", "data": "0x" + UNKNOWN_JOB.hex()},
        # a whole response
        {
            "jsonrpc": "2.0",
            "id": 1,
            "error": {"code": 3, "message": "x", "data": "0x" + UNKNOWN_JOB.hex()},
        },
        # hardhat
        {
            "code": -32603,
            "message": "Error: VM Exception while processing transaction: reverted",
            "data": {"message": "reverted with custom error", "data": "0x" + UNKNOWN_JOB.hex()},
        },
        # ganache
        {
            "code": -32000,
            "message": "revert",
            "data": {"0x" + "ab" * 32: {"error": "revert", "return": "0x" + UNKNOWN_JOB.hex()}},
        },
        UNKNOWN_JOB,
        "0x" + UNKNOWN_JOB.hex(),
    ],
    ids=["anvil", "response", "hardhat", "ganache", "bytes", "hex"],
)
def test_every_wrapping_gives_the_same_name(source: object) -> None:
    assert revert_data(source) == UNKNOWN_JOB
    assert as_revert(source, ABI).error_name == "UnknownJob"


def test_exceptions_of_web3_and_eth_tester() -> None:
    for exc in [*_web3_errors(), *_tester_errors()]:
        assert revert_data(exc) == UNKNOWN_JOB, exc
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = _tester_errors()[0]
    assert as_revert(wrapped, ABI).error_name == "UnknownJob"


def test_not_a_revert() -> None:
    assert revert_data(ConnectionError("refused")) is None
    assert revert_data({"code": -32601, "message": "method not found"}) is None
    assert as_revert(ValueError("x"), ABI) is None
    reason_only = {"code": 3, "message": "execution reverted: too late"}
    assert as_revert(reason_only, ABI).args == ("too late",)


def test_revert_is_a_chain_error() -> None:
    from contracts.chain.errors import ChainError

    assert issubclass(ContractRevert, ChainError)


def test_named_against_the_committed_artifacts_by_default() -> None:
    """Without `abis`, every committed contract's errors are known (contracts.artifacts)."""
    assert decode_revert(UNKNOWN_JOB).error_name == "UnknownJob"
    data = keccak(text="MintCapExceeded(uint256,uint256)")[:4] + encode(["uint256"] * 2, [9, 8])
    assert decode_revert(data).args == (9, 8)
    assert decode_revert(bytes.fromhex("deadbeef")).error_name == "0xdeadbeef"


def test_a_real_revert_through_web3s_in_process_tester_is_named() -> None:
    """web3's EthereumTesterProvider (no HTTP) raises TransactionFailed with the data's repr
    in its message: the same name as over HTTP, for calls and for transactions."""
    from eth_account import Account
    from web3 import EthereumTesterProvider, Web3

    from contracts.artifacts import load
    from contracts.deployment import deploy_all

    w3 = Web3(EthereumTesterProvider())
    key = "0x" + "00" * 31 + "01"
    funder = w3.eth.accounts[0]
    w3.eth.send_transaction({"from": funder, "to": Account.from_key(key).address, "value": 10**20})
    deployment = deploy_all(w3, key, min_stake=10, unbonding_delay_s=10, half_life_s=100)
    escrow = w3.eth.contract(address=deployment.addresses()["JobEscrow"], abi=load("JobEscrow").abi)
    job = b"\x01" * 32
    for attempt in (
        lambda: escrow.functions.refund(job).call(),
        lambda: escrow.functions.refund(job).transact({"from": funder}),
    ):
        with pytest.raises(Exception) as caught:
            attempt()
        revert = as_revert(caught.value)
        assert revert is not None and revert.error_name == "UnknownJob", revert
        assert revert.args == (job,)
