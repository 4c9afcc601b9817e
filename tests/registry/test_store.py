import trio

from p2p import identity
from p2p.aio import open_bridge
from registry.entry import sign_entry
from registry.hlc import Timestamp
from registry.store import RegistryStore

IDENT = identity.NodeIdentity.generate()


def _entry(key, value, ts):
    return sign_entry(
        IDENT,
        kind="components",
        key=key,
        value=value,
        ts=Timestamp(ts, 0),
        created=Timestamp(1, 0),
        owner=IDENT.peer_id,
    )


async def test_roundtrip_replace_and_purge(tmp_path):
    async with open_bridge() as bridge:
        store = RegistryStore(bridge, tmp_path / "registry.db")
        await store.open()
        a1, b1 = _entry("a", {"n": 1}, 1), _entry("b", {"n": [1, 2]}, 1)
        await store.apply([a1, b1])
        a2 = _entry("a", None, 5)
        await store.apply([a2])
        assert sorted(await store.load_all(), key=lambda e: e.key) == [a2, b1]
        assert await store.purge_tombstones(before_wall_ms=10) == 1
        assert await store.load_all() == [b1]
        assert await store.integrity_check() == "ok"
        await store.close()
        # reopening sees what was committed
        again = RegistryStore(bridge, tmp_path / "registry.db")
        await again.open()
        assert await again.load_all() == [b1]
        await again.close()


async def test_bridge_cancellation_does_not_hang():
    import asyncio

    async with open_bridge() as bridge:
        with trio.move_on_after(0.2) as scope:
            await bridge.run(asyncio.sleep, 30)
        assert scope.cancelled_caught
        assert await bridge.run(asyncio.sleep, 0, "done") == "done"


async def test_concurrent_batches_commit_one_at_a_time(tmp_path):
    """Gossip, sync and local writes apply concurrently in a daemon: every batch must commit,
    and a batch must never write an older entry over a newer one."""
    from registry.replica import Replica

    async with open_bridge() as bridge:
        store = RegistryStore(bridge, tmp_path / "registry.db")
        await store.open()
        replica = Replica(IDENT, store=store)
        versions = [_entry("k", {"name": "k", "version": str(i)}, ts=10 + i) for i in range(20)]
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(
                    replica.put, "components", f"c{i}", {"name": "c", "version": "1"}
                )
            for entry in reversed(versions):  # newest first: later batches must not regress it
                nursery.start_soon(replica.apply, [entry])
        stored = {e.key: e for e in await store.load_all()}
        assert sorted(stored) == sorted([f"c{i}" for i in range(20)] + ["k"]), sorted(stored)
        assert stored["k"] == versions[-1] == replica.get("components", "k")
        await store.close()
