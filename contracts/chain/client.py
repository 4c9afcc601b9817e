"""The one way gridmesh talks to a chain: `ChainClient`.

One worker thread owns web3 (a synchronous HTTPProvider) and everything done with it; trio
code awaits its results (`await client.transact(...)`) without blocking the event loop, and
synchronous code (the CLI) uses the `_sync` twins or `run_sync`. Because one thread sends every
transaction, the client keeps its own account's nonce without asking the node each time.

Failures are `contracts.chain.errors` types: a revert is a `ContractRevert` named by its custom
error (checked with `eth_estimateGas` before anything is sent, and replayed from a mined
transaction that failed); an endpoint that does not answer is a `ChainUnreachable` after a
bounded number of retries on connection errors only (web3's own retry, with exponential
backoff; a request that reached the node and failed is never retried); anything else the node
refuses is a `ChainError` saying what. Gas is read from receipts (`gasUsed`), never estimates.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from contracts.chain.errors import ChainError, ChainUnreachable, ContractRevert, as_revert
from contracts.chain.jsonlimits import cap_recursion_limit
from contracts.chain.keys import ChainKey, parse_key

if TYPE_CHECKING:
    from web3 import Web3

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 30.0  # one HTTP request
DEFAULT_RETRIES = 4  # attempts on a connection error, in all
DEFAULT_BACKOFF_S = 0.25  # the first wait between attempts; each next one doubles
RECEIPT_TIMEOUT_S = 120.0
GAS_MARGIN = 1.25  # on top of the estimate: state can change between estimate and mining


@dataclass(frozen=True)
class Bound:
    """A deployed contract: its name (for messages and artifacts), address and ABI."""

    name: str
    address: str
    abi: Sequence[Mapping[str, Any]] = field(repr=False)


@dataclass(frozen=True)
class Event:
    name: str
    address: str
    args: dict[str, Any]
    log_index: int


@dataclass(frozen=True)
class TxResult:
    """A mined, successful transaction: gas from its receipt, events decoded with the ABI of
    the contract it called."""

    tx_hash: str
    gas_used: int
    block: int
    events: tuple[Event, ...] = ()

    def named(self, name: str) -> list[Event]:
        return [event for event in self.events if event.name == name]


class ChainClient:
    """A chain endpoint, and optionally the key this node transacts with.

    Close it (or use `with`) to stop its worker thread."""

    def __init__(
        self,
        rpc_url: str,
        key: ChainKey | str | None = None,
        *,
        abis: Any = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
        receipt_timeout_s: float = RECEIPT_TIMEOUT_S,
        poll_s: float = 0.1,
    ) -> None:
        if retries < 1:
            raise ValueError("retries counts attempts: at least 1")
        self.rpc_url = rpc_url
        self._key = parse_key(key, "the key given") if isinstance(key, str) else key
        self._abis = abis
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.receipt_timeout_s = receipt_timeout_s
        self.poll_s = poll_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chain-client")
        self._worker: threading.Thread | None = None
        self._w3: Web3 | None = None
        self._account: Any = None
        self._nonce: int | None = None
        self._chain_id: int | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ChainClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str | None:
        """The address transactions are sent from (None without a key)."""
        return self._key.address if self._key is not None else None

    # -- running on the worker ---------------------------------------------------------------

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(w3, *args)` on the worker thread; blocks the caller until it is done."""
        return self._submit(fn, *args).result()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(w3, *args)` on the worker thread, awaited from trio. A cancelled caller stops
        waiting; work already running (an HTTP request) finishes on the worker."""
        import trio

        future = self._submit(fn, *args)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: Future[T]) -> None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        finally:
            future.cancel()  # no-op once it runs or ran
        return future.result()

    def _submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        try:
            return self._executor.submit(self._on_worker, fn, *args)
        except RuntimeError:
            raise ChainError("this chain client is closed") from None

    def _on_worker(self, fn: Callable[..., T], *args: Any) -> T:
        self._worker = threading.current_thread()
        try:
            return fn(self._web3(), *args)
        except ChainError:
            raise
        except Exception as exc:
            raise self._explain(exc) from exc

    def _web3(self) -> Web3:
        if self._w3 is None:
            import requests
            from web3 import Web3
            from web3.providers.rpc.utils import ExceptionRetryConfiguration

            retry = ExceptionRetryConfiguration(
                errors=(requests.exceptions.ConnectionError,),
                retries=self.retries,
                backoff_factor=self.backoff_s,
            )
            provider = Web3.HTTPProvider(
                self.rpc_url,
                request_kwargs={"timeout": self.timeout_s},
                exception_retry_configuration=retry,
            )
            self._w3 = Web3(provider)
            cap_recursion_limit()  # web3 imported py_ecc: deep JSON answers must not crash us
        return self._w3

    def _explain(self, exc: Exception) -> ChainError:
        """What went wrong, as a ChainError."""
        import requests
        from web3.exceptions import TimeExhausted

        if isinstance(exc, requests.exceptions.ConnectionError):
            waited = self.backoff_s * (2 ** (self.retries - 1) - 1)
            return ChainUnreachable(
                f"cannot reach the chain at {self.rpc_url} ({self.retries} attempts over "
                f"{waited:.1f} s): {_reason(exc)}"
            )
        if isinstance(exc, requests.exceptions.Timeout):
            return ChainUnreachable(
                f"the chain at {self.rpc_url} did not answer within {self.timeout_s:g} s"
            )
        if isinstance(exc, TimeExhausted):
            return ChainError(f"{exc} (the chain at {self.rpc_url})")
        revert = as_revert(exc, self._all_abis())
        if revert is not None:
            return revert
        first = exc.args[0] if exc.args and isinstance(exc.args[0], str) else None
        message = getattr(exc, "message", None) or first or str(exc) or type(exc).__name__
        if type(exc).__name__ == "Web3RPCError":  # the node said it
            return ChainError(f"{message} (the chain at {self.rpc_url})")
        return ChainError(f"{type(exc).__name__}: {message}")

    def _all_abis(self, bound: Bound | None = None) -> list[Any]:
        """The ABIs reverts are named against: the called contract's, then the client's
        (all of gridmesh's artifacts unless given)."""
        abis: list[Any] = [bound.abi] if bound is not None else []
        if self._abis is not None:
            abis.append(self._abis)
        else:
            with suppress(ImportError):
                from contracts import artifacts

                abis.append(artifacts.all_abis())
        return abis

    # -- reading -----------------------------------------------------------------------------

    def bind(
        self, name: str, address: str, abi: Sequence[Mapping[str, Any]] | None = None
    ) -> Bound:
        """The contract `name` at `address`, with its committed artifact's ABI unless given."""
        from web3 import Web3

        if abi is None:
            from contracts import artifacts

            abi = artifacts.load(name).abi
        return Bound(name, Web3.to_checksum_address(address), abi)

    async def chain_id(self) -> int:
        return await self.run(self._read_chain_id)

    def chain_id_sync(self) -> int:
        return self.run_sync(self._read_chain_id)

    def _read_chain_id(self, w3: Web3) -> int:
        if self._chain_id is None:
            self._chain_id = int(w3.eth.chain_id)
        return self._chain_id

    async def block_number(self) -> int:
        return await self.run(lambda w3: int(w3.eth.block_number))

    async def balance_of(self, address: str | None = None) -> int:
        """The native balance (wei) of `address`, this client's own by default."""
        return await self.run(self._balance, address)

    def _balance(self, w3: Web3, address: str | None) -> int:
        from web3 import Web3 as W3

        who = address or self.address
        if who is None:
            raise ChainError("balance_of needs an address (this client has no key)")
        return int(w3.eth.get_balance(W3.to_checksum_address(who)))

    async def call(self, contract: Bound, fn: str, *args: Any, block: Any = "latest") -> Any:
        """The result of view function `fn` (ContractRevert if it reverts)."""
        return await self.run(self._call, contract, fn, args, block)

    def call_sync(self, contract: Bound, fn: str, *args: Any, block: Any = "latest") -> Any:
        return self.run_sync(self._call, contract, fn, args, block)

    def _call(self, w3: Web3, contract: Bound, fn: str, args: tuple[Any, ...], block: Any) -> Any:
        function = self._function(w3, contract, fn, args)
        sender = {"from": self.address} if self.address else {}
        try:
            return function.call(sender, block_identifier=block)
        except Exception as exc:
            raise self._revert_or(exc, contract, fn) from exc

    # -- transacting -------------------------------------------------------------------------

    async def transact(
        self, contract: Bound, fn: str, *args: Any, value: int = 0, gas: int | None = None
    ) -> TxResult:
        """Send `fn(*args)` from this client's key, wait until mined; the gas it used and its
        events. ContractRevert (before sending: the estimate reverts; or after mining) names
        the custom error."""
        return await self.run(self._transact, contract, fn, args, value, gas)

    def transact_sync(
        self, contract: Bound, fn: str, *args: Any, value: int = 0, gas: int | None = None
    ) -> TxResult:
        return self.run_sync(self._transact, contract, fn, args, value, gas)

    def _transact(
        self,
        w3: Web3,
        contract: Bound,
        fn: str,
        args: tuple[Any, ...],
        value: int,
        gas: int | None,
    ) -> TxResult:
        from web3.logs import DISCARD

        account = self._signer()
        function = self._function(w3, contract, fn, args)
        base = {"from": account.address, "value": value}
        if gas is None:
            try:
                gas = int(function.estimate_gas(base) * GAS_MARGIN)
            except Exception as exc:
                raise self._revert_or(exc, contract, fn) from exc
        chain_id = self._read_chain_id(w3)
        tx, receipt = self._send_and_wait(
            w3,
            lambda nonce: function.build_transaction(
                {**base, "nonce": nonce, "gas": gas, "chainId": chain_id}
            ),
        )
        if receipt["status"] != 1:
            raise self._failed(w3, contract, fn, tx, receipt)
        handle = w3.eth.contract(address=contract.address, abi=contract.abi)
        events = [
            Event(
                log["event"],
                log["address"],
                dict(log["args"]),
                int(log["logIndex"]),
            )
            for entry in contract.abi
            if entry.get("type") == "event"
            for log in handle.events[entry["name"]]().process_receipt(receipt, errors=DISCARD)
        ]
        events.sort(key=lambda event: event.log_index)
        return TxResult(
            "0x" + bytes(receipt["transactionHash"]).hex(),
            int(receipt["gasUsed"]),
            int(receipt["blockNumber"]),
            tuple(events),
        )

    async def send_value(self, to: str, wei: int) -> TxResult:
        """Send `wei` of the native coin (gas money) from this client's key to `to`."""
        return await self.run(self._send_value, to, wei)

    def send_value_sync(self, to: str, wei: int) -> TxResult:
        return self.run_sync(self._send_value, to, wei)

    def _send_value(self, w3: Web3, to: str, wei: int) -> TxResult:
        from web3 import Web3 as W3

        if wei < 0:
            raise ChainError(f"cannot send a negative amount ({wei} wei)")
        target = W3.to_checksum_address(to)
        sender = self._signer().address
        fees = {"maxPriorityFeePerGas": int(w3.eth.max_priority_fee)}
        fees["maxFeePerGas"] = (
            2 * int(w3.eth.get_block("latest")["baseFeePerGas"]) + (fees["maxPriorityFeePerGas"])
        )
        gas = int(w3.eth.estimate_gas({"from": sender, "to": target, "value": wei}))
        tx, receipt = self._send_and_wait(
            w3,
            lambda nonce: {
                "from": sender,
                "to": target,
                "value": wei,
                "gas": gas,
                "nonce": nonce,
                **fees,
            },
        )
        tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
        if receipt["status"] != 1:
            raise ChainError(f"sending {wei} wei to {target} failed: transaction {tx_hash}")
        return TxResult(tx_hash, int(receipt["gasUsed"]), int(receipt["blockNumber"]))

    def _send_and_wait(self, w3: Web3, build: Callable[[int], dict[str, Any]]) -> tuple[Any, Any]:
        """Sign `build(nonce)` with this client's key, send it and wait for its receipt; the
        transaction and the receipt, whatever its status. The nonce is the client's own count;
        a send refused for its nonce (another sender used the key meanwhile) is built and
        signed once more with the node's count."""
        account = self._signer()
        for attempt in (1, 2):
            if self._nonce is None:
                self._nonce = int(w3.eth.get_transaction_count(account.address, "pending"))
            tx = {**build(self._nonce), "chainId": self._read_chain_id(w3)}
            try:
                tx_hash = self._send(w3, account.sign_transaction(tx))
                break
            except Exception as exc:
                if attempt == 2 or "nonce" not in str(exc).lower():
                    raise
        receipt = w3.eth.wait_for_transaction_receipt(
            tx_hash, timeout=self.receipt_timeout_s, poll_latency=self.poll_s
        )
        return tx, receipt

    def _send(self, w3: Web3, signed: Any) -> Any:
        """Send a signed transaction and count its nonce as used. A resend after a lost
        answer that the node already has is that same transaction."""
        try:
            tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
        except Exception as exc:
            text = str(exc).lower()
            if "already known" not in text and "known transaction" not in text:
                self._nonce = None  # ask the node again next time ("nonce too low", ...)
                raise
            tx_hash = signed.hash
        assert self._nonce is not None
        self._nonce += 1
        return tx_hash

    def _failed(self, w3: Web3, contract: Bound, fn: str, tx: Any, receipt: Any) -> ChainError:
        """The error of a transaction mined with status 0: replayed as a call on the state
        before its block to get the revert data."""
        tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
        replay = {k: tx[k] for k in ("from", "to", "data", "value", "gas") if k in tx}
        try:
            w3.eth.call(replay, block_identifier=max(int(receipt["blockNumber"]) - 1, 0))
        except Exception as exc:
            error = self._revert_or(exc, contract, fn)
            if isinstance(error, ContractRevert):
                return error
        used, limit = int(receipt["gasUsed"]), int(tx.get("gas", 0))
        return ChainError(
            f"{contract.name}.{fn}: transaction {tx_hash} failed (status 0) without revert "
            f"data; it used {used} of {limit} gas (out of gas?)"
        )

    def _signer(self) -> Any:
        if self._key is None:
            raise ChainError("this chain client has no key: it can only read")
        if self._account is None:
            from eth_account import Account

            self._account = Account.from_key(self._key.private_key)
        return self._account

    def _function(self, w3: Web3, contract: Bound, fn: str, args: tuple[Any, ...]) -> Any:
        handle = w3.eth.contract(address=contract.address, abi=contract.abi)
        try:
            return handle.functions[fn](*args)
        except Exception as exc:  # no such function, arguments that do not fit its ABI
            raise ChainError(f"{contract.name}.{fn}: {exc}") from None

    def _revert_or(self, exc: Exception, contract: Bound, fn: str) -> ChainError:
        """`exc` as a ContractRevert naming where, or as whatever else it is."""
        if isinstance(exc, ChainError):
            return exc
        revert = as_revert(exc, self._all_abis(contract), context=f"{contract.name}.{fn}")
        if revert is not None:
            return revert
        error = self._explain(exc)
        if type(error) is ChainError:
            return ChainError(f"{contract.name}.{fn}: {error}")
        return error


def _reason(exc: BaseException) -> str:
    """The useful part of requests' long connection error text."""
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    return match.group(0) if match else type(exc).__name__
