"""The values that flow through a vDAG: bounded at the boundary, and each node's input
assembled from what feeds it. Pure functions.

A value is what JSON and msgpack share: None, bool, int, float, str, lists and maps with
string keys (bytes too, between nodes). Bounds: `MAX_VALUE_BYTES` encoded, `MAX_DEPTH`
nesting — the same for the request's input, every node's output and the answer.

How a node's input is made (`assemble`), from its *feeds* — the vDAG's input when the node is
in ``graph.input``, and each edge into it:
- a feed with ``outputNames`` takes those keys of the producer's output (a map), or the
  whole output when it names one name and the output is no map;
- a feed with ``inputNames`` puts what it carries under those names (paired one to one with
  its ``outputNames``, or the one name for the whole value);
- one feed without ``inputNames``: the node's input is that value as it is (a linear chain
  passes values straight through);
- otherwise the input is one map: named feeds merged, each unnamed feed under the label of
  the node it comes from (``"input"`` for the vDAG's input).

The vDAG's output is its one output node's output, or a map by node label when several
nodes give it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2p import codec

MAX_VALUE_BYTES = 1 << 20  # a request's input, a node's output, the answer
MAX_DEPTH = 16
INPUT = "input"  # the vDAG's input, as a feed's label
MAX_DEADLINE_S = 600.0  # a request's whole time
DEFAULT_DEADLINE_S = 60.0


class ValueRefused(ValueError):
    """A value over its bounds or of a type that cannot travel; `reason` labels it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_value(value: Any, what: str) -> bytes:
    """`value` encoded (msgpack), or ValueRefused saying what is wrong with `what`."""
    try:
        data = codec.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueRefused("type", f"{what} cannot be encoded: {exc}") from None
    if len(data) > MAX_VALUE_BYTES:
        raise ValueRefused(
            "too_large", f"{what} is {len(data)} bytes encoded (limit {MAX_VALUE_BYTES})"
        )
    try:
        codec.decode(data, max_bytes=MAX_VALUE_BYTES, max_depth=MAX_DEPTH)
    except codec.CodecError as exc:
        raise ValueRefused(exc.reason, f"{what}: {exc}") from None
    return data


@dataclass(frozen=True)
class Feed:
    """One thing feeding a node: from node `source` (or INPUT), with the edge's names."""

    source: str
    value: Any
    output_names: tuple[str, ...] = ()
    input_names: tuple[str, ...] = ()


class AssemblyError(ValueError):
    """A feed that names what its producer did not give."""


def carried(feed: Feed) -> Any:
    """What the feed carries: the named outputs, or the whole value."""
    names, value = feed.output_names, feed.value
    if not names:
        return value
    if not isinstance(value, dict):
        if len(names) == 1:
            return value
        raise AssemblyError(
            f"{feed.source!r} gave a {type(value).__name__}, not a map with {list(names)}"
        )
    missing = [n for n in names if n not in value]
    if missing:
        raise AssemblyError(
            f"{feed.source!r} gave no {', '.join(map(repr, missing))} "
            f"(it gave {', '.join(map(repr, sorted(value))) or 'nothing'})"
        )
    return value[names[0]] if len(names) == 1 else {n: value[n] for n in names}


def named(feed: Feed) -> dict[str, Any]:
    """A feed with inputNames: what it carries under those names."""
    value = carried(feed)
    ins, outs = feed.input_names, feed.output_names
    if len(ins) == 1:
        return {ins[0]: value}
    if outs and len(outs) == len(ins) and isinstance(value, dict):
        return {i: value[o] for i, o in zip(ins, outs, strict=True)}
    if isinstance(value, dict) and all(n in value for n in ins):
        return {n: value[n] for n in ins}
    raise AssemblyError(f"{feed.source!r} does not give the inputs {list(ins)}")


def assemble(feeds: list[Feed]) -> Any:
    """A node's input from its feeds (the module docstring says how)."""
    if len(feeds) == 1 and not feeds[0].input_names:
        return carried(feeds[0])
    out: dict[str, Any] = {}
    for feed in feeds:
        if feed.input_names:
            out.update(named(feed))
        else:
            out[feed.source] = carried(feed)
    return out


def gather(outputs: list[tuple[str, Any]]) -> Any:
    """The vDAG's answer from its output nodes' (label, output)."""
    if len(outputs) == 1:
        return outputs[0][1]
    return dict(outputs)
