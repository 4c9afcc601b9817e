"""Bounds on JSON from the other side of a chain connection.

py_ecc (imported by eth_account, and so by web3 and eth-tester) raises the interpreter's
recursion limit to 100,000 at import; `json.loads` of deeply nested input then overflows the C
stack and the process dies instead of raising (DESIGN.md). Whoever imports those libraries
calls `cap_recursion_limit()` afterwards; a server also refuses deep bodies before parsing.
"""

from __future__ import annotations

import re
import sys
from itertools import accumulate

SANE_RECURSION_LIMIT = 1000  # CPython's default
MAX_JSON_DEPTH = 32

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def cap_recursion_limit(limit: int = SANE_RECURSION_LIMIT) -> None:
    """Undo py_ecc's raise of the recursion limit (imported here first, so that its import
    cannot raise it again later)."""
    import py_ecc  # noqa: F401 - for its import side effect

    if sys.getrecursionlimit() > limit:
        sys.setrecursionlimit(limit)


def json_too_deep(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `data` nests arrays/objects deeper than `limit`, without parsing it: strings
    are cut out, then the brackets left are summed."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(accumulate(_STEP[b] for b in brackets), default=0) > limit
