"""The receipts' Merkle tree: the rules of issue14.md, proofs for every leaf, tampering refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts import merkle
from contracts.eip712 import keccak


def leaves(n: int, salt: bytes = b"") -> list[bytes]:
    return [keccak(salt + i.to_bytes(4, "big")) for i in range(n)]


def pair(a: bytes, b: bytes) -> bytes:
    return keccak(min(a, b) + max(a, b))


def test_small_trees_by_hand() -> None:
    a, b, c, d, e = leaves(5)
    assert merkle.root([]) == bytes(32)
    assert merkle.root([a]) == a
    assert merkle.root([a, b]) == pair(a, b) == merkle.root([b, a])
    # odd node promoted unchanged, level by level
    assert merkle.root([a, b, c]) == pair(pair(a, b), c)
    assert merkle.root([a, b, c, d]) == pair(pair(a, b), pair(c, d))
    assert merkle.root([a, b, c, d, e]) == pair(pair(pair(a, b), pair(c, d)), e)
    assert merkle.proof([a, b, c], 2) == [pair(a, b)]
    assert merkle.proof([a, b, c, d, e], 4) == [pair(pair(a, b), pair(c, d))]
    assert merkle.proof([a, b, c, d, e], 1) == [a, pair(c, d), e]
    assert merkle.proof([a], 0) == []


@pytest.mark.parametrize("n", range(1, 34))
def test_every_leaf_proves_and_tampering_fails(n: int) -> None:
    items = leaves(n)
    top = merkle.root(items)
    outsider = keccak(b"not a leaf")
    for index, leaf in enumerate(items):
        path = merkle.proof(items, index)
        assert len(path) <= max(1, (n - 1).bit_length())
        assert merkle.verify(path, top, leaf)
        assert not merkle.verify(path, top, outsider)
        assert not merkle.verify(path, keccak(top), leaf)
        if n > 1:
            assert not merkle.verify(path[:-1], top, leaf)
            assert not merkle.verify([*path, path[-1]], top, leaf)
            for k in range(len(path)):
                flipped = bytearray(path[k])
                flipped[index % 32] ^= 1
                assert not merkle.verify([*path[:k], bytes(flipped), *path[k + 1 :]], top, leaf)
            # another leaf's proof does not prove this one
            other = (index + 1) % n
            if merkle.proof(items, other) != path:
                assert not merkle.verify(merkle.proof(items, other), top, leaf)


@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=40), st.data())
def test_random_trees(items: list[bytes], data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(items) - 1))
    assert merkle.verify(merkle.proof(items, index), merkle.root(items), items[index])


def test_order_matters_and_bad_input_is_refused() -> None:
    a, b, c = leaves(3)
    assert merkle.root([a, b, c]) != merkle.root([c, a, b])
    with pytest.raises(ValueError, match="leaf 1"):
        merkle.root([a, b"short"])
    with pytest.raises(IndexError):
        merkle.proof([a, b], 2)
    with pytest.raises(IndexError):
        merkle.proof([], 0)
    assert not merkle.verify([b"short"], merkle.root([a, b]), a)


def test_the_accumulator_keeps_the_same_root() -> None:
    acc = merkle.Accumulator()
    items = leaves(70, b"acc")
    assert acc.root() == bytes(32) and acc.count == 0
    for n, leaf in enumerate(items, start=1):
        acc.append(leaf)
        assert acc.count == n
        assert acc.root() == merkle.root(items[:n]), n
    with pytest.raises(ValueError):
        acc.append(b"short")


@given(st.lists(st.binary(min_size=32, max_size=32), max_size=80))
def test_the_accumulator_on_random_leaves(items: list[bytes]) -> None:
    acc = merkle.Accumulator()
    for leaf in items:
        acc.append(leaf)
    assert acc.root() == merkle.root(items)
