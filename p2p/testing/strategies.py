"""Hypothesis strategies for fuzzing decoders of what peers send: every msgpack value.

Decoders of the wire (codec, records, registry messages, shard frames) must turn any value a
peer could send into their own error, never another exception; these strategies make such
values, random structures rather than only random bytes.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy


def msgpack_scalars(
    *, text_size: int = 40, binary_size: int = 40, allow_infinity: bool | None = None
) -> SearchStrategy:
    """Any msgpack scalar: nil, bools, 64-bit ints (signed and unsigned), floats with NaN,
    strings and bytes up to the given sizes."""
    return (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**64 - 1)
        | st.floats(allow_nan=True, allow_infinity=allow_infinity)
        | st.text(max_size=text_size)
        | st.binary(max_size=binary_size)
    )


def msgpack_values(
    scalars: SearchStrategy, *, max_size: int = 5, key_size: int = 8, max_leaves: int = 30
) -> SearchStrategy:
    """Nested lists and string-keyed maps of `scalars`, each at most `max_size` long."""
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=max_size)
            | st.dictionaries(st.text(max_size=key_size), inner, max_size=max_size)
        ),
        max_leaves=max_leaves,
    )
