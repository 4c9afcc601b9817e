"""Server announcements in `blocks`: who may write one, its typed parameters, how it reads."""

from __future__ import annotations

import pytest

from p2p import identity
from registry.blocks import Announcement, BadAnnouncement, announcement_key, parse_announcement
from registry.entry import sign_entry
from registry.hlc import HybridClock, Timestamp
from registry.replica import Rejected, Replica

SERVER, OTHER = identity.NodeIdentity.generate(), identity.NodeIdentity.generate()


def replica(ident: identity.NodeIdentity) -> Replica:
    return Replica(ident, clock=HybridClock(lambda: 1_000_000))


def announced(peer_id: str, key: str, host: str | None = None, **params) -> dict:
    """The value daemon/shards/service.py `_announce` writes."""
    return {
        "blockId": key,
        "blockComponentURI": "m",
        "model": "m",
        "layers": [0, 4],
        "served_by": [peer_id],
        "parameters": {
            "ms_per_layer": 1.234,
            "dtype": "float32",
            "parameters_bytes": 1 << 20,
            "cache_tokens_free": 4096,
            "host": host,
            **params,
        },
    }


@pytest.mark.parametrize("host", [None, "5f0c7a8e-boot-id"])
async def test_a_servers_own_announcement_is_accepted_and_read(host):
    r = replica(SERVER)
    key = announcement_key("m", 0, 4, SERVER.peer_id)
    entry = await r.put("blocks", key, announced(SERVER.peer_id, key, host))
    assert parse_announcement(entry) == Announcement(
        peer_id=SERVER.peer_id,
        model="m",
        start=0,
        end=4,
        ms_per_layer=1.234,
        cache_tokens_free=4096,
        host=host,
    )


@pytest.mark.parametrize(
    "params, problem",
    [
        ({"ms_per_layer": "fast"}, "parameters.ms_per_layer must be a number"),
        ({"ms_per_layer": -1}, "parameters.ms_per_layer must be >= 0"),
        ({"cache_tokens_free": "lots"}, "parameters.cache_tokens_free must be an integer"),
        ({"host": 7}, "parameters.host must be a string or null"),
        ({"price_per_unit": "5"}, "parameters.price_per_unit must be an integer"),
        ({"price_per_unit": 1.5}, "parameters.price_per_unit must be an integer"),
        ({"price_per_unit": True}, "parameters.price_per_unit must be an integer"),
        ({"price_per_unit": -1}, "parameters.price_per_unit must be >= 0"),
        ({"price_per_unit": 2**63}, "parameters.price_per_unit must be <="),
    ],
)
async def test_announced_parameters_must_have_their_types(params, problem):
    key = announcement_key("m", 0, 4, SERVER.peer_id)
    with pytest.raises(Rejected) as err:
        await replica(SERVER).put("blocks", key, announced(SERVER.peer_id, key, **params))
    assert err.value.reason == "schema" and problem in str(err.value)


async def test_only_the_server_may_announce_itself():
    r = replica(OTHER)
    with pytest.raises(Rejected) as err:
        await r.put("blocks", "fake", announced(SERVER.peer_id, "fake"))
    assert err.value.reason == "admission" and "served_by" in str(err.value)
    squat = announcement_key("m", 0, 4, SERVER.peer_id)  # the key SERVER announces under
    with pytest.raises(Rejected) as err:
        await r.put("blocks", squat, announced(OTHER.peer_id, squat))
    assert err.value.reason == "admission" and "announcements" in str(err.value)


def test_entries_an_older_version_stored_read_as_bad_or_as_no_announcement():
    ts = Timestamp(1, 0)

    def entry(author, key, value, owner=None):
        owner = owner or author.peer_id
        return sign_entry(
            author, kind="blocks", key=key, value=value, ts=ts, created=ts, owner=owner
        )

    key = announcement_key("m", 0, 4, SERVER.peer_id)
    with pytest.raises(BadAnnouncement):  # typed wrongly
        parse_announcement(entry(SERVER, key, announced(SERVER.peer_id, key, ms_per_layer="x")))
    with pytest.raises(BadAnnouncement):  # someone else named as the server
        parse_announcement(entry(OTHER, "fake", announced(SERVER.peer_id, "fake")))
    # the server's key squatted by another peer that names itself: routes to no one
    assert parse_announcement(entry(OTHER, key, announced(OTHER.peer_id, key))) is None
    # a block spec (configs/samples/block.yaml): served by its writer, but not an announcement
    spec = {**announced(SERVER.peer_id, "llama-shard-0"), "cluster_id": "lab-west"}
    assert parse_announcement(entry(SERVER, "llama-shard-0", spec)) is None
    assert parse_announcement(entry(SERVER, key, None)) is None  # withdrawn


@pytest.mark.parametrize("price", [0, 7, 2**63 - 1])
async def test_a_servers_price_travels_in_its_signed_announcement(price):
    r = replica(SERVER)
    key = announcement_key("m", 0, 4, SERVER.peer_id)
    entry = await r.put("blocks", key, announced(SERVER.peer_id, key, price_per_unit=price))
    read = parse_announcement(entry)
    assert read is not None and read.price_per_unit == price
    # an announcement without a price (an older server) declares none: None, not 0
    older = await r.put("blocks", key, announced(SERVER.peer_id, key))
    read = parse_announcement(older)
    assert read is not None and read.price_per_unit is None


@pytest.mark.parametrize("price", ["5", 1.5, True, -1, 2**63, [1]])
def test_a_wrongly_typed_price_stored_by_an_older_version_is_a_bad_announcement(price):
    ts = Timestamp(1, 0)
    key = announcement_key("m", 0, 4, SERVER.peer_id)
    value = announced(SERVER.peer_id, key, price_per_unit=price)
    entry = sign_entry(
        SERVER, kind="blocks", key=key, value=value, ts=ts, created=ts, owner=SERVER.peer_id
    )
    with pytest.raises(BadAnnouncement):
        parse_announcement(entry)
