"""The embedded development chain: a real EVM (py-evm through eth-tester) served as Ethereum
JSON-RPC 2.0 over HTTP, so a daemon talks to it exactly as it would to anvil or a testnet.

`DevChain` answers JSON-RPC requests; eth-tester is not thread-safe, so one lock covers every
request. Methods are eth-tester's (as web3's EthereumTesterProvider names and formats them) plus
anvil's `evm_increaseTime`, `evm_mine`, `evm_snapshot` and `evm_revert`. Quantities go out as
hex, reverts as `{"code": 3, "message": "execution reverted", "data": "0x<selector + args>"}`
like anvil, so `contracts.chain.errors` reads them the same on both.

The HTTP side is the standard library's ThreadingHTTPServer, bounded: at most
`max_connections` at once (more are answered 503), bodies of at most `max_body` bytes (413),
batches of at most `MAX_BATCH` requests, idle keep-alive connections closed after
`IDLE_TIMEOUT_S`, JSON nested at most `jsonlimits.MAX_JSON_DEPTH` deep, only `Content-Type:
application/json` (a web page cannot post that cross-origin without a preflight, which is not
answered). It binds 127.0.0.1 unless told otherwise: its accounts' keys are public.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from contracts.chain.jsonlimits import cap_recursion_limit, json_too_deep

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8545
DEFAULT_ACCOUNTS = 10
MAX_BODY = 8 * 1024 * 1024  # a deployment of several contracts is well under 1 MiB
MAX_BATCH = 200
MAX_CONNECTIONS = 64
IDLE_TIMEOUT_S = 30.0

# JSON-RPC 2.0 error codes; 3 is what geth and anvil answer a revert with
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = (
    -32700,
    -32600,
    -32601,
    -32602,
    -32603,
)
SERVER_ERROR = -32000
EXECUTION_REVERTED = 3


@dataclass(frozen=True)
class DevAccount:
    address: str
    private_key: str  # 0x-hex; a public development key, never a real one


class RPCFailure(Exception):
    """An answer of JSON-RPC error `code` to one request."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data

    def as_error(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class DevChain:
    """An eth-tester chain with `accounts` funded accounts, answering JSON-RPC 2.0."""

    def __init__(self, accounts: int = DEFAULT_ACCOUNTS) -> None:
        if not 1 <= accounts <= 1000:
            raise ValueError(f"accounts must be between 1 and 1000, not {accounts}")
        from eth_tester import EthereumTester, PyEVMBackend
        from web3 import Web3
        from web3.middleware import combine_middleware
        from web3.providers.eth_tester import EthereumTesterProvider
        from web3.providers.eth_tester.defaults import API_ENDPOINTS
        from web3.providers.eth_tester.middleware import (
            default_transaction_fields_middleware,
            ethereum_tester_middleware,
        )

        cap_recursion_limit()  # py_ecc (imported by the above) raised it to 100,000
        genesis = PyEVMBackend.generate_genesis_state(num_accounts=accounts)
        self._backend = _Backend(genesis_state=genesis)
        self.tester = EthereumTester(self._backend)
        self.accounts = [
            DevAccount(address, key.to_hex())
            for address, key in zip(
                self.tester.get_accounts(), self._backend.account_keys, strict=True
            )
        ]
        self._endpoints = API_ENDPOINTS
        provider = EthereumTesterProvider(self.tester)
        w3 = Web3(provider, middleware=[])
        # web3's own translation between the wire (camelCase keys, hex quantities) and
        # eth-tester's calls (snake_case keys, ints); results are hex-encoded by `_wire`
        self._pipeline = combine_middleware(
            middleware=(default_transaction_fields_middleware, ethereum_tester_middleware),
            w3=w3,
            provider_request_fn=self._dispatch,
        )
        self._lock = threading.Lock()
        self._time_offset = 0
        self._extras = {
            "evm_increaseTime": self._increase_time,
            "evm_mine": self._mine,
            "evm_snapshot": self._snapshot,
            "evm_revert": self._revert,
            "net_version": lambda params: str(self.chain_id),  # as anvil: the chain id
        }

    @property
    def chain_id(self) -> int:
        return int(self._endpoints["eth"]["chainId"](self.tester, []))

    # -- requests ---------------------------------------------------------------------------

    def handle_body(self, body: bytes) -> bytes | None:
        """The response body to an HTTP request body; None when it held only notifications."""
        if json_too_deep(body):
            answer: Any = _reply(None, error=RPCFailure(PARSE_ERROR, "JSON nested too deep"))
        else:
            try:
                message = json.loads(body, parse_constant=_no_constant)
            except ValueError as exc:
                answer = _reply(None, error=RPCFailure(PARSE_ERROR, f"parse error: {exc}"))
            else:
                answer = self.handle(message)
        return None if answer is None else json.dumps(answer).encode()

    def handle(self, message: Any) -> Any:
        """The answer to a parsed request or batch (None for notifications only)."""
        if isinstance(message, list):
            if not message:
                return _reply(None, error=RPCFailure(INVALID_REQUEST, "empty batch"))
            if len(message) > MAX_BATCH:
                why = f"batch of {len(message)} requests; at most {MAX_BATCH}"
                return _reply(None, error=RPCFailure(INVALID_REQUEST, why))
            answers = [a for a in (self._one(m) for m in message) if a is not None]
            return answers or None
        return self._one(message)

    def request(self, method: str, params: list[Any] | None = None) -> Any:
        """Run one method and return its result (hex-encoded as on the wire) or raise
        RPCFailure: what tests and the CLI use in-process."""
        with self._lock:
            return self._run(method, params or [])

    def _one(self, request: Any) -> dict[str, Any] | None:
        if not isinstance(request, dict):
            return _reply(None, error=RPCFailure(INVALID_REQUEST, "a request must be an object"))
        rid = request.get("id")
        notification = "id" not in request
        if not isinstance(rid, str | int | float | None) or isinstance(rid, bool):
            return _reply(None, error=RPCFailure(INVALID_REQUEST, "id must be a string or number"))
        method, params = request.get("method"), request.get("params", [])
        try:
            if request.get("jsonrpc") != "2.0":
                raise RPCFailure(INVALID_REQUEST, 'jsonrpc must be "2.0"')
            if not isinstance(method, str) or not method:
                raise RPCFailure(INVALID_REQUEST, "method must be a non-empty string")
            if params is None:
                params = []
            if not isinstance(params, list):
                raise RPCFailure(INVALID_PARAMS, "params must be an array (positional)")
            with self._lock:
                result = self._run(method, params)
        except RPCFailure as failure:
            return None if notification else _reply(rid, error=failure)
        return None if notification else _reply(rid, result=result)

    def _run(self, method: str, params: list[Any]) -> Any:
        """Call under the lock: the method's JSON-ready result, or RPCFailure."""
        if self._time_offset:
            self._keep_offset()
        extra = self._extras.get(method)
        if extra is not None:
            return extra(params)  # already as on the wire
        namespace, _, name = method.partition("_")
        if name not in self._endpoints.get(namespace, {}):
            raise RPCFailure(METHOD_NOT_FOUND, f"method not found: {method}")
        try:
            response = self._pipeline(method, params)
        except RPCFailure:
            raise
        except Exception as exc:  # the formatters refusing a parameter, eth-tester's checks
            raise _failure(method, exc) from None
        if "error" in response:
            error = response["error"]
            raise RPCFailure(error.get("code", SERVER_ERROR), str(error.get("message")))
        return _wire(response.get("result"))

    def _dispatch(self, method: str, params: Any) -> dict[str, Any]:
        """The innermost step of web3's pipeline: eth-tester itself."""
        namespace, _, name = method.partition("_")
        result = self._endpoints[namespace][name](self.tester, params)
        return {"jsonrpc": "2.0", "id": 0, "result": result}

    # -- anvil's testing methods --------------------------------------------------------------

    def _increase_time(self, params: list[Any]) -> int:
        """evm_increaseTime(seconds): later blocks are stamped that much later; returns the
        total offset in seconds (as anvil does)."""
        seconds = _quantity(params, 0, "seconds")
        header = self._backend.chain.header
        self._backend.chain.header = header.copy(timestamp=header.timestamp + seconds)
        self._time_offset += seconds
        return self._time_offset

    def _keep_offset(self) -> None:
        """Stamp the next block no earlier than now + the offset, as anvil does (py-evm would
        stamp it parent + 1 s until the wall clock caught up)."""
        header = self._backend.chain.header
        due = int(time.time()) + self._time_offset
        if header.timestamp < due:
            self._backend.chain.header = header.copy(timestamp=due)

    def _mine(self, params: list[Any]) -> str:
        """evm_mine([timestamp]): mine one block (at that timestamp when given)."""
        if params and params[0] is not None:
            when = _quantity(params, 0, "timestamp")
            pending = self.tester.get_block_by_number("pending")["timestamp"]
            if when < pending:
                raise RPCFailure(INVALID_PARAMS, f"timestamp {when} is before {pending}")
            self._backend.chain.header = self._backend.chain.header.copy(timestamp=when)
        self.tester.mine_blocks(1)
        return "0x0"

    def _snapshot(self, params: list[Any]) -> str:
        return hex(self.tester.take_snapshot())

    def _revert(self, params: list[Any]) -> bool:
        """evm_revert(id): back to that snapshot; false when there is none (as anvil)."""
        from eth_tester.exceptions import SnapshotNotFound

        try:
            self.tester.revert_to_snapshot(_quantity(params, 0, "snapshot id"))
        except SnapshotNotFound:
            return False
        return True


def _backend_class() -> type:
    from eth.exceptions import Revert
    from eth_tester import PyEVMBackend
    from eth_tester.backends.pyevm.main import (
        EVMSpoofTransaction,
        _execute_and_revert_transaction,
    )
    from eth_tester.exceptions import TransactionFailed

    class Backend(PyEVMBackend):  # type: ignore[misc]
        """eth-tester's py-evm backend whose `call` keeps a revert's data as bytes (its own
        turns it into text, or into the decoded reason of an Error(string))."""

        def call(self, transaction: dict[str, Any], block_number: Any = "latest") -> bytes:
            defaulted = dict(transaction)
            defaulted.setdefault("gas", self._max_available_gas())
            unsigned = self._get_normalized_and_unsigned_evm_transaction(defaulted, block_number)
            spoofed = EVMSpoofTransaction(unsigned, from_=transaction["from"])
            computation = _execute_and_revert_transaction(self.chain, spoofed, block_number)
            if computation.is_error:
                error = computation._error
                raise TransactionFailed(error if isinstance(error, Revert) else str(error))
            return bytes(computation.output)

    return Backend


def _Backend(**kwargs: Any) -> Any:  # noqa: N802 - a class, built on first use
    return _backend_class()(**kwargs)


def _failure(method: str, exc: Exception) -> RPCFailure:
    """The JSON-RPC error for what eth-tester or web3's formatters raised."""
    from eth_tester.exceptions import TransactionFailed, ValidationError
    from eth_utils.exceptions import ValidationError as EVMValidationError

    from contracts.chain.errors import ERROR_STRING_SELECTOR, revert_data

    if isinstance(exc, NotImplementedError):
        return RPCFailure(METHOD_NOT_FOUND, f"{method} is not implemented by the dev chain")
    data = revert_data(exc)
    if data is not None and (
        isinstance(exc, TransactionFailed) or type(exc).__name__.startswith("Contract")
    ):
        message = "execution reverted"
        if data.startswith(ERROR_STRING_SELECTOR):
            from eth_abi import decode

            with suppress(Exception):  # a malformed reason is still a revert
                message += f": {decode(['string'], data[4:])[0]}"
        return RPCFailure(EXECUTION_REVERTED, message, "0x" + data.hex())
    if isinstance(exc, TransactionFailed):
        return RPCFailure(SERVER_ERROR, f"execution failed: {exc}")
    if isinstance(exc, EVMValidationError):  # py-evm refusing a transaction (nonce, funds)
        return RPCFailure(SERVER_ERROR, f"invalid transaction: {exc}")
    if isinstance(exc, ValidationError | ValueError | TypeError | KeyError | IndexError):
        return RPCFailure(INVALID_PARAMS, f"invalid params for {method}: {exc}")
    log.exception("dev chain: %s failed", method)
    return RPCFailure(INTERNAL_ERROR, f"{method} failed: {type(exc).__name__}: {exc}")


def _quantity(params: list[Any], index: int, what: str) -> int:
    try:
        value = params[index]
    except IndexError:
        raise RPCFailure(INVALID_PARAMS, f"missing parameter {index}: {what}") from None
    if isinstance(value, str):
        try:
            value = int(value, 16) if value.lower().startswith("0x") else int(value)
        except ValueError:
            raise RPCFailure(INVALID_PARAMS, f"{what} {value!r} is not a number") from None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RPCFailure(INVALID_PARAMS, f"{what} must be a non-negative integer, not {value!r}")
    return value


def _wire(value: Any, key: str = "") -> Any:
    """A result as JSON-RPC sends it: integers as hex quantities, bytes as hex data."""
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        if key == "logsBloom":
            return "0x" + value.to_bytes(256, "big").hex()
        return hex(value)
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): _wire(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_wire(v) for v in value]
    return str(value)


