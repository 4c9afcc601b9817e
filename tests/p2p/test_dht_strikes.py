"""Forged DHT puts are strikes (p2p.guard.StrikingValidator): a real peer putting forged
records straight to the target (as `daemon.tools.hostile_peer`'s dht flood does) is banned
after `ban_strikes` of them, and its later puts fail at once; an honest peer whose puts are
refused only for time (expired copies, as py-libp2p's republishing sends) is never banned."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import trio

from p2p import codec, identity, records
from p2p.discovery import DiscoverySettings, RecordValidator
from p2p.host import HostLimits, Libp2pNetwork

NET = "strikes"
STRIKES = 10


class _AcceptAll:
    def validate(self, key: str, value: bytes) -> None:
        pass

    def select(self, key: str, values: list[bytes]) -> int:
        return len(values) - 1


def _target(rejects: Counter[str]) -> Libp2pNetwork:
    def count(source: str, reason: str) -> None:
        rejects[f"{source}:{reason}"] += 1

    return Libp2pNetwork(
        identity.NodeIdentity.generate(),
        network_id=NET,
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht_namespace=records.NAMESPACE,
        dht_validator=RecordValidator(
            DiscoverySettings(network_id=NET), time.time, lambda r: count("dht", r)
        ),
        on_reject=count,
        limits=HostLimits(ban_strikes=STRIKES, ban_window_s=60, ban_s=60),
    )


def _peer(ident: identity.NodeIdentity) -> Libp2pNetwork:
    return Libp2pNetwork(
        ident,
        network_id=NET,
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht_namespace=records.NAMESPACE,
        dht_validator=_AcceptAll(),
    )


@asynccontextmanager
async def _running(*nets: Libp2pNetwork) -> AsyncIterator[None]:
    """Run `nets`; a failure inside is raised as itself, not in nested exception groups."""
    failure: Exception | None = None
    async with AsyncExitStack() as stack:
        for net in nets:
            await stack.enter_async_context(net.run())
        try:
            yield
        except Exception as exc:
            failure = exc
    if failure is not None:
        raise failure


async def _put(sender: Libp2pNetwork, target: Libp2pNetwork, key: str, value: bytes) -> bool:
    """One put straight to `target`, as any libp2p peer can send it; False if refused."""
    try:
        with trio.fail_after(5):
            return await sender.dht.value_store._store_at_peer(
                target.host.get_id(), key.encode(), value
            )
    except Exception:
        return False


def _record(ident: identity.NodeIdentity, now: float) -> bytes:
    return records.make_record(
        ident, network_id=NET, now=now, valid_for=60.0, addrs=[], resources={}
    )


async def test_a_peer_putting_forged_records_is_banned_after_its_strikes():
    rejects: Counter[str] = Counter()
    target = _target(rejects)
    mallory = identity.NodeIdentity.generate()
    hostile = _peer(mallory)
    own_key = records.record_key(NET, mallory.peer_id)
    good = _record(mallory, time.time())
    tampered = codec.decode(good)
    tampered["body"]["resources"] = {"gpus": [{"name": "H100"}] * 8}
    forged: list[Callable[[int], tuple[str, bytes]]] = [
        lambda i: (own_key, codec.encode(tampered)),  # a bad signature
        lambda i: (records.record_key(NET, f"someone-{i}"), good),  # another node's key
        lambda i: (own_key, os.urandom(300)),  # garbage
        lambda i: (f"/foreign/{i:032x}", good),  # outside our namespace
    ]
    async with _running(target, hostile):
        await hostile.connect(target.listen_addrs()[0])
        assert await _put(hostile, target, own_key, good)  # an honest put first: stored
        sent = 0
        with trio.fail_after(20):
            while not rejects["peer:banned"]:
                key, value = forged[sent % len(forged)](sent)
                assert not await _put(hostile, target, key, value)
                sent += 1
        assert sent <= STRIKES + 1, (sent, rejects)
        # banned: dropped, and a put of its own valid record is refused as well
        assert not await _put(hostile, target, own_key, _record(mallory, time.time()))
        assert rejects["peer:banned"] == 1


async def test_puts_refused_only_for_time_are_no_strikes():
    rejects: Counter[str] = Counter()
    target = _target(rejects)
    ident = identity.NodeIdentity.generate()
    honest = _peer(ident)
    key = records.record_key(NET, ident.peer_id)
    async with _running(target, honest):
        await honest.connect(target.listen_addrs()[0])
        for i in range(3 * STRIKES):
            expired = _record(ident, time.time() - 600 - i)  # a copy that expired on the way
            assert not await _put(honest, target, key, expired)
        future = _record(ident, time.time() + 600)  # a clock far ahead
        assert not await _put(honest, target, key, future)
        assert await _put(honest, target, key, _record(ident, time.time()))
        assert rejects["dht:stale"] == 3 * STRIKES and rejects["dht:future"] == 1, rejects
        assert rejects["peer:banned"] == 0, rejects
