"""Putting chunks on the network: ``Placer``, ``NetworkSink``, ``copy_to``.

A chunk goes on the ``replicas`` live nodes closest to its id, stored in
parallel; a node that is down, full or refuses (bad bytes, or REFUSED: not
a rightful holder by its own view and no guest room) makes way for the
next closest, and a chunk no node took raises NotEnoughNodesError.

A copy counts as placed on the storer's STORED (or ALREADY_HAD) answer.
Unlike a HAVE answer that is evidence, not a claim: it comes on the
authenticated connection that just carried the bytes, after the storer
hashed them against the id and fsynced them, so the storer had the chunk
at that moment. Whether it keeps it is what proofs check later
(``health.prove_holders``, ``check --verify``). Storers
answer with a signed provider record, which ``NetworkSink`` announces in
batches to the k closest nodes of each key (``copy_to`` at once, for a
repair).

Must not import: dht (except ``dht.values``), transport, node.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Sequence

from dht_dfs.core.crypto import SealedChunk
from dht_dfs.core.errors import (
    NetworkError,
    NotEnoughNodesError,
    PeerRefusedError,
    PeerUnavailableError,
    StoreError,
)
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.dht.values import Contact, ProviderRecord
from dht_dfs.transfer.held import HeldCopies
from dht_dfs.transfer.ports import NetworkView, address_of
from dht_dfs.wire import StoreStatus

log = logging.getLogger(__name__)

_ANNOUNCE_BATCH = 64
"""Provider records gathered before the sink announces them."""
_PUTS_PER_WINDOW = 2
"""Chunks a sink places at once, in ``transfer_window`` units: however many
files a tree publish has in flight, storers see a bounded queue (a deep one
delays their DHT answers past ``dht_rpc_timeout`` and gets them evicted)."""


class Placer:
    """Puts one chunk on ``wanted`` nodes of a candidate list, in parallel.

    Starts ``wanted`` stores at once; each failure (down, full, refused)
    starts the next candidate, until enough succeeded or none are left.
    """

    def __init__(
        self,
        network: NetworkView,
        chunk_id: ChunkId,
        data: bytes,
        closest: Sequence[Contact],
        *,
        lease: int,
    ) -> None:
        """``lease``: seconds each storer keeps the chunk at least (``store.chunks``)."""
        self._network = network
        self._chunk_id = chunk_id
        self._data = data
        self._lease = lease
        self.closest = closest

    async def place(
        self, candidates: Sequence[Contact], wanted: int
    ) -> tuple[list[NodeId], list[ProviderRecord]]:
        placed: list[NodeId] = []
        records: list[ProviderRecord] = []
        queue = list(candidates)
        running: dict[asyncio.Task[ProviderRecord | None], Contact] = {}
        failures: list[str] = []
        try:
            while len(placed) < wanted and (queue or running):
                while queue and len(placed) + len(running) < wanted:
                    contact = queue.pop(0)
                    running[asyncio.create_task(self._store_on(contact))] = contact
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    contact = running.pop(task)
                    try:
                        record = task.result()
                    except (NetworkError, StoreError, OSError) as error:
                        if isinstance(error, PeerUnavailableError):
                            self._network.nearby.forget(contact.node_id)
                        failures.append(f"{contact.node_id}: {error}")
                        log.debug(
                            "placing chunk %s on %s failed: %s",
                            self._chunk_id,
                            contact.node_id,
                            error,
                        )
                        continue
                    placed.append(contact.node_id)
                    if record is not None:
                        records.append(record)
        finally:
            # Left running only when an unexpected error ends the loop: stop
            # them and collect their outcome, so none is left unretrieved.
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        if not placed and wanted > 0:
            detail = "; ".join(failures[-3:]) or "no live nodes found"
            raise NotEnoughNodesError(
                f"no node took chunk {self._chunk_id.hex()} "
                f"({len(candidates)} candidate(s): {detail})"
            )
        return placed, records

    async def _store_on(self, contact: Contact) -> ProviderRecord | None:
        network = self._network
        key = self._chunk_id.dht_key
        if contact.node_id == network.node_id:
            assert network.store is not None
            put = functools.partial(
                network.store.put,
                self._chunk_id,
                self._data,
                lease_until=time.time() + self._lease,
            )
            await network.run(put)
            return network.locator.sign_record(key)
        link = await network.dialer.connect(address_of(contact))
        result = await link.store(self._chunk_id, self._data, self._lease)
        if result.status is StoreStatus.FULL:
            raise PeerRefusedError(f"node {contact.node_id} is full")
        if result.status is StoreStatus.REJECTED:
            raise PeerRefusedError(f"node {contact.node_id} rejected the chunk bytes")
        if result.status is StoreStatus.REFUSED:
            raise PeerRefusedError(
                f"node {contact.node_id} is not a rightful holder by its view "
                "and has no room for guests"
            )
        return _parse_receipt(result.receipt, key, contact.node_id)


def _parse_receipt(receipt: bytes, key: bytes, node_id: NodeId) -> ProviderRecord | None:
    """A storer's provider record, if it names this chunk and that storer.

    The signature is not checked here: every DHT node that is handed the
    record checks it before keeping it, and checking it on the publisher's
    event loop too cost 9% of that loop in a profiled publish. The TCP
    handshake already proved who the storer is.
    """
    if not receipt:
        return None
    try:
        record = ProviderRecord.from_bytes(receipt)
    except ValueError:
        log.info("node %s sent an unreadable store receipt", node_id)
        return None
    if record.key != key or record.node_id != node_id or record.expired(time.time()):
        log.info("node %s sent a store receipt that does not fit the chunk", node_id)
        return None
    return record


class NetworkSink:
    """Places published chunks on the network (see the module docstring)."""

    def __init__(self, network: NetworkView) -> None:
        self._network = network
        self._records: list[ProviderRecord] = []
        self._closest: dict[bytes, Sequence[Contact]] = {}
        self._announcing: asyncio.Task[None] | None = None
        """The batch being announced in the background (one at most)."""
        self._in_flight = asyncio.Semaphore(_PUTS_PER_WINDOW * network.config.transfer_window)
        self.under_replicated = 0
        self.placed = 0
        self._lease = math.ceil(network.config.lease_ttl)
        """Every chunk published gets a lease of the publisher's TTL; its pin renews it."""
        self.held = HeldCopies(network, self._lease)
        """Chunks the rightful holders proved they have are not sent again."""

    async def put(self, chunk: SealedChunk) -> None:
        network = self._network
        key = chunk.chunk_id.dht_key
        async with self._in_flight:
            closest = await network.nearby.closest(
                key, network.config.ksize, include_self=network.store is not None
            )
            if await self.held.proven(chunk, closest):
                self.placed += network.config.replicas
                return
            placer = Placer(network, chunk.chunk_id, chunk.data, closest, lease=self._lease)
            placed, records = await placer.place(closest, network.config.replicas)
        self.placed += len(placed)
        if len(placed) < network.config.replicas:
            self.under_replicated += 1
        self._records.extend(records)
        self._closest[key] = closest
        if len(self._records) >= _ANNOUNCE_BATCH:
            # Announced while the next chunks are stored. Batches go one
            # after the other (each waits for the one before); a put waits
            # only while the batch before this one is still going.
            records, self._records = self._records, []
            closest_of, self._closest = self._closest, {}
            before = self._announcing
            self._announcing = asyncio.create_task(self._announce(records, closest_of, before))
            if before is not None:
                await before

    async def _announce(
        self,
        records: list[ProviderRecord],
        closest: dict[bytes, Sequence[Contact]],
        before: asyncio.Task[None] | None = None,
    ) -> None:
        if before is not None:
            try:
                await before
            except (NetworkError, OSError) as error:
                # That batch's records are the storers' to re-announce; this
                # batch still goes out, and the error is not this one's.
                log.info("announcing a batch of provider records failed: %s", error)
        if records:
            confirmed = await self._network.locator.put_records(records, closest)
            lonely = [key for key, count in confirmed.items() if count == 0]
            if lonely:
                log.debug("%d provider record(s) found no DHT node to keep them", len(lonely))

    async def __aenter__(self) -> NetworkSink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """The background batch is this sink's: a publish that failed before its
        flush leaves none running or unretrieved."""
        announcing, self._announcing = self._announcing, None
        if announcing is not None:
            announcing.cancel()
            await asyncio.gather(announcing, return_exceptions=True)

    async def flush(self) -> None:
        """Announce what is left, after every batch in the background."""
        records, self._records = self._records, []
        closest_of, self._closest = self._closest, {}
        before, self._announcing = self._announcing, None
        await self._announce(records, closest_of, before)


async def copy_to(
    network: NetworkView,
    chunk_id: ChunkId,
    data: bytes,
    *,
    closest: Sequence[Contact],
    candidates: Sequence[Contact],
    wanted: int,
    lease: int,
) -> list[NodeId]:
    """Put ``wanted`` copies on ``candidates`` (in order, moving on past
    failures), each kept ``lease`` seconds, then announce the storers'
    records to the ``closest`` nodes. Returns the nodes that took a copy;
    raises NotEnoughNodesError if none did.
    """
    placer = Placer(network, chunk_id, data, closest, lease=lease)
    added, records = await placer.place(candidates, wanted)
    if records:
        try:
            await network.locator.put_records(records, {chunk_id.dht_key: closest})
        except NetworkError as error:
            # The copies stay in place; the storers' own re-announcements
            # make them findable.
            log.info("announcing new copies of chunk %s failed: %s", chunk_id, error)
    return added


__all__ = ["NetworkSink", "Placer", "copy_to"]
