"""Kept lookups answer for other keys only when that answer is provably exact."""

from __future__ import annotations

import dataclasses
import os
import random

from dht_dfs.core.ids import NodeId
from dht_dfs.dht.values import Contact, LookupResult, LookupStats
from dht_dfs.transfer.nearby import Neighbourhoods

K = 20
STATS = LookupStats(hops=1, messages=1, answered=1, failed=0, seconds=0.0, timed_out=False)


def contact(node_id: bytes, port: int) -> Contact:
    return Contact(NodeId(node_id), "127.0.0.1", port, port)


class Network:
    """A perfect lookup over a fixed set of nodes, counting lookups."""

    def __init__(self, size: int, seed: int) -> None:
        generator = random.Random(seed)
        self.nodes = [contact(generator.randbytes(20), 1000 + i) for i in range(size)]
        self.me = self.nodes[0]
        self.lookups = 0

    @property
    def contact(self) -> Contact:
        return self.me

    def truth(self, key: bytes, count: int, include_self: bool) -> list[Contact]:
        nodes = [c for c in self.nodes if include_self or c is not self.me]
        return sorted(nodes, key=lambda c: c.distance(key))[:count]

    async def lookup(self, key: bytes) -> LookupResult:
        self.lookups += 1
        others = sorted((c for c in self.nodes if c is not self.me), key=lambda c: c.distance(key))
        return LookupResult(key, (), tuple(others[:K]), STATS)


async def test_answers_are_exact_in_a_network_larger_than_k() -> None:
    network = Network(300, seed=1)
    nearby = Neighbourhoods(network, K, clock=lambda: 0.0)
    generator = random.Random(2)
    # Keys in clusters (as a file's chunks are not, but regions of a large
    # network are shared by many keys), and keys spread at random.
    base = generator.randbytes(20)
    keys = [base[:3] + generator.randbytes(17) for _ in range(200)]
    keys += [generator.randbytes(20) for _ in range(100)]
    for key in keys:
        for count, include_self in ((3, True), (6, False), (K, True)):
            found = await nearby.closest(key, count, include_self=include_self)
            assert found == network.truth(key, count, include_self)
    assert nearby.served > 0, "keys of one region shared a lookup"
    assert network.lookups < 3 * len(keys)


async def test_one_lookup_serves_every_key_of_a_small_network() -> None:
    network = Network(8, seed=3)
    nearby = Neighbourhoods(network, K, clock=lambda: 0.0)
    for _ in range(500):
        key = os.urandom(20)
        assert await nearby.closest(key, 3) == network.truth(key, 3, True)
    assert network.lookups == 1


async def test_answers_expire_and_unreachable_nodes_are_dropped() -> None:
    network = Network(8, seed=4)
    now = [0.0]
    nearby = Neighbourhoods(network, K, ttl=30.0, clock=lambda: now[0])
    key = os.urandom(20)
    first = await nearby.closest(key, 3, include_self=False)
    nearby.forget(first[0].node_id)
    assert nearby.peek(key, 3, include_self=False) == [*first[1:], network.truth(key, 4, False)[3]]
    now[0] = 31.0
    assert nearby.peek(key, 3) is None, "an expired answer proves nothing"
    await nearby.closest(key, 3)
    assert network.lookups == 2


async def test_a_lookup_cut_short_is_not_kept() -> None:
    network = Network(8, seed=6)
    nearby = Neighbourhoods(network, K, clock=lambda: 0.0)
    key = os.urandom(20)
    partial = await network.lookup(key)
    nearby.learn(LookupResult(key, (), partial.closest, dataclasses.replace(STATS, timed_out=True)))
    assert nearby.peek(key, 3) is None


async def test_an_empty_answer_is_not_kept() -> None:
    network = Network(1, seed=5)  # nobody but this node answers
    nearby = Neighbourhoods(network, K, clock=lambda: 0.0)
    assert await nearby.closest(os.urandom(20), 3) == [network.me]
    assert nearby.peek(os.urandom(20), 3) is None
