"""Contract tests run twice: on the embedded chain (web3's EthereumTesterProvider, py-evm in this
process) and on anvil (from contracts/node_modules, a process on 127.0.0.1).

A test asks for `chain`: the contracts deployed by `contracts.deployment.deploy_all`, a provider
registered and staked, a payer funded and approved, all from keys made here. The deployment is
built once per test module and backend; each test runs inside a snapshot that is reverted after
it, so tests do not see each other. Time moves with `chain.advance(seconds)` (eth-tester's time
travel, or anvil's evm_increaseTime + evm_mine). Signatures are made with eth-account's
`Account.sign_typed_data`, never with the project's own EIP-712 code, so a mismatch between
the Solidity and that code cannot hide in both. Custom errors are asserted by name: the revert
data's 4-byte selector is looked up in the committed ABIs (`chain.reverts("StaleVoucher")`).
"""

from __future__ import annotations

import ast
import contextlib
import glob
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CONTRACTS_DIR = Path(__file__).resolve().parents[2] / "contracts"
NODE_MODULES = CONTRACTS_DIR / "node_modules"
NOT_INSTALLED = (
    "the npm packages are not installed (run `make contracts-deps`, i.e. `npm ci` in contracts/)"
)

TOKEN = 10**6  # one tUSD in its smallest unit
MIN_STAKE = 100 * TOKEN
UNBONDING_DELAY_S = 7 * 24 * 3600
HALF_LIFE_S = 30 * 24 * 3600
FEE_BPS = 100
ETH = 10**18

VOUCHER_FIELDS = [
    ("jobId", "bytes32"),
    ("provider", "address"),
    ("cumulativeAmount", "uint256"),
    ("receiptsRoot", "bytes32"),
    ("nonce", "uint64"),
]
RECEIPT_FIELDS = [
    ("jobId", "bytes32"),
    ("provider", "address"),
    ("model", "bytes32"),
    ("layerStart", "uint32"),
    ("layerEnd", "uint32"),
    ("session", "bytes32"),
    ("step", "uint64"),
    ("inputHash", "bytes32"),
    ("outputHash", "bytes32"),
    ("units", "uint64"),
    ("pricePerUnit", "uint256"),
    ("prevReceipt", "bytes32"),
    ("timestamp", "uint64"),
]
ACCOUNT_NAMES = ("deployer", "payer", "provider", "provider2", "fee", "outsider")


def keccak(data: bytes) -> bytes:
    from eth_utils import keccak as _keccak

    return _keccak(data)


def error_selectors() -> dict[bytes, str]:
    """4-byte selector -> custom error name, over every committed ABI (OpenZeppelin's too)."""
    from contracts import artifacts

    def canonical(item: dict[str, Any]) -> str:
        if item["type"].startswith("tuple"):
            inner = ",".join(canonical(c) for c in item["components"])
            return f"({inner}){item['type'][len('tuple') :]}"
        return item["type"]

    found: dict[bytes, str] = {}
    for abi in artifacts.all_abis().values():
        for item in abi:
            if item["type"] == "error":
                args = ",".join(canonical(i) for i in item["inputs"])
                found[keccak(f"{item['name']}({args})".encode())[:4]] = item["name"]
    return found


def revert_data(exc: BaseException) -> bytes | None:
    """The raw revert data of a failed call, as web3 (anvil) or eth-tester reports it."""
    data = getattr(exc, "data", None)
    if isinstance(data, str) and data.startswith("0x"):
        return bytes.fromhex(data[2:])
    if isinstance(data, bytes):
        return data
    # eth-tester raises TransactionFailed("execution reverted: b'...'"): the bytes' repr
    text = str(exc.args[0]) if exc.args else ""
    match = re.search(r"b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\"", text)
    if match:
        return ast.literal_eval(match.group(0))
    return None


