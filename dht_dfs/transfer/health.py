"""Replica health: count live copies of a file's chunks, prove them, and repair.

``live_holders`` asks every candidate holder (the DHT's providers and the
nodes closest to each id) once, in one batched HAVE, so a stale record of a
dead or emptied node does not count. A HAVE answer is a claim: a node that
stores nothing can say yes. ``prove_holders`` turns claims into evidence:
each peer gets a fresh nonce and must answer with a keyed hash of every
chunk it claims (``core.proofs``), checked against bytes the verifier has.

``survey`` walks a file's public manifest (the root hash is enough) and
fills a ``CheckReport``, and with ``repair`` brings short chunks back to
``replicas`` copies (``replicate``). Without ``verify`` the copies counted
are claimed (HAVE); with it, one copy of each chunk is fetched and checked
against its id, and every other claimed holder must prove its copy: a
holder that fails is not counted, and ``repair`` replaces it. That costs
one chunk download plus one proof per holder, not a download per holder
(Tahoe's verify downloads every share).

Must not import: dht (except ``dht.values``), transport, node.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dht_dfs.core.addresses import PeerAddress
from dht_dfs.core.errors import ChunkNotFoundError, DhtfsError, NetworkError
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.core.proofs import PROOF_NONCE_SIZE, proof_tag, tag_matches
from dht_dfs.core.refs import RootHash
from dht_dfs.transfer.pipeline import ProgressFn
from dht_dfs.transfer.placement import copy_to
from dht_dfs.transfer.ports import NetworkView, address_of, address_of_record, get_verified
from dht_dfs.transfer.retrieval import NetworkSource, root_not_found
from dht_dfs.transfer.walk import walk_public

log = logging.getLogger(__name__)

_SURVEY_BATCH = 256
"""Chunks whose holders are looked up together (one HAVE per peer per batch)."""
_VERIFY_BATCH = 16
"""Chunks whose copies a verifying survey holds in memory at once (to check proofs)."""


@dataclass(frozen=True, slots=True)
class ChunkHealth:
    chunk_id: ChunkId
    size: int
    is_manifest: bool
    holders: tuple[NodeId, ...]
    """Live nodes that said they hold the chunk (HAVE), or proved it (verify)."""
    failed: tuple[NodeId, ...] = ()
    """Nodes that claimed the chunk but failed to prove it (verify only)."""


@dataclass
class CheckReport:
    """What ``check`` and ``repair`` found (and did)."""

    root: RootHash
    replicas: int
    verified: bool = False
    """Holders proved their copies; otherwise they only claimed them (HAVE)."""
    chunks: int = 0
    bytes: int = 0
    healthy: int = 0
    min_copies: int | None = None
    under_replicated: list[ChunkHealth] = field(default_factory=list)
    """Chunks with fewer than ``replicas`` live copies (after repair, if any)."""
    lost: list[ChunkHealth] = field(default_factory=list)
    """Chunks with no live copy at all."""
    copies_added: int = 0
    failed_proofs: int = 0
    """(chunk, holder) claims that a proof refuted."""
    failed_holders: set[NodeId] = field(default_factory=set)
    """Nodes that failed at least one proof."""
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, health: ChunkHealth) -> None:
        copies = len(health.holders)
        self.failed_proofs += len(health.failed)
        self.failed_holders.update(health.failed)
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
                    "failed_proof": [n.hex() for n in h.failed],
                }
                for h in items[:1000]
            ]

        return {
            "root": str(self.root),
            "ok": self.ok,
            "replicas_wanted": self.replicas,
            "verified": self.verified,
            "holders_are": "proven" if self.verified else "claimed",
            "chunks": self.chunks,
            "bytes": self.bytes,
            "healthy": self.healthy,
            "min_copies": self.min_copies,
            "under_replicated": describe(self.under_replicated),
            "under_replicated_count": len(self.under_replicated),
            "lost": describe(self.lost),
            "lost_count": len(self.lost),
            "copies_added": self.copies_added,
            "failed_proofs": self.failed_proofs,
            "failed_holders": sorted(n.hex() for n in self.failed_holders)[:100],
            "errors": self.errors[:100],
            "seconds": round(self.seconds, 3),
        }


async def survey(
    network: NetworkView,
    root: RootHash,
    *,
    repair: bool,
    progress: ProgressFn | None,
    verify: bool = False,
) -> CheckReport:
    """Count live copies of every chunk of a file; with ``repair``, add the missing.

    With ``verify`` only proven copies count (see the module docstring).
    """
    started = time.monotonic()
    report = CheckReport(root=root, replicas=network.config.replicas, verified=verify)
    source = NetworkSource(network)
    batch: list[tuple[ChunkId, int, bool]] = []
    try:
        async for item in walk_public(source, root, network.executor):
            batch.append(item)
            if len(batch) >= _SURVEY_BATCH:
                await _survey_batch(network, batch, report, repair=repair, verify=verify)
                batch = []
                if progress is not None:
                    progress(report.chunks, 0)
        if batch:
            await _survey_batch(network, batch, report, repair=repair, verify=verify)
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
    verify: bool,
) -> None:
    ids = [chunk_id for chunk_id, _, _ in batch]
    holders, addresses = await _claimed_holders(network, ids)
    failed: dict[ChunkId, list[NodeId]] = {chunk_id: [] for chunk_id in ids}
    if verify:
        for start in range(0, len(ids), _VERIFY_BATCH):
            part = ids[start : start + _VERIFY_BATCH]
            await _verify_part(
                network,
                part,
                holders=holders,
                addresses=addresses,
                failed=failed,
                report=report,
                repair=repair,
            )
    elif repair:
        await _repair_short(network, ids, holders, report)
    for chunk_id, size, is_manifest in batch:
        health = ChunkHealth(
            chunk_id, size, is_manifest, tuple(holders[chunk_id]), tuple(failed[chunk_id])
        )
        report.add(health)


async def _repair_short(
    network: NetworkView,
    ids: Sequence[ChunkId],
    holders: dict[ChunkId, list[NodeId]],
    report: CheckReport,
) -> None:
    """Copy every chunk with some but too few (claimed) holders."""
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

    short = [c for c in ids if len(holders[c]) < network.config.replicas and holders[c]]
    async with asyncio.TaskGroup() as group:
        for chunk_id in short:
            group.create_task(fix(chunk_id))


async def _verify_part(
    network: NetworkView,
    ids: Sequence[ChunkId],
    *,
    holders: dict[ChunkId, list[NodeId]],
    addresses: Mapping[NodeId, PeerAddress],
    failed: dict[ChunkId, list[NodeId]],
    report: CheckReport,
    repair: bool,
) -> None:
    """Keep only proven holders of ``ids`` in ``holders``; with ``repair``, replace the rest.

    One copy of each chunk is fetched (from anyone, checked by its id) and
    every claimed holder but this node is challenged; this node's own copy
    counts only if it reads back intact.
    """
    window = asyncio.Semaphore(network.config.transfer_window)
    copies: dict[ChunkId, bytes | bytearray] = {}
    source = NetworkSource(network)

    async def get_copy(chunk_id: ChunkId) -> None:
        async with window:
            if network.node_id in holders[chunk_id]:
                assert network.store is not None
                try:
                    copies[chunk_id] = await network.run(network.store.get, chunk_id)
                except DhtfsError:
                    # Corrupt (the store removed it) or vanished: not a copy.
                    holders[chunk_id].remove(network.node_id)
                    failed[chunk_id].append(network.node_id)
                else:
                    return
            try:
                copies[chunk_id] = await get_verified(source, chunk_id)
            except ChunkNotFoundError as error:
                report.errors.append(f"{chunk_id.hex()}: no intact copy to check proofs with")
                log.warning("verify: %s", error)

    async with asyncio.TaskGroup() as group:
        for chunk_id in ids:
            group.create_task(get_copy(chunk_id))

    asks: dict[NodeId, tuple[PeerAddress, list[ChunkId]]] = {}
    for chunk_id in ids:
        for node_id in holders[chunk_id]:
            if node_id != network.node_id and node_id in addresses:
                asks.setdefault(node_id, (addresses[node_id], []))[1].append(chunk_id)
    proven = await prove_holders(network, asks, copies)
    for chunk_id in ids:
        kept = []
        for node_id in holders[chunk_id]:
            if node_id == network.node_id or chunk_id in proven.get(node_id, ()):
                kept.append(node_id)
            else:
                failed[chunk_id].append(node_id)
                network.locator.forget_provider(chunk_id.dht_key, node_id)
        holders[chunk_id] = kept
    if failed_any := [c for c in ids if failed[c]]:
        log.warning("verify: %d chunk(s) had holders that failed a proof", len(failed_any))
    if not repair:
        return

    async def fix(chunk_id: ChunkId, data: bytes | bytearray) -> None:
        async with window:
            try:
                added = await replicate(
                    network, chunk_id, holders[chunk_id], data=data, exclude=failed[chunk_id]
                )
            except DhtfsError as error:
                log.warning("cannot repair chunk %s: %s", chunk_id.hex(), error)
                report.errors.append(f"{chunk_id.hex()}: {error}")
                return
            holders[chunk_id] = holders[chunk_id] + added
            report.copies_added += len(added)

    async with asyncio.TaskGroup() as group:
        for chunk_id, data in copies.items():
            if len(holders[chunk_id]) < network.config.replicas:
                group.create_task(fix(chunk_id, data))


async def live_holders(
    network: NetworkView, chunk_ids: Sequence[ChunkId]
) -> dict[ChunkId, list[NodeId]]:
    """For each chunk, the live nodes that say (HAVE) they hold it right now.

    Candidates are the DHT's providers and this node itself; each
    candidate peer is asked once (a batched HAVE), so a stale record of a
    dead or emptied node does not count. These are claims: a lying node
    counts too, so nothing may be dropped on this answer alone
    (``prove_holders``).
    """
    holders, _ = await _claimed_holders(network, chunk_ids)
    return holders


async def _claimed_holders(
    network: NetworkView, chunk_ids: Sequence[ChunkId]
) -> tuple[dict[ChunkId, list[NodeId]], dict[NodeId, PeerAddress]]:
    """``live_holders``, and the address each peer was reached at."""
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
    return result, {node_id: address for node_id, (address, _) in candidates.items()}


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


async def prove_holders(
    network: NetworkView,
    asks: Mapping[NodeId, tuple[PeerAddress, list[ChunkId]]],
    copies: Mapping[ChunkId, bytes | bytearray],
) -> dict[NodeId, set[ChunkId]]:
    """Challenge each peer, once and all at the same time, to prove it holds its chunks.

    ``copies`` are bytes the caller has checked against their ids: only
    chunks with a copy can be challenged (the others are proven by no one).
    Each peer gets its own fresh nonce, so an answer is good for that one
    challenge. The answer per peer is the set of chunks it proved; a peer
    that did not answer proved nothing.
    """
    proven: dict[NodeId, set[ChunkId]] = {}

    def expected(nonce: bytes, chunk_ids: list[ChunkId]) -> list[bytes]:
        return [proof_tag(nonce, chunk_id, copies[chunk_id]) for chunk_id in chunk_ids]

    async def challenge(node_id: NodeId, address: PeerAddress, wanted: list[ChunkId]) -> None:
        proven[node_id] = set()
        chunk_ids = [chunk_id for chunk_id in wanted if chunk_id in copies]
        if not chunk_ids:
            return
        nonce = os.urandom(PROOF_NONCE_SIZE)
        try:
            link = await network.dialer.connect(address)
            tags = await link.prove(nonce, chunk_ids)
        except (NetworkError, OSError) as error:
            log.debug("%s did not answer PROVE: %s", address, error)
            return
        # Hashed after the answer, so a peer never waits on our CPU.
        good = await network.run(expected, nonce, chunk_ids)
        for chunk_id, want, answered in zip(chunk_ids, good, tags, strict=True):
            if tag_matches(want, answered):
                proven[node_id].add(chunk_id)
            else:
                log.info("node %s failed to prove it holds chunk %s", node_id, chunk_id.hex())

    async with asyncio.TaskGroup() as group:
        for node_id, (address, chunk_ids) in asks.items():
            group.create_task(challenge(node_id, address, chunk_ids))
    return proven


async def replicate(
    network: NetworkView,
    chunk_id: ChunkId,
    holders: Sequence[NodeId],
    *,
    data: bytes | bytearray | None = None,
    exclude: Sequence[NodeId] = (),
) -> list[NodeId]:
    """Copy a chunk to the closest live nodes lacking it, up to ``replicas``.

    Returns the nodes that took a copy. The bytes are ``data`` (already
    checked by the caller) or come from this node's store or a holder, and
    are verified before they are sent on. Nodes in ``exclude`` (they failed
    a proof) get no copy: they would only claim to keep it again.
    """
    missing = network.config.replicas - len(holders)
    if missing <= 0:
        return []
    if data is None:
        data = await get_verified(NetworkSource(network), chunk_id)
    closest = await network.locator.closest_live_nodes(
        chunk_id.dht_key, network.config.ksize, include_self=network.store is not None
    )
    held = set(holders) | set(exclude)
    targets = [c for c in closest if c.node_id not in held]
    # Asked for by a user (``dhtfs repair``): the new copies get the repairer's
    # lease, as a publish would give them. A node's own repair passes carry the
    # chunk's remaining lease instead (``node.maintenance``).
    return await copy_to(
        network,
        chunk_id,
        bytes(data),
        closest=closest,
        candidates=targets,
        wanted=missing,
        lease=math.ceil(network.config.lease_ttl),
    )


__all__ = [
    "CheckReport",
    "ChunkHealth",
    "ask_have",
    "live_holders",
    "prove_holders",
    "replicate",
    "survey",
]
