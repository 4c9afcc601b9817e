"""What a shard server refuses, and whose a session is: bad input, caps on sessions,
streams and cache, pushes from peers that do not own the session, over the in-memory
network's streams (`memory_cluster`) and the same-host socket. Tests that wait on timeouts
run on trio's virtual clock (`virtual_time`)."""

from __future__ import annotations

import math

import pytest
import trio

torch = pytest.importorskip("torch")

from daemon.shards import SHARD_PROTOCOL, wire  # noqa: E402
from daemon.shards import server as server_module  # noqa: E402
from daemon.shards.client import generate  # noqa: E402
from daemon.shards.server import ShardServer  # noqa: E402
from p2p import localsock  # noqa: E402
from p2p.identity import NodeIdentity  # noqa: E402
from p2p.network import NetworkError, Stream  # noqa: E402
from tests.daemon.shards import memory_cluster  # noqa: E402
from tests.daemon.shards.memory_cluster import MemoryCluster, collect, remote  # noqa: E402

# the fixtures, taken by name
cluster, virtual_time = memory_cluster.cluster, memory_cluster.virtual_time
model_dir, reference = memory_cluster.model_dir, memory_cluster.reference


async def test_bad_requests_are_refused_and_the_server_keeps_serving(cluster, model_dir):
    server = await cluster.add("b", model_dir, 2, 6)
    stream = await cluster.dial("b")

    async def ask(header, tensor=None):
        await stream.send(wire.encode(header, tensor))
        return wire.decode(await stream.receive())

    base = {"op": "open", "model": "tiny", "start": 2, "end": 6}
    assert (await ask({**base, "max_length": 10**6}))[0].code == "bad_length"
    assert (await ask({**base, "max_length": 10**9}))[0].code == "bad_header"  # typed bound
    refused, _ = await ask({**base, "model": "other", "max_length": 8})
    assert refused.code == "unknown_model"
    reply, _ = await ask({**base, "max_length": 8})
    session = reply.session
    fwd = {"op": "forward", "session": session, "position": 0}
    hidden = server.blocks["tiny"].config.hidden_size
    cases = [
        ({**fwd, "session": "nope"}, torch.zeros(1, 1, hidden), "unknown_session"),
        (fwd, torch.zeros(1, 1, hidden + 1), "bad_input"),  # wrong shape
        (fwd, torch.zeros(1, 0, hidden), "bad_input"),  # no positions
        (fwd, torch.zeros(1, 1, hidden, dtype=torch.float16), "bad_input"),  # wrong dtype
        (fwd, torch.zeros(1, 2), "bad_input"),  # token ids to a middle shard
        ({**fwd, "position": 5}, torch.zeros(1, 1, hidden), "bad_position"),
        # over the session's max_length: refused from the header, before the bytes are read
        (fwd, torch.zeros(1, 9, hidden), "too_large"),
        ({"op": "dance", "session": session}, None, "bad_header"),
        ({"op": "opened", "session": session, "link": "x"}, None, "bad_op"),  # a reply
        ({**fwd, "position": "0"}, torch.zeros(1, 1, hidden), "bad_header"),
        ({**fwd, "position": -1}, torch.zeros(1, 1, hidden), "bad_header"),
    ]
    for header, tensor, code in cases:
        reply, _ = await ask(header, tensor)
        assert reply.code == code, (header, reply)
    await stream.send(b"\xff" * 100)  # garbage frame
    assert wire.decode(await stream.receive())[0].code == "malformed"
    reply, out = await ask(fwd, torch.zeros(1, 3, hidden))
    assert wire.op(reply) == "result" and out.shape == (1, 3, 258)
    assert not math.isnan(float(out.sum()))