class Chain:
    """One backend with the contracts deployed; what every contract test drives."""

    def __init__(self, backend: str, w3: Any, funder: str, accounts: dict[str, Any]) -> None:
        self.backend = backend
        self.w3 = w3
        self.funder = funder
        self.acct = accounts
        self.selectors = error_selectors()
        self.chain_id = w3.eth.chain_id

    # --- state and time -------------------------------------------------------------------
    def snapshot(self) -> Any:
        if self.backend == "embedded":
            return self.w3.provider.ethereum_tester.take_snapshot()
        return self.w3.provider.make_request("evm_snapshot", [])["result"]

    def revert(self, snapshot: Any) -> None:
        if self.backend == "embedded":
            self.w3.provider.ethereum_tester.revert_to_snapshot(snapshot)
        else:
            assert self.w3.provider.make_request("evm_revert", [snapshot])["result"] is True

    def now(self) -> int:
        """The latest block's timestamp."""
        return self.w3.eth.get_block("latest")["timestamp"]

    def advance(self, seconds: int) -> None:
        """Mines a block `seconds` after the latest one."""
        if self.backend == "embedded":
            # eth-tester's time_travel(t) mines a block at t - 1 and leaves t pending
            self.w3.provider.ethereum_tester.time_travel(self.now() + seconds + 1)
        else:
            self.w3.provider.make_request("evm_increaseTime", [seconds])
            self.w3.provider.make_request("evm_mine", [])

    # --- contracts ------------------------------------------------------------------------
    def contract(self, name: str, address: str) -> Any:
        from contracts import artifacts

        return self.w3.eth.contract(address=address, abi=artifacts.load(name).abi)

    def deploy(self, name: str, *args: Any, by: str = "deployer") -> Any:
        from contracts.deployment import deploy_contract

        address, _ = deploy_contract(self.w3, self.acct[by], name, *args)
        return self.contract(name, address)

    def send(self, by: str, call: Any) -> Any:
        """Signs and sends `call` from account `by`; returns the receipt (status 1)."""
        from contracts.deployment import send

        return send(self.w3, self.acct[by], call)

    def addr(self, name: str) -> str:
        return self.acct[name].address

    def balance(self, who: str, token: Any = None) -> int:
        """Token balance of an account name or an address."""
        address = self.acct[who].address if who in self.acct else who
        return (token or self.token).functions.balanceOf(address).call()

    def error_name(self, exc: BaseException) -> str | None:
        data = revert_data(exc)
        if data is None or len(data) < 4:
            return None
        return self.selectors.get(data[:4], "0x" + data[:4].hex())

    @contextlib.contextmanager
    def reverts(self, error: str) -> Iterator[None]:
        """Expects the block to revert with the custom error named `error`."""
        from eth_tester.exceptions import TransactionFailed
        from web3.exceptions import ContractLogicError

        with pytest.raises((ContractLogicError, TransactionFailed)) as caught:
            yield
        name = self.error_name(caught.value)
        assert name == error, f"reverted with {name}, expected {error}: {caught.value!r}"

    # --- EIP-712, with eth-account only ---------------------------------------------------
    def domain(self, escrow: Any = None, chain_id: int | None = None) -> dict[str, Any]:
        return {
            "name": "gridmesh",
            "version": "1",
            "chainId": self.chain_id if chain_id is None else chain_id,
            "verifyingContract": (escrow or self.escrow).address,
        }

    @staticmethod
    def _types(kind: str) -> dict[str, list[dict[str, str]]]:
        fields = VOUCHER_FIELDS if kind == "Voucher" else RECEIPT_FIELDS
        return {kind: [{"name": n, "type": t} for n, t in fields]}

    def sign(self, by: str, kind: str, message: dict[str, Any], **domain: Any) -> bytes:
        """eth-account's signature of `message` (a Voucher or Receipt) by account `by`."""
        from eth_account import Account

        signed = Account.sign_typed_data(
            self.acct[by].key, self.domain(**domain), self._types(kind), message
        )
        return bytes(signed.signature)

    def digest(self, kind: str, message: dict[str, Any], **domain: Any) -> bytes:
        """eth-account's EIP-712 digest of `message`."""
        from eth_account.messages import encode_typed_data

        signable = encode_typed_data(self.domain(**domain), self._types(kind), message)
        return keccak(b"\x19" + signable.version + signable.header + signable.body)

    @staticmethod
    def as_tuple(kind: str, message: dict[str, Any]) -> tuple[Any, ...]:
        fields = VOUCHER_FIELDS if kind == "Voucher" else RECEIPT_FIELDS
        return tuple(message[name] for name, _ in fields)

    def voucher(
        self, job_id: bytes, cumulative: int, nonce: int, provider: str = "provider", **extra: Any
    ) -> dict[str, Any]:
        message = {
            "jobId": job_id,
            "provider": self.addr(provider),
            "cumulativeAmount": cumulative,
            "receiptsRoot": keccak(b"root %d" % nonce),
            "nonce": nonce,
        }
        message.update(extra)
        return message

    def receipt(self, job_id: bytes, provider: str = "provider", **extra: Any) -> dict[str, Any]:
        message = {
            "jobId": job_id,
            "provider": self.addr(provider),
            "model": keccak(b"tiny-llama"),
            "layerStart": 0,
            "layerEnd": 4,
            "session": keccak(b"session-1"),
            "step": 7,
            "inputHash": keccak(b"input"),
            "outputHash": keccak(b"output"),
            "units": 4 * 16,
            "pricePerUnit": 25,
            "prevReceipt": bytes(32),
            "timestamp": 1_800_000_000,
        }
        message.update(extra)
        return message

    def settle(self, voucher: dict[str, Any], signature: bytes, by: str = "provider") -> Any:
        return self.send(
            by, self.escrow.functions.settle(self.as_tuple("Voucher", voucher), signature)
        )

    def deposit(self, job_id: bytes, amount: int, *, ttl: int = 3600, by: str = "payer") -> int:
        """Deposits `amount` for `job_id`, deadline `ttl` seconds from now; returns the deadline."""
        deadline = self.now() + ttl
        self.send(by, self.escrow.functions.deposit(job_id, amount, 25, deadline))
        return deadline


