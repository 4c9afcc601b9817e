import pytest

from p2p import codec, identity, records

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
