"""A bounded on-disk cache of chunks a reader fetched (the mount's read cache).

Layout under the cache directory::

    ab/abcdef…(64 hex)   one file per chunk: its stored (encrypted) bytes

Ciphertext, not plaintext: a cached chunk is no more readable than the
network's copy (it needs the key from a manifest), and it can be checked
against its id whenever it is read, so a rotten or planted file is dropped,
never served. Least recently used chunks go first once ``max_bytes`` is
exceeded. The recency order lives in memory; at open it is rebuilt from
the files' modification times, which ``get`` refreshes, so the cache and its
order survive across mounts. Several processes may share one directory
(files appear whole, by rename); each bounds what it sees.

Not a ``ChunkStore``: nothing here is durable or leased, nothing is
announced, and losing the whole directory loses nothing.

Blocking (file I/O): async callers run these methods in a thread. Thread-safe.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from pathlib import Path

from dht_dfs.core.ids import CHUNK_ID_SIZE, ChunkId
from dht_dfs.store.files import write_durably

log = logging.getLogger(__name__)

_HEX = frozenset("0123456789abcdef")


class ChunkCache:
    """Verified chunk bytes on disk, at most ``max_bytes`` of them, LRU out."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._sizes: collections.OrderedDict[ChunkId, int] = collections.OrderedDict()
        """Every cached chunk and its size, least recently used first."""
        self._used = 0
        self._counter = 0
        self.hits = self.misses = self.dropped = 0

    def open(self) -> ChunkCache:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        stale = time.time() - 3600
        for leftover in self.root.glob("tmp.*"):
            # An unfinished write of a reader that crashed (others' recent ones stay).
            with contextlib.suppress(FileNotFoundError):
                if leftover.stat().st_mtime < stale:
                    leftover.unlink()
        found: list[tuple[float, ChunkId, int]] = []
        for fan in self.root.iterdir():
            if not fan.is_dir() or len(fan.name) != 2:
                continue
            for path in fan.iterdir():
                name = path.name
                if len(name) != CHUNK_ID_SIZE * 2 or not set(name) <= _HEX:
                    path.unlink(missing_ok=True)  # an unfinished write of a crashed reader
                    continue
                try:
                    info = path.stat()
                except FileNotFoundError:
                    continue  # evicted by another mount sharing the directory
                found.append((info.st_mtime, ChunkId(bytes.fromhex(name)), info.st_size))
        with self._lock:
            for _, chunk_id, size in sorted(found, key=lambda item: item[0]):
                self._sizes[chunk_id] = size
                self._used += size
            self._evict_locked()
        return self

    @property
    def used(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._sizes)

    def _path(self, chunk_id: ChunkId) -> Path:
        name = chunk_id.hex()
        return self.root / name[:2] / name

    def get(self, chunk_id: ChunkId) -> bytes | None:
        """The chunk's bytes if cached and still matching its id, else None."""
        path = self._path(chunk_id)
        try:
            data = path.read_bytes()
        except OSError:  # gone (evicted by another mount), or unreadable: a miss
            with self._lock:
                size = self._sizes.pop(chunk_id, None)
                if size is not None:
                    self._used -= size
                self.misses += 1
            return None
        if not chunk_id.matches(data):
            log.warning("mount cache: chunk %s was corrupt on disk; dropped it", chunk_id)
            self._drop(chunk_id)
            with self._lock:
                self.misses += 1
            return None
        now = time.time()
        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: bytes still good
            os.utime(path, (now, now))
        with self._lock:
            self.hits += 1
            if chunk_id in self._sizes:
                self._sizes.move_to_end(chunk_id)
            else:
                self._sizes[chunk_id] = len(data)
                self._used += len(data)
                self._evict_locked()
        return data

    def put(self, chunk_id: ChunkId, data: bytes | bytearray) -> None:
        """Keep a verified chunk (the caller checked it); older ones make room."""
        if len(data) > self.max_bytes:
            return
        with self._lock:
            if chunk_id in self._sizes:
                self._sizes.move_to_end(chunk_id)
                return
            self._counter += 1
            tmp = self.root / f"tmp.{os.getpid()}.{threading.get_ident()}.{self._counter}"
        final = self._path(chunk_id)
        final.parent.mkdir(mode=0o700, exist_ok=True)
        try:
            # No fsync: a cache lost in a crash costs a fetch, and every read checks it.
            write_durably(tmp, final, data, fsync=False)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            log.info("mount cache: cannot keep chunk %s: %s", chunk_id, error.strerror)
            return
        with self._lock:
            if chunk_id not in self._sizes:
                self._sizes[chunk_id] = len(data)
                self._used += len(data)
            self._evict_locked()

    def _drop(self, chunk_id: ChunkId) -> None:
        self._path(chunk_id).unlink(missing_ok=True)
        with self._lock:
            size = self._sizes.pop(chunk_id, None)
            if size is not None:
                self._used -= size

    def _evict_locked(self) -> None:
        while self._used > self.max_bytes and self._sizes:
            chunk_id, size = self._sizes.popitem(last=False)
            self._used -= size
            self.dropped += 1
            self._path(chunk_id).unlink(missing_ok=True)


__all__ = ["ChunkCache"]
