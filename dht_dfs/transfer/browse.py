"""Reading a tree without fetching it: resolve a path, list a directory, stream a file.

``resolve`` follows ``REF/a/b`` from a directory's root through its nodes
(descending interior nodes by name range, each child checked against its
parent's branch before anything below it is read) and answers with the
entry found. ``list_directory`` yields a directory's entries in name order,
one node held per level. Neither fetches a single file chunk: what a
listing shows (kind, size, mode, mtime) is in the directory nodes
(property 16). Only a file reference named by itself costs its root
manifest, to show that file's own entry.

``stream_file`` yields a file's plaintext in order, chunk by chunk, with
at most ``transfer_window`` chunks fetched ahead; each chunk is checked
against its id and decrypted before it is yielded, so a caller writing to
a pipe holds at most a window of chunks whatever the file's size.

Must not import: dht, transport, node, or the network side of transfer.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

from dht_dfs.core.config import Config
from dht_dfs.core.crypto import open_chunk
from dht_dfs.core.direntry import DirEntry, EntryKind, name_problem
from dht_dfs.core.dirnode import (
    OpenedDirNode,
    check_child,
    child_for,
    decode_dir_node,
    decode_root,
    find_entry,
    open_dir_node,
)
from dht_dfs.core.errors import DirectoryError, InputError, ManifestError, PathNotFoundError
from dht_dfs.core.ids import ChunkId
from dht_dfs.core.manifest import ManifestNode
from dht_dfs.core.refs import ReadReference
from dht_dfs.transfer.ports import ChunkSource, Consume, get_verified
from dht_dfs.transfer.walk import LeafChunk, open_root, walk_leaves

T = TypeVar("T")

ROOT_NAME = "(root)"
"""The name shown for a directory's root (a root has no name of its own)."""


@dataclass(frozen=True, slots=True)
class Resolved:
    """What ``REF/PATH`` names: an entry, and the path that led to it."""

    entry: DirEntry
    """For a root named by itself: a directory entry named ROOT_NAME, or the file's own."""
    path: tuple[str, ...]


def split_path(text: str) -> tuple[str, tuple[str, ...]]:
    """``REF/a/b`` -> (``REF``, ("a", "b")); empty steps and "." are dropped, ".." refused."""
    reference, _, rest = text.partition("/")
    steps = tuple(step for step in rest.split("/") if step not in ("", "."))
    if ".." in steps:
        raise InputError(f"{text}: '..' is not allowed in a path inside a tree")
    return reference, steps


class CachingSource:
    """A ``ChunkSource`` that keeps what it fetched, up to a byte bound, least recent out."""

    def __init__(self, source: ChunkSource, limit: int) -> None:
        self._source = source
        self._limit = limit
        self._held = 0
        self._chunks: collections.OrderedDict[ChunkId, bytes] = collections.OrderedDict()

    async def fetch(self, chunk_id: ChunkId, size_hint: int | None, consume: Consume[T]) -> T:
        data = self._chunks.get(chunk_id)
        if data is not None:
            self._chunks.move_to_end(chunk_id)
            return consume(data)
        kept: list[bytes] = []

        def keep(raw: bytes | bytearray) -> T:
            result = consume(raw)  # it checks the id: only a good copy is kept
            kept.append(bytes(raw))
            return result

        result = await self._source.fetch(chunk_id, size_hint, keep)
        if kept and len(kept[0]) <= self._limit:
            self._chunks[chunk_id] = kept[0]
            self._held += len(kept[0])
            while self._held > self._limit:
                _, dropped = self._chunks.popitem(last=False)
                self._held -= len(dropped)
        return result

    async def prefetch(self, chunk_ids: Sequence[ChunkId]) -> None:
        await self._source.prefetch(chunk_ids)


async def _fetch_dir_node(
    source: ChunkSource,
    reference: ReadReference,
    stored_size: int,
    executor: Executor,
) -> OpenedDirNode:
    loop = asyncio.get_running_loop()
    data = bytes(await get_verified(source, reference.root, stored_size or None))
    node = await loop.run_in_executor(executor, decode_dir_node, reference.root, data)
    return await loop.run_in_executor(executor, open_dir_node, node, reference.key)


async def _open_any_root(
    source: ChunkSource, reference: ReadReference, executor: Executor
) -> OpenedDirNode | ManifestNode:
    loop = asyncio.get_running_loop()
    data = bytes(await get_verified(source, reference.root, None))
    node = await loop.run_in_executor(executor, decode_root, reference.root, data)
    if isinstance(node, ManifestNode):
        return node
    return await loop.run_in_executor(executor, open_dir_node, node, reference.key)


async def _find(
    source: ChunkSource, root: OpenedDirNode, name: str, executor: Executor
) -> DirEntry | None:
    """The entry named ``name`` in the directory whose root is ``root``."""
    node = root
    while not node.node.is_leaf:
        branch = child_for(node, name)
        if branch is None:
            return None
        child = await _fetch_dir_node(source, branch.reference, branch.stored_size, executor)
        check_child(node, branch, child)
        node = child
    return find_entry(node, name)


