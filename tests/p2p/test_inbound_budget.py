"""A peer's inbound bytes are read at its budget's rate (p2p.inbound): a real peer pushing bulk
past it is slowed by backpressure (its sends block; nothing is dropped), a peer that has sent
garbage is read far slower from its first penalties on, and an honest peer beside either is
served at once."""

from __future__ import annotations

import contextlib
import os
import struct
from collections import Counter

import trio
from libp2p.peer.id import ID

from p2p import codec
from p2p.host import HostLimits
from p2p.inbound import InboundBudget
from tests.p2p.test_gossip_validator import _node, _running

SINK = "/gridmesh/test/sink/1"
PARSE = "/gridmesh/test/parse/1"
FRAMED = "/gridmesh/test/framed/1"
ECHO = "/gridmesh/test/echo/1"
MiB, KiB = 1 << 20, 1 << 10


def test_the_rate_halves_per_point_of_score_and_the_burst_with_it():
    scores = {"honest": 0.0, "stale": -0.1, "bad": -3.0, "worse": -40.0}
    limits = HostLimits(
        inbound_bytes_per_s=8 * MiB,
        inbound_bytes_burst=4 * MiB,
        min_inbound_bytes_per_s=64 * KiB,
    )
    now = [0.0]
    budget = InboundBudget(limits, scores.__getitem__, lambda s, r: None, clock=lambda: now[0])
    assert budget.rate_of("honest") == 8 * MiB
    assert 0.9 * 8 * MiB < budget.rate_of("stale") < 8 * MiB  # an honest slip barely counts
    assert budget.rate_of("bad") == MiB
    assert budget.rate_of("worse") == 64 * KiB  # the floor
    assert budget.charge("honest", 4 * MiB) == 0.0  # the burst
    assert budget.charge("honest", MiB) == 1 / 8  # then the rate: an eighth of a second
    assert budget.charge("bad", MiB // 2) == 0.0  # its burst is an eighth too (512 KiB)
    assert budget.charge("bad", MiB) == 1.0
    now[0] = 1.0
    assert budget.charge("bad", 1) > 0  # paid back only to zero: no new burst yet


async def test_a_peer_held_back_at_the_floor_is_scored_for_it_and_an_honest_one_never(
    autojump_clock,
):
    # throttled at the floor, a flooder is refused too rarely to reach its ban by refusals:
    # the time it is held back there counts against it; a peer at score 0 is only slowed
    scores = {"honest": 0.0, "flooder": -40.0}
    events: Counter[tuple[str, str]] = Counter()

    def penalize(peer: str, reason: str, count: int) -> None:
        events[peer, reason] += count

    limits = HostLimits(
        inbound_bytes_per_s=MiB, inbound_bytes_burst=MiB, min_inbound_bytes_per_s=16 * KiB
    )
    budget = InboundBudget(limits, scores.__getitem__, lambda s, r: None, penalize=penalize)
    start = trio.current_time()
    for _ in range(8):
        await budget.take("flooder", 16 * KiB)  # after its burst, 1 s held back each
        await budget.take("honest", MiB)  # its whole budget each time, at full rate
    assert trio.current_time() - start >= 6.9
    assert events["honest", "over_budget"] == 0
    assert 65 <= events["flooder", "over_budget"] <= 70  # one a tenth of a second held back


async def _push(
    limits: HostLimits, size: int, garbage: int = 0, oversized: int = 0
) -> tuple[float, float, Counter]:
    """A real peer sends `garbage` undecodable requests and `oversized` frames over a framed
    protocol's bound, then pushes `size` bytes into a stream whose handler reads them all;
    meanwhile an honest peer asks for an echo. Returns (seconds the push took, seconds the
    honest echo took, the target's refusals)."""
    rejects: Counter[str] = Counter()
    target, pusher, honest = _node(rejects, limits), _node(Counter()), _node(Counter())
    received = 0
    done = trio.Event()

    async def sink(stream) -> None:
        nonlocal received
        while data := await stream.read(64 * KiB):
            received += len(data)
            if received >= size:
                done.set()

    async def parse(sender: str, request: bytes) -> bytes:
        return codec.encode(codec.decode(request))  # garbage raises CodecError

    async def echo(sender: str, request: bytes) -> bytes:
        return request

    async def framed(stream) -> None:
        while True:  # frames over 1 KiB are refused from their prefix (and scored)
            await stream.receive()

    target.host.set_stream_handler(target.scope.protocol(SINK), sink)
    target.guard_handlers()
    target.set_request_handler(PARSE, parse)
    target.set_request_handler(ECHO, echo)
    target.set_stream_handler(FRAMED, framed, max_frame_bytes=KiB)
    async with _running(target, pusher, honest):
        await pusher.connect(target.listen_addrs()[0])
        await honest.connect(target.listen_addrs()[0])
        assert await honest.request(target.peer_id, ECHO, b"warm", timeout_s=10) == b"warm"
        for _ in range(garbage):
            with contextlib.suppress(Exception):  # the target resets the stream: the point
                await pusher.request(target.peer_id, PARSE, b"\xc1" * 64, timeout_s=10)
        for _ in range(oversized):
            with contextlib.suppress(Exception):  # reset by the target
                raw = await pusher.host.new_stream(
                    ID.from_base58(target.peer_id), [target.scope.protocol(FRAMED)]
                )
                await raw.write(struct.pack(">I", MiB) + b"x" * 64)
                with trio.fail_after(10):
                    await raw.read(1)  # until the target resets it
        stream = await pusher.host.new_stream(
            ID.from_base58(target.peer_id), [target.scope.protocol(SINK)]
        )
        started = trio.current_time()
        echo_s = 0.0

        async def ask_honestly() -> None:
            nonlocal echo_s
            await trio.sleep(0.3)  # while the push is under way
            at = trio.current_time()
            assert await honest.request(target.peer_id, ECHO, b"hi", timeout_s=10) == b"hi"
            echo_s = trio.current_time() - at

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask_honestly)
                chunk = os.urandom(64 * KiB)
                for _ in range(size // len(chunk)):
                    await stream.write(chunk)
                await done.wait()
        return trio.current_time() - started, echo_s, rejects


async def test_a_bulk_pusher_past_its_budget_is_slowed_and_an_honest_peer_is_not():
    limits = HostLimits(inbound_bytes_per_s=MiB, inbound_bytes_burst=MiB)
    took, echo_s, rejects = await _push(limits, 4 * MiB)
    # 1 MiB of burst, then 1 MiB/s: about 3 s (unbudgeted: well under a second here)
    assert took >= 2.5, took
    assert rejects["inbound:throttled"] >= 1
    assert echo_s < 1.0, echo_s


async def test_a_peer_that_sent_garbage_is_read_slowly_from_its_first_penalties():
    limits = HostLimits(min_inbound_bytes_per_s=64 * KiB)  # 64 MiB/s for a clean score
    clean, _, _ = await _push(limits, MiB)
    # 20 undecodable requests: -10 (0.5 each), the rate and burst at 64 KiB/s (the floor)
    took, echo_s, rejects = await _push(limits, MiB, garbage=20)
    assert rejects["stream:malformed"] >= 10
    assert clean < 2.0, clean
    # 1 MiB at 64 KiB/s would take 16 s; the score recovers meanwhile (half-life 30 s), and
    # the rate with it (-8.5 after 7 s: 180 KiB/s). Unbudgeted: as fast as the clean push
    assert took >= 5.0, took
    assert echo_s < 1.0, echo_s


async def test_a_peer_sending_frames_over_the_bound_is_read_slowly():
    limits = HostLimits(min_inbound_bytes_per_s=64 * KiB)
    took, echo_s, rejects = await _push(limits, MiB, oversized=20)
    assert rejects["stream:frame_too_large"] >= 10  # and each held against its score
    assert took >= 5.0, took  # as after garbage requests (above)
    assert echo_s < 1.0, echo_s
