"""The in-memory network: links (latency, loss, partitions, crashes) and its small Kademlia."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2p.network import NetworkError
from p2p.testing import memnet
from p2p.testing.memnet import MemoryNetwork, MemoryNode, RoutingTable

LATENCY = 0.005
RTT = 2 * LATENCY


class VersionValidator:
    """Accepts b"v:<int>..." unless revoked; the highest version wins, the last one on ties."""

    def __init__(self, revoked: set[bytes] | None = None) -> None:
        self.revoked = revoked if revoked is not None else set()
        self.rejected: list[bytes] = []

    @staticmethod
    def version(value: bytes) -> int:
        return int(value[2:].split(b"-")[0])

    def validate(self, key: str, value: bytes) -> None:
        if not value.startswith(b"v:") or value in self.revoked:
            self.rejected.append(value)
            raise ValueError(f"invalid value {value!r}")

    def select(self, key: str, values: list[bytes]) -> int:
        best = 0
        for index, value in enumerate(values):
            if self.version(value) >= self.version(values[best]):
                best = index
        return best


def _pair(**kw: float) -> tuple[MemoryNetwork, MemoryNode, MemoryNode]:
    hub = MemoryNetwork(latency_s=LATENCY, **kw)
    return hub, hub.add_node("a"), hub.add_node("b")


def _echo(node: MemoryNode, calls: list[tuple[str, bytes]] | None = None) -> None:
    async def handler(sender: str, payload: bytes) -> bytes:
        if calls is not None:
            calls.append((sender, payload))
        return b"re:" + payload

    node.set_request_handler("/echo", handler)


async def _times_out(call, wait_s: float = 10.0) -> bool:
    """True when `call()` was still waiting after `wait_s` virtual seconds."""
    with trio.move_on_after(wait_s) as scope:
        await call()
    return scope.cancelled_caught


async def _chain(hub: MemoryNetwork, count: int, prefix: str = "n") -> list[MemoryNode]:
    """`count` nodes, each dialling only the one before it."""
    nodes = [hub.add_node(f"{prefix}{i}") for i in range(count)]
    for previous, node in zip(nodes, nodes[1:], strict=False):
        await node.connect(previous.peer_id)
    return nodes


# -- links -------------------------------------------------------------------------------


async def test_request_takes_one_round_trip_of_virtual_time(autojump_clock):
    hub, a, b = _pair()
    calls: list[tuple[str, bytes]] = []
    _echo(b, calls)
    start = trio.current_time()
    assert await a.request("b", "/echo", b"hi") == b"re:hi"
    assert trio.current_time() - start == pytest.approx(RTT)
    assert calls == [("a", b"hi")]
    assert a.known_peers() == {"b"} and b.known_peers() == {"a"}
    assert (hub.messages_sent, hub.messages_dropped) == (2, 0)
    assert hub.bytes_sent == len(b"hi") + len(b"re:hi") + 2 * memnet._HEADER_BYTES
    assert a.now() == b.now() == hub.epoch + trio.current_time()


async def test_jitter_is_bounded_and_follows_the_seed(autojump_clock):
    async def delays(seed: int) -> list[float]:
        hub, a, b = _pair(seed=seed, jitter_s=0.02)
        _echo(b)
        out = []
        for _ in range(20):
            start = trio.current_time()
            await a.request("b", "/echo", b"x")
            out.append(trio.current_time() - start)
        return out

    first, again, other = await delays(7), await delays(7), await delays(8)
    assert all(RTT <= d <= RTT + 2 * 0.02 for d in first)
    assert len(set(first)) == 20
    assert first == pytest.approx(again) and first != pytest.approx(other)


async def test_total_loss_drops_every_request(autojump_clock):
    hub, a, b = _pair(loss=1.0)
    calls: list[tuple[str, bytes]] = []
    _echo(b, calls)
    assert await _times_out(lambda: a.request("b", "/echo", b"x"), wait_s=7.0)
    assert trio.current_time() == pytest.approx(7.0)
    assert calls == [] and b.known_peers() == set()
    assert (hub.messages_sent, hub.messages_dropped) == (1, 1)


async def test_partial_loss_drops_either_leg(autojump_clock):
    hub, a, b = _pair(loss=0.3, seed=3)
    calls: list[tuple[str, bytes]] = []
    _echo(b, calls)
    answered = 0
    for _ in range(400):
        with trio.move_on_after(1.0):
            await a.request("b", "/echo", b"x")
            answered += 1
    assert 0.4 < answered / 400 < 0.6  # both legs survive with probability 0.49
    assert hub.messages_dropped == 400 - answered  # one lost leg per failed request
    assert len(calls) > answered  # some answers were lost on the way back
    assert hub.messages_sent == 400 + len(calls)


async def test_partitions_block_and_heal_restores(autojump_clock):
    hub = MemoryNetwork(latency_s=LATENCY)
    nodes = {name: hub.add_node(name) for name in "abcd"}
    for node in nodes.values():
        _echo(node)
    hub.partition([{"a", "b"}, {"c"}])  # d is in no group: it is alone with the unlisted
    assert await nodes["a"].request("b", "/echo", b"x") == b"re:x"
    for src, dst in [("a", "c"), ("c", "a"), ("a", "d"), ("c", "d"), ("d", "b")]:
        assert await _times_out(lambda s=src, d=dst: nodes[s].request(d, "/echo", b"x"))
    assert not hub.reachable("a", "c") and hub.reachable("a", "b")
    hub.heal()
    assert await nodes["a"].request("c", "/echo", b"x") == b"re:x"
    assert await nodes["d"].request("b", "/echo", b"x") == b"re:x"
    with pytest.raises(ValueError):
        hub.partition([{"a"}, {"a", "b"}])


async def test_partition_blocks_the_answer_of_a_request_in_flight(autojump_clock):
    hub, a, b = _pair()
    arrived = trio.Event()

    async def slow(sender: str, payload: bytes) -> bytes:
        arrived.set()
        await trio.sleep(1.0)  # virtual time (autojump clock)
        return b"late"

    b.set_request_handler("/slow", slow)
    async with trio.open_nursery() as nursery:

        async def cut() -> None:
            await arrived.wait()
            hub.partition([{"a"}, {"b"}])

        nursery.start_soon(cut)
        assert await _times_out(lambda: a.request("b", "/slow", b""))


async def test_handler_failures_are_network_errors(autojump_clock):
    hub, a, b = _pair()

    async def broken(sender: str, payload: bytes) -> bytes:
        raise RuntimeError("boom")

    async def wrong_type(sender: str, payload: bytes) -> bytes:
        return "text"  # type: ignore[return-value]

    b.set_request_handler("/broken", broken)
    b.set_request_handler("/wrong", wrong_type)
    start = trio.current_time()
    with pytest.raises(NetworkError) as err:
        await a.request("b", "/broken", b"x")
    assert isinstance(err.value.__cause__, RuntimeError)
    assert trio.current_time() - start == pytest.approx(RTT)
    with pytest.raises(NetworkError, match="not supported"):
        await a.request("b", "/nobody-home", b"x")
    with pytest.raises(NetworkError, match="not bytes"):
        await a.request("b", "/wrong", b"x")
    with pytest.raises(TypeError):
        await a.request("b", "/broken", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await a.request("b", memnet.GET, b"x")
    with pytest.raises(ValueError):
        b.set_request_handler(memnet.PUT, broken)


async def test_unknown_crashed_and_refusing_peers(autojump_clock):
    hub = MemoryNetwork(latency_s=LATENCY)
    a, b, c = hub.add_node("a"), hub.add_node("b"), hub.add_node("c")
    _echo(b)
    _echo(c)
    with pytest.raises(NetworkError, match="no address"):
        await a.request("nobody", "/echo", b"x")
    assert trio.current_time() == 0.0
    hub.remove_node("b")  # a dead machine: silence
    assert await _times_out(lambda: a.request("b", "/echo", b"x"))
    hub.remove_node("c", refuse=True)  # the daemon died, the machine answers
    start = trio.current_time()
    with pytest.raises(NetworkError, match="refused"):
        await a.request("c", "/echo", b"x")
    assert trio.current_time() - start == pytest.approx(RTT)
    assert not b.alive
    with pytest.raises(NetworkError, match="removed"):
        await b.request("a", "/echo", b"x")
    with pytest.raises(NetworkError, match="removed"):
        await b.dht_get("k")
    with pytest.raises(KeyError):
        hub.node("b")
    with pytest.raises(KeyError):
        hub.remove_node("b")
    assert hub.peer_ids() == ["a"]


async def test_connect_teaches_both_sides_or_fails(autojump_clock):
    hub = MemoryNetwork(latency_s=LATENCY)
    a, b, c, d = (hub.add_node(name) for name in "abcd")
    await a.connect("b")
    assert trio.current_time() == pytest.approx(RTT)
    assert a.known_peers() == {"b"} and b.known_peers() == {"a"}
    hub.remove_node("c")
    start = trio.current_time()
    with pytest.raises(NetworkError):
        await a.connect("c", timeout_s=3.0)
    assert trio.current_time() - start == pytest.approx(3.0)
    hub.partition([{"a", "b"}])
    with pytest.raises(NetworkError):
        await a.connect("d")
    assert "d" not in a.known_peers()
    with pytest.raises(ValueError):
        await a.connect("a")


async def test_connect_resends_the_dial_until_the_peer_answers(autojump_clock):
    hub = MemoryNetwork(latency_s=LATENCY)
    a, b = hub.add_node("a"), hub.add_node("b")
    hub.partition([{"a"}, {"b"}])
    async with trio.open_nursery() as nursery:

        async def heal_later() -> None:
            await trio.sleep(2.5)  # virtual time (autojump clock)
            hub.heal()

        nursery.start_soon(heal_later)
        await a.connect("b")  # dials at 0, 1 and 2 s are lost; the one at 3 s gets through
    assert trio.current_time() == pytest.approx(3 * memnet.RPC_TIMEOUT_S + RTT)
    assert a.known_peers() == {"b"} and b.known_peers() == {"a"}
    with pytest.raises(ValueError):
        hub.add_node("a")


async def test_connect_arms_a_self_lookup(autojump_clock):
    hub = MemoryNetwork()
    a, b, c = await _chain(hub, 3, prefix="")
    assert c.known_peers() == {b.peer_id}
    assert await c.dht_get("missing") is None  # the self-lookup runs first
    assert c.known_peers() == {a.peer_id, b.peer_id}
    assert a.known_peers() == {b.peer_id, c.peer_id}  # a heard from c


# -- the DHT -----------------------------------------------------------------------------


async def test_dht_put_get_across_nodes_stores_at_the_k_closest(autojump_clock):
    hub = MemoryNetwork()
    nodes = await _chain(hub, 40)
    for node in nodes:
        await node.refresh()
    await nodes[0].dht_put("key", b"value")
    for node in nodes[1:]:
        assert await node.dht_get("key") == b"value"
    assert await nodes[5].dht_get("other") is None
    holders = {n.peer_id for n in nodes if n.local_value("key") == b"value"}
    target = memnet.dht_id("key")
    others = sorted(nodes[1:], key=lambda n: memnet.dht_id(n.peer_id) ^ target)
    assert holders == {nodes[0].peer_id} | {n.peer_id for n in others[: memnet.K]}


async def test_dht_survives_some_loss(autojump_clock):
    hub = MemoryNetwork(seed=5)
    nodes = await _chain(hub, 30)
    for node in nodes:
        await node.refresh()
    hub.loss = 0.1
    await nodes[3].dht_put("key", b"value")
    found = [await node.dht_get("key") for node in nodes]
    assert found == [b"value"] * 30
    assert hub.messages_dropped > 0


async def test_validator_rejects_on_put_and_on_receive(autojump_clock):
    hub = MemoryNetwork()
    nodes = await _chain(hub, 6)
    validators = [VersionValidator() for _ in nodes[:5]]
    for node, validator in zip(nodes, validators, strict=False):
        node.set_validator(validator)
    lenient = nodes[5]  # runs no validator, like a hostile node
    with pytest.raises(ValueError):
        await nodes[0].dht_put("key", b"bad")
    assert nodes[0].local_value("key") is None
    await lenient.dht_put("key", b"bad")
    assert lenient.local_value("key") == b"bad"
    assert [n.local_value("key") for n in nodes[:5]] == [None] * 5
    assert [n.puts_rejected for n in nodes[:5]] == [1] * 5
    assert await nodes[1].dht_get("key") is None  # the lenient node's copy is refused too
    assert validators[1].rejected == [b"bad", b"bad"]


async def test_select_keeps_the_newest_and_the_last_on_ties(autojump_clock):
    hub = MemoryNetwork()
    nodes = await _chain(hub, 5)
    for node in nodes:
        node.set_validator(VersionValidator())
    await nodes[0].dht_put("key", b"v:2")
    await nodes[4].dht_put("key", b"v:1")  # older: everyone keeps v:2, the putter too
    assert [n.local_value("key") for n in nodes] == [b"v:2"] * 5
    assert await nodes[3].dht_get("key") == b"v:2"
    await nodes[1].dht_put("key", b"v:3-x")
    await nodes[2].dht_put("key", b"v:3-y")  # a tie: the new value wins
    assert [n.local_value("key") for n in nodes] == [b"v:3-y"] * 5


async def test_a_stale_local_copy_does_not_hide_the_fresh_value(autojump_clock):
    hub = MemoryNetwork()
    a, b, c = await _chain(hub, 3, prefix="")
    revoked: set[bytes] = set()
    for node in (a, b, c):
        node.set_validator(VersionValidator(revoked))
    await a.dht_put("key", b"v:1")
    hub.partition([{a.peer_id}])
    await c.dht_put("key", b"v:2")  # a misses it
    hub.heal()
    assert [n.local_value("key") for n in (a, b, c)] == [b"v:1", b"v:2", b"v:2"]
    assert await a.dht_get("key") == b"v:1"  # local first, as py-libp2p does
    revoked.add(b"v:1")  # now the validator rejects it (think: the record expired)
    assert await a.dht_get("key") == b"v:2"
    assert a.local_value("key") is None


async def test_peers_forget_a_crashed_node(autojump_clock):
    hub = MemoryNetwork()
    nodes = await _chain(hub, 4)
    for node in nodes:
        await node.refresh()
    await nodes[3].dht_put("key", b"value")
    crashed = nodes[3]
    hub.remove_node(crashed.peer_id)
    assert crashed.local_value("key") is None and crashed.known_peers() == set()
    survivor = nodes[0]
    start = trio.current_time()
    await survivor.refresh()  # two lookups, each with one RPC to the dead node
    # a lookup does not wait out a silent peer, only a few round trips
    assert trio.current_time() - start < 2 * (hub.stall_s() + 2 * RTT)
    await survivor.refresh()
    await trio.sleep(  # virtual time (autojump clock)
        memnet.RPC_TIMEOUT_S
    )  # the last RPCs time out: four failures so far  # virtual time (autojump clock)
    assert crashed.peer_id in survivor.known_peers()
    await survivor.refresh()
    await trio.sleep(memnet.RPC_TIMEOUT_S)  # virtual time (autojump clock)
    assert crashed.peer_id not in survivor.known_peers()  # MAX_FAILURES reached
    # the others still name it, but hearsay does not bring it back for a while
    await survivor.refresh()
    assert crashed.peer_id not in survivor.known_peers()
    await trio.sleep(memnet.EVICTION_BACKOFF_S)  # virtual time (autojump clock)
    await survivor.refresh()
    assert crashed.peer_id in survivor.known_peers()


async def test_maintenance_stops_when_the_node_is_removed(autojump_clock):
    hub = MemoryNetwork()
    a, b = await _chain(hub, 2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.run_maintenance, 10.0)
        await trio.sleep(25)  # virtual time (autojump clock)
        hub.remove_node(b.peer_id)
    assert 30.0 < trio.current_time() < 30.1  # its next refresh found it removed, and returned


async def test_maintenance_spreads_a_chained_bootstrap(autojump_clock):
    hub = MemoryNetwork()
    nodes = await _chain(hub, 30)
    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(node.run_maintenance, 10.0)
        await trio.sleep(60)  # virtual time (autojump clock)
        nursery.cancel_scope.cancel()
    everyone = {n.peer_id for n in nodes}
    assert all(n.known_peers() == everyone - {n.peer_id} for n in nodes)


@given(
    ids=st.sets(st.integers(0, 10_000), max_size=300),
    target=st.integers(0, 2**256 - 1),
    count=st.integers(1, 25),
    exclude=st.integers(0, 10_000),
)
def test_routing_table_closest_matches_brute_force(
    ids: set[int], target: int, count: int, exclude: int
) -> None:
    table = RoutingTable()
    peers = [f"p{i}" for i in ids]
    for peer in peers:
        table.add(peer)
    table.discard(f"p{min(ids, default=0)}")
    remaining = [p for p in peers if p in table]
    expected = sorted(
        (p for p in remaining if p != f"p{exclude}"), key=lambda p: memnet.dht_id(p) ^ target
    )[:count]
    assert table.closest(target, count, exclude=f"p{exclude}") == expected
    assert len(table) == len(remaining) and table.peers() == set(remaining)


# -- gossip ------------------------------------------------------------------------------

TOPIC = "/test/topic"


class Inbox:
    """A gossip handler that records (origin, data, virtual time) for each delivery."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes, float]] = []

    async def __call__(self, origin: str, data: bytes) -> None:
        self.got.append((origin, data, trio.current_time()))

    def data(self) -> list[bytes]:
        return [data for _, data, _ in self.got]


