"""Retrieval over the in-memory network: in which order holders are tried.

Hinted holders (they said HAVE) come first, least busy first; then the DHT's
providers; then the nodes closest to the id. A bad copy, a dead or slow
holder only moves the fetch on; a holder that lost the chunk has its
provider record forgotten.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import Executor

import pytest

from dht_dfs.core.errors import ChunkNotFoundError
from dht_dfs.core.ids import ChunkId
from dht_dfs.transfer.ports import get_verified
from dht_dfs.transfer.retrieval import NetworkSource
from tests.support.memnet import FakeNode, MemNet


def put_chunk(*holders: FakeNode) -> tuple[ChunkId, bytes]:
    data = os.urandom(2000)
    chunk_id = ChunkId.of(data)
    for node in holders:
        node.keep(chunk_id, data)
    return chunk_id, data


async def test_hinted_holders_are_asked_first_without_a_lookup(
    net: MemNet, executor: Executor
) -> None:
    nodes = net.add(6)
    holder, stale = nodes[4], nodes[1]
    chunk_id, data = put_chunk(holder)
    net.announce(stale, chunk_id)  # a provider record of a node without the chunk
    joined = net.join(net.client(), executor)
    source = NetworkSource(joined.network)
    await source.prefetch([chunk_id])
    assert await get_verified(source, chunk_id) == data
    assert holder.gets == 1
    assert stale.gets == 0, "the provider record was not needed"
    assert joined.locator.calls == [], "no DHT lookup for a hinted chunk"


async def test_the_least_busy_holder_is_asked_first(net: MemNet, executor: Executor) -> None:
    first, second = net.add(2)
    chunk_id, data = put_chunk(first, second)
    joined = net.join(net.client(), executor)
    for busy, idle in ((first, second), (second, first)):
        busy.busy, idle.busy = 5, 0
        gets_before = busy.gets
        source = NetworkSource(joined.network)
        await source.prefetch([chunk_id])
        for _ in range(3):
            assert await get_verified(source, chunk_id) == data
        assert busy.gets == gets_before, "the busy holder was passed over every time"


async def test_providers_come_before_the_closest_nodes(net: MemNet, executor: Executor) -> None:
    net.add(8)
    joined = net.join(net.client(), executor)
    source = NetworkSource(joined.network)
    # A provider too far from the id to be among the 2 * replicas closest.
    announced, announced_data = put_chunk()
    far = net.by_distance(announced.dht_key)[7]
    far.keep(announced, announced_data)
    net.announce(far, announced)
    assert await get_verified(source, announced) == announced_data
    assert far.gets == 1
    # One lookup gave both the providers and the closest nodes, kept.
    assert joined.locator.calls == ["lookup"]
    # No record at all: found on the closest node, where copies belong. The
    # kept answer (the whole network of 8) names it without a lookup.
    unannounced, unannounced_data = put_chunk()
    nearest = net.by_distance(unannounced.dht_key)[0]
    nearest.keep(unannounced, unannounced_data)
    joined.locator.calls.clear()
    gets_before = nearest.gets  # it may be the far node of the first chunk too
    assert await get_verified(source, unannounced) == unannounced_data
    assert joined.locator.calls == []
    assert nearest.gets == gets_before + 1


async def test_expected_holders_lacking_a_chunk_fall_back_to_its_providers(
    net: MemNet, executor: Executor
) -> None:
    net.add(8)
    joined = net.join(net.client(), executor)
    source = NetworkSource(joined.network)
    warm, warm_data = put_chunk()
    net.by_distance(warm.dht_key)[0].keep(warm, warm_data)
    assert await get_verified(source, warm) == warm_data
    # Kept answers now name the closest nodes of any key; this chunk is not
    # there but on a far provider (placed before those nodes joined, say).
    moved, moved_data = put_chunk()
    far = net.by_distance(moved.dht_key)[7]
    far.keep(moved, moved_data)
    net.announce(far, moved)
    joined.locator.calls.clear()
    gets_before = far.gets  # it may have been asked for the first chunk too
    assert await get_verified(source, moved) == moved_data
    assert joined.locator.calls == ["find_providers"]
    assert far.gets == gets_before + 1


async def test_a_corrupt_copy_moves_on_and_is_never_returned(
    net: MemNet, executor: Executor
) -> None:
    bad, good = net.add(2)
    chunk_id, data = put_chunk(bad, good)
    bad.corrupt = True
    good.busy = 3  # so the corrupt copy is the one tried first
    net.announce(bad, chunk_id)
    net.announce(good, chunk_id)
    joined = net.join(net.client(), executor)
    assert await get_verified(NetworkSource(joined.network), chunk_id) == data
    assert bad.gets == 1 and good.gets == 1
    assert len(joined.dialer.given_back) == 1, "the bad copy's buffer is reused"
    # With every copy bad there is nothing to return, and the error says why.
    good.corrupt = True
    with pytest.raises(ChunkNotFoundError, match="served a corrupt copy"):
        await get_verified(NetworkSource(joined.network), chunk_id)


async def test_a_holder_that_dies_mid_transfer_moves_on(net: MemNet, executor: Executor) -> None:
    dying, steady = net.add(2)
    chunk_id, data = put_chunk(dying, steady)
    dying.die_after = 1  # answers the HAVE, then dies
    steady.busy = 3
    joined = net.join(net.client(), executor)
    source = NetworkSource(joined.network)
    await source.prefetch([chunk_id])
    assert dying.requests == 1, "the dying holder was hinted"
    assert await get_verified(source, chunk_id) == data
    assert dying.dead
    assert steady.gets == 1


async def test_a_stale_provider_record_is_forgotten(net: MemNet, executor: Executor) -> None:
    emptied, dead, holder = net.add(3)
    chunk_id, data = put_chunk(holder)
    for node in (emptied, dead, holder):
        net.announce(node, chunk_id)
    dead.dead = True
    holder.busy = 3  # try the other two first
    joined = net.join(net.client(), executor)
    assert await get_verified(NetworkSource(joined.network), chunk_id) == data
    key = chunk_id.dht_key
    # Only a node that answered "not here" is known to be stale; a dead node
    # may come back with its store.
    assert joined.locator.forgotten == [(key, emptied.node_id)]
    assert set(net.records[key]) == {dead.node_id, holder.node_id}


async def test_a_slow_holder_times_out_and_the_next_answers(
    net: MemNet, executor: Executor
) -> None:
    slow, fast = net.add(2)
    chunk_id, data = put_chunk(slow, fast)
    slow.gate = asyncio.Event()  # never set: the request times out
    fast.busy = 3
    net.announce(slow, chunk_id)
    net.announce(fast, chunk_id)
    joined = net.join(net.client(), executor, net.config.replace(request_timeout=0.01))
    assert await get_verified(NetworkSource(joined.network), chunk_id) == data
    assert slow.requests == 1 and slow.gets == 0
    assert fast.gets == 1


async def test_no_holder_at_all_is_chunk_not_found(net: MemNet, executor: Executor) -> None:
    net.add(3)
    chunk_id, _ = put_chunk()
    joined = net.join(net.client(), executor)
    with pytest.raises(ChunkNotFoundError, match="is unavailable") as caught:
        await get_verified(NetworkSource(joined.network), chunk_id)
    assert caught.value.chunk_hex == chunk_id.hex()


async def test_a_flood_of_records_at_a_stalled_listener_costs_a_hedge_delay(
    net: MemNet, executor: Executor
) -> None:
    stalled, honest = net.add(2)
    stalled.gate = asyncio.Event()  # accepts, never finishes a handshake
    chunks = [put_chunk(honest) for _ in range(3)]
    for chunk_id, _ in chunks:
        net.fake_records(stalled, chunk_id, 32)  # 32 made-up identities, one address
        net.announce(honest, chunk_id)
    honest.busy = 5  # so it sorts after every fake record
    config = net.config.replace(hedge_delay=0.05, connect_timeout=2.0, request_timeout=2.0)
    joined = net.join(net.client(), executor, config)
    source = NetworkSource(joined.network)
    started = time.monotonic()
    for chunk_id, data in chunks:
        assert await get_verified(source, chunk_id) == data
    took = time.monotonic() - started
    # Unhedged, one at a time: 32 connect timeouts per chunk (over three minutes).
    assert took < 3 * 5 * config.hedge_delay, f"{took:.2f} s"
    assert joined.dialer.connects <= 3 * 2, "one attempt per address per chunk"
    assert honest.gets == 3


async def test_records_tried_per_chunk_are_capped(net: MemNet, executor: Executor) -> None:
    chunk_id, _ = put_chunk()
    for node in net.add(40):  # 40 live nodes announce it and have nothing
        net.announce(node, chunk_id)
    joined = net.join(net.client(), executor)
    with pytest.raises(ChunkNotFoundError):
        await get_verified(NetworkSource(joined.network), chunk_id)
    asked = sum(node.gets for node in net.nodes.values())
    # The provider records, capped; then the closest nodes not yet asked.
    assert asked <= net.config.max_holders_per_chunk + 2 * net.config.replicas
    assert all(node.gets <= 1 for node in net.nodes.values()), "each holder once per chunk"


async def test_prefetch_asks_nobody_about_chunks_whose_holders_are_proven(
    net: MemNet, executor: Executor
) -> None:
    net.add(6)
    joined = net.join(net.client(), executor)
    source = NetworkSource(joined.network)
    first, first_data = put_chunk()
    net.by_distance(first.dht_key)[0].keep(first, first_data)
    assert await get_verified(source, first) == first_data  # one lookup, kept
    chunk_id, data = put_chunk()
    for holder in net.by_distance(chunk_id.dht_key)[: net.config.replicas]:
        holder.keep(chunk_id, data)
    asked = sum(node.requests for node in net.nodes.values())
    await source.prefetch([chunk_id])
    assert sum(node.requests for node in net.nodes.values()) == asked, "no HAVE was sent"
    assert await get_verified(source, chunk_id) == data
    assert joined.locator.calls == ["lookup"]