async def test_idle_sessions_expire(cluster, model_dir):
    server = await cluster.add("a", model_dir, 0, 6)
    stream = await cluster.dial("a")
    await stream.send(
        wire.encode({"op": "open", "model": "tiny", "start": 0, "end": 6, "max_length": 8})
    )
    session = wire.decode(await stream.receive())[0].session
    server.session_idle_s = 0.0
    assert server.reap_idle() == 1 and not server.sessions
    await stream.send(
        wire.encode(
            {"op": "forward", "session": session, "position": 0},
            torch.tensor([[1, 2]], dtype=torch.int64),
        )
    )
    assert wire.decode(await stream.receive())[0].code == "unknown_session"


async def test_pushed_frames_are_checked_and_never_answered_on_the_push_stream(
    cluster, virtual_time, model_dir
):
    rejects: list[str] = []
    await cluster.add("a", model_dir, 0, 3)
    server = await cluster.add("b", model_dir, 3, 6, on_reject=rejects.append)
    owner = await cluster.dial("b")
    open_b = {"op": "open", "model": "tiny", "start": 3, "end": 6, "max_length": 8}
    await owner.send(wire.encode({**open_b, "prev": "a"}))
    opened = wire.decode(await owner.receive())[0]
    session, link = opened.session, opened.link
    assert len(session) == 32 and len(link) == 32
    pusher = await cluster.dial("b", origin="a")
    hidden = torch.zeros(1, 1, server.blocks["tiny"].config.hidden_size)
    push = {"op": "forward", "pushed": True, "position": 0, "step": 1, "link": link}
    # unknown session: dropped and counted, no answer anywhere
    await pusher.send(wire.encode({**push, "session": "f" * 32}, hidden))
    # a bad tensor from the right pusher: the session's owner is told, tagged with the step
    await pusher.send(wire.encode({**push, "session": session}, hidden[:, :, :5]))
    reply, _ = wire.decode(await owner.receive())
    assert (wire.op(reply), reply.code, reply.step) == ("error", "bad_input", 1)
    assert rejects == ["unknown_session", "bad_input"]
    # a good push: the result goes to the owner, not back to the pusher
    await pusher.send(wire.encode({**push, "session": session, "step": 2}, hidden))
    reply, out = wire.decode(await owner.receive())
    assert (wire.op(reply), reply.step, out.shape) == ("result", 2, (1, 1, 258))
    assert server.sessions[session].length == 1
    with trio.move_on_after(0.2):  # nothing ever comes back on the push stream
        await pusher.receive()
        pytest.fail("a pushed frame was answered on the push stream")


async def test_sessions_are_refused_when_the_cache_budget_is_full(cluster, model_dir):
    probe = await cluster.add("probe", model_dir, 0, 6)
    per_token = probe.blocks["tiny"].cache_bytes_per_token
    server = await cluster.add("a", model_dir, 0, 6, cache_budget_bytes=100 * per_token)
    block = server.blocks["tiny"]
    assert server.free_cache_tokens(block) == 100
    stream = await cluster.dial("a")

    async def open_session(max_length: int) -> dict:
        header = {"op": "open", "model": "tiny", "start": 0, "end": 6}
        await stream.send(wire.encode({**header, "max_length": max_length}))
        return wire.decode(await stream.receive())[0]

    first = await open_session(60)
    assert wire.op(first) == "opened" and server.free_cache_tokens(block) == 40
    refused = await open_session(41)
    assert refused.code == "busy" and "40 positions free" in refused.message
    await stream.send(wire.encode({"op": "close", "session": first.session}))
    assert wire.op(wire.decode(await stream.receive())[0]) == "closed"
    assert server.free_cache_tokens(block) == 100
    assert wire.op(await open_session(41)) == "opened"