async def _known_mesh(hub: MemoryNetwork, count: int) -> list[MemoryNode]:
    """`count` nodes, chained, kept refreshing until they all know each other."""
    nodes = await _chain(hub, count)
    everyone = {n.peer_id for n in nodes}
    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(node.run_maintenance, 10.0)
        for _ in range(30):  # at most 300 virtual seconds
            if all(n.known_peers() == everyone - {n.peer_id} for n in nodes):
                break
            await trio.sleep(10)  # virtual time (autojump clock)
        else:
            raise AssertionError("the nodes did not learn each other within 300 s")
        nursery.cancel_scope.cancel()
    return nodes


async def _subscribe_all(nodes: list[MemoryNode]) -> dict[str, Inbox]:
    inboxes = {}
    for node in nodes:
        inboxes[node.peer_id] = Inbox()
        await node.subscribe(TOPIC, inboxes[node.peer_id])
    return inboxes


async def test_gossip_reaches_every_subscriber_of_fifty_nodes_in_a_few_hops(autojump_clock):
    # a node is missed by random-fanout gossip with probability ~e^-fanout: with 10, the
    # chance that one of 10 messages misses one of 49 nodes is ~2% (and the seed is fixed)
    hub = MemoryNetwork(seed=11, latency_s=LATENCY, fanout=10)
    nodes = await _known_mesh(hub, 50)
    inboxes = await _subscribe_all(nodes)
    publishers = [nodes[(7 * round_) % len(nodes)] for round_ in range(10)]
    for round_, publisher in enumerate(publishers):
        start = trio.current_time()
        before = hub.gossip_sent
        await publisher.publish(TOPIC, b"msg-%d" % round_)
        await trio.sleep(1.0)  # virtual time (autojump clock)
        for node in nodes:
            got = [(o, t) for o, d, t in inboxes[node.peer_id].got if d == b"msg-%d" % round_]
            if node is publisher:
                assert got == []  # never echoed to its sender
            else:
                assert len(got) == 1  # exactly once, however many copies arrived
                origin, when = got[0]
                assert origin == publisher.peer_id
                assert when - start <= 8 * LATENCY + 1e-9  # a handful of hops
        # every subscriber forwards once to `fanout` peers; the publisher sends to `fanout`
        assert hub.gossip_sent - before == 10 * 50
    assert sum(n.gossip_duplicates for n in nodes) > 0
    assert all(n.gossip_received == 10 - publishers.count(n) for n in nodes)
    assert all(n.gossip_handler_errors == 0 for n in nodes)


