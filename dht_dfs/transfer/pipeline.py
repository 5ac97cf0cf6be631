"""The bounded pipeline pieces the publish and fetch engines share.

``ordered_map`` runs a function over items in worker threads, a fixed number
at a time, and yields results in order; ``InOrderHasher`` hashes a stream in
a thread of its own without reordering it. Both bound memory by a window,
not by the file's size.

Must not import: dht, transport, node, or any other transfer module.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TypeVar

from dht_dfs.core.errors import DhtfsError

T = TypeVar("T")
R = TypeVar("R")

ProgressFn = Callable[[int, int], None]
"""Called with (bytes done, bytes total) as work advances."""


async def ordered_map(
    func: Callable[[T], R],
    items: Iterable[T],
    *,
    concurrency: int,
    executor: Executor,
) -> AsyncIterator[R]:
    """Run ``func`` over ``items`` in threads, ``concurrency`` at a time, in order."""
    loop = asyncio.get_running_loop()
    pending: deque[asyncio.Future[R]] = deque()
    iterator = iter(items)
    try:
        for item in iterator:
            pending.append(loop.run_in_executor(executor, func, item))
            if len(pending) >= concurrency:
                yield await pending.popleft()
        while pending:
            yield await pending.popleft()
    finally:
        for future in pending:
            future.cancel()


class InOrderHasher:
    """SHA-256 of a stream whose pieces arrive in order, hashed in a thread.

    A single-thread executor keeps updates in submission order; at most
    ``backlog`` pieces wait, so memory stays bounded. Many hashers may share
    one (``ordered``: a tree publish hashes all its files on one thread
    rather than start and stop a thread per file); it must have one worker.
    """

    def __init__(self, backlog: int, ordered: ThreadPoolExecutor | None = None) -> None:
        self._hash = hashlib.sha256()
        self._own = ordered is None
        self._executor = ordered or ThreadPoolExecutor(1, thread_name_prefix="dhtfs-hash")
        self._pending: deque[asyncio.Future[None]] = deque()
        self._backlog = backlog

    async def update(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._pending.append(loop.run_in_executor(self._executor, self._hash.update, data))
        while len(self._pending) > self._backlog:
            await self._pending.popleft()

    async def digest(self) -> bytes:
        while self._pending:
            await self._pending.popleft()
        return self._hash.digest()

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        if self._own:
            self._executor.shutdown(wait=False, cancel_futures=True)


def first_error(group: BaseExceptionGroup[DhtfsError]) -> DhtfsError:
    """The first error of a task group, to report as one line."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, DhtfsError)
    return error


__all__ = ["InOrderHasher", "ProgressFn", "first_error", "ordered_map"]
