"""Helpers of the chain client's tests: raw JSON-RPC over HTTP, and contracts assembled by hand
(no compiler needed)."""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST `body` and return (HTTP status, parsed JSON body or None)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", "/", body, {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        conn.close()


def rpc(url: str, method: str, params: list[Any] | None = None) -> Any:
    """One JSON-RPC call: its result, or AssertionError with the error."""
    request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}
    status, answer = post(url, json.dumps(request).encode())
    assert status == 200, (status, answer)
    assert "error" not in answer, answer
    return answer["result"]


def rpc_error(url: str, method: str, params: list[Any] | None = None) -> dict[str, Any]:
    request = {"jsonrpc": "2.0", "id": 7, "method": method, "params": params or []}
    status, answer = post(url, json.dumps(request).encode())
    assert status == 200 and answer["id"] == 7 and "error" in answer, (status, answer)
    return answer["error"]


def reverter_initcode(data: bytes) -> bytes:
    """Creation code of a contract whose every call reverts with `data` (e.g. a custom error's
    selector and arguments): CODECOPY the data to memory, REVERT with it."""
    size = len(data).to_bytes(2, "big")
    runtime = b"\x61" + size + b"\x61\x00\x0f\x60\x00\x39" + b"\x61" + size + b"\x60\x00\xfd" + data
    assert len(runtime) == 15 + len(data)
    rsize = len(runtime).to_bytes(2, "big")
    init = b"\x61" + rsize + b"\x80\x61\x00\x0d\x60\x00\x39\x60\x00\xf3"
    assert len(init) == 13
    return init + runtime