async def test_gossip_with_loss_still_reaches_almost_everyone(autojump_clock):
    hub = MemoryNetwork(seed=12, latency_s=LATENCY)
    nodes = await _known_mesh(hub, 50)
    inboxes = await _subscribe_all(nodes)
    hub.loss = 0.10
    dropped = hub.messages_dropped
    messages = 20
    for i in range(messages):
        await nodes[i].publish(TOPIC, b"lossy-%d" % i)
    await trio.sleep(1.0)  # virtual time (autojump clock)
    assert hub.messages_dropped > dropped
    deliveries = [len(inbox.got) for inbox in inboxes.values()]
    assert all(d <= messages for d in deliveries)  # never twice
    # missed with probability ~e^-(fanout * (1 - loss)) = 0.5% per node and message
    coverage = sum(deliveries) / (messages * (len(nodes) - 1))
    assert 0.95 <= coverage <= 1.0


async def test_gossip_is_not_echoed_nor_sent_back(autojump_clock):
    hub = MemoryNetwork(latency_s=LATENCY)
    a, b, c = await _chain(hub, 3)
    await a.connect(c.peer_id)  # a full triangle
    inboxes = await _subscribe_all([a, b, c])
    await a.publish(TOPIC, b"hello")
    await trio.sleep(1)  # virtual time (autojump clock)
    assert inboxes[a.peer_id].got == []
    assert [(o, d) for o, d, _ in inboxes[b.peer_id].got] == [(a.peer_id, b"hello")]
    assert [(o, d) for o, d, _ in inboxes[c.peer_id].got] == [(a.peer_id, b"hello")]
    # a sends to b and c; each forwards to the other only (not back, not to the origin)
    assert hub.gossip_sent == 4
    assert a.gossip_duplicates == 0
    assert b.gossip_duplicates == c.gossip_duplicates == 1


