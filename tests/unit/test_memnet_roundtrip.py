"""Publish and fetch a whole file over the in-memory network."""

from __future__ import annotations

import os
from concurrent.futures import Executor
from pathlib import Path

import pytest

from dht_dfs.core.errors import RootNotFoundError
from dht_dfs.core.ids import ChunkId
from dht_dfs.core.refs import ReadReference
from dht_dfs.transfer.fetch import PART_SUFFIX
from tests.support.memnet import MemNet

SIZE = 40_000
"""Ten 4 KiB chunks under a two-level tree of manifest nodes (fanout 4)."""


async def test_publish_places_every_chunk_on_its_closest_and_fetch_returns_the_file(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(6)
    data = os.urandom(SIZE)
    (tmp_path / "in.bin").write_bytes(data)
    publisher = net.join(net.client(), executor)
    result = await publisher.network.publish(tmp_path / "in.bin")
    chunks = result.data_chunks + result.manifest_chunks
    assert result.data_chunks == 10 and result.manifest_chunks >= 3
    assert result.copies == 3 * chunks and result.under_replicated == 0
    stored = {c for node in net.nodes.values() for c in node.chunks}
    assert len(stored) == chunks
    for chunk_id in stored:
        rightful = {node.node_id for node in net.by_distance(chunk_id.dht_key)[:3]}
        assert net.holders(chunk_id) == rightful
        assert set(net.records[chunk_id.dht_key]) == rightful, "every copy is announced"

    fetcher = net.join(net.client(), executor)
    fetched = await fetcher.network.fetch(result.reference, output=tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data
    assert fetched.chunks == fetched.chunks_fetched == 10
    assert not (tmp_path / ("out.bin" + PART_SUFFIX)).exists()


async def test_fetch_survives_a_holder_dying_mid_file(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    nodes = net.add(6)
    data = os.urandom(SIZE)
    (tmp_path / "in.bin").write_bytes(data)
    result = await net.join(net.client(), executor).network.publish(tmp_path / "in.bin")
    busiest = max(nodes, key=lambda node: len(node.chunks))
    # The others look busy, so the fetch asks this node first for every
    # chunk it holds: it dies after two answers, and is met dead after that.
    for node in nodes:
        if node is not busiest:
            node.busy = 3
    busiest.die_after = busiest.requests + 2
    fetcher = net.join(net.client(), executor)
    await fetcher.network.fetch(result.reference, output=tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data
    assert busiest.dead, "the holder died during the fetch"


async def test_too_few_nodes_publish_under_replicated(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(2)
    (tmp_path / "in.bin").write_bytes(os.urandom(SIZE))
    result = await net.join(net.client(), executor).network.publish(tmp_path / "in.bin")
    chunks = result.data_chunks + result.manifest_chunks
    assert result.under_replicated == chunks
    assert result.copies == 2 * chunks


async def test_an_unknown_root_is_reported_as_such(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(3)
    unknown = ReadReference(ChunkId(os.urandom(32)), os.urandom(32))
    fetcher = net.join(net.client(), executor)
    with pytest.raises(RootNotFoundError, match="no node has root"):
        await fetcher.network.fetch(unknown, output=tmp_path / "x")
    assert not (tmp_path / "x").exists()
