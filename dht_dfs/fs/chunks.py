"""The chunks a mount reads: one fetch per chunk however many readers want it.

``PlainChunks.get(leaf)`` gives a data chunk's plaintext, from (in order)

1. a bounded in-memory LRU of decrypted chunks (``memory_bytes``),
2. the on-disk cache of verified ciphertext (``store.cache``), checked
   against its id again as it is read,
3. the network (``NetworkSource``: every holder in turn, hedged, each
   answer checked against the id), under a deadline of ``timeout`` seconds.

Concurrent asks for one chunk share one task, owned here (``close`` ends
them), and a reader that gives up does not cancel it for the others.

Read-ahead (``start_ahead``) is budgeted in bytes across all readers: the
chunks fetched ahead and not yet read stay in memory (never evicted for
other chunks) and together take at most half of ``memory_bytes``, so many
streaming readers or a publisher's 16 MiB chunks slow read-ahead down
instead of evicting what is about to be read. ``cancel_ahead`` (a seek, a
release) stops those fetches no reader waits for. A chunk
no holder can supply in time raises ``ChunkUnavailableError`` naming it:
the read that needed it fails (EIO), never with wrong bytes, and the next
read tries again.

Must not import: pyfuse3 (fuse.py is the only one that does), node.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterable
from concurrent.futures import Executor

from dht_dfs.core.crypto import decrypt_with_key
from dht_dfs.core.errors import ChunkUnavailableError, DhtfsError, ManifestError
from dht_dfs.core.ids import ChunkId
from dht_dfs.store.cache import ChunkCache
from dht_dfs.transfer.network import Network
from dht_dfs.transfer.ports import get_verified
from dht_dfs.transfer.retrieval import NetworkSource
from dht_dfs.transfer.walk import LeafChunk

log = logging.getLogger(__name__)


class PlainChunks:
    """Decrypted data chunks for the mount's reads (see the module docstring)."""

    def __init__(
        self,
        network: Network,
        cache: ChunkCache | None,
        *,
        memory_bytes: int,
        timeout: float,
    ) -> None:
        self._network = network
        self._source = NetworkSource(network)
        self._cache = cache
        self._executor: Executor = network.executor
        self._memory_bytes = memory_bytes
        self.timeout = timeout
        """Seconds any wait for the network may take (chunks, listings, indexes)."""
        self._plain: collections.OrderedDict[ChunkId, bytes] = collections.OrderedDict()
        self._plain_bytes = 0
        self._tasks: dict[ChunkId, asyncio.Task[bytes]] = {}
        self._waiters: dict[ChunkId, int] = {}
        """Readers (not read-ahead) waiting on each task."""
        self._ahead: dict[ChunkId, int] = {}
        """Chunks fetched (or being fetched) ahead and not read yet: their sizes."""
        self._ahead_bytes = 0
        self._ahead_budget = memory_bytes // 2
        self._closed = False
        self._writes: set[asyncio.Task[None]] = set()
        self.fetched = 0
        """Data chunks fetched from the network (not from a cache)."""
        self.bytes_fetched = 0
        self.from_disk = 0
        self.unavailable = 0

    def cached(self, chunk_id: ChunkId) -> bytes | None:
        plain = self._plain.get(chunk_id)
        if plain is not None:
            self._plain.move_to_end(chunk_id)
        return plain

    def _start(self, leaf: LeafChunk) -> asyncio.Task[bytes]:
        chunk_id = leaf.entry.chunk_id
        task = asyncio.create_task(self._load(leaf), name=f"dhtfs-mount-chunk-{chunk_id}")
        self._tasks[chunk_id] = task
        task.add_done_callback(lambda done: self._finished(chunk_id, done))
        return task

    def _finished(self, chunk_id: ChunkId, task: asyncio.Task[bytes]) -> None:
        if self._tasks.get(chunk_id) is task:
            del self._tasks[chunk_id]
        if task.cancelled() or task.exception() is not None:
            self._unmark(chunk_id)  # nothing to keep for a reader

    def _unmark(self, chunk_id: ChunkId) -> None:
        size = self._ahead.pop(chunk_id, None)
        if size is not None:
            self._ahead_bytes -= size

    async def get(self, leaf: LeafChunk) -> bytes:
        """The chunk's plaintext (see the module docstring); shared by concurrent askers."""
        chunk_id = leaf.entry.chunk_id
        self._unmark(chunk_id)  # read now: no longer held for a reader to come
        current = asyncio.current_task()
        for _ in range(3):
            plain = self.cached(chunk_id)
            if plain is not None:
                return plain
            if self._closed:
                raise ChunkUnavailableError(f"chunk {chunk_id.hex()}: the mount is closing")
            task = self._tasks.get(chunk_id) or self._start(leaf)
            self._waiters[chunk_id] = self._waiters.get(chunk_id, 0) + 1
            try:
                # Shielded: a reader giving up (a cancelled read) leaves the fetch to others.
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if current is not None and current.cancelling():
                    raise  # this reader was cancelled
                # A read-ahead fetch given up just before this reader came: fetch again.
            finally:
                left = self._waiters[chunk_id] - 1
                if left:
                    self._waiters[chunk_id] = left
                else:
                    del self._waiters[chunk_id]
        raise ChunkUnavailableError(f"chunk {chunk_id.hex()}: its fetch kept being cancelled")

    def start_ahead(self, leaf: LeafChunk) -> bool:
        """Fetch a chunk a reader will likely want; False once the read-ahead budget is spent."""
        chunk_id = leaf.entry.chunk_id
        if chunk_id in self._plain or chunk_id in self._tasks:
            return True
        size = leaf.entry.plain_size
        if self._closed or self._ahead_bytes + size > self._ahead_budget:
            return False
        self._ahead[chunk_id] = size
        self._ahead_bytes += size
        self._start(leaf)
        return True

    def cancel_ahead(self, chunk_ids: Iterable[ChunkId]) -> None:
        """Give up chunks fetched ahead for a reader that seeked or went away."""
        for chunk_id in chunk_ids:
            if chunk_id not in self._ahead:
                continue
            self._unmark(chunk_id)
            task = self._tasks.get(chunk_id)
            if task is not None and not self._waiters.get(chunk_id):
                task.cancel()

    async def _load(self, leaf: LeafChunk) -> bytes:
        chunk_id, size = leaf.entry.chunk_id, leaf.entry.stored_size
        loop = asyncio.get_running_loop()
        data: bytes | None = None
        if self._cache is not None:
            data = await loop.run_in_executor(self._executor, self._cache.get, chunk_id)
            if data is not None:
                self.from_disk += 1
        if data is None:
            try:
                async with asyncio.timeout(self.timeout):
                    # One copy out of the receive buffer, shared by decryption and the cache.
                    data = bytes(await get_verified(self._source, chunk_id, size))
            except TimeoutError:
                self.unavailable += 1
                raise ChunkUnavailableError(
                    f"chunk {chunk_id.hex()}: no holder answered within {self.timeout:g} s",
                    chunk_id.hex(),
                ) from None
            except DhtfsError as error:
                self.unavailable += 1
                raise ChunkUnavailableError(
                    f"chunk {chunk_id.hex()} is unavailable: {error}", chunk_id.hex()
                ) from None
            self.fetched += 1
            self.bytes_fetched += len(data)
            if self._cache is not None:
                self._keep_on_disk(chunk_id, data)
        plain = await loop.run_in_executor(
            self._executor, decrypt_with_key, data, leaf.key, chunk_id
        )
        if len(plain) != leaf.entry.plain_size:
            raise ManifestError(f"chunk {chunk_id.hex()} size disagrees with its manifest")
        self._remember(chunk_id, plain)
        return plain

    def _keep_on_disk(self, chunk_id: ChunkId, data: bytes) -> None:
        assert self._cache is not None
        cache = self._cache

        async def write() -> None:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, cache.put, chunk_id, data
            )

        task = asyncio.create_task(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def _remember(self, chunk_id: ChunkId, plain: bytes) -> None:
        if chunk_id in self._plain:
            return
        self._plain[chunk_id] = plain
        self._plain_bytes += len(plain)
        if self._plain_bytes <= self._memory_bytes:
            return
        # Least recently used first, but never a chunk fetched ahead and not
        # read yet (read-ahead is at most half the budget, so room remains).
        for old in list(self._plain):
            if self._plain_bytes <= self._memory_bytes:
                break
            if old in self._ahead or old == chunk_id:
                continue
            self._plain_bytes -= len(self._plain.pop(old))

    async def close(self) -> None:
        """End every fetch still running; let the cache writes finish (they are
        quick, and a chunk fetched is worth keeping for the next mount)."""
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._writes, return_exceptions=True)


__all__ = ["PlainChunks"]