async def test_gossip_takes_one_latency_per_hop_and_counts_bytes(autojump_clock):
    hub, a, b = _pair()
    await b.connect(a.peer_id)
    inbox = Inbox()
    await b.subscribe(TOPIC, inbox)
    before = hub.bytes_sent
    start = trio.current_time()
    await a.publish(TOPIC, b"x" * 1000)
    await trio.sleep(1)  # virtual time (autojump clock)
    assert inbox.got[0][2] - start == pytest.approx(LATENCY)
    msg_id = memnet.message_id(a.peer_id, b"x" * 1000)
    size = len(TOPIC) + len(a.peer_id) + len(msg_id) + 1000 + memnet._HEADER_BYTES
    assert hub.bytes_sent - before == hub.gossip_bytes == size
    assert hub.gossip_sent == 1


async def test_gossip_dedups_by_origin_and_data(autojump_clock):
    hub = MemoryNetwork(latency_s=LATENCY)
    a, b, c = await _chain(hub, 3)
    await a.connect(c.peer_id)
    inboxes = await _subscribe_all([a, b, c])
    await a.publish(TOPIC, b"same")
    await a.publish(TOPIC, b"same")  # the same id: one message to receivers
    await b.publish(TOPIC, b"same")  # another origin: another message
    await trio.sleep(1)  # virtual time (autojump clock)
    assert sorted(o for o, _, _ in inboxes[c.peer_id].got) == sorted([a.peer_id, b.peer_id])
    assert [o for o, _, _ in inboxes[a.peer_id].got] == [b.peer_id]
    assert [o for o, _, _ in inboxes[b.peer_id].got] == [a.peer_id]


