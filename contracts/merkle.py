"""The Merkle tree over acknowledged receipts, as JobEscrow and OpenZeppelin's MerkleProof check it.

Leaves are 32-byte receipt digests in acknowledgement order (not sorted, not hashed again).
A parent is keccak256(min(a, b) ++ max(a, b)) (sorted pairs); an odd node at the end of a
level is promoted unchanged; the root of one leaf is the leaf, of none 32 zero bytes. A proof
is the list of siblings from the leaf up (a promotion adds none), so `MerkleProof.verify`
(which folds sorted pairs) accepts it.
"""

from __future__ import annotations

from collections.abc import Sequence

from contracts.eip712 import ZERO32, keccak


def hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a < b else keccak(b + a)


def _check_leaves(leaves: Sequence[bytes]) -> None:
    for i, leaf in enumerate(leaves):
        if type(leaf) is not bytes or len(leaf) != 32:
            raise ValueError(f"leaf {i} is not 32 bytes")


def _next_level(level: list[bytes]) -> list[bytes]:
    parents = [hash_pair(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        parents.append(level[-1])
    return parents


def root(leaves: Sequence[bytes]) -> bytes:
    _check_leaves(leaves)
    if not leaves:
        return ZERO32
    level = list(leaves)
    while len(level) > 1:
        level = _next_level(level)
    return level[0]


def proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The siblings of leaf `index` from the bottom up."""
    _check_leaves(leaves)
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} of a tree of {len(leaves)}")
    siblings: list[bytes] = []
    level = list(leaves)
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):
            siblings.append(level[sibling])
        level = _next_level(level)
        index //= 2
    return siblings


def verify(proof: Sequence[bytes], root: bytes, leaf: bytes) -> bool:
    """True when `proof` leads from `leaf` to `root` (OpenZeppelin's MerkleProof.verify)."""
    node = leaf
    for sibling in proof:
        if type(sibling) is not bytes or len(sibling) != 32:
            return False
        node = hash_pair(node, sibling)
    return node == root


class Accumulator:
    """The same root, kept up to date as leaves are appended: O(log n) per leaf and per root.

    With odd nodes promoted, the tree of n leaves is a complete subtree per 1-bit of n (largest
    first, the "peaks"), and its root folds them from the right: H(p1, H(p2, ... H(pk-1, pk))).
    Appending merges equal-sized peaks as a binary counter carries.
    """

    def __init__(self) -> None:
        self._peaks: list[tuple[int, bytes]] = []  # (size, subtree root), largest first
        self.count = 0

    def append(self, leaf: bytes) -> None:
        _check_leaves([leaf])
        size, node = 1, leaf
        while self._peaks and self._peaks[-1][0] == size:
            _, left = self._peaks.pop()
            size, node = size * 2, hash_pair(left, node)
        self._peaks.append((size, node))
        self.count += 1

    def root(self) -> bytes:
        if not self._peaks:
            return ZERO32
        node = self._peaks[-1][1]
        for _, peak in reversed(self._peaks[:-1]):
            node = hash_pair(peak, node)
        return node
