"""Discovery at scale on the in-memory network: k-bucket routing tables, DHT walks that take
about log2(N) rounds, records found beyond the peers a node knows, a refresher whose work
follows what falls due, late joiners listed, on trio's virtual clock. (Hundreds to a thousand
nodes finding each other and dropping dead ones within 10 s: bench/discovery_sim.py.)"""

from __future__ import annotations

import math
import random

import msgspec
import trio

from p2p import records
from p2p.discovery import DiscoverySettings, ResourceDirectory
from p2p.gone import GONE_TOPIC, GoneNotice
from p2p.host import Libp2pNetwork
from p2p.identity import NodeIdentity
from p2p.testing.kademlia import K, RoutingTable, dht_id, target_id
from p2p.testing.memnet import MemoryNetwork
from p2p.walks import sweep_bits, sweep_targets


def test_k_buckets_keep_at_most_k_per_bucket_and_free_room_on_discard() -> None:
    own = dht_id("me")
    table = RoutingTable(own, bucket_size=2)
    names = [f"p{i}" for i in range(200)]
    added = [name for name in names if table.add(name)]
    buckets: dict[int, int] = {}
    for name in added:
        bucket = (dht_id(name) ^ own).bit_length()
        buckets[bucket] = buckets.get(bucket, 0) + 1
    assert max(buckets.values()) == 2
    assert len(added) < 30  # the far buckets are full; most newcomers were refused
    refused = next(n for n in names if n not in table and (dht_id(n) ^ own).bit_length() == 256)
    assert not table.add(refused)
    full_bucket = [n for n in added if (dht_id(n) ^ own).bit_length() == 256]
    table.discard(full_bucket[0])
    assert table.add(refused)  # a failed peer's place goes to a newcomer
    assert len(RoutingTable().peers()) == 0 and all(RoutingTable().add(n) for n in names[:50])


async def _bootstrapped(count: int, seed: int) -> tuple[MemoryNetwork, list]:
    """`count` nodes with k-buckets, each joined through a random earlier one, refreshed."""
    hub = MemoryNetwork(seed=seed, bucket_size=K)
    rng = random.Random(seed)
    nodes = [hub.add_node(f"node-{i}") for i in range(count)]
    for index in range(1, count):
        await nodes[index].connect(nodes[rng.randrange(index)].peer_id)
    for _ in range(2):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(node.refresh)
    return hub, nodes


async def test_walks_find_the_true_closest_in_about_log2_n_rounds(autojump_clock) -> None:
    count = 400
    hub, nodes = await _bootstrapped(count, seed=11)
    known = [len(node.known_peers()) for node in nodes]
    assert max(known) < count / 2, max(known)  # k-buckets: nobody knows everyone
    hub.lookup_rounds.clear()
    rng = random.Random(12)
    for walker in rng.sample(nodes, 40):
        target = rng.randbytes(32)
        found = await walker.dht_find_peers(target)
        others = [n.peer_id for n in nodes if n is not walker]
        best = sorted(others, key=lambda p: dht_id(p) ^ target_id(target))[:K]
        assert walker.peer_id not in found
        assert len(set(found) & set(best)) >= K - 2, (found, best)
    rounds = list(hub.lookup_rounds.elements())
    assert len(rounds) == 40
    assert max(rounds) <= math.log2(count) and sum(rounds) / len(rounds) >= 2, rounds


def test_sweep_targets_land_one_in_each_subtree() -> None:
    for bits in (1, 4, 7):
        targets = sweep_targets(bits)
        assert len(targets) == 1 << bits
        subtrees = [target_id(t) >> (256 - bits) for t in targets]
        assert subtrees == list(range(1 << bits))
    assert sweep_bits(1000, 4096) == 7  # about K/2 = 10 nodes a subtree
    assert sweep_bits(100_000, 4096) == sweep_bits(4096, 4096) == 9  # bounded by the cap
    assert sweep_bits(0, 4096) == 1


def _directories(hub: MemoryNetwork, count: int, settings: DiscoverySettings) -> list:
    out = []
    for index in range(count):
        ident = NodeIdentity.generate()
        node = hub.add_node(ident.peer_id)
        directory = ResourceDirectory(
            node, ident, settings, describe=lambda i=index: ([f"/memory/{i}"], {"i": i})
        )
        node.set_validator(directory.validator)
        out.append((ident.peer_id, node, directory))
    return out


