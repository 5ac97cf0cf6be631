"""Keeping every chunk at full replication without anyone asking.

Each node runs three kinds of upkeep on the chunks it stores:

- Repair (``repair_pass``): skipped while the same nearby nodes answer
  pings as after the last clean pass. Otherwise, for each stored chunk, the ``replicas`` live
  nodes closest to its id (a DHT lookup: dead nodes do not answer) are its
  rightful holders. They are asked (one batched HAVE per peer) whether they
  hold it; any that lack it get a copy. To keep several holders from all
  pushing the same chunk, only the closest node that holds it acts; a node
  outside the rightful set acts only when no rightful node holds it, which
  is how a chunk moves to a node that joined closer to its id. A copy far
  outside the rightful set (beyond ``2 * replicas``) is dropped once the
  rightful set is complete, and complete means proven: HAVE answers are
  claims (a node closer to the id that stores nothing can say yes), so
  before a drop every rightful holder is challenged (``prove_holders``,
  checked against this node's own bytes) and all ``replicas`` must pass.
  One that fails counts as lacking the chunk: the copy stays, and the
  chunk is copied on to the next closest nodes (never to a node that
  failed). Paced at ``repair_rate`` chunks per second.
- Guests (chunks kept for a peer without this node being a rightful
  holder, see ``node.service``) are never copied anywhere: repair, the
  hand-over to closer newcomers and the hand-off all skip them, so parking
  bytes on a far node does not make repair spread them. A pass promotes a
  guest to rightful once its lookup puts this node within
  ``store_closeness_slack * replicas`` of the chunk (membership changed),
  and from then on treats it as any other; it drops guests older than
  ``guest_ttl`` (or over a budget that shrank).
- Scrub (``scrub_step``): re-hash stored chunks at ``scrub_rate`` bytes per
  second; a corrupt or vanished copy is removed and fetched again from
  another holder.
- Hand-off (``hand_off``): before a node leaves, every chunk with fewer than
  ``replicas`` proven copies elsewhere is copied to the closest nodes
  lacking it, within ``leave_timeout`` (leaving drops this node's copy, so
  the same proof rule applies).

Provider records are renewed by the DHT's re-announce loop; records of a
provider that stops answering are dropped when a fetch or check meets it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from dht_dfs.core.addresses import PeerAddress
from dht_dfs.core.config import Config
from dht_dfs.core.errors import ChunkNotFoundError, DhtfsError, NetworkError
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.core.pacer import Pacer
from dht_dfs.dht.values import Contact
from dht_dfs.store.chunks import ChunkStore
from dht_dfs.store.scrub import ScrubReport
from dht_dfs.transfer.network import Network
from dht_dfs.transfer.ports import address_of, get_verified
from dht_dfs.transfer.retrieval import NetworkSource

log = logging.getLogger(__name__)

_BATCH = 64
_DROP_FACTOR = 2
_FULL_PASS_EVERY = 10
"""A pass runs in full at least every this many passes, even if nothing changed."""
_PROBED_CONTACTS = 64
_PROBE_TIMEOUT = 2.0


@dataclass
class RepairStats:
    skipped: bool = False
    """Nothing changed since a clean pass: no chunk was examined."""
    examined: int = 0
    copies_added: int = 0
    copies_dropped: int = 0
    under_replicated: int = 0
    """Chunks still short of ``replicas`` copies after the pass."""
    failed_proofs: int = 0
    """Rightful holders that said they hold a chunk (HAVE) but could not prove it."""
    errors: int = 0
    first_error: str = ""
    """The first copy that failed, and why: logged once per pass with the count,
    not once per chunk (several nodes leaving at once fail thousands)."""
    guests_kept: int = 0
    """Guest chunks examined and left alone (not copied anywhere)."""
    guests_promoted: int = 0
    """Guest chunks this node became a rightful holder of, now repaired as such."""
    guests_dropped: int = 0
    """Guest chunks dropped: older than ``guest_ttl`` or over a guest budget."""

    def merge(self, other: RepairStats) -> None:
        self.skipped = self.skipped and other.skipped
        self.examined += other.examined
        self.copies_added += other.copies_added
        self.copies_dropped += other.copies_dropped
        self.under_replicated += other.under_replicated
        self.failed_proofs += other.failed_proofs
        self.errors += other.errors
        self.first_error = self.first_error or other.first_error
        self.guests_kept += other.guests_kept
        self.guests_promoted += other.guests_promoted
        self.guests_dropped += other.guests_dropped


def _log_errors(what: str, stats: RepairStats) -> None:
    if stats.errors:
        log.warning(
            "%s: could not copy %d chunk(s) (first: %s)", what, stats.errors, stats.first_error
        )


@dataclass(slots=True)
class ScrubTotals:
    """What scrub steps did since start (for metrics)."""

    chunks_checked: int = 0
    bytes_checked: int = 0
    replaced: int = 0
    """Bad or vanished copies fetched again from another holder."""
    lost: int = 0
    """Bad or vanished copies no other node could supply."""

    def add(self, chunks: int, size: int, replaced: int, lost: int) -> None:
        self.chunks_checked += chunks
        self.bytes_checked += size
        self.replaced += replaced
        self.lost += lost


@dataclass(frozen=True, slots=True)
class ScrubResult:
    report: ScrubReport
    refetched: tuple[ChunkId, ...]
    lost: tuple[ChunkId, ...]
    """Bad local copies that no other node could supply."""


class Maintainer:
    """Repair, scrub and hand-off for one node's store."""

    def __init__(self, network: Network, store: ChunkStore, config: Config) -> None:
        self._network = network
        self._store = store
        self._config = config
        self._last_membership: frozenset[NodeId] | None = None
        self._clean_passes_skipped = 0
        self.totals = RepairStats()
        """Everything repair passes and hand-offs did since start (for metrics)."""
        self.repair_passes = 0
        self.scrub = ScrubTotals()

    @property
    def _me(self) -> NodeId:
        return self._network.node_id

    # --- repair ---------------------------------------------------------------------

    async def live_membership(self) -> frozenset[NodeId]:
        """The nearest known nodes that answer a ping now (this node included)."""
        network = self._network
        contacts = network.locator.known_contacts()[:_PROBED_CONTACTS]

        async def alive(contact: Contact) -> NodeId | None:
            try:
                async with asyncio.timeout(_PROBE_TIMEOUT):
                    connection = await network.connect(address_of(contact))
                    await connection.ping()
            except (NetworkError, OSError, TimeoutError):
                return None
            return contact.node_id

        answers = await asyncio.gather(*(alive(c) for c in contacts))
        return frozenset(n for n in answers if n is not None) | {self._me}

    async def repair_pass(self, *, rate: float | None = None, force: bool = False) -> RepairStats:
        """Examine every stored chunk once; fix what is short.

        Per-chunk DHT lookups are the cost of a pass, so a pass first pings
        the nearest known nodes: if the same nodes answer as after the last
        pass, and that pass found nothing to do, nothing can have moved and
        the pass is skipped (``force`` or every ``_FULL_PASS_EVERY``-th pass
        runs anyway, for losses a ping cannot see, like a wiped disk).
        """
        # Guests expire whether or not the rest of the pass runs.
        cutoff = time.time() - self._config.guest_ttl
        dropped = await self._network.run(lambda: self._store.drop_guests(added_before=cutoff))
        membership = await self.live_membership()
        if (
            not force
            and membership == self._last_membership
            and self._clean_passes_skipped < _FULL_PASS_EVERY - 1
        ):
            self._clean_passes_skipped += 1
            return RepairStats(skipped=True, guests_dropped=dropped)
        stats = RepairStats(guests_dropped=dropped)
        pacer = Pacer(self._config.repair_rate if rate is None else rate)
        batch: list[ChunkId] = []
        for chunk_id in await self._stored_ids():
            batch.append(chunk_id)
            if len(batch) >= _BATCH:
                await asyncio.sleep(pacer.reserve(len(batch), time.monotonic()))
                stats.merge(await self._repair_batch(batch, leaving=False))
                batch = []
        if batch:
            await asyncio.sleep(pacer.reserve(len(batch), time.monotonic()))
            stats.merge(await self._repair_batch(batch, leaving=False))
        clean = not (
            stats.copies_added or stats.under_replicated or stats.errors or stats.failed_proofs
        )
        # Remember the membership only after a pass with nothing left to do.
        self._last_membership = membership if clean else None
        self._clean_passes_skipped = 0
        if stats.copies_added or stats.copies_dropped or stats.under_replicated:
            log.info(
                "repair pass: %d chunks examined, %d copies added, %d dropped, %d still short",
                stats.examined,
                stats.copies_added,
                stats.copies_dropped,
                stats.under_replicated,
            )
        _log_errors("repair", stats)
        self.repair_passes += 1
        self.totals.merge(stats)
        return stats

    async def hand_off(self, *, within: float | None = None) -> RepairStats:
        """Before leaving: make sure each chunk has ``replicas`` copies elsewhere."""
        stats = RepairStats()
        limit = self._config.leave_timeout if within is None else within
        ids = await self._stored_ids()
        # Guests leave with this node: it never had a reason to keep them.
        guests = await self._network.run(self._store.guests_among, ids)
        ids = [chunk_id for chunk_id in ids if chunk_id not in guests]
        try:
            async with asyncio.timeout(limit):
                for start in range(0, len(ids), _BATCH):
                    stats.merge(await self._repair_batch(ids[start : start + _BATCH], leaving=True))
        except TimeoutError:
            log.warning(
                "hand-off stopped after %.0f s with %d of %d chunks examined",
                limit,
                stats.examined,
                len(ids),
            )
        if stats.copies_added:
            log.info("handed off %d copies before leaving", stats.copies_added)
        _log_errors("hand-off", stats)
        self.totals.merge(stats)
        return stats

    async def _stored_ids(self) -> list[ChunkId]:
        """Every chunk id in the store, read in a thread (a big index takes a while)."""
        return await self._network.run(lambda: list(self._store.ids()))

    async def _repair_batch(self, ids: Sequence[ChunkId], *, leaving: bool) -> RepairStats:
        network = self._network
        replicas = self._config.replicas
        stats = RepairStats(examined=len(ids))
        lookups = asyncio.Semaphore(self._config.transfer_window)

        async def closest_of(chunk_id: ChunkId) -> list[Contact]:
            async with lookups:
                return await network.locator.closest_live_nodes(
                    chunk_id.dht_key, self._config.ksize, include_self=not leaving
                )

        async with asyncio.TaskGroup() as group:
            tasks = {chunk_id: group.create_task(closest_of(chunk_id)) for chunk_id in ids}
        closest = {chunk_id: task.result() for chunk_id, task in tasks.items()}
        if not leaving:
            ids = await self._without_guests(ids, closest, stats)

        # Ask each rightful holder, once, which of the batch's chunks it has.
        asked: dict[NodeId, tuple[PeerAddress, list[ChunkId]]] = {}
        for chunk_id in ids:
            for contact in closest[chunk_id][:replicas]:
                if contact.node_id != self._me:
                    entry = asked.setdefault(contact.node_id, (address_of(contact), []))
                    entry[1].append(chunk_id)
        answers = await network.ask_have(asked)
        unreachable = {node_id for node_id, held in answers.items() if held is None}
        holds = {
            (node_id, chunk_id): here
            for node_id, (_, chunk_ids) in asked.items()
            for chunk_id, here in zip(chunk_ids, answers[node_id] or (), strict=False)
        }

        work = asyncio.Semaphore(self._config.transfer_window)

        async def settle(chunk_id: ChunkId) -> None:
            async with work:
                await self._settle(
                    chunk_id, closest[chunk_id], holds, unreachable, stats, leaving=leaving
                )

        async with asyncio.TaskGroup() as group:
            for chunk_id in ids:
                group.create_task(settle(chunk_id))
        return stats

    async def _without_guests(
        self, ids: Sequence[ChunkId], closest: dict[ChunkId, list[Contact]], stats: RepairStats
    ) -> list[ChunkId]:
        """The batch less the guests; a guest this node is now near enough to is
        promoted (the same rank the chunk service admits as rightful) and kept."""
        guests = await self._network.run(self._store.guests_among, list(ids))
        if not guests:
            return list(ids)
        rank = self._config.store_closeness_slack * self._config.replicas
        kept: list[ChunkId] = []
        for chunk_id in ids:
            if chunk_id in guests:
                near = [c.node_id for c in closest[chunk_id][:rank]]
                if self._me not in near or not await self._network.run(
                    self._store.promote, chunk_id
                ):
                    stats.guests_kept += 1
                    continue
                stats.guests_promoted += 1
                log.info("repair: chunk %s was a guest here; now this node is rightful", chunk_id)
            kept.append(chunk_id)
        return kept

    async def _settle(
        self,
        chunk_id: ChunkId,
        closest: list[Contact],
        holds: dict[tuple[NodeId, ChunkId], bool],
        unreachable: set[NodeId],
        stats: RepairStats,
        *,
        leaving: bool,
    ) -> None:
        replicas = self._config.replicas
        candidates = [c for c in closest if c.node_id not in unreachable]
        rightful = candidates[:replicas]
        disproven: set[NodeId] = set()

        def has(contact: Contact) -> bool:
            if contact.node_id == self._me:
                return not leaving
            if contact.node_id in disproven:
                return False
            return holds.get((contact.node_id, chunk_id), False)

        holders = [c for c in rightful if has(c)]
        near = {c.node_id for c in candidates[: _DROP_FACTOR * replicas]}
        # The rightful holders all have it: a copy this far away is surplus.
        surplus = not leaving and self._me not in near
        if len(holders) >= replicas and not (surplus or leaving):
            return  # this copy stays: nothing is dropped on the HAVE answers
        data: bytes | None = None
        if len(holders) >= replicas:
            # This copy is about to go (dropped, or this node leaves): only
            # proofs from the rightful holders say the chunk survives that.
            data = await self._own_copy(chunk_id, stats)
            if data is None:
                return
            others = [c for c in holders if c.node_id != self._me]
            disproven = await self._disproven(chunk_id, data, others)
            if not disproven:
                if surplus and await self._network.run(self._store.delete, chunk_id):
                    stats.copies_dropped += 1
                return
            stats.failed_proofs += len(disproven)
            log.warning(
                "repair: %d rightful holder(s) of chunk %s claimed it but failed the proof; "
                "keeping this copy",
                len(disproven),
                chunk_id.hex(),
            )
            holders = [c for c in holders if c.node_id not in disproven]
        if not leaving and holders and holders[0].node_id != self._me:
            return  # a closer holder is responsible for this chunk
        lease = await self._remaining_lease(chunk_id)
        if lease <= 0:
            return  # its leases ran out: nobody keeps it alive, so nor does repair
        # A node that failed a proof gets no copy: it would claim to keep it again.
        missing = [
            c
            for c in candidates
            if not has(c) and c.node_id != self._me and c.node_id not in disproven
        ]
        if data is None:
            data = await self._own_copy(chunk_id, stats)
            if data is None:
                return
        try:
            added = await self._network.copy_to(
                chunk_id, data, closest, missing, replicas - len(holders), lease=lease
            )
        except DhtfsError as error:
            log.debug("repair: could not copy chunk %s: %s", chunk_id, error)
            stats.errors += 1
            stats.first_error = stats.first_error or f"chunk {chunk_id}: {error}"
            stats.under_replicated += 1
            return
        stats.copies_added += len(added)
        if len(holders) + len(added) < replicas:
            stats.under_replicated += 1

    async def _remaining_lease(self, chunk_id: ChunkId) -> int:
        """Whole seconds left of the chunk's lease here: what a copy made now carries,
        so repair and hand-off never make a chunk outlive its leases."""
        until = await self._network.run(self._store.lease_until, chunk_id)
        return 0 if until is None else math.ceil(until - time.time())

    async def _own_copy(self, chunk_id: ChunkId, stats: RepairStats) -> bytes | None:
        try:
            return await self._network.run(self._store.get, chunk_id)
        except ChunkNotFoundError:
            return None  # deleted meanwhile
        except DhtfsError as error:
            log.warning("repair: local copy unusable: %s", error)
            stats.errors += 1
            return None

    async def _disproven(
        self, chunk_id: ChunkId, data: bytes, holders: Sequence[Contact]
    ) -> set[NodeId]:
        """The holders that cannot prove they hold the chunk (a fresh nonce each)."""
        asks = {c.node_id: (address_of(c), [chunk_id]) for c in holders}
        proven = await self._network.prove_holders(asks, {chunk_id: data})
        return {c.node_id for c in holders if chunk_id not in proven.get(c.node_id, ())}

    # --- scrub ----------------------------------------------------------------------

    async def scrub_step(self, max_bytes: int, *, older_than: float | None = None) -> ScrubResult:
        """Re-hash up to ``max_bytes`` of stored chunks; re-fetch any bad copy."""
        report = await asyncio.to_thread(self._store.scrub, max_bytes, older_than=older_than)
        refetched: list[ChunkId] = []
        lost: list[ChunkId] = []
        source = NetworkSource(self._network)
        now = time.time()
        for chunk_id in (*report.corrupt, *report.missing):
            lease_until = report.leases.get(chunk_id, now)
            if lease_until <= now:
                continue  # its leases ran out: collected anyway, not worth fetching
            if await self._refetch(source, chunk_id, lease_until):
                refetched.append(chunk_id)
            else:
                lost.append(chunk_id)
        self.scrub.add(report.checked, report.bytes_checked, len(refetched), len(lost))
        return ScrubResult(report, tuple(refetched), tuple(lost))

    async def _refetch(self, source: NetworkSource, chunk_id: ChunkId, lease_until: float) -> bool:
        try:
            data = await get_verified(source, chunk_id)
            await self._network.run(
                functools.partial(self._store.put, chunk_id, data, lease_until=lease_until)
            )
        except DhtfsError as error:
            problem = str(error)
        else:
            log.info("scrub: replaced bad copy of chunk %s from another holder", chunk_id)
            return True
        log.error("scrub: chunk %s is bad here and no holder has it: %s", chunk_id.hex(), problem)
        return False

    # --- the loops a running node owns ---------------------------------------------------

    async def run_repair(self) -> None:
        """Repair passes forever, staggered so nodes do not all act at once."""
        interval = self._config.repair_interval
        await asyncio.sleep(interval * random.uniform(0.1, 1.0))
        while True:
            try:
                await self.repair_pass()
            except DhtfsError as error:
                log.warning("repair pass failed: %s", error)
            except Exception:
                # A bug must not end repair for the node's lifetime: log it
                # with its trace and try again next interval.
                log.exception("repair pass failed unexpectedly")
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))

    async def run_scrub(self) -> None:
        """Re-verify every chunk once per ``scrub_interval``, at ``scrub_rate``."""
        step = 1.0
        rest = min(60.0, self._config.scrub_interval / 10)
        while True:
            cutoff = time.time() - self._config.scrub_interval
            try:
                result = await self.scrub_step(
                    int(self._config.scrub_rate * step), older_than=cutoff
                )
            except Exception:
                # As for repair: a failure must not end scrubbing for good.
                log.exception("scrub step failed")
                await asyncio.sleep(rest)
                continue
            idle = result.report.checked == 0 and not result.report.missing
            await asyncio.sleep(rest if idle else step)
