"""The batcher under random schedules (hypothesis, trio's virtual clock): sessions stepping
at random moments, with steps of random lengths, callers giving up, sessions ending and
passes failing, sessions of chains of 1, 2 or 4 hops (micro-batches). Whatever happens:
every step that was not withdrawn ends (its output, or an error), its output is its own, no
pass holds a session twice or more than the bounds, a session is settled exactly once per
step that ran, and nothing is left pending."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from daemon.shards.batching import Batcher, StepDropped  # noqa: E402

MAX_BATCH = 4
MAX_POSITIONS = 12

step_plan = st.tuples(
    st.sampled_from([0.0, 0.001, 0.004, 0.012, 0.03]),  # think time (a client's round trip)
    st.integers(1, 8),  # positions
    st.sampled_from(["ok", "ok", "ok", "give_up", "end", "bad"]),
    st.sampled_from([0.0005, 0.003, 0.02]),  # how long a caller that gives up waits
)
sessions_plan = st.lists(st.lists(step_plan, min_size=1, max_size=6), min_size=1, max_size=8)


@settings(max_examples=100, deadline=None)
@given(
    plan=sessions_plan,
    window=st.sampled_from([0.0, 0.003, 0.01, 0.05]),
    depth=st.sampled_from([1, 2, 4]),  # the sessions' chains (2, 4: micro-batches)
)
def test_every_step_ends_with_its_own_output_within_the_bounds(plan, window, depth):
    passes: list[list[tuple[str, int]]] = []
    settled: dict[str, int] = {}
    ended: set[str] = set()

    def compute(keys, xs, last_only):
        passes.append([(k, int(x.shape[1])) for k, x in zip(keys, xs, strict=True)])
        if any(k.endswith("!") for k in keys):
            raise RuntimeError("a step the device refuses")
        return [x * 2 for x in xs]

    def settle(keys, positions):
        for key, n in zip(keys, positions, strict=True):
            settled[key] = settled.get(key, 0) + n

    names = [f"s{i}" for i in range(len(plan))]
    ran: dict[str, int] = {}  # positions of steps that got their output
    outcomes: list[str] = []

    async def session(name: str, steps: list, batcher: Batcher[str]) -> None:
        for index, (think, positions, fate, patience) in enumerate(steps):
            await trio.sleep(think)
            key = name + ("!" if fate == "bad" else "")
            x = torch.full((1, positions), float(index + 1))
            if fate == "end":
                ended.add(key)
            with trio.move_on_after(patience if fate == "give_up" else 10) as scope:
                try:
                    out = await batcher.step(key, x, positions=positions)
                except StepDropped:
                    outcomes.append("dropped")
                    continue
                except RuntimeError:
                    outcomes.append("failed")
                    continue
                assert torch.equal(out, x * 2)  # its own output
                ran[key] = ran.get(key, 0) + positions
                outcomes.append("ok")
            if scope.cancelled_caught:
                assert fate == "give_up"
                outcomes.append("gave_up")
            ended.discard(key)

    async def main() -> None:
        batcher = Batcher(
            compute,
            limiter=trio.CapacityLimiter(1),
            settle=settle,
            live=lambda key: key not in ended,
            depth=lambda key: depth,
            sessions=lambda: [name for name in names if name not in ended],
            max_batch=MAX_BATCH,
            max_positions=MAX_POSITIONS,
            window_s=window,
        )
        async with trio.open_nursery() as nursery:
            for i, steps in enumerate(plan):
                nursery.start_soon(session, names[i], steps, batcher)
        assert batcher.pending == 0

    # passes inline: a worker thread computing would let the virtual clock jump meanwhile
    threaded = trio.to_thread.run_sync

    async def inline(fn, *args, **_):
        await trio.lowlevel.checkpoint()
        return fn(*args)

    trio.to_thread.run_sync = inline  # type: ignore[assignment]
    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        trio.to_thread.run_sync = threaded
    assert len(outcomes) == sum(len(steps) for steps in plan)  # every step ended
    for batch in passes:
        keys = [key for key, _ in batch]
        assert len(keys) == len(set(keys)) <= MAX_BATCH
        assert len(batch) == 1 or sum(n for _, n in batch) <= MAX_POSITIONS
    # settled once per step that ran (a step given up on after it was taken still ran)
    for key, positions in ran.items():
        assert settled.get(key, 0) >= positions
    assert not any(key.endswith("!") for key in settled)  # a refused step advanced nothing
