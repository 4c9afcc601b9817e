"""A small synchronous JSON-RPC client for the CLI (stdlib only).

Uses http.client directly rather than urllib so that *_proxy environment variables can never
route a loopback call (and its token) through a proxy.
"""

from __future__ import annotations

import http.client
import itertools
import json
from typing import Any
from urllib.parse import urlsplit

from daemon.api.jsonrpc import cap_recursion_limit, json_too_deep


class RPCClientError(Exception):
    """Base of the errors raised by RPCClient."""


class DaemonUnreachable(RPCClientError):
    """The daemon did not answer: connection refused, reset or timed out."""


class BadResponse(RPCClientError):
    """The daemon answered something that is not a valid JSON-RPC response."""


class RPCCallError(RPCClientError):
    """The daemon answered with a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.data = data


class RPCClient:
    """Calls a daemon's JSON-RPC endpoint, e.g. RPCClient("http://127.0.0.1:8645/", token)."""

    def __init__(self, url: str, token: str, timeout: float = 30) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"unsupported RPC URL {url!r}: expected http://HOST:PORT/")
        self.url = url
        self._host = parts.hostname
        self._port = parts.port or 80
        self._path = parts.path or "/"
        self._token = token
        self.timeout = timeout
        self._ids = itertools.count(1)
        cap_recursion_limit()

    def call(self, method: str, params: dict[str, Any] | list[Any] | None = None) -> Any:
        """Call `method` and return its result; raises RPCCallError on a JSON-RPC error."""
        req_id = next(self._ids)
        doc = self._post(_request(method, params, req_id))
        if not isinstance(doc, dict):
            raise BadResponse(f"expected a JSON-RPC response object, got {type(doc).__name__}")
        if "error" not in doc and doc.get("id") != req_id:
            raise BadResponse(f"response id {doc.get('id')!r} does not match request id {req_id}")
        return _result(doc)

    def batch(self, calls: list[tuple[str, Any]]) -> list[Any]:
        """Send several calls in one request.

        Returns one entry per call, in order: the result, or an RPCCallError instance
        (returned, not raised, so one failure does not hide the other results).
        """
        if not calls:
            return []
        ids = [next(self._ids) for _ in calls]
        reqs = [_request(m, p, i) for (m, p), i in zip(calls, ids, strict=True)]
        doc = self._post(reqs)
        if isinstance(doc, dict) and "error" in doc:
            _result(doc)  # the whole batch was rejected: raises
        if not isinstance(doc, list):
            raise BadResponse("expected a JSON-RPC batch response (an array)")
        by_id = {r.get("id"): r for r in doc if isinstance(r, dict)}
        out: list[Any] = []
        for i in ids:
            if i not in by_id:
                raise BadResponse(f"batch response lacks an answer for id {i}")
            try:
                out.append(_result(by_id[i]))
            except RPCCallError as e:
                out.append(e)
        return out

    def _post(self, payload: Any) -> Any:
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        try:
            conn.request(
                "POST",
                self._path,
                body=body,
                headers={
                    "Authorization": f"Bearer {self._token}",
                    "Content-Type": "application/json",
                },
            )
            resp = conn.getresponse()
            data = resp.read()
        except TimeoutError:
            raise DaemonUnreachable(
                f"daemon at {self.url} did not answer within {self.timeout:g} s"
            ) from None
        except ConnectionRefusedError:
            raise DaemonUnreachable(
                f"cannot connect to daemon at {self.url}: connection refused (is it running?)"
            ) from None
        except (OSError, http.client.HTTPException) as e:
            raise DaemonUnreachable(f"cannot talk to daemon at {self.url}: {e}") from None
        finally:
            conn.close()
        if resp.status == 204:
            return None
        try:
            if json_too_deep(data):
                raise ValueError("nested too deeply")
            return json.loads(data)
        except (ValueError, RecursionError):
            raise BadResponse(
                f"daemon at {self.url} answered HTTP {resp.status} with a non-JSON body"
            ) from None


def _request(method: str, params: Any, req_id: int) -> dict[str, Any]:
    req: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": req_id}
    if params is not None:
        req["params"] = params
    return req


def _result(doc: dict[str, Any]) -> Any:
    if "error" in doc:
        err = doc["error"]
        if not isinstance(err, dict):
            raise BadResponse("JSON-RPC error member is not an object")
        code = err.get("code")
        raise RPCCallError(
            code if isinstance(code, int) else 0, str(err.get("message", "")), err.get("data")
        )
    if "result" not in doc:
        raise BadResponse("JSON-RPC response has neither result nor error")
    return doc["result"]
