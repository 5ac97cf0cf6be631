"""Publish into and restore from a local chunk store: the data path without a network.

``StoreSink`` and ``StoreSource`` adapt a ``ChunkStore`` to the engines'
ports; ``publish_to_store`` and ``restore_from_store`` run a whole file
through them.

Must not import: dht, transport, node, or the network side of transfer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from dht_dfs.core.config import Config
from dht_dfs.core.crypto import SealedChunk
from dht_dfs.core.ids import ChunkId
from dht_dfs.core.refs import ReadReference
from dht_dfs.store.chunks import ChunkStore, PutOutcome
from dht_dfs.transfer.fetch import FetchResult, fetch_file
from dht_dfs.transfer.ports import Consume
from dht_dfs.transfer.publish import PublishResult, publish_file

T = TypeVar("T")


class StoreSink:
    """Publish into a local chunk store."""

    def __init__(self, store: ChunkStore, executor: Executor | None = None) -> None:
        self._store = store
        self._executor = executor
        self.stored = 0
        self.already_had = 0

    async def put(self, chunk: SealedChunk) -> None:
        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(
            self._executor, self._store.put, chunk.chunk_id, chunk.data
        )
        if outcome is PutOutcome.STORED:
            self.stored += 1
        else:
            self.already_had += 1

    async def flush(self) -> None:
        return None


class StoreSource:
    """Fetch from a local chunk store (verifies every read)."""

    def __init__(self, store: ChunkStore, executor: Executor | None = None) -> None:
        self._store = store
        self._executor = executor

    async def fetch(self, chunk_id: ChunkId, size_hint: int | None, consume: Consume[T]) -> T:
        def read_and_consume() -> T:
            # The store checks the hash on read (and drops a corrupt copy).
            return consume(self._store.get(chunk_id))

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, read_and_consume)

    async def prefetch(self, chunk_ids: Sequence[ChunkId]) -> None:
        return None


async def publish_to_store(
    path: Path, store: ChunkStore, config: Config, *, name: str | None = None
) -> PublishResult:
    """Publish a file into a local store: the data path without a network."""
    with ThreadPoolExecutor(config.workers, thread_name_prefix="dhtfs-io") as executor:
        return await publish_file(
            path, StoreSink(store, executor), config, executor=executor, name=name
        )


async def restore_from_store(
    reference: ReadReference,
    store: ChunkStore,
    config: Config,
    output: Path | None = None,
    *,
    overwrite: bool = False,
) -> FetchResult:
    """Restore a file from a local store by its read reference."""
    with ThreadPoolExecutor(config.workers, thread_name_prefix="dhtfs-io") as executor:
        return await fetch_file(
            reference,
            StoreSource(store, executor),
            config,
            executor=executor,
            output=output,
            overwrite=overwrite,
        )


__all__ = ["StoreSink", "StoreSource", "publish_to_store", "restore_from_store"]
