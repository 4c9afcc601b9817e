"""p2p.dhtops: a DHT operation held by a write that cannot be cut (a peer that reads nothing)
does not hold its caller past the deadline; what is left running is bounded."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from p2p import dhtops
from p2p.dhtops import MAX_DETACHED, DhtOps
from p2p.network import NetworkError


class _Store:
    def __init__(self) -> None:
        self.values: dict[bytes, bytes] = {}

    def put(self, key: bytes, value: bytes, validity: float = 0.0) -> None:
        self.values[key] = value

    def get(self, key: bytes) -> Any:
        return None

    def remove(self, key: bytes) -> bool:
        return self.values.pop(key, None) is not None


class _StuckDHT:
    """py-libp2p's KadDHT as seen through a frame write to a peer that reads nothing:
    `put_value` stores locally, then writes for `hold_s` in a shielded scope (as
    p2p.atomic_writes does), which no deadline of its caller can cut."""

    def __init__(self, hold_s: float) -> None:
        self.value_store = _Store()
        self.hold_s = hold_s
        self.finished = 0

    async def put_value(self, key: str, value: bytes) -> None:
        self.value_store.put(key.encode(), value)
        with trio.CancelScope(shield=True):
            await trio.sleep(self.hold_s)
        self.finished += 1

    async def get_value(self, key: str) -> bytes | None:
        with trio.CancelScope(shield=True):
            await trio.sleep(self.hold_s)
        self.finished += 1
        return b"late"


class _Accept:
    def validate(self, key: str, value: bytes) -> None:
        return None


async def _ops(nursery: trio.Nursery, dht: _StuckDHT, timeout_s: float = 3.0) -> DhtOps:
    def spawn(task: Any) -> bool:
        nursery.start_soon(task)
        return True

    observed: list[tuple[str, str]] = []
    ops = DhtOps(
        dht,
        _Accept(),
        timeout_s,
        lambda op, outcome, s: observed.append((op, outcome)),
        spawn=spawn,
    )  # type: ignore[arg-type]
    ops.observed = observed  # type: ignore[attr-defined]
    return ops


async def test_a_stuck_put_or_get_leaves_its_caller_at_the_deadline(autojump_clock):
    dht = _StuckDHT(hold_s=30.0)
    async with trio.open_nursery() as nursery:
        ops = await _ops(nursery, dht)
        started = trio.current_time()
        with pytest.raises(NetworkError, match="longer than 3"):
            await ops.put("/k", b"v")
        assert trio.current_time() - started == pytest.approx(3.0)
        assert dht.value_store.values == {b"/k": b"v"}  # stored locally at once
        with trio.move_on_after(1.0):  # a caller's own deadline, shorter still
            await ops.get("/k")
        assert trio.current_time() - started == pytest.approx(4.0)
        assert ops.detached == 2 and dht.finished == 0  # both still writing, detached
        await trio.sleep(40)
        assert ops.detached == 0 and dht.finished == 2  # and they ended on their own
        # the caller's own cancellation counts as an error, the deadline as a timeout
        assert ops.observed == [("put", "timeout"), ("get", "error")]  # type: ignore[attr-defined]


async def test_a_quick_operation_answers_as_before(autojump_clock):
    dht = _StuckDHT(hold_s=0.1)
    async with trio.open_nursery() as nursery:
        ops = await _ops(nursery, dht)
        assert await ops.get("/k") == b"late"
        await ops.put("/k", b"v")
        assert ops.detached == 0 and ops.observed == [("get", "ok"), ("put", "ok")]  # type: ignore[attr-defined]


async def test_what_is_left_running_is_bounded(autojump_clock, monkeypatch):
    monkeypatch.setattr(dhtops, "MAX_DETACHED", 3)
    dht = _StuckDHT(hold_s=30.0)
    async with trio.open_nursery() as nursery:
        ops = await _ops(nursery, dht, timeout_s=1.0)
        for _ in range(3):
            with pytest.raises(NetworkError):
                await ops.get("/k")
        started = trio.current_time()
        with pytest.raises(NetworkError, match="still running"):
            await ops.get("/k")  # refused at once
        with pytest.raises(NetworkError, match="still running"):
            await ops.put("/fresh", b"v2")
        assert trio.current_time() == started
        assert dht.value_store.values[b"/fresh"] == b"v2"  # still stored locally
        assert ("get", "refused") in ops.observed  # type: ignore[attr-defined]
        await trio.sleep(40)
        assert ops.detached == 0
        with pytest.raises(NetworkError, match="longer than"):  # accepted again
            await ops.get("/k")


async def test_without_a_running_host_it_runs_inline(autojump_clock):
    dht = _StuckDHT(hold_s=0.5)
    ops = DhtOps(dht, _Accept(), 3.0)  # type: ignore[arg-type]
    assert await ops.get("/k") == b"late"
    assert ops.detached == 0
    assert MAX_DETACHED >= 16
