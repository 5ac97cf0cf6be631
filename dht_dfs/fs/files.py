"""Reading a published file at any offset: its chunk index, reads, read-ahead.

A ``FileView`` is one file of the mount. Its chunk index (each data chunk's
offset, id and key) comes from the file's manifest nodes when the file is
first opened, never from a data chunk, and is checked to add up to the size
the directory declared. A read fetches exactly the chunks it overlaps, all
at once, and returns their bytes in order.

Read-ahead is per open file (``ReadState``): a read that starts where the
last one ended doubles the window of chunks fetched ahead of it (up to
``MAX_AHEAD``); any other read is a seek, and the window falls back to one
chunk, so random readers pay for nothing they do not read. The chunks ahead
go through the same shared fetches as reads (``PlainChunks``), so two
readers streaming one file fetch each chunk once.

Must not import: pyfuse3, node.
"""

from __future__ import annotations

import asyncio
import bisect
import logging

from dht_dfs.core.direntry import DirEntry, EntryKind
from dht_dfs.core.errors import ManifestError
from dht_dfs.core.ids import ChunkId
from dht_dfs.fs.chunks import PlainChunks
from dht_dfs.transfer.browse import file_leaves
from dht_dfs.transfer.network import Network
from dht_dfs.transfer.retrieval import NetworkSource
from dht_dfs.transfer.walk import LeafChunk

log = logging.getLogger(__name__)

MAX_AHEAD = 32
"""Chunks a streaming reader has fetched ahead of it at most (32 MiB of 1 MiB chunks)."""


class ReadState:
    """One open file's position and read-ahead window, and the chunks it has ahead."""

    def __init__(self, chunks: PlainChunks) -> None:
        self._chunks = chunks
        self.next_offset = -1
        self.window = 0
        self.ahead: set[ChunkId] = set()

    def advance(self, offset: int, size: int) -> int:
        """Record a read; how many chunks to have fetched ahead of it."""
        if offset == self.next_offset:
            self.window = min(MAX_AHEAD, max(2, self.window * 2))
        else:
            # A first read or a seek: nothing ahead until it streams again
            # (``head -c 4096`` fetches one chunk, not three).
            self.window = 0
            self.cancel()
        self.next_offset = offset + size
        return self.window

    def cancel(self) -> None:
        self._chunks.cancel_ahead(self.ahead)
        self.ahead.clear()

    async def close(self) -> None:
        self.cancel()


class FileView:
    """One file of the mount (see the module docstring)."""

    def __init__(self, network: Network, entry: DirEntry, chunks: PlainChunks) -> None:
        if entry.kind is not EntryKind.FILE:
            raise ValueError("a FileView is of a file")
        self._network = network
        self.entry = entry
        self._chunks = chunks
        self._leaves: list[LeafChunk] | None = None
        self._offsets: list[int] = []
        self._loading = asyncio.Lock()

    @property
    def size(self) -> int:
        return self.entry.size

    async def _index(self) -> list[LeafChunk]:
        if self._leaves is not None:
            return self._leaves
        async with self._loading:
            if self._leaves is None:
                try:
                    async with asyncio.timeout(self._chunks.timeout):
                        self._leaves = await self._load_index()
                except TimeoutError:
                    raise ManifestError(
                        f"{self.entry.name}: its manifest did not come within "
                        f"{self._chunks.timeout:g} s"
                    ) from None
                self._offsets = [leaf.offset for leaf in self._leaves]
        return self._leaves

    async def _load_index(self) -> list[LeafChunk]:
        source = NetworkSource(self._network)
        leaves: list[LeafChunk] = []
        async for leaf in file_leaves(source, self.entry, self._network.executor):
            if leaf.entry.plain_size <= 0:  # an empty chunk would make offsets ambiguous
                raise ManifestError(f"manifest of {self.entry.name} lists an empty chunk")
            leaves.append(leaf)
        return leaves

    async def open(self) -> ReadState:
        """Read the chunk index now (an unreadable manifest fails the open, not a
        read); the new open file's read state."""
        if self.entry.inline is None:
            await self._index()
        return ReadState(self._chunks)

    async def read(self, offset: int, size: int, state: ReadState | None = None) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer only at the end of the file)."""
        end = min(offset + size, self.entry.size)
        if offset >= end:
            return b""
        if self.entry.inline is not None:
            return self.entry.inline[offset:end]
        leaves = await self._index()
        first = bisect.bisect_right(self._offsets, offset) - 1
        last = bisect.bisect_right(self._offsets, end - 1) - 1
        wanted = leaves[first : last + 1]
        if state is not None:
            state.ahead.difference_update(leaf.entry.chunk_id for leaf in wanted)
            self._read_ahead(state, state.advance(offset, end - offset), leaves, last)
        if len(wanted) == 1:
            plain = await self._chunks.get(wanted[0])
            start = offset - wanted[0].offset
            return plain[start : start + end - offset]
        pieces = await asyncio.gather(*(self._chunks.get(leaf) for leaf in wanted))
        joined = b"".join(pieces)
        start = offset - wanted[0].offset
        return joined[start : start + end - offset]

    def _read_ahead(
        self, state: ReadState, window: int, leaves: list[LeafChunk], last: int
    ) -> None:
        for leaf in leaves[last + 1 : last + 1 + window]:
            chunk_id = leaf.entry.chunk_id
            if chunk_id in state.ahead:
                continue
            if not self._chunks.start_ahead(leaf):
                break  # the read-ahead budget is spent: what is ahead is enough
            state.ahead.add(chunk_id)


__all__ = ["MAX_AHEAD", "FileView", "ReadState"]
