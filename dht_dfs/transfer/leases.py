"""Renewing the leases that keep a file's or a tree's chunks stored.

A holder keeps a chunk while some lease on it runs (``store.chunks``): the
publisher's STORE gives the first one, and a node that pins a root renews
them with ``renew`` on a schedule. ``renew`` walks the root's public part
(the root hash is enough, as for check and repair; a lost node below the
root is counted as unleased and the walk renews everything else) and sends one batched
LEASE per node to the ``ksize`` live nodes closest to each chunk: repair
keeps every copy within a few places of the closest, so that reaches every
holder, and a node that lacks a chunk just answers so. Closest nodes come
from ``transfer.nearby``, so a whole pin costs a few lookups, not one per
chunk.

A LEASE answer is a claim, like HAVE: it tells how many holders took the
lease, which ``pins`` reports, never that a copy exists (``check --verify``
proves that).

Must not import: dht (except ``dht.values``), transport, node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from dht_dfs.core.addresses import PeerAddress
from dht_dfs.core.errors import ChunkNotFoundError, NetworkError
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.core.refs import RootHash
from dht_dfs.transfer.pipeline import ProgressFn
from dht_dfs.transfer.ports import NetworkView, address_of
from dht_dfs.transfer.retrieval import NetworkSource, root_not_found
from dht_dfs.transfer.walk import walk_public

log = logging.getLogger(__name__)

_BATCH = 1024
"""Chunks leased together: one LEASE per node per batch (the wire's id limit)."""
_PEERS_AT_ONCE = 32
"""Peers a renewal asks at the same time (a batch can reach thousands in a big network)."""
_MISSING_KEPT = 100
"""Chunk ids of unleased chunks a report lists (it counts them all)."""


@dataclass
class RenewalReport:
    """What one renewal of a root's leases found."""

    root: RootHash
    seconds: int
    """The lease asked for."""
    chunks: int = 0
    bytes: int = 0
    """Stored (ciphertext) bytes of the chunks, each counted once."""
    leased: int = 0
    """Chunks at least one holder took the lease for."""
    min_holders: int | None = None
    """Fewest holders that took the lease for one chunk."""
    unleased: list[ChunkId] = field(default_factory=list)
    """Chunks no node said it holds (at most ``_MISSING_KEPT`` listed)."""
    unleased_count: int = 0
    unreachable: set[NodeId] = field(default_factory=set)
    """Nodes asked that did not answer."""
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.unleased_count == 0

    def add(self, chunk_id: ChunkId, size: int, holders: int) -> None:
        self.chunks += 1
        self.bytes += size
        self.min_holders = holders if self.min_holders is None else min(self.min_holders, holders)
        if holders:
            self.leased += 1
        else:
            self.unleased_count += 1
            if len(self.unleased) < _MISSING_KEPT:
                self.unleased.append(chunk_id)


async def renew(
    network: NetworkView,
    root: RootHash,
    seconds: int,
    *,
    progress: ProgressFn | None = None,
) -> RenewalReport:
    """Lease every chunk of ``root`` for ``seconds`` on every node that holds it."""
    started = time.monotonic()
    report = RenewalReport(root, seconds)
    batch: list[tuple[ChunkId, int]] = []

    def missing(error: ChunkNotFoundError) -> None:
        # A lost node below the root: counted, and the walk renews the rest.
        if error.chunk_hex is not None:
            report.add(ChunkId.from_hex(error.chunk_hex), 0, 0)

    source = NetworkSource(network)
    try:
        async for chunk_id, size, _ in walk_public(
            source, root, network.executor, on_missing=missing
        ):
            batch.append((chunk_id, size))
            if len(batch) >= _BATCH:
                await _renew_batch(network, batch, seconds, report)
                batch = []
                if progress is not None:
                    progress(report.chunks, 0)
        if batch:
            await _renew_batch(network, batch, seconds, report)
    except ChunkNotFoundError as error:
        raise root_not_found(error, root.root) from None
    if progress is not None:
        progress(report.chunks, report.chunks)
    report.duration = time.monotonic() - started
    return report


async def _renew_batch(
    network: NetworkView,
    batch: list[tuple[ChunkId, int]],
    seconds: int,
    report: RenewalReport,
) -> None:
    ids = [chunk_id for chunk_id, _ in batch]
    holders = dict.fromkeys(ids, 0)
    lookups = asyncio.Semaphore(network.config.transfer_window)
    asks: dict[NodeId, tuple[PeerAddress, list[ChunkId]]] = {}

    async def place(chunk_id: ChunkId) -> None:
        async with lookups:
            closest = await network.nearby.closest(
                chunk_id.dht_key, network.config.ksize, include_self=False
            )
        for contact in closest:
            if contact.node_id != network.node_id:
                asks.setdefault(contact.node_id, (address_of(contact), []))[1].append(chunk_id)

    async with asyncio.TaskGroup() as group:
        for chunk_id in ids:
            group.create_task(place(chunk_id))

    peers = asyncio.Semaphore(_PEERS_AT_ONCE)

    async def ask(node_id: NodeId, address: PeerAddress, chunk_ids: list[ChunkId]) -> None:
        try:
            async with peers:
                link = await network.dialer.connect(address)
                held = await link.lease(seconds, chunk_ids)
        except (NetworkError, OSError) as error:
            log.debug("%s did not answer LEASE: %s", address, error)
            report.unreachable.add(node_id)
            network.nearby.forget(node_id)
            return
        for chunk_id, here in zip(chunk_ids, held, strict=True):
            holders[chunk_id] += here

    async with asyncio.TaskGroup() as group:
        for node_id, (address, chunk_ids) in asks.items():
            group.create_task(ask(node_id, address, chunk_ids))
    if network.store is not None:
        # This node's own copies, wherever it stands among the closest.
        local = await network.run(network.store.lease, ids, time.time() + seconds)
        for chunk_id, here in zip(ids, local, strict=True):
            holders[chunk_id] += here
    for chunk_id, size in batch:
        report.add(chunk_id, size, holders[chunk_id])


__all__ = ["RenewalReport", "renew"]