async def test_a_stream_keeps_being_read_while_its_chained_step_waits_on_a_push(cluster, model_dir):
    """Pushes between servers of crossing routes must not wait on each other forever: a
    stream's reader goes on while the steps it started wait to push."""

    dialed = trio.Event()

    async def never_read(stream: Stream) -> None:  # the next server accepts the stream
        dialed.set()
        await trio.sleep_forever()

    server = await cluster.add("s1", model_dir, 0, 3)
    cluster.node("s2").set_stream_handler(SHARD_PROTOCOL, never_read)
    stream = await cluster.dial("s1")
    cluster.hub.stream_capacity = 0  # s1's push stream, opened later, buffers nothing
    header = {"op": "open", "model": "tiny", "start": 0, "end": 3, "max_length": 8}
    nxt = {"peer": "s2", "session": "a" * 32, "link": "b" * 32}
    await stream.send(wire.encode({**header, "next": nxt}))
    session = wire.decode(await stream.receive())[0].session
    step = {"op": "forward", "session": session, "position": 0, "step": 1}
    await stream.send(wire.encode(step, torch.tensor([[1, 2]])))
    with trio.fail_after(5):
        await dialed.wait()  # the step ran and is pushing: its push never ends
        await stream.send(wire.encode(header))
        reply, _ = wire.decode(await stream.receive())  # yet the stream still answers
    assert wire.op(reply) == "opened"
    assert server.sessions[session].length == 2


async def test_first_shard_refuses_an_empty_step(cluster, model_dir):
    await cluster.add("a", model_dir, 0, 6)
    stream = await cluster.dial("a")
    header = {"op": "open", "model": "tiny", "start": 0, "end": 6, "max_length": 8}
    await stream.send(wire.encode(header))
    session = wire.decode(await stream.receive())[0].session
    empty = torch.zeros(1, 0, dtype=torch.int64)
    for chain in ({}, {"step": 1}):  # relayed and chained
        step = {"op": "forward", "session": session, "position": 0, **chain}
        await stream.send(wire.encode(step, empty))
        assert wire.decode(await stream.receive())[0].code == "bad_input"


async def test_a_session_whose_client_stops_reading_is_ended(
    cluster, virtual_time, model_dir, monkeypatch
):
    monkeypatch.setattr(server_module, "TELL_OWNER_TIMEOUT_S", 0.2)
    stalled = trio.Semaphore(0)

    def rejected(reason: str) -> None:
        if reason == "owner_stalled":
            stalled.release()

    server = await cluster.add("a", model_dir, 0, 6, on_reject=rejected)
    free = server.free_cache_tokens(server.blocks["tiny"])
    stream = await cluster.dial("a")  # capacity: 8 frames each way
    sessions = []
    for _ in range(10):
        header = {"op": "open", "model": "tiny", "start": 0, "end": 6, "max_length": 8}
        await stream.send(wire.encode(header))
        sessions.append(wire.decode(await stream.receive())[0].session)
    for session in sessions:  # ten results on their way; this client reads none
        step = {"op": "forward", "session": session, "position": 0, "step": 1}
        await stream.send(wire.encode(step, torch.tensor([[1, 2]])))
    with trio.fail_after(10):  # the results that did not fit end their sessions
        await stalled.acquire()
        await stalled.acquire()
    assert len(server.sessions) == 8
    assert server.free_cache_tokens(server.blocks["tiny"]) == free - 8 * 8


async def test_one_peer_cannot_take_every_session(cluster, model_dir):
    server = await cluster.add("a", model_dir, 0, 6, max_sessions=4)
    greedy = await cluster.dial("a", origin="greedy")
    other = await cluster.dial("a", origin="other")

    async def open_on(stream) -> dict:
        header = {"op": "open", "model": "tiny", "start": 0, "end": 6, "max_length": 8}
        await stream.send(wire.encode(header))
        return wire.decode(await stream.receive())[0]

    assert [wire.op(await open_on(greedy)) for _ in range(2)] == ["opened", "opened"]
    refused = await open_on(greedy)
    assert refused.code == "busy" and "of this peer" in refused.message
    assert wire.op(await open_on(other)) == "opened"
    assert len(server.sessions) == 3


# -- a session belongs to its opener (issue 12 item 4) ----------------------------------