def _reply(rid: Any, *, result: Any = None, error: RPCFailure | None = None) -> dict[str, Any]:
    if error is not None:
        return {"jsonrpc": "2.0", "id": rid, "error": error.as_error()}
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# -- HTTP -----------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "gridmesh-devchain"
    timeout = IDLE_TIMEOUT_S  # an idle keep-alive connection gives its slot back
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._refuse(411, "send a Content-Length (chunked bodies are not accepted)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._refuse(411, "a Content-Length is required")
        if length < 0:
            return self._refuse(400, "bad Content-Length")
        if length > self.server.max_body:
            why = f"request body of {length} bytes; at most {self.server.max_body}"
            return self._refuse(413, why)
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return self._refuse(415, "Content-Type must be application/json")
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            return None
        answer = self.server.chain.handle_body(body)
        if answer is None:
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self._send(200, answer)
        return None

    def do_GET(self) -> None:  # noqa: N802
        self._refuse(405, "POST JSON-RPC 2.0 requests (Content-Type: application/json) here")

    def _refuse(self, status: int, why: str) -> None:
        """An HTTP error with a JSON-RPC error body; the connection is closed (its body, if
        any, is left unread)."""
        code = PARSE_ERROR if status in (400, 411) else INVALID_REQUEST
        body = json.dumps(_reply(None, error=RPCFailure(code, why))).encode()
        self.close_connection = True
        self._send(status, body, close=True)

    def _send(self, status: int, body: bytes, *, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = MAX_CONNECTIONS

    def __init__(
        self, address: tuple[str, int], chain: DevChain, *, max_body: int, max_connections: int
    ) -> None:
        self.chain = chain
        self.max_body = max_body
        self._slots = threading.BoundedSemaphore(max_connections)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


@dataclass
class RunningChain:
    """A dev chain being served: its URL, its bound address, its accounts."""

    chain: DevChain
    server: _Server
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def accounts(self) -> list[DevAccount]:
        return self.chain.accounts


def make_server(
    chain: DevChain,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    max_body: int = MAX_BODY,
    max_connections: int = MAX_CONNECTIONS,
) -> RunningChain:
    """Bind (port 0: a free one) without serving yet; `server.serve_forever()` serves."""
    server = _Server((host, port), chain, max_body=max_body, max_connections=max_connections)
    bound_host, bound_port = server.server_address[:2]
    return RunningChain(chain, server, str(bound_host), int(bound_port))


@contextmanager
def serve_in_thread(
    host: str = DEFAULT_HOST,
    port: int = 0,
    *,
    accounts: int = DEFAULT_ACCOUNTS,
    chain: DevChain | None = None,
    max_body: int = MAX_BODY,
    max_connections: int = MAX_CONNECTIONS,
) -> Iterator[RunningChain]:
    """Serve a dev chain from a background thread while the block runs (tests, the devnet)."""
    running = make_server(
        chain or DevChain(accounts),
        host,
        port,
        max_body=max_body,
        max_connections=max_connections,
    )
    thread = threading.Thread(
        target=running.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.name = f"devchain:{running.port}"
    thread.start()
    try:
        yield running
    finally:
        running.server.shutdown()
        running.server.server_close()
        thread.join()
