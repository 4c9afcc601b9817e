"""Fixtures of the chain client's tests: a dev chain served over real HTTP on a free port
(helpers to talk to it raw are in rpc_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from contracts.chain.devchain import RunningChain, serve_in_thread


@pytest.fixture
def devchain() -> Iterator[RunningChain]:
    with serve_in_thread(port=0, accounts=4) as running:
        yield running
