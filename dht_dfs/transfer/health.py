"""Replica health: count confirmed live copies of a file's chunks, and repair.

``live_holders`` asks every candidate holder (the DHT's providers and the
nodes closest to each id) once, in one batched HAVE, so a stale record of a
dead or emptied node does not count; ``survey`` walks a file's public
manifest (the root hash is enough) and fills a ``CheckReport``, and with
``repair`` brings short chunks back to ``replicas`` copies (``replicate``).

Must not import: dht (except ``dht.values``), transport, node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dht_dfs.core.addresses import PeerAddress
from dht_dfs.core.errors import ChunkNotFoundError, DhtfsError, NetworkError
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.core.refs import RootHash
from dht_dfs.transfer.pipeline import ProgressFn
from dht_dfs.transfer.placement import copy_to
from dht_dfs.transfer.ports import NetworkView, address_of, address_of_record, get_verified
from dht_dfs.transfer.retrieval import NetworkSource, root_not_found
from dht_dfs.transfer.walk import walk_public

log = logging.getLogger(__name__)

_SURVEY_BATCH = 256
"""Chunks whose holders are looked up together (one HAVE per peer per batch)."""


@dataclass(frozen=True, slots=True)
class ChunkHealth:
    chunk_id: ChunkId
    size: int
    is_manifest: bool
    holders: tuple[NodeId, ...]
    """Live nodes that confirmed holding the chunk."""


@dataclass
class CheckReport:
    """What ``check`` and ``repair`` found (and did)."""

    root: RootHash
    replicas: int
    chunks: int = 0
    bytes: int = 0
    healthy: int = 0
    min_copies: int | None = None
    under_replicated: list[ChunkHealth] = field(default_factory=list)
    """Chunks with fewer than ``replicas`` live copies (after repair, if any)."""
    lost: list[ChunkHealth] = field(default_factory=list)
    """Chunks with no live copy at all."""
    copies_added: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, health: ChunkHealth) -> None:
        copies = len(health.holders)
        self.chunks += 1
        self.bytes += health.size
        self.min_copies = copies if self.min_copies is None else min(self.min_copies, copies)
        if copies >= self.replicas:
            self.healthy += 1
        elif copies == 0:
            self.lost.append(health)
        else:
            self.under_replicated.append(health)

    @property
    def ok(self) -> bool:
        return not self.under_replicated and not self.lost

    def to_json(self) -> dict[str, object]:
        def describe(items: list[ChunkHealth]) -> list[dict[str, object]]:
            return [
                {
                    "chunk": h.chunk_id.hex(),
                    "manifest": h.is_manifest,
                    "copies": len(h.holders),
                    "holders": [n.hex() for n in h.holders],
                }
                for h in items[:1000]
            ]

        return {
            "root": str(self.root),
            "ok": self.ok,
            "replicas_wanted": self.replicas,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "healthy": self.healthy,
            "min_copies": self.min_copies,
            "under_replicated": describe(self.under_replicated),
            "lost": describe(self.lost),
            "copies_added": self.copies_added,
            "errors": self.errors[:100],
            "seconds": round(self.seconds, 3),
        }


async def survey(
    network: NetworkView, root: RootHash, *, repair: bool, progress: ProgressFn | None
) -> CheckReport:
    """Count confirmed live copies of every chunk of a file; with ``repair``, add the missing."""
    started = time.monotonic()
    report = CheckReport(root=root, replicas=network.config.replicas)
    source = NetworkSource(network)
    batch: list[tuple[ChunkId, int, bool]] = []
    try:
        async for item in walk_public(source, root, network.executor):
            batch.append(item)
            if len(batch) >= _SURVEY_BATCH:
                await _survey_batch(network, batch, report, repair=repair)
                batch = []
                if progress is not None:
                    progress(report.chunks, 0)
        if batch:
            await _survey_batch(network, batch, report, repair=repair)
        if progress is not None:
            progress(report.chunks, report.chunks)
    except ChunkNotFoundError as error:
        raise root_not_found(error, root.root) from None
    report.seconds = time.monotonic() - started
    return report


async def _survey_batch(
    network: NetworkView,
    batch: list[tuple[ChunkId, int, bool]],
    report: CheckReport,
    *,
    repair: bool,
) -> None:
    ids = [chunk_id for chunk_id, _, _ in batch]
    holders = await live_holders(network, ids)
    semaphore = asyncio.Semaphore(network.config.transfer_window)

    async def fix(chunk_id: ChunkId) -> None:
        async with semaphore:
            try:
                added = await replicate(network, chunk_id, holders[chunk_id])
            except DhtfsError as error:
                log.warning("cannot repair chunk %s: %s", chunk_id.hex(), error)
                report.errors.append(f"{chunk_id.hex()}: {error}")
                return
            holders[chunk_id] = holders[chunk_id] + added
            report.copies_added += len(added)

    if repair:
        short = [c for c in ids if len(holders[c]) < network.config.replicas and holders[c]]
        async with asyncio.TaskGroup() as group:
            for chunk_id in short:
                group.create_task(fix(chunk_id))
    for chunk_id, size, is_manifest in batch:
        report.add(ChunkHealth(chunk_id, size, is_manifest, tuple(holders[chunk_id])))


async def live_holders(
    network: NetworkView, chunk_ids: Sequence[ChunkId]
) -> dict[ChunkId, list[NodeId]]:
    """For each chunk, the live nodes that confirm holding it right now.

    Candidates are the DHT's providers and this node itself; each
    candidate peer is asked once (a batched HAVE), so a stale record of a
    dead or emptied node does not count.
    """
    result: dict[ChunkId, list[NodeId]] = {chunk_id: [] for chunk_id in chunk_ids}
    if network.store is not None:
        held = await network.run(network.store.have_which, list(chunk_ids))
        for chunk_id, here in zip(chunk_ids, held, strict=True):
            if here:
                result[chunk_id].append(network.node_id)
    candidates: dict[NodeId, tuple[PeerAddress, list[ChunkId]]] = {}
    semaphore = asyncio.Semaphore(network.config.transfer_window)

    async def providers_of(chunk_id: ChunkId) -> None:
        # One lookup gives both the announced providers and the nodes
        # closest to the id, where copies belong even if their records
        # were lost; all of them are asked.
        async with semaphore:
            found = await network.locator.lookup(chunk_id.dht_key)
        addresses = [address_of_record(record) for record in found.providers]
        addresses += [address_of(c) for c in found.closest[: 2 * network.config.replicas]]
        for address in addresses:
            if address.node_id is None or address.node_id == network.node_id:
                continue
            entry = candidates.setdefault(address.node_id, (address, []))
            if chunk_id not in entry[1]:
                entry[1].append(chunk_id)

    async with asyncio.TaskGroup() as group:
        for chunk_id in chunk_ids:
            group.create_task(providers_of(chunk_id))

    answers = await ask_have(network, candidates)
    for node_id, (_, asked) in candidates.items():
        flags = answers[node_id]
        for position, chunk_id in enumerate(asked):
            if flags is not None and flags[position]:
                result[chunk_id].append(node_id)
            else:
                # A held record of a provider that is gone or no longer
                # has the chunk is stale.
                network.locator.forget_provider(chunk_id.dht_key, node_id)
    return result


async def ask_have(
    network: NetworkView, asks: Mapping[NodeId, tuple[PeerAddress, list[ChunkId]]]
) -> dict[NodeId, list[bool] | None]:
    """Ask each peer, once and all at the same time, which of its chunks it holds.

    The answer per peer is one flag per id asked, or None if the peer
    could not be reached or did not answer.
    """
    answers: dict[NodeId, list[bool] | None] = {}

    async def ask(node_id: NodeId, address: PeerAddress, chunk_ids: list[ChunkId]) -> None:
        try:
            link = await network.dialer.connect(address)
            answers[node_id] = await link.have(chunk_ids)
        except (NetworkError, OSError) as error:
            log.debug("%s did not answer HAVE: %s", address, error)
            answers[node_id] = None

    async with asyncio.TaskGroup() as group:
        for node_id, (address, chunk_ids) in asks.items():
            group.create_task(ask(node_id, address, chunk_ids))
    return answers


async def replicate(
    network: NetworkView, chunk_id: ChunkId, holders: Sequence[NodeId]
) -> list[NodeId]:
    """Copy a chunk to the closest live nodes lacking it, up to ``replicas``.

    Returns the nodes that took a copy. The bytes come from this node's
    store or a holder and are verified before they are sent on.
    """
    missing = network.config.replicas - len(holders)
    if missing <= 0:
        return []
    data = await get_verified(NetworkSource(network), chunk_id)
    closest = await network.locator.closest_live_nodes(
        chunk_id.dht_key, network.config.ksize, include_self=network.store is not None
    )
    held = set(holders)
    targets = [c for c in closest if c.node_id not in held]
    return await copy_to(
        network, chunk_id, bytes(data), closest=closest, candidates=targets, wanted=missing
    )


__all__ = [
    "CheckReport",
    "ChunkHealth",
    "ask_have",
    "live_holders",
    "replicate",
    "survey",
]
