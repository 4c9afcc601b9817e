"""Continuous batching of decode steps (daemon.shards.batching): the batcher on its own (a
fake compute, trio's virtual clock), then shard servers on the in-memory network running
concurrent generations: exact tokens, batches that really form, sessions that end or whose
server dies mid-batch."""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing

torch = pytest.importorskip("torch")

from daemon.shards.batching import Batcher, StepDropped  # noqa: E402
from daemon.shards.model import greedy_generate, load_model  # noqa: E402
from tests.daemon.shards import memory_cluster  # noqa: E402
from tests.daemon.shards.memory_cluster import LAYERS, collect, remote  # noqa: E402

# the fixtures, taken by name
cluster, virtual_time = memory_cluster.cluster, memory_cluster.virtual_time
model_dir = memory_cluster.model_dir


class Fake:
    """A compute that records its batches and answers each step with its input plus 1."""

    def __init__(self, fail: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.fail = fail  # a batch holding this key raises (as a step the device refuses)

    def __call__(self, keys, xs, last_only) -> list[torch.Tensor]:
        self.batches.append(list(keys))
        if self.fail in keys:
            raise RuntimeError("the device failed")
        return [x + 1 for x in xs]


def batcher(fake: Fake, **kw) -> Batcher[str]:
    kw.setdefault("window_s", 0.5)
    return Batcher(fake, limiter=trio.CapacityLimiter(1), **kw)


async def test_a_lone_session_never_waits(virtual_time):
    fake = Fake()
    steps = batcher(fake, window_s=10.0)
    started = trio.current_time()
    for t in range(5):
        assert int(await steps.step("a", torch.tensor([t]))) == t + 1
    assert trio.current_time() == started  # no window waited
    assert fake.batches == [["a"]] * 5 and steps.batch_sizes == {1: 5}
    assert steps.batched_steps == 0


async def test_sessions_in_lockstep_are_gathered_and_join_and_leave(virtual_time):
    """Sessions step with a round trip of 0.1 s between steps (their clients): after the
    first round every step of every live session is in one batch; a session that starts
    later joins, one that ends leaves, and nobody waits a window for a session gone."""
    fake = Fake()
    steps = batcher(fake)
    done: list[str] = []

    async def session(name: str, start_s: float, count: int) -> None:
        await trio.sleep(start_s)
        for t in range(count):
            assert int(await steps.step(name, torch.tensor([t]))) == t + 1
            await trio.sleep(0.1)
        done.append(name)

    async with trio.open_nursery() as nursery:
        for name, start_s, count in [("a", 0, 6), ("b", 0, 3), ("c", 0, 6), ("d", 0.25, 4)]:
            nursery.start_soon(session, name, start_s, count)
    assert sorted(done) == ["a", "b", "c", "d"]
    rounds = [sorted(batch) for batch in fake.batches]
    assert ["a", "b", "c"] in rounds  # gathered
    assert ["a", "c", "d"] in rounds  # d joined after b left
    assert max(len(batch) for batch in rounds) == 3
    assert steps.batched_steps >= 12 and sum(steps.batch_sizes.values()) == len(rounds)


async def test_a_slow_session_holds_a_batch_at_most_the_window(virtual_time):
    fake = Fake()
    steps = batcher(fake, window_s=0.5)
    waited: list[float] = []

    async def fast() -> None:
        for t in range(4):
            started = trio.current_time()
            await steps.step("fast", torch.tensor([t]))
            waited.append(trio.current_time() - started)
            await trio.sleep(0.01)

    async def slow() -> None:
        await steps.step("slow", torch.tensor([0]))
        await trio.sleep(30)  # its client went quiet
        await steps.step("slow", torch.tensor([1]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fast)
        nursery.start_soon(slow)
    assert max(waited) <= 0.5 + 1e-9  # the window, once, then "slow" is no longer awaited
    assert sum(w > 0.1 for w in waited) == 1


@pytest.mark.parametrize("max_window_s", [0.0, 0.25], ids=["fixed", "adaptive"])
async def test_the_window_grows_to_a_pass_so_that_a_straggler_joins_its_batch(
    virtual_time, monkeypatch, max_window_s
):
    """Passes take 0.2 s (as on daemons sharing cores); "b" comes back 0.1 s after "a" every
    round, past the 5 ms window. A fixed window runs them apart, a pass each; grown to a
    pass, the window gathers them: one pass per round, and every round sooner."""
    pass_s = 0.2

    async def slow_pass(fn, *args, **_):
        await trio.sleep(pass_s)
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", slow_pass)
    fake = Fake()
    steps = batcher(fake, window_s=0.005, max_window_s=max_window_s)

    async def session(name: str, back_s: float) -> None:
        for t in range(8):
            assert int(await steps.step(name, torch.tensor([t]))) == t + 1
            await trio.sleep(back_s)

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session, "a", 0.01)
        nursery.start_soon(session, "b", 0.11)
    took = trio.current_time() - started
    assert steps.pass_s == pytest.approx(pass_s)
    if max_window_s:
        assert steps.window() == pytest.approx(pass_s)
        assert steps.batch_sizes[2] >= 7, steps.batch_sizes
        assert took < 8 * 0.35, took  # a pass and b's round trip per round
    else:
        assert steps.window() == 0.005
        assert steps.batch_sizes[2] <= 1, steps.batch_sizes  # (the first step, together)
        assert took > 7 * 0.4, took  # two passes per round


async def test_batches_are_bounded_and_taken_oldest_first(virtual_time):
    fake = Fake()
    steps = batcher(fake, max_batch=4, window_s=0.0)
    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(steps.step, f"s{i}", torch.tensor([i]))
            await trio.sleep(0.001)  # arrival order s0..s9
    assert all(len(batch) <= 4 for batch in fake.batches)
    assert [key for batch in fake.batches for key in batch] == [f"s{i}" for i in range(10)]


async def test_withdrawn_dropped_and_failed_steps_leave_the_others_alone(virtual_time):
    ended: set[str] = set()
    fake = Fake(fail="bad")
    steps = batcher(fake, live=lambda key: key not in ended)
    results: dict[str, object] = {}

    async def step(name: str, value: int) -> None:
        try:
            results[name] = int(await steps.step(name, torch.tensor([value])))
        except (StepDropped, RuntimeError) as exc:
            results[name] = type(exc).__name__

    await steps.step("lead", torch.tensor([0]))  # batch 0: "lead" alone, now awaited
    async with trio.open_nursery() as nursery:
        nursery.start_soon(step, "bad", 1)
        nursery.start_soon(step, "y", 2)
        await trio.sleep(0.1)  # batch 1 ("bad", "y") waits the window for "lead": it fails
    # then each of its steps runs alone: only the failing one fails
    assert results == {"bad": "RuntimeError", "y": 3}
    assert sorted(fake.batches[1]) == ["bad", "y"] and len(fake.batches) == 4
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as cancelled:
            cancelled.cancel()  # a caller that gives up before its batch: withdrawn
            await steps.step("gone", torch.tensor([9]))
        nursery.start_soon(step, "x", 3)
        nursery.start_soon(step, "dead", 4)
        ended.add("dead")  # its session ended while the step waited
        await trio.sleep(0.01)
        nursery.start_soon(step, "lead", 5)
    assert results == {"bad": "RuntimeError", "y": 3, "x": 4, "dead": "StepDropped", "lead": 6}
    assert steps.pending == 0
    assert all("gone" not in batch and "dead" not in batch for batch in fake.batches)


# -- shard servers running concurrent generations ----------------------------------------

PROMPTS = [list(b"gridmesh batches the steps of many sessions")[: 3 + 5 * i] for i in range(8)]
BUDGETS = [12 + 3 * i for i in range(8)]


@pytest.fixture(scope="module")
def expected(model_dir):
    whole = load_model(model_dir)
    return [greedy_generate([whole], p, n) for p, n in zip(PROMPTS, BUDGETS, strict=True)]


async def generate_all(cluster, expected, *, stagger: bool = True, **kw) -> list:
    """The 8 generations at once, each starting when the one before has 2 tokens (so they
    join the batch at different steps; with different budgets they leave at different
    steps); each must give the tokens it gives alone."""
    models = [remote(cluster, **kw) for _ in PROMPTS]
    started = [trio.Event() for _ in PROMPTS]

    async def one(i: int) -> None:
        if stagger and i:
            await started[i - 1].wait()
        model = models[i]
        await model.open()

        def on_token(count: int) -> None:
            if count == 2:
                started[i].set()

        tokens = await collect(model, PROMPTS[i], BUDGETS[i], on_token)
        assert tokens == expected[i], i
        await model.close()

    async with trio.open_nursery() as nursery:
        for i in range(len(PROMPTS)):
            nursery.start_soon(one, i)
    return models


@pytest.mark.parametrize("chained", [True, False], ids=["chained", "relayed"])
async def test_concurrent_sessions_are_batched_and_exact(cluster, model_dir, expected, chained):
    await cluster.add("s1", model_dir, 0, 3)
    await cluster.add("s2", model_dir, 3, LAYERS)
    await generate_all(cluster, expected, chained=chained)
    await trio.testing.wait_all_tasks_blocked()  # the servers have seen the closes
    for peer in ("s1", "s2"):
        server = cluster.servers[peer]
        sizes = server.batching.batch_sizes
        assert max(sizes) > 1 and server.batching.batched_steps > 0, (peer, sizes)
        steps = sum(size * count for size, count in sizes.items())
        assert steps == len(PROMPTS) + sum(BUDGETS)  # a prefill, then a step per token
        assert server.batching.shared_prefills > 0  # a prefill joined the decode steps
        assert not server.sessions and server.waiting_steps == 0


async def test_max_batch_one_runs_every_step_alone(cluster, model_dir, expected):
    await cluster.add("solo", model_dir, 0, LAYERS, max_batch=1)
    await generate_all(cluster, expected, stagger=False)
    assert set(cluster.servers["solo"].batching.batch_sizes) == {1}


async def test_sessions_that_end_mid_batch_leave_the_others_exact(cluster, model_dir, expected):
    """Two more generations end abruptly while the others are batched with them: one stops
    and closes its sessions; the other's client dies (its tasks stop, its streams reset)."""
    from daemon.shards.client import GenerationError, RemoteModel, generate

    await cluster.add("s1", model_dir, 0, 3)
    await cluster.add("s2", model_dir, 3, LAYERS)
    closing = remote(cluster)
    dying = RemoteModel(
        cluster.node("dying"),
        cluster.announced,
        model_id="tiny",
        num_layers=LAYERS,
        max_length=128,
    )
    ended = []

    async def closes() -> None:
        await closing.open()
        async for count, _ in _counted(generate(closing, PROMPTS[3], 40)):
            if count == 4:
                break
        await closing.close()
        ended.append("closed")

    async def dies(scope: trio.CancelScope) -> None:
        with scope, contextlib.suppress(GenerationError):  # what the dead client saw
            await dying.open()
            async for count, _ in _counted(generate(dying, PROMPTS[5], 40)):
                if count == 5:  # SIGKILL, in memory: its tasks stop, its streams reset
                    scope.cancel()
                    cluster.hub.remove_node("dying", refuse=True)
                    ended.append("died")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(closes)
        nursery.start_soon(dies, trio.CancelScope())
        await generate_all(cluster, expected, stagger=False)
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(ended) == ["closed", "died"]
    for peer in ("s1", "s2"):
        server = cluster.servers[peer]
        assert max(server.batching.batch_sizes) > 1
        assert not server.sessions  # the dead client's sessions ended with its streams


async def _counted(tokens):
    count = 0
    async for token in tokens:
        count += 1
        yield count, token


async def test_a_server_killed_under_a_batch_fails_every_session_over_exactly(
    cluster, model_dir, expected
):
    for name, (a, b) in {"a": (0, 2), "m": (2, 4), "z": (4, 6)}.items():
        await cluster.add(f"{name}1", model_dir, a, b)
        await cluster.add(f"{name}2", model_dir, a, b)  # a replica of each range
    models = [remote(cluster) for _ in PROMPTS]
    for model in models:
        await model.open()
    victim = models[0].route[1]["peer_id"]
    on_victim = [i for i, m in enumerate(models) if victim in [h["peer_id"] for h in m.route]]
    assert len(on_victim) > 1
    killed = trio.Event()

    async def one(i: int) -> None:
        def maybe_kill(count: int) -> None:
            if i == 0 and count == 6:
                cluster.kill(victim)
                killed.set()

        assert await collect(models[i], PROMPTS[i], BUDGETS[i], maybe_kill) == expected[i]

    async with trio.open_nursery() as nursery:
        for i in range(len(PROMPTS)):
            nursery.start_soon(one, i)
    assert killed.is_set()
    assert max(cluster.servers[victim].batching.batch_sizes) > 1  # it was batching
    for i in on_victim:
        assert [r["peer_id"] for r in models[i].recoveries] == [victim], i
    replica = victim[:-1] + ("2" if victim.endswith("1") else "1")
    assert max(cluster.servers[replica].batching.batch_sizes) > 1  # replays, then batched
    for model in models:
        await model.close()


def test_batching_bounds_are_checked():
    from daemon.shards.server import ShardServer

    for bad in ({"max_batch": 0}, {"batch_window_s": -1.0}, {"batch_window_s": 5.0}):
        with pytest.raises(ValueError):
            ShardServer(**bad)
    with pytest.raises(ValueError):
        Batcher(Fake(), limiter=trio.CapacityLimiter(1), max_batch=0)


async def test_a_leader_that_gives_up_hands_the_batch_over(virtual_time):
    fake = Fake()
    steps = batcher(fake, window_s=1.0)
    await steps.step("due", torch.tensor([0]))  # ran here: due back, so a leader waits
    results: dict[str, int] = {}

    async def step(name: str) -> None:
        results[name] = int(await steps.step(name, torch.tensor([1])))

    leader = trio.CancelScope()
    with trio.fail_after(60):  # virtual: "b" and "c" would wait for ever
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancellable, leader, steps)
            await trio.sleep(0.1)  # "a" leads, waiting for "due" (which never comes)
            nursery.start_soon(step, "b")
            nursery.start_soon(step, "c")
            await trio.sleep(0.1)
            leader.cancel()  # it gives up while waiting: "b" leads the rest
    assert results == {"b": 2, "c": 2}
    assert sorted(fake.batches[-1]) == ["b", "c"] and steps.pending == 0


