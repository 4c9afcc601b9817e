import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2p import codec, identity, records
from p2p.testing.strategies import msgpack_scalars, msgpack_values

NET = "testnet"


def _record(ident, now=1000.0, valid_for=90.0, **kw):
    return records.make_record(
        ident,
        network_id=kw.get("network_id", NET),
        now=now,
        valid_for=valid_for,
        addrs=["/ip4/127.0.0.1/tcp/1"],
        resources={"cpu": {"cores": 2}, "gpus": []},
    )


def test_valid_record():
    ident = identity.NodeIdentity.generate()
    key = records.record_key(NET, ident.peer_id)
    assert len(key) < 50
    rec = records.validate_record(key, _record(ident), now=1010.0, network_id=NET)
    assert rec.peer_id == ident.peer_id
    assert rec.payout_address == ident.payout_address
    assert rec.expires_at == 1090.0
    assert rec.resources["cpu"]["cores"] == 2


def _reason(key, value, now=1010.0, network_id=NET):
    with pytest.raises(records.RecordError) as err:
        records.validate_record(key, value, now=now, network_id=network_id)
    return err.value.reason


def test_forged_signature_rejected():
    ident = identity.NodeIdentity.generate()
    raw = codec.decode(_record(ident))
    raw["body"]["resources"] = {"gpus": [{"name": "H100"}] * 8}
    assert _reason(records.record_key(NET, ident.peer_id), codec.encode(raw)) == "bad_signature"


def test_record_under_another_nodes_key_rejected():
    ident, other = identity.NodeIdentity.generate(), identity.NodeIdentity.generate()
    assert _reason(records.record_key(NET, other.peer_id), _record(ident)) == "wrong_key"


def test_stale_and_future_rejected():
    ident = identity.NodeIdentity.generate()
    key = records.record_key(NET, ident.peer_id)
    assert _reason(key, _record(ident, now=1000.0), now=1091.0) == "stale"
    assert _reason(key, _record(ident, now=1100.0), now=1000.0) == "future"


def test_other_network_rejected():
    ident = identity.NodeIdentity.generate()
    value = _record(ident, network_id="othernet")
    assert _reason(records.record_key(NET, ident.peer_id), value) == "wrong_network"


def test_garbage_rejected():
    ident = identity.NodeIdentity.generate()
    assert _reason(records.record_key(NET, ident.peer_id), b"\xff\x00garbage") == "malformed"


def test_select_newest_last_wins_ties():
    ident = identity.NodeIdentity.generate()
    old, new = _record(ident, now=1.0), _record(ident, now=2.0)
    assert records.select_newest([old, new]) == 1
    assert records.select_newest([new, old]) == 0
    assert records.select_newest([new, new]) == 1
    assert records.select_newest([b"junk", old]) == 1


def _signed(ident, body, ts=1000.0, type_=records.RECORD_TYPE):
    return codec.seal(ident, type_, body, timestamp=ts).to_wire()


def _body(**changes):
    body = {"net": NET, "valid_for": 90.0, "payout": "0xabc", "addrs": [], "resources": {}}
    body.update(changes)
    return body


@pytest.mark.parametrize(
    "changes",
    [
        {"valid_for": True},
        {"valid_for": "90"},
        {"valid_for": 0.0},
        {"valid_for": 7200.0},
        {"addrs": ["/ip4/1.2.3.4/tcp/1"] * (records.MAX_ADDRS + 1)},
        {"addrs": ["x" * (records.MAX_ADDR_CHARS + 1)]},
        {"addrs": [1]},
        {"payout": 5},
        {"resources": []},
        {"net": None},
        {"price_per_unit": "5"},
        {"price_per_unit": 1.5},
        {"price_per_unit": True},
        {"price_per_unit": -1},
        {"price_per_unit": 2**63},
    ],
)
def test_typed_body_refuses_wrong_shapes(changes):
    ident = identity.NodeIdentity.generate()
    key = records.record_key(NET, ident.peer_id)
    assert _reason(key, _signed(ident, _body(**changes))) == "malformed"


def test_cheap_checks_come_before_the_signature():
    # a misplaced, stale or foreign record is refused for that, without a signature check
    ident, other = identity.NodeIdentity.generate(), identity.NodeIdentity.generate()
    raw = codec.decode(_record(ident))
    raw["sig"] = bytes(64)
    forged = codec.encode(raw)
    assert _reason(records.record_key(NET, other.peer_id), forged) == "wrong_key"
    assert _reason(records.record_key(NET, ident.peer_id), forged, now=5000.0) == "stale"
    assert _reason(records.record_key(NET, ident.peer_id), forged, network_id="x") == (
        "wrong_network"
    )
    assert _reason(records.record_key(NET, ident.peer_id), forged) == "bad_signature"


_leaf = msgpack_scalars(text_size=30, binary_size=40)
_values = msgpack_values(_leaf, max_size=4, key_size=8, max_leaves=25)
_bodies = st.fixed_dictionaries(
    {},
    optional={
        "net": st.just(NET) | _leaf,
        "valid_for": st.floats(allow_nan=True) | _leaf,
        "payout": _leaf,
        "addrs": st.lists(st.text(max_size=20) | _leaf, max_size=4) | _leaf,
        "resources": _values,
    },
)
FUZZ_IDENT = identity.NodeIdentity.generate()
FUZZ_KEY = records.record_key(NET, FUZZ_IDENT.peer_id)


@given(_bodies | _values, st.floats(allow_nan=True) | st.integers(-(2**40), 2**40))
def test_signed_random_bodies_only_raise_record_error(body, ts):
    # correctly signed, so every check past the signature is exercised too
    try:
        rec = records.validate_record(
            FUZZ_KEY, _signed(FUZZ_IDENT, body, ts), now=1010.0, network_id=NET
        )
    except records.RecordError as exc:
        assert exc.reason
    else:
        assert rec.peer_id == FUZZ_IDENT.peer_id
        assert isinstance(rec.addrs, list) and isinstance(rec.resources, dict)


@given(st.binary(max_size=600) | _values.map(codec.encode))
def test_random_values_only_raise_record_error(value):
    try:
        records.validate_record(FUZZ_KEY, value, now=1010.0, network_id=NET)
    except records.RecordError as exc:
        assert exc.reason
    records.select_newest([value, value])  # never raises either


@pytest.mark.parametrize("price", [0, 12, records.MAX_PRICE_PER_UNIT])
def test_the_price_travels_signed_in_the_record(price):
    ident = identity.NodeIdentity.generate()
    key = records.record_key(NET, ident.peer_id)
    value = records.make_record(
        ident,
        network_id=NET,
        now=1000.0,
        valid_for=90.0,
        addrs=[],
        resources={},
        price_per_unit=price,
    )
    rec = records.validate_record(key, value, now=1010.0, network_id=NET)
    assert rec.price_per_unit == price and rec.to_json()["price_per_unit"] == price
    # the price is under the signature: changing it breaks the record
    raw = codec.decode(value)
    raw["body"]["price_per_unit"] = price + 1 if price < records.MAX_PRICE_PER_UNIT else 0
    assert _reason(key, codec.encode(raw)) == "bad_signature"


def test_a_record_without_a_price_declares_none():
    """An older node's record has no price: it reads as None (unknown), not as free."""
    ident = identity.NodeIdentity.generate()
    key = records.record_key(NET, ident.peer_id)
    rec = records.validate_record(key, _record(ident), now=1010.0, network_id=NET)
    assert rec.price_per_unit is None
    assert "price_per_unit" not in codec.decode(_record(ident))["body"]