def _fund_and_deploy(chain: Chain) -> None:
    from contracts.deployment import deploy_all

    w3 = chain.w3
    for account in chain.acct.values():
        tx = w3.eth.send_transaction(
            {"from": chain.funder, "to": account.address, "value": 100 * ETH}
        )
        w3.eth.wait_for_transaction_receipt(tx)
    d = deploy_all(
        w3,
        chain.acct["deployer"].key.hex(),
        min_stake=MIN_STAKE,
        unbonding_delay_s=UNBONDING_DELAY_S,
        fee_bps=FEE_BPS,
        fee_recipient=chain.addr("fee"),
        half_life_s=HALF_LIFE_S,
    )
    chain.deployment = d
    chain.token = chain.contract("TestUSD", d.token)
    chain.reputation = chain.contract("ReputationRegistry", d.reputation)
    chain.providers = chain.contract("ProviderRegistry", d.providers)
    chain.escrow = chain.contract("JobEscrow", d.escrow)
    for name in ("provider", "provider2"):
        chain.send(name, chain.providers.functions.register(keccak(name.encode())[:20] + b"peer"))
        chain.send(name, chain.token.functions.mint(chain.addr(name), MIN_STAKE))
        chain.send(name, chain.token.functions.approve(d.providers, 2**256 - 1))
        chain.send(name, chain.providers.functions.stake(MIN_STAKE))
    chain.send("payer", chain.token.functions.mint(chain.addr("payer"), 1_000_000 * TOKEN))
    chain.send("payer", chain.token.functions.approve(d.escrow, 2**256 - 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def anvil_binary() -> Path | None:
    """The platform's anvil binary that npm installed with @foundry-rs/anvil, if any."""
    found = sorted(glob.glob(str(NODE_MODULES / "@foundry-rs" / "anvil-*" / "bin" / "anvil*")))
    return Path(found[0]) if found else None


def _die_with_parent() -> None:
    """Runs in the anvil child before exec: on Linux, the kernel kills anvil when pytest dies
    without running its finalizers (SIGKILL, or SIGTERM from a CI timeout)."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def _answers_within(proc: subprocess.Popen[bytes], w3: Any, timeout_s: float) -> str:
    """Whether anvil answers a JSON-RPC call: "up", "exited" if it died first, "silent" if
    neither happened within `timeout_s`."""
    from daemon.devnet import DevnetError, wait_for

    def state() -> str | None:
        if proc.poll() is not None:
            return "exited"
        with contextlib.suppress(Exception):
            if w3.eth.chain_id:
                return "up"
        return None

    try:
        return wait_for(state, timeout_s, "anvil to answer", poll_s=0.02)
    except DevnetError:
        return "silent"


@pytest.fixture(scope="session")
def anvil_w3() -> Iterator[Any]:
    """A fresh anvil on a free 127.0.0.1 port for this test session; always killed after."""
    binary = anvil_binary()
    if binary is None:
        pytest.skip(f"anvil: {NOT_INSTALLED}")
    from web3 import Web3

    proc = None
    try:
        for _attempt in range(3):  # the free port may be taken between our check and anvil's bind
            port = _free_port()
            proc = subprocess.Popen(
                [str(binary), "--host", "127.0.0.1", "--port", str(port), "--silent"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
            w3 = Web3(Web3.HTTPProvider(f"http://127.0.0.1:{port}", request_kwargs={"timeout": 30}))
            if _answers_within(proc, w3, 30.0) != "up":  # exited (its port taken?) or silent
                proc.kill()
                proc.wait()
                continue
            yield w3
            return
        stderr = proc.stderr.read().decode(errors="replace") if proc and proc.stderr else ""
        pytest.fail(f"anvil did not start: {stderr[-2000:]}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def embedded_w3() -> Any:
    from web3 import EthereumTesterProvider, Web3

    return Web3(EthereumTesterProvider())


@pytest.fixture(scope="module", params=["embedded", "anvil"])
def chain_module(request: pytest.FixtureRequest) -> Iterator[Chain]:
    """The deployment for one test module on one backend, reverted when the module is done."""
    from eth_account import Account

    w3 = request.getfixturevalue(f"{request.param}_w3")
    accounts = {
        name: Account.from_key(keccak(b"gridmesh contract tests: " + name.encode()))
        for name in ACCOUNT_NAMES
    }
    chain = Chain(request.param, w3, w3.eth.accounts[0], accounts)
    start = chain.snapshot()
    try:
        _fund_and_deploy(chain)
        yield chain
    finally:
        chain.revert(start)


@pytest.fixture
def chain(chain_module: Chain) -> Iterator[Chain]:
    """`chain_module` inside a snapshot reverted after the test."""
    snapshot = chain_module.snapshot()
    try:
        yield chain_module
    finally:
        chain_module.revert(snapshot)