async def test_gossip_skips_unsubscribed_and_unknown_peers(autojump_clock):
    hub = MemoryNetwork(latency_s=LATENCY)
    a, b, c = await _chain(hub, 3)  # a knows b only; b knows both
    stranger = hub.add_node("stranger")  # subscribed, but nobody knows it
    inboxes = await _subscribe_all([a, c, stranger])  # b is not subscribed
    await a.publish(TOPIC, b"m")
    await trio.sleep(1)  # virtual time (autojump clock)
    # a knows no subscriber: nothing is sent (b, which could relay, has not subscribed)
    assert hub.gossip_sent == 0
    assert hub.subscribers(TOPIC) == {a.peer_id, c.peer_id, "stranger"}
    await b.subscribe(TOPIC, Inbox())
    await a.publish(TOPIC, b"m2")
    await trio.sleep(1)  # virtual time (autojump clock)
    assert [d for _, d, _ in inboxes[c.peer_id].got] == [b"m2"]  # relayed by b
    assert inboxes["stranger"].got == []


async def test_partitions_block_gossip_and_heal_restores(autojump_clock):
    hub = MemoryNetwork(latency_s=LATENCY)
    nodes = await _known_mesh(hub, 6)
    inboxes = await _subscribe_all(nodes)
    left = {n.peer_id for n in nodes[:3]}
    hub.partition([left])
    await nodes[0].publish(TOPIC, b"split")
    await trio.sleep(1)  # virtual time (autojump clock)
    for node in nodes[1:]:
        expected = [b"split"] if node.peer_id in left else []
        assert inboxes[node.peer_id].data() == expected
    hub.heal()
    await nodes[5].publish(TOPIC, b"healed")
    await trio.sleep(1)  # virtual time (autojump clock)
    assert all(b"healed" in inboxes[n.peer_id].data() for n in nodes[:5])