async def test_records_beyond_the_known_peers_are_found_and_the_cap_holds(autojump_clock):
    """With k-buckets (bucket size 4) nobody knows all 60 nodes, yet with walks every node
    lists every node; a node whose cap is 12 lists no more than that (its table's peers
    first), and still every node it knows of."""
    hub = MemoryNetwork(seed=21, bucket_size=4)
    settings = DiscoverySettings(network_id="sim", record_validity_s=90, publish_interval_s=30)
    capped = DiscoverySettings(
        network_id="sim", record_validity_s=90, publish_interval_s=30, max_peers=12
    )
    nodes = _directories(hub, 59, settings) + _directories(hub, 1, capped)
    rng = random.Random(21)
    for index in range(1, len(nodes)):
        await nodes[index][1].connect(nodes[rng.randrange(index)][0])
    everyone = {peer_id for peer_id, _, _ in nodes}
    async with trio.open_nursery() as nursery:
        for _, _, directory in nodes:
            nursery.start_soon(directory.run)
            nursery.start_soon(directory.refresh_forever)
        await trio.sleep(60)  # virtual time (autojump clock)
        assert all(len(node.known_peers()) < 40 for _, node, _ in nodes)
        for peer_id, _, directory in nodes[:-1]:
            assert {r.peer_id for r in await directory.find()} == everyone, peer_id
        _, node, directory = nodes[-1]
        listed = {r.peer_id for r in await directory.find()}
        assert len(listed) <= max(12, len(node.known_peers()) + 1)
        assert node.known_peers() <= listed
        assert sum(d.walker.walks for _, _, d in nodes) >= 60
        nursery.cancel_scope.cancel()


class _CountingDirectory(ResourceDirectory):
    """Counts the refresher's per-peer checks, and when each peer was looked up."""

    due_checks = 0

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.looked_up: dict[str, list[float]] = {}

    def _due(self, peer_id: str, now: float) -> bool:
        self.due_checks += 1
        return super()._due(peer_id, now)

    async def lookup(self, peer_id: str) -> records.ResourceRecord | None:
        self.looked_up.setdefault(peer_id, []).append(self._net.now())
        return await super().lookup(peer_id)


async def test_the_refreshers_work_follows_what_falls_due_not_all_it_holds(autojump_clock):
    """A node holding 2,000 records that fall due one by one over 45 s looks each up once,
    at its time (within a batch), and its refresher checks a few peers per look-up, not all
    2,000 at each: it woke for each record and scanned every one, O(N**2) per half validity
    (4 million checks here; 17 million a node at the 4,096 default cap)."""
    count = 2000
    hub = MemoryNetwork(seed=23)
    settings = DiscoverySettings(network_id="sim", record_validity_s=90, publish_interval_s=30)
    ident = NodeIdentity.generate()
    node = hub.add_node(ident.peer_id)
    directory = _CountingDirectory(node, ident, settings, describe=lambda: ([], {}))
    node.set_validator(directory.validator)
    rng = random.Random(23)
    due_at: dict[str, float] = {}
    for _ in range(count):
        other = NodeIdentity.generate()
        issued = hub.now() - rng.uniform(0, 45)
        value = records.make_record(
            other, network_id="sim", now=issued, valid_for=90, addrs=[], resources={}
        )
        key = records.record_key("sim", other.peer_id)
        directory._offer(records.validate_record(key, value, now=hub.now(), network_id="sim"))
        due_at[other.peer_id] = issued + 45
    async with trio.open_nursery() as nursery:
        nursery.start_soon(directory.refresh_forever)
        await trio.sleep(46)  # virtual time: every record fell due once
        nursery.cancel_scope.cancel()
    batch_s = 22.5 / 32  # refresh_forever's batch: its interval (min(30, 90 / 4)) / 32
    for peer_id, when in due_at.items():
        first = directory.looked_up[peer_id][0]  # (none answers: retried 30 s later)
        assert when <= first <= when + batch_s + 1e-6, (when, first)
    assert directory.due_checks < 10 * count, directory.due_checks


async def test_a_late_joiner_is_listed_by_the_nodes_it_connected_to(autojump_clock):
    """Nodes whose sweeps are done and whose k-buckets are full (size 1 here) meet a node
    that joins later by their walks only by chance; its own walks connected to them, and
    they list it within a refresh interval, though neither their table nor their walks
    hold it."""
    hub = MemoryNetwork(seed=24, bucket_size=1)
    settings = DiscoverySettings(
        network_id="sim",
        record_validity_s=90,
        publish_interval_s=30,
        walk_interval_s=1000,  # no random walks: what walks meet is what sweeps met
        sweep_interval_s=1000,
    )
    nodes = _directories(hub, 31, settings)
    rng = random.Random(24)
    for index in range(1, 30):
        await nodes[index][1].connect(nodes[rng.randrange(index)][0])
    async with trio.open_nursery() as nursery:
        for _, _, directory in nodes[:30]:
            nursery.start_soon(directory.run)
            nursery.start_soon(directory.refresh_forever)
        await trio.sleep(30)  # virtual time: the first 30 are done sweeping
        late_id, late, late_dir = nodes[30]
        await late.connect(nodes[0][0])
        nursery.start_soon(late_dir.run)
        nursery.start_soon(late_dir.refresh_forever)
        await trio.sleep(5)  # virtual time: its sweep has connected to the others
        reached = [d for p, n, d in nodes[:30] if late_id in n.connected_peers()]
        unseen = [
            d
            for p, n, d in nodes[:30]
            if late_id in n.connected_peers()
            and late_id not in n.known_peers()
            and late_id not in d.walker.met
            and not d.lists(late_id)
        ]
        assert len(reached) >= 20 and unseen, (len(reached), len(unseen))
        await trio.sleep(25)  # virtual time: a refresh interval (22.5 s) and a look-up
        assert all(d.lists(late_id) for d in reached)
        nursery.cancel_scope.cancel()


