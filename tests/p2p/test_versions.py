"""Protocol versions in the hello (p2p.versions): a peer of another major version is refused
with the reason (what `node_peers` shows), a newer minor version interoperates, and a hello
without a version (a node that predates the field) counts as 1.0. Real py-libp2p hosts."""

from __future__ import annotations

import pytest
import trio

from p2p import codec, identity, versions
from p2p.hello import open_hello_body
from p2p.network import NetworkError
from tests.p2p.test_networks import DEVNET, _Host, _running, _until


def test_versions_parse_and_compare():
    assert versions.parse("1.0") == (1, 0)
    assert versions.parse("12.345") == (12, 345)
    for bad in ("1", "1.", ".1", "a.b", "1.0.0", "-1.0", "1.0 ", "99999.1"):
        with pytest.raises(ValueError):
            versions.parse(bad)
    assert versions.incompatibility("1.0", "1.9") is None
    assert versions.incompatibility("1.9", "1.0") is None
    why = versions.incompatibility("1.0", "2.0")
    assert why is not None and "incompatible major version" in why and "2.0" in why


def test_hello_version_is_typed_and_defaults_to_1_0():
    ident = identity.NodeIdentity.generate()

    def hello(body):
        return codec.seal(ident, "hello", body, timestamp=1.0).to_wire()

    assert open_hello_body(hello({"network_id": "n"}), ident.peer_id).version == "1.0"
    newer = open_hello_body(hello({"network_id": "n", "version": "1.4", "x": 1}), ident.peer_id)
    assert newer.version == "1.4"  # and a field this version does not know is skipped
    for version in ("2", "v2.0", 2.0, "1.0" * 10, None):
        with pytest.raises(codec.CodecError, match="malformed"):
            open_hello_body(hello({"network_id": "n", "version": version}), ident.peer_id)


async def test_an_incompatible_major_is_refused_with_the_reason_a_newer_minor_is_served():
    old, new_major, new_minor = _Host(DEVNET), _Host(DEVNET), _Host(DEVNET)
    new_major.net.hello_gate.version = "2.0"
    new_minor.net.hello_gate.version = "1.7"
    async with _running(old, new_major, new_minor):
        with pytest.raises(NetworkError, match="speaks gridmesh protocol 2.0.*incompatible"):
            await old.net.connect(new_major.net.listen_addrs()[0])
        shown = old.net.refused_peers()[new_major.ident.peer_id]
        assert "2.0" in shown and "incompatible major version" in shown
        assert ("hello", "incompatible_version") in old.rejects
        # the other side refuses too, and says why
        await _until(
            lambda: old.ident.peer_id in new_major.net.refused_peers(), 5, "new_major's refusal"
        )
        assert "incompatible" in new_major.net.refused_peers()[old.ident.peer_id]
        assert not new_major.net.is_verified(old.ident.peer_id)
        await _until(
            lambda: new_major.ident.peer_id not in old.net.connected_peers(), 5, "the drop"
        )

        # a newer minor version: served both ways
        await old.net.connect(new_minor.net.listen_addrs()[0])
        assert old.net.is_verified(new_minor.ident.peer_id)
        await _until(lambda: new_minor.net.is_verified(old.ident.peer_id), 5, "both verified")
        with trio.fail_after(5):
            assert await old.net.ping(new_minor.ident.peer_id) >= 0