async def _victim_generation(cluster: MemoryCluster, prompt, n: int):
    """A victim's chained generation through s1 -> s2 -> s3, paused after `n` tokens."""
    model = remote(cluster)
    await model.open()
    tokens = []
    steps = generate(model, prompt, 24)
    for _ in range(n):
        tokens.append(await steps.__anext__())
    return model, steps, tokens


async def test_a_peer_that_knows_a_session_id_cannot_push_into_it_or_read_it(
    cluster, virtual_time, model_dir, reference
):
    prompt, expected = reference
    rejects: list[str] = []
    for peer, (a, b) in {"s1": (0, 2), "s2": (2, 4), "s3": (4, 6)}.items():
        await cluster.add(peer, model_dir, a, b, on_reject=rejects.append)
    model, steps, tokens = await _victim_generation(cluster, prompt, 5)
    s2 = model.hops[1]
    victim = cluster.servers["s2"].sessions[s2.session]
    length = victim.length
    # mallory learned s2's session id (and even its link token) and pushes as a peer,
    # naming herself as where the output should go (the old protocol obeyed `chain`)
    mallory = await cluster.dial("s2", origin="mallory")
    hidden = torch.zeros(1, 1, cluster.servers["s2"].blocks["tiny"].config.hidden_size)
    for link in ("0" * 32, s2.link):
        push = {"op": "forward", "pushed": True, "session": s2.session, "link": link}
        chain = [{"peer": "mallory", "session": "m" * 32}]
        await mallory.send(
            wire.encode({**push, "position": length, "step": 99, "chain": chain}, hidden)
        )
    # her own stream may not drive, re-point or close the victim's session either
    for header in (
        {"op": "forward", "session": s2.session, "position": length, "step": 98},
        {
            "op": "link",
            "session": s2.session,
            "next": {"peer": "mallory", "session": "m", "link": "l"},
        },
        {"op": "close", "session": s2.session},
    ):
        tensor = hidden if header["op"] == "forward" else None
        await mallory.send(wire.encode(header, tensor))
        assert wire.decode(await mallory.receive())[0].code == "unknown_session"
    with trio.move_on_after(0.3):  # nothing computed over the victim's cache reaches her
        await mallory.receive()
        pytest.fail("the attacker got an answer")
    assert rejects.count("foreign_push") == 2 and victim.length == length
    # the victim's generation goes on, untouched
    async for token in steps:
        tokens.append(token)
    assert tokens == expected and not model.recoveries


async def test_a_session_cannot_be_chained_into_another_users_session(
    cluster, model_dir, reference
):
    """Mallory opens her own session on s1 (the victim's previous hop: pushes from s1 pass
    the peer check) and points its output at the victim's s2 session: without the link
    token that only the victim was given, s2 drops the pushes."""
    prompt, expected = reference
    refused = trio.Event()

    def rejected(reason: str) -> None:
        if reason == "foreign_push":
            refused.set()

    for peer, (a, b) in {"s1": (0, 2), "s2": (2, 4), "s3": (4, 6)}.items():
        await cluster.add(peer, model_dir, a, b, on_reject=rejected)
    model, steps, tokens = await _victim_generation(cluster, prompt, 4)
    s2 = model.hops[1]
    victim = cluster.servers["s2"].sessions[s2.session]
    length = victim.length
    mallory = await cluster.dial("s1", origin="mallory")
    nxt = {"peer": "s2", "session": s2.session, "link": s2.session}  # a guessed token
    await mallory.send(
        wire.encode(
            {"op": "open", "model": "tiny", "start": 0, "end": 2, "max_length": 64, "next": nxt}
        )
    )
    own = wire.decode(await mallory.receive())[0].session
    step = {"op": "forward", "session": own, "position": 0, "step": 1}
    await mallory.send(wire.encode(step, torch.tensor([[5] * length])))
    reply, _ = wire.decode(await mallory.receive())  # s1 pushed, and tells her so
    assert wire.op(reply) == "partial" and reply.forward_error is None
    with trio.fail_after(5):
        await refused.wait()
    assert victim.length == length
    async for token in steps:
        tokens.append(token)
    assert tokens == expected and not model.recoveries