async def _all_list(nodes: list, everyone: set[str]) -> bool:
    return all([{r.peer_id for r in await d.find()} == everyone for _, _, d in nodes])


async def test_a_false_gone_notice_hides_no_live_node_and_a_malformed_one_goes_nowhere(
    autojump_clock,
):
    """A liar announces that a live node is gone: every node asks that node itself, it
    answers, and it stays listed; bytes that are no notice are refused by the validator."""
    hub = MemoryNetwork(seed=22)
    settings = DiscoverySettings(network_id="sim", record_validity_s=90, publish_interval_s=30)
    nodes = _directories(hub, 6, settings)
    for index in range(1, len(nodes)):
        await nodes[index][1].connect(nodes[0][0])
    liar = hub.add_node("liar")
    await liar.connect(nodes[0][0])
    everyone = {peer_id for peer_id, _, _ in nodes}
    async with trio.open_nursery() as nursery:
        for _, _, directory in nodes:
            nursery.start_soon(directory.run)
            nursery.start_soon(directory.refresh_forever)
        await trio.sleep(20)  # virtual time (autojump clock)
        assert await _all_list(nodes, everyone)
        victim = nodes[3][0]
        await liar.publish(GONE_TOPIC, msgspec.msgpack.encode(GoneNotice(victim)))
        await liar.publish(GONE_TOPIC, b"\x93not a notice")
        for _ in range(10):
            await trio.sleep(0.5)  # virtual time (autojump clock)
            assert await _all_list(nodes, everyone)
        others = [d for p, _, d in nodes if p != victim]
        assert sum(d.gone.refuted for d in others) >= 3  # they asked, it answered
        assert sum(d.gone.confirmed for d in others) == 0
        assert sum(d.gone.refused for _, _, d in nodes) >= 1
        nursery.cancel_scope.cancel()


class _DirectoryValidator:
    """The host's DHT validator is the directory's, which exists only after the host."""

    directory: ResourceDirectory | None = None

    def validate(self, key: str, value: bytes) -> None:
        assert self.directory is not None
        self.directory.validator.validate(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        assert self.directory is not None
        return self.directory.validator.select(key, values)


async def test_on_libp2p_a_walk_meets_a_node_two_hops_away_and_its_record_is_listed() -> None:
    """Real py-libp2p hosts in a line, a - b - c: a's walks (dht_find_peers) meet c, whom a
    never dialled, and a lists c's record."""
    settings = DiscoverySettings(
        network_id="walks", record_validity_s=30, publish_interval_s=5, walk_interval_s=1
    )
    parts = []
    for _ in range(3):
        ident = NodeIdentity.generate()
        validator = _DirectoryValidator()
        net = Libp2pNetwork(
            ident,
            network_id="walks",
            listen=["/ip4/127.0.0.1/tcp/0"],
            dht_namespace=records.NAMESPACE,
            dht_validator=validator,
        )
        directory = ResourceDirectory(net, ident, settings, describe=lambda: ([], {}))
        validator.directory = directory
        parts.append((net, directory))
    (a, found_by_a), (b, _), (c, _) = parts
    async with a.run(), b.run(), c.run():
        await a.connect(b.listen_addrs()[0])
        await c.connect(b.listen_addrs()[0])
        assert c.peer_id not in a.known_peers()
        async with trio.open_nursery() as nursery:
            for _, directory in parts:
                nursery.start_soon(directory.run)
                nursery.start_soon(directory.refresh_forever)
            with trio.fail_after(30):
                while c.peer_id not in {r.peer_id for r in await found_by_a.find()}:  # noqa: ASYNC110
                    await trio.sleep(0.1)
            assert c.peer_id in found_by_a.walker.met
            assert found_by_a.walker.walks >= 1
            nursery.cancel_scope.cancel()
