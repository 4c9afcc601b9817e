"""Fuzz the registry's decoders: random bytes and random nested structures only ever raise
the registry's own errors (and a Replicator handed them counts them, never raises)."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p import codec
from p2p.identity import NodeIdentity
from p2p.testing.memnet import MemoryNetwork
from p2p.testing.strategies import msgpack_scalars, msgpack_values
from registry import blocks, schemas, sync, wire
from registry.entry import Entry, EntryError, entry_from_wire
from registry.hlc import HybridClock, Timestamp
from registry.replica import Replica
from registry.replication import ReplicationSettings, Replicator

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

scalars = msgpack_scalars(text_size=40, binary_size=40, allow_infinity=True)
structures = msgpack_values(scalars, max_size=6, key_size=12, max_leaves=40)
# maps that look like registry messages, with every field random
near_messages = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 0, 2, True, "1"])},
    optional={
        "op": st.sampled_from(["digests", "pull", "push", "x"]) | structures,
        "digests": st.dictionaries(
            st.sampled_from(schemas.KINDS) | st.text(max_size=40),
            st.lists(st.binary(min_size=7, max_size=9), min_size=15, max_size=17) | structures,
            max_size=3,
        )
        | structures,
        "after": st.fixed_dictionaries({"kind": structures, "key": structures}) | structures,
        "ids": st.lists(st.lists(st.text(max_size=20), min_size=2, max_size=2), max_size=4)
        | structures,
        "entries": st.lists(structures, max_size=4) | structures,
        "buckets": st.lists(st.tuples(st.text(max_size=10), st.integers(-2, 20)), max_size=4)
        | structures,
        "summaries": st.lists(structures, max_size=4) | structures,
        "truncated": structures,
        "next": structures,
        "more": structures,
        "applied": structures,
        "error": structures,
    },
)
near_entries = st.fixed_dictionaries(
    {},
    optional={
        "kind": st.sampled_from(schemas.KINDS) | structures,
        "key": st.text(min_size=1, max_size=20) | structures,
        "value": st.dictionaries(st.text(max_size=10), structures, max_size=4) | structures,
        "ts": st.lists(st.integers(-1, 2**64 - 1), min_size=2, max_size=2) | structures,
        "created": st.lists(st.integers(-1, 2**64 - 1), min_size=2, max_size=2) | structures,
        "author": st.text(max_size=20) | structures,
        "owner": st.text(max_size=20) | structures,
        "sig": st.binary(max_size=70) | structures,
    },
)
anything = structures | near_messages | near_entries

REPLY_TYPES = (wire.ListingReply, wire.PullReply, wire.PushReply)


def packed(value: Any) -> bytes:
    return codec.encode(value)


def decode_all(data: bytes) -> None:
    for decode in (
        lambda: wire.decode_gossip(data, 1 << 20),
        lambda: wire.decode_sync_op(data, 1 << 20),
        *(lambda t=t: wire.decode_reply(data, t, 1 << 20) for t in REPLY_TYPES),
    ):
        with contextlib.suppress(wire.WireError):
            decode()


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_wire_errors(data):
    decode_all(data)


@FUZZ
@given(anything)
def test_random_structures_raise_only_wire_errors(value):
    decode_all(packed(value))
    for type_ in (wire.Gossip, wire.DigestsOp, wire.PullOp, wire.PushOp, *REPLY_TYPES):
        with contextlib.suppress(wire.WireError):
            wire.convert(value, type_)
    for parse in (sync.parse_digests, sync.parse_listing):
        with contextlib.suppress(sync.SyncError):
            parse(value)


@FUZZ
@given(near_entries | structures)
def test_entry_from_wire_raises_only_entry_errors(value):
    try:
        entry = entry_from_wire(value)
    except EntryError:
        return
    assert isinstance(entry, Entry)
    assert entry_from_wire(entry.to_wire()) == entry


@FUZZ
@given(
    st.sampled_from(schemas.KINDS) | structures,
    st.text(max_size=30) | structures,
    st.dictionaries(st.text(max_size=16), structures, max_size=6) | structures,
)
def test_schema_validation_raises_only_schema_errors(kind, key, value):
    with contextlib.suppress(schemas.SchemaError):
        schemas.validate_key(kind, key)
    with contextlib.suppress(schemas.SchemaError):
        schemas.validate_value(kind, key, value)


AUTHOR = NodeIdentity.generate().peer_id
block_values = st.fixed_dictionaries(
    {},
    optional={
        "model": st.just("m") | structures,
        "layers": st.lists(st.integers(-2, 10), min_size=2, max_size=2) | structures,
        "served_by": st.just([AUTHOR]) | structures,
        "parameters": st.fixed_dictionaries(
            {},
            optional={
                "ms_per_layer": st.floats() | st.integers() | structures,
                "cache_tokens_free": st.integers() | structures,
                "host": structures,
            },
        )
        | structures,
    },
)


@FUZZ
@given(block_values, st.booleans(), st.text(max_size=20))
def test_announcements_parse_or_are_skipped_never_raise(value, matching_key, other_key):
    model, layers = value.get("model"), value.get("layers")
    key = other_key or "k"
    if matching_key and isinstance(model, str) and isinstance(layers, list) and len(layers) == 2:
        key = blocks.announcement_key(model, layers[0], layers[1], AUTHOR)
    ts = Timestamp(1, 0)
    entry = Entry("blocks", key, value, ts, AUTHOR, ts, AUTHOR)
    bad: list[str] = []
    found = blocks.announcements([entry], on_bad=bad.append)
    assert len(found) + len(bad) <= 1
    for item in found:
        assert item.peer_id == AUTHOR and 0 <= item.start < item.end
        assert isinstance(item.ms_per_layer, float) and item.ms_per_layer >= 0


@pytest.mark.parametrize("seed", range(3))
async def test_a_replicator_counts_random_messages_and_never_raises(seed, autojump_clock):
    hub = MemoryNetwork(seed=seed)
    ident = NodeIdentity.generate()
    node = hub.add_node(ident.peer_id)
    rejects: list[tuple[str, str]] = []
    replica = Replica(ident, clock=HybridClock(lambda: int(hub.now() * 1000)))
    replicator = Replicator(
        node,
        replica,
        ReplicationSettings(network_id="fuzz"),
        on_reject=lambda source, reason: rejects.append((source, reason)),
    )
    rng = random.Random(seed)
    for n in range(200):
        data = rng.randbytes(rng.randrange(1, 300))
        if n % 2:
            data = packed({"v": 1, "op": rng.choice(["digests", "pull", "push"]), "x": data})
        await replicator.on_gossip("peer", data)
        reply = codec.decode(await replicator.on_sync("peer", data))
        assert reply["v"] == 1
        await trio.lowlevel.checkpoint()
    assert replica.entries == {}
    assert len(rejects) >= 200