# -- bounded streams (issue 12 item 3) -------------------------------------------------


async def test_idle_streams_are_closed_and_a_peer_cannot_hold_many(
    cluster, virtual_time, model_dir, reference
):
    prompt, expected = reference
    rejects: list[str] = []
    server = await cluster.add(
        "a",
        model_dir,
        0,
        6,
        on_reject=rejects.append,
        stream_idle_s=0.3,
        max_streams_per_peer=4,
    )
    idle = [await cluster.dial("a", origin="mallory") for _ in range(5)]
    with trio.fail_after(5):  # the fifth is refused at once, the others once idle
        for stream in idle:
            with pytest.raises(NetworkError):
                await stream.receive()
    assert rejects.count("too_many_streams") == 1 and rejects.count("idle_stream") == 4
    assert not server._streams
    # a stream holding a live session is not idle, however long its client only listens
    model = remote(cluster)
    await model.open()
    await trio.sleep(0.5)  # virtual time (autojump clock): longer than stream_idle_s
    assert await collect(model, prompt, 8) == expected[:8]


async def test_a_frame_larger_than_the_session_can_take_is_refused_before_it_is_read(
    cluster, model_dir
):
    server = await cluster.add("b", model_dir, 3, 6)
    config = server.blocks["tiny"].config
    hidden, positions = config.hidden_size, min(4096, config.max_position_embeddings)
    # the transports refuse frames over this before reading them (float32 hidden states)
    assert server.max_frame_bytes == 4 + wire.MAX_HEADER_BYTES + positions * hidden * 4
    stream = await cluster.dial("b")
    await stream.send(
        wire.encode({"op": "open", "model": "tiny", "start": 3, "end": 6, "max_length": 4})
    )
    session = wire.decode(await stream.receive())[0].session
    fwd = {"op": "forward", "session": session, "position": 0}
    await stream.send(wire.encode(fwd, torch.zeros(1, 5, hidden)))
    assert wire.decode(await stream.receive())[0].code == "too_large"
    await stream.send(wire.encode(fwd, torch.zeros(1, 4, hidden)))
    assert wire.op(wire.decode(await stream.receive())[0]) == "result"


# -- over the same-host socket: real identities (issue 12 items 4 and 10) ----------------


