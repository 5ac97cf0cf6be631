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
from dht_dfs.core.errors import ChunkUnavailableError, DirectoryError
from dht_dfs.fs.chunks import PlainChunks
from dht_dfs.fs.files import MAX_AHEAD, FileView
from dht_dfs.fs.tree import Tree
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
    state = await view.open()
    size = net.config.chunk_size
    windows = []
    for index in range(8):
        assert await view.read(index * size, size, state) == data[index * size : (index + 1) * size]
        windows.append(state.window)
    # Nothing ahead of a first read (it may be the only one), then doubling.
    assert windows == [0, 2, 4, 8, 16, MAX_AHEAD, MAX_AHEAD, MAX_AHEAD]
    await asyncio.gather(*list(chunks._tasks.values()), return_exceptions=True)
    assert chunks.fetched > 8, "chunks ahead of the reader were fetched"
    # A seek: the window falls back and what was ahead is given up.
    await view.read(2 * size + 17, 10, state)
    assert state.window == 0 and not state.ahead
    await state.close()
    await chunks.close()


async def test_a_reader_that_stops_streaming_stops_the_fetches_ahead_of_it(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    view, chunks, _ = await a_view(net, executor, tmp_path)
    state = await view.open()
    size = net.config.chunk_size
    for index in range(5):
        await view.read(index * size, size, state)
    assert state.ahead and chunks._tasks, "read-ahead is under way"
    await state.close()  # released: nobody waits for the chunks ahead
    await asyncio.gather(*list(chunks._tasks.values()), return_exceptions=True)
    fetched = chunks.fetched
    assert fetched < CHUNKS
    assert not chunks._tasks and chunks._ahead_bytes == 0
    await chunks.close()


async def test_many_streaming_readers_never_fetch_a_chunk_twice(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    """Read-ahead is budgeted in bytes: it cannot evict what is about to be read."""
    network, entry, data = await published(net, executor, tmp_path)
    size = net.config.chunk_size
    chunks = PlainChunks(network, None, memory_bytes=12 * size, timeout=5.0)
    views = [FileView(network, entry, chunks) for _ in range(6)]

    async def stream(view: FileView, start: int) -> bytes:
        state = await view.open()
        pieces = []
        for index in range(CHUNKS):
            position = (start + index) % CHUNKS * size
            pieces.append(await view.read(position, size, state))
        await state.close()
        return b"".join(pieces)

    # Six readers, each starting at its own place, all streaming at once.
    starts = [0, 7, 14, 21, 28, 35]
    results = await asyncio.gather(*(stream(v, s) for v, s in zip(views, starts, strict=True)))
    for result, start in zip(results, starts, strict=True):
        rotated = data[start * size :] + data[: start * size]
        assert result[: len(data)] == rotated[: len(result)]
    # No more fetches than reads (readers far apart may each need a chunk in
    # turn from a small memory): read-ahead never evicts what it fetched.
    assert chunks.fetched <= 6 * CHUNKS
    await chunks.close()


async def test_random_readers_read_nothing_ahead(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    view, chunks, data = await a_view(net, executor, tmp_path)
    state = await view.open()
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


async def test_a_tree_with_more_entries_than_the_bound_fails_its_listing(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    """A published DAG can list one subtree under many names: numbering is bounded."""
    net.add(5)
    network = net.join(net.client(), executor).network
    tree_dir = tmp_path / "tree"
    tree_dir.mkdir()
    for index in range(10):
        (tree_dir / f"f{index}").write_bytes(b"x")
    reference = (await network.publish(tree_dir)).reference
    small = Tree(network, chunks_of(network), max_inodes=5)
    root = await small.mount(reference)
    with pytest.raises(DirectoryError, match="more than 5 entries"):
        await small.children(root)
    roomy = Tree(network, chunks_of(network))
    names = await roomy.children(await roomy.mount(reference))
    assert sorted(names) == sorted(f"f{index}".encode() for index in range(10))
    await small.close()
    await roomy.close()
