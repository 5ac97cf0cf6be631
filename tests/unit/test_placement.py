"""Placement over the in-memory network: where copies of a chunk go."""

from __future__ import annotations

import os
from concurrent.futures import Executor

import pytest

from dht_dfs.core.errors import NotEnoughNodesError
from dht_dfs.core.ids import ChunkId
from dht_dfs.transfer.placement import Placer
from tests.support.memnet import MemNet


def a_chunk() -> tuple[ChunkId, bytes]:
    data = os.urandom(1000)
    return ChunkId.of(data), data


async def test_places_replicas_copies_on_the_closest_nodes(net: MemNet, executor: Executor) -> None:
    net.add(6)
    joined = net.join(net.client(), executor)
    chunk_id, data = a_chunk()
    closest = await joined.locator.closest_live_nodes(chunk_id.dht_key, net.config.ksize)
    placed, records = await Placer(joined.network, chunk_id, data, closest, lease=3600).place(
        closest, 3
    )
    rightful = {node.node_id for node in net.by_distance(chunk_id.dht_key)[:3]}
    assert set(placed) == rightful
    assert len(placed) == 3
    assert net.holders(chunk_id) == rightful
    # Each storer's receipt is its provider record, to be announced.
    assert {record.node_id for record in records} == rightful
    assert all(record.key == chunk_id.dht_key for record in records)


async def test_falls_past_full_dead_and_refusing_nodes_to_the_next_closest(
    net: MemNet, executor: Executor
) -> None:
    net.add(7)
    joined = net.join(net.client(), executor)
    chunk_id, data = a_chunk()
    ranked = net.by_distance(chunk_id.dht_key)
    closest = await joined.locator.closest_live_nodes(chunk_id.dht_key, net.config.ksize)
    ranked[0].full = True
    ranked[1].dead = True  # died after the lookup that listed it
    ranked[2].refuse = True
    placed, _ = await Placer(joined.network, chunk_id, data, closest, lease=3600).place(closest, 3)
    next_closest = {node.node_id for node in ranked[3:6]}
    assert set(placed) == next_closest
    assert net.holders(chunk_id) == next_closest
    assert ranked[0].stores == 1 and ranked[2].stores == 1
    assert ranked[6].stores == 0, "no more stores than needed"


async def test_no_node_taking_the_chunk_raises_not_enough_nodes(
    net: MemNet, executor: Executor
) -> None:
    for node in net.add(4):
        node.full = True
    joined = net.join(net.client(), executor)
    chunk_id, data = a_chunk()
    closest = await joined.locator.closest_live_nodes(chunk_id.dht_key, net.config.ksize)
    with pytest.raises(NotEnoughNodesError, match=r"no node took chunk .* is full"):
        await Placer(joined.network, chunk_id, data, closest, lease=3600).place(closest, 3)
    with pytest.raises(NotEnoughNodesError, match="no live nodes found"):
        await Placer(joined.network, chunk_id, data, [], lease=3600).place([], 3)
    assert net.holders(chunk_id) == set()


async def test_fewer_nodes_than_replicas_places_what_it_can(
    net: MemNet, executor: Executor
) -> None:
    net.add(2)
    joined = net.join(net.client(), executor)
    chunk_id, data = a_chunk()
    closest = await joined.locator.closest_live_nodes(chunk_id.dht_key, net.config.ksize)
    placed, _ = await Placer(joined.network, chunk_id, data, closest, lease=3600).place(closest, 3)
    assert set(placed) == {node.node_id for node in net.nodes.values()}


async def test_a_sink_left_before_its_flush_leaves_no_announcement_running(
    net: MemNet, executor: Executor
) -> None:
    import asyncio

    from dht_dfs.core.crypto import seal_chunk
    from dht_dfs.transfer.placement import NetworkSink

    net.add(4)
    joined = net.join(net.client(), executor)
    never = asyncio.Event()

    async def stalled(records: object, closest: object) -> dict[bytes, int]:
        await never.wait()  # a DHT that never answers
        return {}

    joined.locator.put_records = stalled  # type: ignore[method-assign]
    async with NetworkSink(joined.network) as sink:
        for _ in range(22):  # 3 receipts each: a batch of 64 goes out in the background
            await sink.put(seal_chunk(os.urandom(100)))
        announcing = sink._announcing
        assert announcing is not None and not announcing.done()
        # The publish fails here, before any flush.
    assert announcing.cancelled(), "the sink ended what it started"
