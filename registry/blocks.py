"""Server announcements in the `blocks` registry, read through a typed form.

A shard server announces each range of layers it serves as a `blocks` entry under
`announcement_key(model, start, end, its peer id)`, with `served_by: [its peer id]` and its
measured speed in `parameters`. Every node reads these entries when it routes a generation,
so reading them must never fail on one: `parse_announcement` turns an entry into an
`Announcement` or says it is none of one (an AIOS block spec, a deleted entry), and raises
`BadAnnouncement` (to be skipped and counted) for an entry that has the shape of one but not
its types, or that names a server other than the peer that wrote it. Only a server's own key
may announce it: the schema refuses such writes, and this check keeps entries stored before
that rule (or by an older node) out of routing too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated

import msgspec
from msgspec import Meta

from p2p.records import PricePerUnit
from registry.entry import Entry
from registry.schemas import MAX_LAYER_INDEX

Layer = Annotated[int, Meta(ge=0, le=MAX_LAYER_INDEX)]


class BadAnnouncement(ValueError):
    """A `blocks` entry that looks like a server announcement but cannot be one."""


class AnnouncedParameters(msgspec.Struct, frozen=True):
    """The fields of `parameters` routing reads; others (AIOS's) are ignored. Fields added
    after the first version are optional: an older server's announcement lacks them and they
    read as None (unknown)."""

    ms_per_layer: Annotated[float, Meta(ge=0.0, le=1e6)]
    cache_tokens_free: Annotated[int, Meta(ge=0)] | None = None
    parameters_bytes: Annotated[int, Meta(ge=0)] | None = None
    dtype: Annotated[str, Meta(max_length=32)] | None = None
    host: Annotated[str, Meta(max_length=128)] | None = None
    price_per_unit: PricePerUnit | None = None


class _AnnouncedValue(msgspec.Struct, frozen=True):
    model: Annotated[str, Meta(min_length=1, max_length=4096)]
    layers: tuple[Layer, Layer]
    served_by: Annotated[list[Annotated[str, Meta(max_length=128)]], Meta(max_length=1)]
    parameters: AnnouncedParameters


class Announcement(msgspec.Struct, frozen=True):
    """One server's announced range of layers of a model."""

    peer_id: str
    model: str
    start: int
    end: int
    ms_per_layer: float
    cache_tokens_free: int | None
    host: str | None
    price_per_unit: int | None = None  # None: the server declares no price (older version)


def announcement_key(model: str, start: int, end: int, peer_id: str) -> str:
    """The key a server announces a range under (the schema reserves this form for it)."""
    return f"{model}.{start}-{end}.{peer_id[-12:]}"


def parse_announcement(entry: Entry) -> Announcement | None:
    """The announcement an entry makes, None if it makes none, BadAnnouncement if it is one
    that cannot be trusted or read. Never raises anything else."""
    value = entry.value
    if entry.kind != "blocks" or not isinstance(value, dict) or not value.get("served_by"):
        return None
    model, layers = value.get("model"), value.get("layers")
    if not (
        isinstance(model, str)
        and isinstance(layers, list)
        and len(layers) == 2
        and all(isinstance(n, int) for n in layers)
    ):
        return None  # a block spec without a range: nothing to route to
    if not isinstance(entry.author, str) or entry.key != announcement_key(
        model, layers[0], layers[1], entry.author
    ):
        if value.get("served_by") != [entry.author]:
            raise BadAnnouncement(f"blocks/{entry.key[:64]} names a server that did not write it")
        return None  # a block spec (e.g. configs/samples/block.yaml), not an announcement
    if value.get("served_by") != [entry.author] or entry.owner != entry.author:
        raise BadAnnouncement(f"blocks/{entry.key[:64]} names a server that did not write it")
    try:
        typed = msgspec.convert(value, _AnnouncedValue, strict=True)
    except (msgspec.ValidationError, TypeError, ValueError, RecursionError) as exc:
        raise BadAnnouncement(f"blocks/{entry.key[:64]}: {str(exc)[:120]}") from None
    start, end = typed.layers
    if start >= end:
        raise BadAnnouncement(f"blocks/{entry.key[:64]}: layers must be [start, end)")
    params = typed.parameters
    return Announcement(
        peer_id=entry.author,
        model=typed.model,
        start=start,
        end=end,
        ms_per_layer=params.ms_per_layer,
        cache_tokens_free=params.cache_tokens_free,
        host=params.host,
        price_per_unit=params.price_per_unit,
    )


def announcements(
    entries: Iterable[Entry],
    model_id: str | None = None,
    on_bad: Callable[[str], None] | None = None,
) -> list[Announcement]:
    """Every valid announcement among `entries` (of `model_id` when given); each bad one is
    skipped and reported to `on_bad` with the reason `bad_entry`."""
    out = []
    for entry in entries:
        try:
            item = parse_announcement(entry)
        except BadAnnouncement:
            if on_bad is not None:
                on_bad("bad_entry")
            continue
        if item is not None and (model_id is None or item.model == model_id):
            out.append(item)
    return out