async def test_handler_errors_are_counted_and_delivery_goes_on(autojump_clock):
    hub, a, b = _pair()
    await b.connect(a.peer_id)
    calls: list[bytes] = []

    async def flaky(origin: str, data: bytes) -> None:
        calls.append(data)
        if data == b"boom":
            raise RuntimeError("handler bug")

    inbox = Inbox()
    await b.subscribe(TOPIC, flaky)
    await b.subscribe(TOPIC, inbox)  # a second handler on the same topic
    for data in (b"one", b"boom", b"two"):
        await a.publish(TOPIC, data)
    await trio.sleep(1)  # virtual time (autojump clock)
    assert calls == [b"one", b"boom", b"two"]
    assert inbox.data() == [b"one", b"boom", b"two"]  # the other handler still ran
    assert b.gossip_handler_errors == 1


async def test_crashed_nodes_neither_get_nor_send_gossip(autojump_clock):
    hub = MemoryNetwork(latency_s=LATENCY)
    a, b, c = await _chain(hub, 3)
    await a.connect(c.peer_id)
    inboxes = await _subscribe_all([a, b, c])
    await a.publish(TOPIC, b"in flight")
    hub.remove_node(b.peer_id)  # crashes before the message arrives
    await trio.sleep(1)  # virtual time (autojump clock)
    assert inboxes[b.peer_id].got == []
    assert inboxes[c.peer_id].data() == [b"in flight"]
    assert hub.subscribers(TOPIC) == {a.peer_id, c.peer_id}
    with pytest.raises(NetworkError):
        await b.publish(TOPIC, b"ghost")
    with pytest.raises(TypeError):
        await a.publish(TOPIC, "not bytes")  # type: ignore[arg-type]


async def test_seen_cache_is_bounded(autojump_clock):
    hub = MemoryNetwork(latency_s=LATENCY, seen_cache=4)
    a, b = await _chain(hub, 2)
    inbox = Inbox()
    await b.subscribe(TOPIC, inbox)
    for i in range(10):
        await a.publish(TOPIC, b"%d" % i)
    await trio.sleep(1)  # virtual time (autojump clock)
    assert len(b._seen) == len(b._seen_order) == 4
    await a.publish(TOPIC, b"0")  # forgotten long ago: delivered again
    await a.publish(TOPIC, b"9")  # still remembered: dropped
    await trio.sleep(1)  # virtual time (autojump clock)
    assert inbox.data() == [b"%d" % i for i in range(10)] + [b"0"]
