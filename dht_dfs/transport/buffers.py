"""Chunk bodies on their way out (an open file) and in (recycled buffers, budget).

Must not import: asyncio or anything of dht_dfs but core.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FileBody:
    """A stored chunk to serve from disk: an open descriptor and its size.

    The transport closes the descriptor when it is done.
    """

    fd: int
    size: int


@dataclass(frozen=True, slots=True)
class LazyFileBody:
    """A stored chunk that is opened only when the connection can send it.

    A GET handler returns this at once; the transport calls ``open`` after
    it has waited for its turn and for room in the socket, so a peer that
    queues requests and stops reading holds no descriptor but the one being
    sent. ``open`` returns None if the chunk went away meanwhile.
    """

    open: Callable[[], FileBody | None]


ChunkBody = bytes | FileBody | LazyFileBody


def close_body(body: ChunkBody) -> None:
    """Release what a body holds (the descriptor of an open file)."""
    if isinstance(body, FileBody):
        os.close(body.fd)


class BodyBudget:
    """Bytes of incoming chunk bodies a node holds at once, per node and per peer.

    A connection reserves a body's length when its (authenticated) header
    arrives and before any buffer exists, and releases it once the body is
    handled. When a reservation does not fit, the connection registers a
    waiter and stops reading; ``release`` wakes waiters in arrival order.
    A body is never larger than either bound (``Config.validate``), so every
    waiter is eventually served. Used from the event loop thread only.
    """

    def __init__(self, total: int, per_peer: int) -> None:
        self.total = total
        self.per_peer = per_peer
        self.reserved = 0
        self.peak = 0
        self._by_peer: dict[Hashable, int] = {}
        self._waiters: OrderedDict[object, Callable[[], None]] = OrderedDict()

    def reserved_by(self, peer: Hashable) -> int:
        return self._by_peer.get(peer, 0)

    def try_reserve(self, peer: Hashable, size: int) -> bool:
        held = self._by_peer.get(peer, 0)
        if self.reserved + size > self.total or held + size > self.per_peer:
            return False
        self.reserved += size
        self.peak = max(self.peak, self.reserved)
        self._by_peer[peer] = held + size
        return True

    def release(self, peer: Hashable, size: int) -> None:
        held = self._by_peer.get(peer, 0)
        size = min(size, held)
        if size <= 0:
            return
        self.reserved -= size
        if held == size:
            del self._by_peer[peer]
        else:
            self._by_peer[peer] = held - size
        for wake in list(self._waiters.values()):
            wake()

    def wait(self, key: object, wake: Callable[[], None]) -> None:
        """Call ``wake`` after the next release (until ``cancel_wait``)."""
        self._waiters[key] = wake

    def cancel_wait(self, key: object) -> None:
        self._waiters.pop(key, None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)


class BufferPool:
    """Recycled buffers for chunk bodies of the most common size.

    Allocating a fresh 1 MiB bytearray per received chunk zeroes it and, on
    this project's VM, takes page faults on memory the allocator just gave
    back: 14% of the event loop's time in a profiled fetch. A consumer that
    is done with a body may ``give_back`` it; bodies never given back are
    simply garbage-collected. Used from the event loop thread only.
    """

    def __init__(self, keep: int = 32) -> None:
        self._keep = keep
        self._free: dict[int, list[bytearray]] = {}
        self.reused = 0

    def take(self, size: int) -> bytearray:
        free = self._free.get(size)
        if free:
            self.reused += 1
            return free.pop()
        return bytearray(size)

    def give_back(self, buffer: bytes | bytearray) -> None:
        if not isinstance(buffer, bytearray) or len(buffer) < 64 * 1024:
            return
        free = self._free.setdefault(len(buffer), [])
        if len(free) < self._keep:
            free.append(buffer)
        # Keep only one size class: chunk sizes rarely vary within a transfer.
        if len(self._free) > 1:
            self._free = {len(buffer): free}


def read_chunk(body: FileBody | LazyFileBody) -> bytes | None:
    """Open (if lazy), read and close a chunk file: runs in a thread that owns the fd."""
    opened = body if isinstance(body, FileBody) else body.open()
    if opened is None:
        return None
    try:
        return os.pread(opened.fd, opened.size, 0)
    finally:
        close_body(opened)