async def _cancellable(scope: trio.CancelScope, steps: Batcher[str]) -> None:
    with scope:
        await steps.step("a", torch.tensor([1]))


async def test_a_failed_pass_leaves_every_cache_where_its_session_is(tmp_path, monkeypatch):
    """A pass that fails after writing (the device fails as it hands the output back):
    the caches are set back to their sessions' lengths, and the steps run again alone
    give the outputs a clean server gives."""
    from daemon.shards import wire
    from daemon.shards.batching import run_steps
    from daemon.shards.model import make_tiny
    from daemon.shards.server import Outbox, ShardServer
    from p2p.streams import stream_pair

    model = make_tiny(tmp_path / "m", layers=2, seed=4)
    servers = []
    for _ in range(2):
        server = ShardServer()
        await server.load("m", model, 0, 2)
        servers.append(server)
    header = wire.Open(model="m", start=0, end=2, max_length=16)
    owner = Outbox(stream_pair("a", "b")[0])
    broken, clean = ([s.open_session(header, owner) for _ in range(2)] for s in servers)
    for server, sessions in zip(servers, (broken, clean), strict=True):
        for session in sessions:
            await server.forward(session, 0, torch.tensor([[1, 2, 3]]), False)
    xs = [torch.tensor([[4]]), torch.tensor([[5]])]
    block = servers[0].blocks["m"]
    packed = block.shard.forward_packed

    def fails_late(*args):
        packed(*args)  # the caches were written and grew
        raise RuntimeError("the device failed")

    monkeypatch.setattr(block.shard, "forward_packed", fails_late)
    with pytest.raises(RuntimeError):
        run_steps(broken, xs, [False, False], None)
    assert [s.cache.length for s in broken] == [s.length for s in broken] == [3, 3]
    monkeypatch.undo()
    for session, twin, x in zip(broken, clean, xs, strict=True):
        again = await servers[0].forward(session, 3, x, False)
        assert torch.equal(again, await servers[1].forward(twin, 3, x, False))


async def test_waiting_steps_are_the_steps_not_yet_in_a_pass(tmp_path):
    from daemon.shards import wire
    from daemon.shards.model import make_tiny
    from daemon.shards.server import Outbox, ShardServer
    from p2p.streams import stream_pair

    server = ShardServer()
    await server.load("m", make_tiny(tmp_path / "m", layers=2, seed=4), 0, 2)
    header = wire.Open(model="m", start=0, end=2, max_length=16)
    sessions = [server.open_session(header, Outbox(stream_pair("a", "b")[0])) for _ in "abc"]
    async with trio.open_nursery() as nursery, server._compute:  # another pass runs
        for session in sessions:
            nursery.start_soon(server.forward, session, 0, torch.tensor([[1, 2]]), True)
        await trio.testing.wait_all_tasks_blocked()
        assert server.waiting_steps == 3
    assert server.waiting_steps == 0 and [s.length for s in sessions] == [2, 2, 2]
    assert server.batching.batch_sizes == {3: 1} and server.batching.shared_prefills == 3