async def resolve(
    source: ChunkSource, reference: ReadReference, path: Sequence[str], executor: Executor
) -> Resolved:
    """The entry ``path`` names below ``reference`` (a file's or a directory's root).

    Raises PathNotFoundError naming the first missing step, or the first
    step that is not a directory.
    """
    opened = await _open_any_root(source, reference, executor)
    if isinstance(opened, ManifestNode):
        if path:
            raise PathNotFoundError(f"{reference} is a file: it has no {path[0]!r} inside it")
        file_root = await open_root(source, reference, executor)
        metadata = file_root.metadata
        assert metadata is not None
        # A file's own name is the publisher's to choose: one a directory could
        # not hold ("a/b", "..") stands as "-", as an empty one does.
        name = metadata.name
        if not name or name_problem(name.encode("utf-8", "surrogateescape")) is not None:
            name = "-"
        entry = DirEntry.file(
            name, reference, metadata.size, opened.stored_size, mode=metadata.mode & 0o777
        )
        return Resolved(entry, ())
    totals = opened.totals
    assert totals is not None
    entry = DirEntry(ROOT_NAME, EntryKind.DIRECTORY, totals.total_size, 0o755, 0, reference)
    for depth, step in enumerate(path):
        if entry.kind is not EntryKind.DIRECTORY:
            where = "/".join(path[:depth])
            raise PathNotFoundError(f"{where} is a {entry.kind.value}, not a directory")
        if depth:
            assert entry.reference is not None
            opened = await _fetch_dir_node(source, entry.reference, entry.stored_size, executor)
            if not opened.node.is_root:
                raise DirectoryError(f"directory node {opened.node.chunk_id.hex()} is no root")
        found = await _find(source, opened, step, executor)
        if found is None:
            raise PathNotFoundError(f"no {'/'.join(path[: depth + 1])!r} in this tree")
        entry = found
    return Resolved(entry, tuple(path))


async def list_directory(
    source: ChunkSource, entry: DirEntry, executor: Executor
) -> AsyncIterator[DirEntry]:
    """A directory's entries in name order; one node held per level."""
    if entry.kind is not EntryKind.DIRECTORY or entry.reference is None:
        raise ValueError("list_directory takes a directory entry")
    root = await _fetch_dir_node(source, entry.reference, entry.stored_size, executor)
    if not root.node.is_root:
        raise DirectoryError(f"directory node {root.node.chunk_id.hex()} is no root")
    stack: list[tuple[OpenedDirNode, int]] = [(root, 0)]
    while stack:
        node, position = stack.pop()
        if node.node.is_leaf:
            for item in node.entries:
                yield item
            continue
        if position == len(node.branches):
            continue
        stack.append((node, position + 1))
        branch = node.branches[position]
        child = await _fetch_dir_node(source, branch.reference, branch.stored_size, executor)
        check_child(node, branch, child)
        stack.append((child, 0))


async def file_leaves(
    source: ChunkSource, entry: DirEntry, executor: Executor
) -> AsyncIterator[LeafChunk]:
    """A file entry's data chunks in order, checked against the size its directory
    declared: the manifest must say the same size, and its chunks must follow
    each other without a gap and cover it exactly (checked as they come, so a
    caller that stops early has read only what it used)."""
    assert entry.reference is not None
    root = await open_root(source, entry.reference, executor)
    metadata = root.metadata
    assert metadata is not None
    if metadata.size != entry.size:
        raise ManifestError(
            f"{entry.name}: its directory says {entry.size} bytes, its manifest {metadata.size}"
        )
    offset = 0
    async for leaf in walk_leaves(source, root, executor):
        if leaf.offset != offset:
            raise ManifestError(f"manifest of {entry.name} does not add up to its size")
        offset += leaf.entry.plain_size
        if offset > entry.size:
            raise ManifestError(f"manifest of {entry.name} lists more than its size")
        yield leaf
    if offset != entry.size:
        raise ManifestError(f"manifest of {entry.name} covers {offset} of {entry.size} bytes")


async def stream_file(
    source: ChunkSource,
    entry: DirEntry,
    config: Config,
    executor: Executor,
    *,
    start: int = 0,
    stop: int | None = None,
) -> AsyncGenerator[bytes, None]:
    """A file's plaintext in order, each chunk verified, ``transfer_window`` ahead at most.

    ``start``/``stop``: only bytes [start, stop) (an HTTP range): chunks wholly
    outside it are not fetched (the manifest nodes above them still are).
    """
    if entry.kind is not EntryKind.FILE:
        raise InputError(f"{entry.name} is a {entry.kind.value}, not a file")
    stop = entry.size if stop is None else min(stop, entry.size)
    if entry.inline is not None:
        if start < stop:
            yield entry.inline[start:stop]
        return
    if start >= stop:
        return
    loop = asyncio.get_running_loop()

    async def fetch_one(leaf: LeafChunk) -> bytes:
        data = bytes(await get_verified(source, leaf.entry.chunk_id, leaf.entry.stored_size))
        plain = await loop.run_in_executor(
            executor, open_chunk, leaf.entry.chunk_id, leaf.key, data
        )
        if len(plain) != leaf.entry.plain_size:
            raise ManifestError(
                f"chunk {leaf.entry.chunk_id.hex()} size disagrees with its manifest"
            )
        if leaf.offset < start or leaf.offset + len(plain) > stop:
            return plain[max(0, start - leaf.offset) : stop - leaf.offset]
        return plain

    ahead: collections.deque[asyncio.Task[bytes]] = collections.deque()
    try:
        async for leaf in file_leaves(source, entry, executor):
            end = leaf.offset + leaf.entry.plain_size
            if end <= start:
                continue  # before the range: not fetched
            ahead.append(asyncio.ensure_future(fetch_one(leaf)))
            if len(ahead) >= config.transfer_window:
                yield await ahead.popleft()
            if end >= stop:
                break  # the range is covered
        while ahead:
            yield await ahead.popleft()
    finally:
        # The caller may stop early (a closed pipe): no fetch outlives it.
        for task in ahead:
            task.cancel()
        await asyncio.gather(*ahead, return_exceptions=True)


__all__ = [
    "CachingSource",
    "PathNotFoundError",
    "Resolved",
    "file_leaves",
    "list_directory",
    "resolve",
    "split_path",
    "stream_file",
]
