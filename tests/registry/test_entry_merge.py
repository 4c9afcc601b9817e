"""Property tests: merge is a join (commutative, associative, idempotent), so replicas that
receive the same entries in any order, with duplicates, end equal."""

from functools import reduce

from hypothesis import given, settings
from hypothesis import strategies as st

from p2p import identity
from registry.entry import Entry, entry_from_wire, join, merge, sign_entry, verify_entry
from registry.hlc import Timestamp

AUTHORS = [identity.NodeIdentity.generate() for _ in range(3)]


@st.composite
def entries(draw):
    author = draw(st.sampled_from(AUTHORS))
    owner = draw(st.sampled_from([author.peer_id] + [a.peer_id for a in AUTHORS]))
    created = Timestamp(draw(st.integers(0, 5)), draw(st.integers(0, 2)))
    ts = Timestamp(created.wall_ms + draw(st.integers(0, 5)), draw(st.integers(0, 2)))
    value = draw(st.one_of(st.none(), st.dictionaries(st.sampled_from("ab"), st.integers(0, 3))))
    return Entry(
        kind=draw(st.sampled_from(["blocks", "clusters"])),
        key=draw(st.sampled_from(["x", "y"])),
        value=value,
        ts=ts,
        author=author.peer_id,
        created=created,
        owner=owner,
    )


same_key = entries().map(lambda e: Entry("blocks", "x", *_rest(e)))


def _rest(e):
    return (e.value, e.ts, e.author, e.created, e.owner)


@settings(deadline=None)
@given(same_key, same_key)
def test_join_commutative(a, b):
    assert join(a, b) == join(b, a)


@settings(deadline=None)
@given(same_key, same_key, same_key)
def test_join_associative(a, b, c):
    assert join(join(a, b), c) == join(a, join(b, c))


@settings(deadline=None)
@given(same_key)
def test_join_idempotent(a):
    assert join(a, a) == a


@settings(max_examples=200, deadline=None)
@given(st.lists(entries(), max_size=20), st.randoms(use_true_random=False))
def test_replicas_converge_in_any_order_with_duplicates(batch, rnd):
    first, _ = merge({}, batch)
    shuffled = batch + batch[: len(batch) // 2]
    rnd.shuffle(shuffled)
    # deliver in random chunks, as gossip and anti-entropy would
    second: dict = {}
    while shuffled:
        cut = rnd.randint(1, len(shuffled))
        second, _ = merge(second, shuffled[:cut])
        shuffled = shuffled[cut:]
    assert first == second
    # and a replica equals the fold of join over everything it received, per key
    for entry_id, entry in first.items():
        same = [e for e in batch if e.id == entry_id]
        assert reduce(join, same) == entry


def test_earlier_claim_wins_over_later_update():
    a, b = AUTHORS[:2]
    mine = Entry("blocks", "x", {"v": 1}, Timestamp(10, 0), a.peer_id, Timestamp(10, 0), a.peer_id)
    theirs = Entry(
        "blocks", "x", {"v": 2}, Timestamp(99, 0), b.peer_id, Timestamp(11, 0), b.peer_id
    )
    assert join(mine, theirs) == mine
    update = Entry(
        "blocks", "x", {"v": 3}, Timestamp(12, 0), a.peer_id, Timestamp(10, 0), a.peer_id
    )
    assert join(mine, update) == update


def test_merge_reports_changes():
    a = AUTHORS[0]
    e1 = Entry("blocks", "x", {"v": 1}, Timestamp(1, 0), a.peer_id, Timestamp(1, 0), a.peer_id)
    e2 = Entry("blocks", "x", None, Timestamp(2, 0), a.peer_id, Timestamp(1, 0), a.peer_id)
    replica, changed = merge({}, [e1, e2, e1])
    assert changed == [e1, e2]
    assert replica[("blocks", "x")].deleted


def test_sign_verify_and_wire_roundtrip():
    a = AUTHORS[0]
    entry = sign_entry(
        a,
        kind="blocks",
        key="x",
        value={"n": 1},
        ts=Timestamp(5, 1),
        created=Timestamp(5, 1),
        owner=a.peer_id,
    )
    assert verify_entry(entry)
    again = entry_from_wire(entry.to_wire())
    assert again == entry and verify_entry(again)
    tampered = Entry(*_fields(entry, value={"n": 2}))
    assert not verify_entry(tampered)
    stolen = Entry(*_fields(entry, author=AUTHORS[1].peer_id))
    assert not verify_entry(stolen)


def _fields(entry, **changes):
    data = {
        "kind": entry.kind,
        "key": entry.key,
        "value": entry.value,
        "ts": entry.ts,
        "author": entry.author,
        "created": entry.created,
        "owner": entry.owner,
        "signature": entry.signature,
    }
    data.update(changes)
    return data.values()
