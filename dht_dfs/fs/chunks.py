"""The chunks a mount reads: one fetch per chunk however many readers want it.

``PlainChunks.get(leaf)`` gives a data chunk's plaintext, from (in order)

1. a bounded in-memory LRU of decrypted chunks (``memory_bytes``),
2. the on-disk cache of verified ciphertext (``store.cache``), checked
   against its id again as it is read,
3. the network (``NetworkSource``: every holder in turn, hedged, each
   answer checked against the id), under a deadline of ``timeout`` seconds.

Concurrent asks for one chunk share one task, owned here (``close`` ends
them), and a reader that gives up does not cancel it for the others. A chunk
no holder can supply in time raises ``ChunkUnavailableError`` naming it:
the read that needed it fails (EIO), never with wrong bytes, and the next
read tries again.

Must not import: pyfuse3 (fuse.py is the only one that does), node.
"""

from __future__ import annotations

import asyncio
import collections
import logging
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
        self._timeout = timeout
        self._plain: collections.OrderedDict[ChunkId, bytes] = collections.OrderedDict()
        self._plain_bytes = 0
        self._tasks: dict[ChunkId, asyncio.Task[bytes]] = {}
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

    async def get(self, leaf: LeafChunk) -> bytes:
        """The chunk's plaintext (see the module docstring); shared by concurrent askers."""
        chunk_id = leaf.entry.chunk_id
        plain = self.cached(chunk_id)
        if plain is not None:
            return plain
        task = self._tasks.get(chunk_id)
        if task is None:
            task = asyncio.create_task(self._load(leaf), name=f"dhtfs-mount-chunk-{chunk_id}")
            self._tasks[chunk_id] = task
            task.add_done_callback(lambda _: self._tasks.pop(chunk_id, None))
        # Shielded: one reader giving up (a cancelled read) leaves the fetch to the others.
        return await asyncio.shield(task)

    async def _load(self, leaf: LeafChunk) -> bytes:
        chunk_id, size = leaf.entry.chunk_id, leaf.entry.stored_size
        loop = asyncio.get_running_loop()
        data: bytes | bytearray | None = None
        if self._cache is not None:
            data = await loop.run_in_executor(self._executor, self._cache.get, chunk_id)
            if data is not None:
                self.from_disk += 1
        if data is None:
            try:
                async with asyncio.timeout(self._timeout):
                    data = await get_verified(self._source, chunk_id, size)
            except TimeoutError:
                self.unavailable += 1
                raise ChunkUnavailableError(
                    f"chunk {chunk_id.hex()}: no holder answered within {self._timeout:g} s",
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
                self._keep_on_disk(chunk_id, bytes(data))
        plain = await loop.run_in_executor(
            self._executor, decrypt_with_key, bytes(data), leaf.key, chunk_id
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
        while self._plain_bytes > self._memory_bytes and len(self._plain) > 1:
            _, dropped = self._plain.popitem(last=False)
            self._plain_bytes -= len(dropped)

    async def close(self) -> None:
        """End every fetch still running; let the cache writes finish (they are
        quick, and a chunk fetched is worth keeping for the next mount)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._writes, return_exceptions=True)


__all__ = ["PlainChunks"]