@pytest.mark.skipif(localsock.HOST_ID is None, reason="abstract Unix sockets need Linux")
async def test_same_host_peers_are_told_apart_and_cannot_use_each_others_sessions(model_dir):
    server_ident, victim, mallory = (NodeIdentity.generate() for _ in range(3))
    rejects: list[str] = []
    server = ShardServer(max_sessions=4, on_reject=rejects.append)
    await server.load("tiny", model_dir, 3, 6)
    hidden = torch.zeros(1, 1, server.blocks["tiny"].config.hidden_size)
    opening = {"op": "open", "model": "tiny", "start": 3, "end": 6, "max_length": 8}

    async def ask(stream, header, tensor=None):
        await stream.send(wire.encode(header, tensor))
        return wire.decode(await stream.receive())[0]

    async with trio.open_nursery() as nursery:
        listener = localsock.Listener(
            server_ident,
            {"shard": server.handle_stream},
            on_reject=rejects.append,
            max_frame_bytes=lambda: server.max_frame_bytes,
        )
        await nursery.start(listener.serve)
        # mallory takes every session one peer may hold (half); before the mutual hello every
        # same-host peer was "local", and the victim was refused as the same peer
        theirs = await localsock.dial(mallory, server_ident.peer_id, "shard")
        assert [wire.op(await ask(theirs, opening)) for _ in range(3)] == [
            "opened",
            "opened",
            "error",
        ]
        ours = await localsock.dial(victim, server_ident.peer_id, "shard")
        opened = await ask(ours, {**opening, "prev": victim.peer_id})
        assert wire.op(opened) == "opened"
        assert server.sessions[opened.session].peer == victim.peer_id
        # mallory knows the victim's session id and link token: her pushes are dropped
        push = {"op": "forward", "pushed": True, "session": opened.session, "step": 1}
        await theirs.send(wire.encode({**push, "position": 0, "link": opened.link}, hidden))
        # and her own stream cannot drive the victim's session
        fwd = {"op": "forward", "session": opened.session, "position": 0}
        assert (await ask(theirs, fwd, hidden)).code == "unknown_session"
        assert "foreign_push" in rejects and server.sessions[opened.session].length == 0
        # a frame longer than anything this server takes ends mallory's stream unread
        await theirs._stream.send_all(localsock._LEN.pack(server.max_frame_bytes + 1))
        with pytest.raises(NetworkError):
            await theirs.receive()
        await trio.testing.wait_all_tasks_blocked()  # her stream's sessions and caches go
        assert [s.peer for s in server.sessions.values()] == [victim.peer_id]
        assert server._streams == {victim.peer_id: 1} and listener.connections == 1
        # the victim's own push (it named itself the previous hop) and steps go through
        await ours.send(wire.encode({**push, "position": 0, "link": opened.link}, hidden))
        reply, out = wire.decode(await ours.receive())
        assert (wire.op(reply), reply.step, out.shape) == ("result", 1, (1, 1, 258))
        reply = await ask(ours, {**fwd, "position": 1}, hidden)
        assert wire.op(reply) == "result" and reply.length == 2
        nursery.cancel_scope.cancel()


async def test_a_sliding_window_session_needs_only_its_windows_cache(cluster, tmp_path):
    """Admission counts a sliding layer's ring (its window), not every position: a long
    session of a windowed model fits where a full-attention cache of its length would not."""
    from daemon.shards.model import make_tiny

    model = make_tiny(
        tmp_path / "mistral", family="mistral", layers=2, sliding_window=8, max_positions=512
    )
    probe = await cluster.add("probe", model, 0, 2)
    per_token = probe.blocks["tiny"].cache_bytes_per_token
    server = await cluster.add("a", model, 0, 2, cache_budget_bytes=100 * per_token)
    block = server.blocks["tiny"]
    assert block.cache_bytes(400) == 8 * per_token  # two rings of 8 positions
    assert server.free_cache_tokens(block) == 512  # any session fits (100 without windows)
    stream = await cluster.dial("a")
    header = {"op": "open", "model": "tiny", "start": 0, "end": 2, "max_length": 400}
    await stream.send(wire.encode(header))
    opened = wire.decode(await stream.receive())[0]
    assert wire.op(opened) == "opened"
    assert server.cache_used_bytes == 8 * per_token


def test_tokens_for_is_the_longest_session_that_fits(tmp_path):
    from daemon.shards.blocks import ServedBlock
    from daemon.shards.model import load_model, make_tiny

    model = make_tiny(
        tmp_path / "qwen2",
        family="qwen2",
        layers=4,
        sliding_window=16,
        max_window_layers=2,  # layers 2 and 3 slide, 0 and 1 see everything
        max_positions=256,
    )
    shard = load_model(model)
    block = ServedBlock("m", model, 0, 4, shard.config, shard, torch.float32, "cpu")
    layer = block.cache_bytes_per_token // 4
    for tokens in (0, 1, 15, 16, 17, 100, 256):
        assert block.cache_bytes(tokens) == layer * (2 * tokens + 2 * min(tokens, 16))
        fits = block.tokens_for(block.cache_bytes(tokens))
        assert fits == tokens or (tokens == 256 and fits == 256)
        if tokens:
            assert block.tokens_for(block.cache_bytes(tokens) - 1) == tokens - 1
    assert block.tokens_for(0) == 0
    assert block.tokens_for(10**12) == 10**12 // block.cache_bytes_per_token  # as announced
