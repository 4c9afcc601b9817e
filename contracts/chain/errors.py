"""What goes wrong on a chain, and the one helper that names a revert on every node we speak to.

A revert's data is the 4-byte selector of its error plus the ABI-encoded arguments. Each node
hands it back in its own wrapping (DESIGN.md "Known pitfalls of the chain stack"):
- eth-tester raises `TransactionFailed(Revert(data))`, or for `call` the text of the bytes
  (`"b'\\xde\\xad...'"`), or the decoded reason of an `Error(string)`;
- anvil (and geth, and our own dev chain) answer `{"code": 3, "message": "execution reverted",
  "data": "0x..."}`;
- hardhat answers `{"code": -32603, "message": "...", "data": {"message": ..., "data": "0x..."}}`
  (ganache: `{"data": {"0x<tx hash>": {"return": "0x..."}}}`);
- web3 turns those into `ContractCustomError` / `ContractPanicError` / `ContractLogicError`
  with `.data`, or `Web3RPCError` with `.rpc_response`.
`revert_data` digs the bytes out of any of these; `decode_revert` names them against the ABIs.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)
PANIC_SELECTOR = bytes.fromhex("4e487b71")  # Panic(uint256)

# Solidity's panic codes (docs: "Panic via assert and Error via require")
PANIC_REASONS = {
    0x00: "generic compiler panic",
    0x01: "assert failed",
    0x11: "arithmetic overflow or underflow",
    0x12: "division or modulo by zero",
    0x21: "invalid enum value",
    0x22: "bad storage byte array encoding",
    0x31: "pop on an empty array",
    0x32: "array index out of bounds",
    0x41: "out of memory",
    0x51: "call to an uninitialised function",
}


class ChainError(Exception):
    """A chain call that did not do what was asked; the message says what and why."""


class ChainUnreachable(ChainError):
    """The endpoint did not answer (refused, reset, timed out) within the retry budget."""


class ContractRevert(ChainError):
    """A contract reverted: `error_name` is its custom error ("UnknownJob"), "Error" for
    `Error(string)`, "Panic" for `Panic(uint256)`, the selector's hex for a selector none of
    the ABIs declares, "" for a revert without data. `args` are the decoded arguments."""

    def __init__(
        self,
        error_name: str,
        args: tuple[Any, ...],
        selector: str,
        *,
        data: bytes = b"",
        context: str = "",
    ) -> None:
        super().__init__(error_name, args, selector)
        self.error_name = error_name
        self.args = tuple(args)
        self.selector = selector
        self.data = data
        self.context = context

    def __reduce__(self) -> Any:
        return (_rebuild, (self.error_name, self.args, self.selector, self.data, self.context))

    def __str__(self) -> str:
        where = f"{self.context}: " if self.context else ""
        if not self.error_name:
            return f"{where}reverted without a reason"
        if self.error_name == "Panic" and self.args:
            code = self.args[0]
            why = PANIC_REASONS.get(code, "unknown panic code")
            return f"{where}reverted with Panic(0x{code:02x}): {why}"
        if self.error_name == "Error" and self.args:
            return f"{where}reverted: {self.args[0]}"
        shown = ", ".join(_show(arg) for arg in self.args)
        return f"{where}reverted with {self.error_name}({shown})"


def _rebuild(name: str, args: tuple[Any, ...], selector: str, data: bytes, context: str) -> Any:
    return ContractRevert(name, args, selector, data=data, context=context)


def _show(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, tuple | list):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    return repr(value) if isinstance(value, str) else str(value)


# -- finding the revert data ----------------------------------------------------------------

_HEX = re.compile(r"0x([0-9a-fA-F]{8}(?:[0-9a-fA-F]{2})*)")
_BYTES_REPR = re.compile(r"""^b(['"]).*\1$""", re.DOTALL)
_MAX_DEPTH = 8


def revert_data(source: Any) -> bytes | None:
    """The raw revert data (selector + arguments) carried by `source`, or None when it holds
    none: an exception from web3 or eth-tester, a JSON-RPC error object or response, bytes, or
    a hex string. b"" is a revert without data."""
    return _dig(source, 0)


def _dig(source: Any, depth: int) -> bytes | None:
    if depth > _MAX_DEPTH or source is None:
        return None
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, str):
        return _from_text(source)
    if isinstance(source, Mapping):
        return _from_mapping(source, depth)
    if isinstance(source, BaseException):
        return _from_exception(source, depth)
    return None


def _from_text(text: str) -> bytes | None:
    text = text.strip()
    if text in ("0x", ""):
        return b"" if text == "0x" else None
    if text.startswith("0x") and len(text) % 2 == 0:
        try:
            return bytes.fromhex(text[2:])
        except ValueError:
            return None
    if _BYTES_REPR.match(text):  # eth-tester's call: str(Revert(b"..."))
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return None
        return value if isinstance(value, bytes) else None
    return None


def _from_mapping(error: Mapping[str, Any], depth: int) -> bytes | None:
    if "error" in error and isinstance(error["error"], Mapping):  # a whole response
        return _from_mapping(error["error"], depth + 1)
    data = error.get("data")
    if isinstance(data, str):
        found = _from_text(data)
        if found is not None:
            return found
    if isinstance(data, Mapping):
        if "data" in data or "message" in data:  # hardhat
            found = _from_mapping(data, depth + 1)
            if found is not None:
                return found
        for inner in data.values():  # ganache: {tx hash: {"error": "revert", "return": ...}}
            if isinstance(inner, Mapping) and isinstance(inner.get("return"), str):
                return _from_text(inner["return"])
    if error.get("code") == 3 or "revert" in str(error.get("message", "")).lower():
        message = str(error.get("message", ""))
        match = _HEX.search(message)
        if match:
            return bytes.fromhex(match.group(1))
        if data is None and "revert" in message.lower():
            return _reason_only(message)
    return None


def _reason_only(message: str) -> bytes:
    """A node that says only 'execution reverted[: reason]': the reason as Error(string)."""
    _, sep, reason = message.partition("execution reverted:")
    reason = reason.strip()
    if not sep or not reason:
        return b""
    from eth_abi import encode

    return ERROR_STRING_SELECTOR + encode(["string"], [reason])


def _from_exception(exc: BaseException, depth: int) -> bytes | None:
    name = type(exc).__name__
    if name in ("ContractCustomError", "ContractPanicError", "ContractLogicError"):
        found = _dig(getattr(exc, "data", None), depth + 1)
        if found is not None:
            return found
        message = getattr(exc, "message", None) or ""
        return _reason_only(str(message)) if "revert" in str(message) else b""
    response = getattr(exc, "rpc_response", None)  # web3's Web3RPCError
    if isinstance(response, Mapping):
        found = _from_mapping(response, depth + 1)
        if found is not None:
            return found
    if name == "TransactionFailed":  # eth-tester
        for arg in exc.args:
            found = _dig(arg, depth + 1)
            if found is not None:
                return found
            if isinstance(arg, str) and arg.startswith("execution reverted"):
                # in process, web3's tester provider raises the data's repr after a colon:
                # TransactionFailed("execution reverted: b'\\xe4\\x98...'")
                tail = arg.partition(":")[2].strip()
                found = _from_text(tail) if tail else None
                return found if found is not None else _reason_only(arg)
        return None
    if name == "Revert":  # py-evm's VM error, the data as its first argument
        return _dig(exc.args[0], depth + 1) if exc.args else b""
    for arg in exc.args:
        if isinstance(arg, Mapping | BaseException):
            found = _dig(arg, depth + 1)
            if found is not None:
                return found
    for inner in (exc.__cause__, exc.__context__):
        if inner is not None and inner is not exc:
            found = _dig(inner, depth + 1)
            if found is not None:
                return found
    return None


# -- naming it ------------------------------------------------------------------------------

AbiSource = Iterable[Any] | Mapping[str, Any]


def decode_revert(
    data: bytes, abis: AbiSource | None = None, *, context: str = ""
) -> ContractRevert:
    """`data` named: the custom error of the ABIs (all of ours when `abis` is None) whose
    selector it starts with, Error(string), Panic(uint256), else the selector's hex."""
    from eth_abi import decode
    from eth_abi.exceptions import DecodingError

    if len(data) < 4:
        return ContractRevert("", (), "0x" + data.hex(), data=data, context=context)
    selector, body = data[:4], data[4:]
    hex_selector = "0x" + selector.hex()
    if selector == ERROR_STRING_SELECTOR:
        name, types = "Error", ("string",)
    elif selector == PANIC_SELECTOR:
        name, types = "Panic", ("uint256",)
    else:
        known = error_index(abis).get(selector)
        if known is None:
            return ContractRevert(
                hex_selector, (body,) if body else (), hex_selector, data=data, context=context
            )
        name, types = known
    try:
        args = tuple(decode(list(types), body))
    except (DecodingError, ValueError, OverflowError):
        args = (body,)
    return ContractRevert(name, args, hex_selector, data=data, context=context)


def as_revert(
    source: Any, abis: AbiSource | None = None, *, context: str = ""
) -> ContractRevert | None:
    """`source` (anything `revert_data` reads) as a named ContractRevert, or None when it is
    not a revert."""
    data = revert_data(source)
    return None if data is None else decode_revert(data, abis, context=context)


def error_index(abis: AbiSource | None = None) -> dict[bytes, tuple[str, tuple[str, ...]]]:
    """{selector: (error name, argument types)} of every custom error the ABIs declare."""
    if abis is None:
        return dict(_our_errors())
    return _index(abis)


@lru_cache(maxsize=1)
def _our_errors() -> tuple[tuple[bytes, tuple[str, tuple[str, ...]]], ...]:
    try:
        from contracts import artifacts
    except ImportError:  # no artifacts in this tree: only Error, Panic and selectors by hex
        return ()
    return tuple(_index(artifacts.all_abis()).items())


def _entries(abis: Any) -> Iterable[Mapping[str, Any]]:
    """ABI entries from one ABI, several, or {contract name: ABI}."""
    if isinstance(abis, Mapping):
        if "type" in abis:
            yield abis
            return
        abis = abis.values()
    for item in abis:
        if isinstance(item, Mapping) and "type" in item:
            yield item
        elif isinstance(item, Mapping | list | tuple):
            yield from _entries(item)
        elif hasattr(item, "abi"):  # an Artifact
            yield from _entries(item.abi)


def _index(abis: Any) -> dict[bytes, tuple[str, tuple[str, ...]]]:
    from eth_utils import keccak
    from eth_utils.abi import collapse_if_tuple

    index: dict[bytes, tuple[str, tuple[str, ...]]] = {}
    for entry in _entries(abis):
        if entry.get("type") != "error":
            continue
        types = tuple(collapse_if_tuple(dict(arg)) for arg in entry.get("inputs", []))
        signature = f"{entry['name']}({','.join(types)})"
        index[keccak(text=signature)[:4]] = (entry["name"], types)
    return index
