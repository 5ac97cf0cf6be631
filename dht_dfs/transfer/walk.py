"""Walking a file's manifest tree: its root, its data chunks, all its chunk ids.

Manifest nodes are fetched from a ``ChunkSource`` as they are reached, one
held per level, so memory is bounded by the tree's depth, not the file's
size. With a read key the walk yields each data chunk with its offset and
key (``walk_leaves``); without one, only the public part is read
(``walk_public``): enough to check, repair or pin a file.

Both walks check every node against the shape the root's public part
declares (``TreeShape``: the file's size, chunk size and fanout) as soon as
it is read and before any child is fetched, so a hostile tree that lists
more chunks or bytes than its size, or a lopsided or deeper tree, stops at
once with a ManifestError. The work of ``walk_leaves`` is then bounded by
the declared size, which a fetch checks against free space first;
``walk_public`` also skips a manifest subtree it has walked before (a
repeated subtree holds the same chunks), so its work is bounded by the
manifest bytes actually stored, not by a size anyone can declare.

Must not import: dht, transport, node, or the network side of transfer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from dht_dfs.core.dirnode import MAGIC as DIR_MAGIC
from dht_dfs.core.dirnode import decode_dir_node, decode_root
from dht_dfs.core.errors import ChunkNotFoundError, DirectoryError, ManifestError
from dht_dfs.core.ids import ChunkId
from dht_dfs.core.manifest import (
    Entry,
    ManifestNode,
    NodeKind,
    OpenedNode,
    check_node_shape,
    decode_node,
    open_node,
)
from dht_dfs.core.refs import ReadReference, RootHash
from dht_dfs.transfer.ports import ChunkSource, get_verified


@dataclass(frozen=True, slots=True)
class LeafChunk:
    """One data chunk of a file, where it goes, and how to open it."""

    index: int
    offset: int
    entry: Entry
    key: bytes


async def _read_node(
    source: ChunkSource, chunk_id: ChunkId, size: int | None, executor: Executor
) -> ManifestNode:
    """Fetch, check and parse one manifest node (public part only)."""
    data = bytes(await get_verified(source, chunk_id, size))
    if size is not None and len(data) != size:
        raise ManifestError(
            f"manifest chunk {chunk_id.hex()} has {len(data)} bytes, its parent says {size}"
        )
    node = await asyncio.get_running_loop().run_in_executor(executor, decode_node, chunk_id, data)
    if node.is_root != (size is None):
        where = "is a manifest node but not a root" if size is None else "is a root inside a tree"
        raise ManifestError(f"manifest chunk {chunk_id.hex()} {where}")
    return node


async def open_root(
    source: ChunkSource, reference: ReadReference, executor: Executor
) -> OpenedNode:
    node = await _read_node(source, reference.root, None, executor)
    return await asyncio.get_running_loop().run_in_executor(
        executor, open_node, node, reference.key
    )


async def _walk(
    source: ChunkSource,
    root: ManifestNode,
    keys: tuple[bytes, ...] | None,
    executor: Executor,
    *,
    prefetch: bool,
    skip_repeats: bool = False,
) -> AsyncIterator[tuple[Entry, bytes | None, bool]]:
    """Every entry below ``root``, depth first in file order: (entry, key, is manifest).

    Without ``keys`` (no read key) only public parts are read and each key
    is None. Manifest nodes are fetched as they are reached and one node is
    held per level, so memory is bounded by the depth. With ``prefetch`` the
    source hears of each leaf's chunks as the leaf is reached, after the
    leaf has passed the shape check. With ``skip_repeats`` a manifest node
    met before is yielded but not descended into again (memory: one id per
    distinct manifest node, ~1/fanout of the file's chunks).
    """
    loop = asyncio.get_running_loop()
    shape = root.shape
    if shape is None:
        raise ManifestError(f"manifest chunk {root.chunk_id.hex()} is not a root")
    if prefetch and root.kind == NodeKind.LEAF:
        await source.prefetch([entry.chunk_id for entry in root.entries])
    seen: set[ChunkId] = set()
    # Frames: node, its keys, next position, its height, its first data chunk.
    stack: list[tuple[ManifestNode, tuple[bytes, ...] | None, int, int, int]] = [
        (root, keys, 0, shape.height, 0)
    ]
    while stack:
        node, node_keys, position, height, first_leaf = stack[-1]
        if position == len(node.entries):
            stack.pop()
            continue
        stack[-1] = (node, node_keys, position + 1, height, first_leaf)
        entry = node.entries[position]
        key = None if node_keys is None else node_keys[position]
        if node.kind == NodeKind.LEAF:
            yield entry, key, False
            continue
        if skip_repeats and entry.chunk_id in seen:
            yield entry, key, True
            continue
        child = await _read_node(source, entry.chunk_id, entry.stored_size, executor)
        child_first = first_leaf + position * shape.leaves_under(height - 1)
        check_node_shape(child, shape, height - 1, child_first)
        if skip_repeats:
            seen.add(entry.chunk_id)
        yield entry, key, True
        if prefetch and child.kind == NodeKind.LEAF:
            await source.prefetch([leaf.chunk_id for leaf in child.entries])
        child_keys = None
        if key is not None:
            child_keys = (await loop.run_in_executor(executor, open_node, child, key)).keys
        stack.append((child, child_keys, 0, height - 1, child_first))


async def walk_leaves(
    source: ChunkSource, root: OpenedNode, executor: Executor
) -> AsyncIterator[LeafChunk]:
    """Every data chunk of the file in order, with its offset and key."""
    index = offset = 0
    async for entry, key, is_manifest in _walk(
        source, root.node, root.keys, executor, prefetch=True
    ):
        if is_manifest:
            continue
        assert key is not None
        yield LeafChunk(index, offset, entry, key)
        index += 1
        offset += entry.plain_size


async def walk_public(
    source: ChunkSource,
    root: RootHash,
    executor: Executor,
    *,
    on_missing: Callable[[ChunkNotFoundError], None] | None = None,
) -> AsyncIterator[tuple[ChunkId, int, bool]]:
    """Every chunk of a file or directory tree without its key: (id, stored size, is node).

    Dispatches on the root's magic. Manifest and directory nodes come
    before their children, and a subtree met before (its chunks were just
    yielded) is listed by its id alone or, for a whole file or directory
    seen twice, not again. Enough to check, repair or pin a file or tree.
    Memory: the ids of the nodes walked, and one node's children per level.
    """
    loop = asyncio.get_running_loop()
    seen: set[ChunkId] = set()
    # Frames: a chunk id, its stored size (None: unknown), and what it must
    # be: a root (of a file or directory) or a directory node of that height.
    pending: list[tuple[ChunkId, int | None, int | None]] = [(root.root, None, None)]
    while pending:
        chunk_id, size, height = pending.pop()
        if chunk_id in seen:
            continue
        seen.add(chunk_id)
        try:
            data = bytes(await get_verified(source, chunk_id, size))
        except ChunkNotFoundError as error:
            if on_missing is None or chunk_id == root.root:
                raise
            on_missing(error)
            continue
        if size is not None and len(data) != size:
            raise ManifestError(
                f"chunk {chunk_id.hex()} has {len(data)} bytes, its parent says {size}"
            )
        if height is None and not data.startswith(DIR_MAGIC):
            node = await loop.run_in_executor(executor, decode_root, chunk_id, data)
            assert isinstance(node, ManifestNode)
            yield chunk_id, node.stored_size, True
            try:
                async for entry, _, is_manifest in _walk(
                    source, node, None, executor, prefetch=False, skip_repeats=True
                ):
                    yield entry.chunk_id, entry.stored_size, is_manifest
            except ChunkNotFoundError as error:
                if on_missing is None:
                    raise
                on_missing(error)
            continue
        directory = await loop.run_in_executor(executor, decode_dir_node, chunk_id, data)
        if directory.is_root != (height is None):
            where = "is a root inside a directory tree" if height is not None else "is no root"
            raise DirectoryError(f"directory node {chunk_id.hex()} {where}")
        if height is not None and directory.height != height:
            raise DirectoryError(
                f"directory node {chunk_id.hex()} has height {directory.height}, "
                f"its parent says {height}"
            )
        yield chunk_id, directory.stored_size, True
        below = None if directory.is_leaf else directory.height - 1
        for child in reversed(directory.children):
            pending.append((child.chunk_id, child.stored_size or None, below))


__all__ = ["LeafChunk", "open_root", "walk_leaves", "walk_public"]
