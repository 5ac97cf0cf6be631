"""Scrub: re-hash a store's chunks, least recently verified first.

A chunk whose file no longer hashes to its id is removed (the node fetches
it again from another holder, under the lease it had here); an index row
whose file vanished is dropped. A corrupt or vanished guest is reported
apart: nobody asked this node to keep it, so it is not fetched again.

Blocking (file reads): async callers run it in a thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dht_dfs.core.ids import ChunkId

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScrubReport:
    checked: int
    bytes_checked: int
    corrupt: tuple[ChunkId, ...]
    """Chunks whose file no longer matched their id; they have been removed."""
    missing: tuple[ChunkId, ...]
    """Chunks in the index whose file had gone; their index rows were dropped."""
    dropped_guests: tuple[ChunkId, ...] = ()
    """Guest chunks found corrupt or gone: removed, and not worth fetching again."""
    leases: dict[ChunkId, float] = field(default_factory=dict)
    """Until when each corrupt or missing chunk was leased: a copy fetched again
    keeps that lease, no longer (scrub must not keep an unpinned chunk alive)."""


class Scrubbed(Protocol):
    """The parts of a ``ChunkStore`` a scrub works with."""

    def least_verified(self, before: float) -> list[tuple[ChunkId, int, bool, float]]: ...
    def path_of(self, chunk_id: ChunkId) -> Path: ...
    def mark_verified(self, chunk_id: ChunkId) -> None: ...
    def forget(self, chunk_id: ChunkId) -> None: ...
    def delete(self, chunk_id: ChunkId) -> bool: ...


def scrub(store: Scrubbed, max_bytes: int, *, older_than: float | None = None) -> ScrubReport:
    """Re-hash the least recently verified chunks, up to ``max_bytes``.

    ``older_than``: only chunks last verified before this time [now].
    """
    before = time.time() if older_than is None else older_than
    checked = bytes_checked = 0
    corrupt: list[ChunkId] = []
    missing: list[ChunkId] = []
    guests: list[ChunkId] = []
    leases: dict[ChunkId, float] = {}
    for chunk_id, size, guest, lease_until in store.least_verified(before):
        if checked and bytes_checked + size > max_bytes:
            break
        try:
            data = store.path_of(chunk_id).read_bytes()
        except FileNotFoundError:
            store.forget(chunk_id)
            (guests if guest else missing).append(chunk_id)
            leases[chunk_id] = lease_until
            continue
        checked += 1
        bytes_checked += len(data)
        if chunk_id.matches(data):
            store.mark_verified(chunk_id)
        else:
            log.warning("scrub: chunk %s is corrupt on disk; removing it", chunk_id.hex())
            store.delete(chunk_id)
            (guests if guest else corrupt).append(chunk_id)
            leases[chunk_id] = lease_until
    return ScrubReport(
        checked, bytes_checked, tuple(corrupt), tuple(missing), tuple(guests), leases
    )
