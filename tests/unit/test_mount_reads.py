"""The mount's reads without FUSE: what a read fetches, read-ahead, sharing, failure.

``FileView`` and ``PlainChunks`` over the in-memory network; the FUSE
glue on top is tested for real in tests/integration/test_mount.py.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import Executor
from pathlib import Path

import pytest

from dht_dfs.core.direntry import DirEntry
from dht_dfs.core.errors import ChunkUnavailableError
from dht_dfs.fs.chunks import PlainChunks
from dht_dfs.fs.files import MAX_AHEAD, FileView, ReadState
from dht_dfs.store.cache import ChunkCache
from dht_dfs.transfer.network import Network
from tests.support.memnet import MemNet

CHUNKS = 40


async def published(
    net: MemNet, executor: Executor, tmp_path: Path
) -> tuple[Network, DirEntry, bytes]:
    net.add(5)
    network = net.join(net.client(), executor).network
    data = os.urandom(CHUNKS * net.config.chunk_size - 100)
    (tmp_path / "file.bin").write_bytes(data)
    reference = (await network.publish(tmp_path / "file.bin")).reference
    entry = (await network.resolve(reference, ())).entry
    return network, entry, data


def chunks_of(network: Network, cache: ChunkCache | None = None) -> PlainChunks:
    return PlainChunks(network, cache, memory_bytes=1 << 30, timeout=2.0)


async def a_view(
    net: MemNet, executor: Executor, tmp_path: Path
) -> tuple[FileView, PlainChunks, bytes]:
    """A published file's view over fresh chunks, and the file's bytes."""
    network, entry, data = await published(net, executor, tmp_path)
    chunks = chunks_of(network)
    return FileView(network, entry, chunks), chunks, data


async def test_reads_at_any_offset_fetch_only_the_chunks_they_touch(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    view, chunks, data = await a_view(net, executor, tmp_path)
    size = net.config.chunk_size
    cases = [(0, 1), (size - 1, 2), (3 * size + 5, 2 * size), (len(data) - 3, 100), (7, 0)]
    for offset, length in cases:
        assert await view.read(offset, length) == data[offset : offset + length]
    # chunk 0; chunks 0-1; chunks 3-5; the last chunk: 6 distinct chunks, each once.
    assert chunks.fetched == 6
    assert await view.read(len(data), 10) == b""
    await chunks.close()


async def test_read_ahead_grows_while_a_reader_streams_and_stops_on_a_seek(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    view, chunks, data = await a_view(net, executor, tmp_path)
    state = ReadState()
    size = net.config.chunk_size
    windows = []
    for index in range(8):
        assert await view.read(index * size, size, state) == data[index * size : (index + 1) * size]
        windows.append(state.window)
    assert windows == [2, 4, 8, 16, MAX_AHEAD, MAX_AHEAD, MAX_AHEAD, MAX_AHEAD]
    await asyncio.gather(*state.ahead, return_exceptions=True)
    assert chunks.fetched > 8, "chunks ahead of the reader were fetched"
    # A seek: the window falls back and what was ahead is dropped.
    await view.read(2 * size + 17, 10, state)
    assert state.window == 0 and not state.ahead
    await state.close()
    await chunks.close()


async def test_random_readers_read_nothing_ahead(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    view, chunks, data = await a_view(net, executor, tmp_path)
    state = ReadState()
    size = net.config.chunk_size
    for index in (30, 3, 17, 9):
        offset = index * size + 11
        assert await view.read(offset, 100, state) == data[offset : offset + 100]
    assert chunks.fetched == 4
    await chunks.close()


async def test_concurrent_readers_share_one_fetch_per_chunk(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    network, entry, data = await published(net, executor, tmp_path)
    chunks = chunks_of(network)
    views = [FileView(network, entry, chunks) for _ in range(4)]
    size = net.config.chunk_size
    results = await asyncio.gather(*(view.read(5 * size, 3 * size) for view in views))
    assert results == [data[5 * size : 8 * size]] * 4
    assert chunks.fetched == 3
    await chunks.close()


async def test_a_chunk_nobody_has_fails_its_read_not_the_others(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    network, entry, data = await published(net, executor, tmp_path)
    view = FileView(network, entry, chunks_of(network))
    await view.open()
    size = net.config.chunk_size
    # Lose chunk 2 everywhere (its id: read the index the open loaded).
    lost = (await view._index())[2].entry.chunk_id
    for node in net.nodes.values():
        node.drop(lost)
    with pytest.raises(ChunkUnavailableError, match=lost.hex()):
        await view.read(2 * size + 1, 10)
    assert await view.read(3 * size, 10) == data[3 * size : 3 * size + 10]


async def test_the_disk_cache_serves_a_second_mount_without_the_network(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    network, entry, data = await published(net, executor, tmp_path)
    cache = ChunkCache(tmp_path / "cache", 1 << 30).open()
    first = chunks_of(network, cache)
    assert await FileView(network, entry, first).read(0, 5000) == data[:5000]
    await first.close()  # waits for its cache writes
    reopened = ChunkCache(tmp_path / "cache", 1 << 30).open()
    assert len(reopened) == 2  # 5000 bytes are two 4 KiB chunks
    second = chunks_of(network, reopened)
    assert await FileView(network, entry, second).read(0, 5000) == data[:5000]
    assert second.fetched == 0 and second.from_disk == 2
    await second.close()
