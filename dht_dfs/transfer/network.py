"""Publish, fetch, check and repair across the network.

Binds the generic engines of ``client.py`` to the DHT (where are chunks,
which nodes are closest) and the TCP endpoint (move the bytes):

- ``NetworkSink`` places each chunk on the ``replicas`` live nodes closest
  to its id, in parallel, falling back to the next-closest node when one is
  full, down or refuses; storers answer with a signed provider record that
  the sink announces in batches to the k closest nodes of each key.
- ``NetworkSource`` gets a chunk from whichever holder answers: peers that
  said they hold it (HAVE queries sent ahead for a whole manifest leaf),
  then the providers the DHT knows. A dead peer, a timeout or a corrupt copy
  only moves it on to the next holder; load spreads over the holders by
  preferring the connection with the fewest requests in flight.
- ``Network.check``/``repair`` count confirmed live replicas of every chunk
  of a file (the root hash is enough: ids are in the manifests' public part)
  and bring the short ones back to ``replicas`` copies.

Used by a running node (``node.py``) and by a short-lived client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from dht_dfs.core.addresses import PeerAddress
from dht_dfs.core.config import Config
from dht_dfs.core.crypto import SealedChunk
from dht_dfs.core.errors import (
    ChunkNotFoundError,
    DhtfsError,
    HandshakeError,
    IntegrityError,
    NetworkError,
    NotEnoughNodesError,
    PeerRefusedError,
    PeerUnavailableError,
    RootNotFoundError,
    StoreError,
)
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.core.manifest import FileMetadata
from dht_dfs.core.refs import ReadReference, RootHash
from dht_dfs.dht.node import DhtNode
from dht_dfs.dht.values import Contact, ProviderRecord
from dht_dfs.store.chunks import ChunkStore
from dht_dfs.transfer.engine import (
    Consume,
    FetchResult,
    ProgressFn,
    PublishResult,
    fetch_file,
    get_verified,
    publish_file,
    walk_public,
)
from dht_dfs.transport.endpoint import Endpoint, PeerConnection
from dht_dfs.wire.protocol import StoreStatus

log = logging.getLogger(__name__)

T = TypeVar("T")

_ANNOUNCE_BATCH = 64
"""Provider records gathered before the sink announces them."""
_PREFETCH_PEERS = 8
"""Known contacts asked (besides connected peers) which chunks they hold."""


def address_of(contact: Contact) -> PeerAddress:
    return PeerAddress(contact.host, contact.tcp_port, contact.node_id)


def address_of_record(record: ProviderRecord) -> PeerAddress:
    return PeerAddress(record.host, record.tcp_port, record.node_id)


class Network:
    """A node's (or client's) view of the network: DHT, endpoint, maybe a store."""

    def __init__(
        self,
        config: Config,
        dht: DhtNode,
        endpoint: Endpoint,
        executor: Executor,
        store: ChunkStore | None = None,
    ) -> None:
        self.config = config
        self.dht = dht
        self.endpoint = endpoint
        self.executor = executor
        self.store = store
        """This node's own store; None for a short-lived client."""

    @property
    def node_id(self) -> NodeId:
        return self.endpoint.identity.node_id

    async def run(self, func: Callable[..., T], *args: object) -> T:
        """``func(*args)`` in the worker threads (hashing, crypto, file I/O)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, *args)

    async def connect(self, address: PeerAddress) -> PeerConnection:
        return await self.endpoint.connect(address)

    # --- the engines -----------------------------------------------------------------

    async def publish(
        self,
        path: Path,
        *,
        name: str | None = None,
        progress: ProgressFn | None = None,
        convergence_secret: bytes | None = None,
    ) -> PublishResult:
        """Publish a file; a private ``convergence_secret`` overrides the config's."""
        config = self.config
        if convergence_secret is not None:
            config = config.replace(convergence_secret=convergence_secret).validate()
        sink = NetworkSink(self)
        result = await publish_file(
            path, sink, config, executor=self.executor, name=name, progress=progress
        )
        if sink.under_replicated:
            log.warning(
                "%d chunk(s) of %s have fewer than %d copies; repair will add them "
                "when more nodes are up",
                sink.under_replicated,
                path,
                self.config.replicas,
            )
        return dataclasses.replace(
            result, under_replicated=sink.under_replicated, copies=sink.placed
        )

    async def fetch(
        self,
        reference: ReadReference,
        *,
        output: Path | None = None,
        overwrite: bool = False,
        progress: ProgressFn | None = None,
        on_metadata: Callable[[FileMetadata, Path], None] | None = None,
        verify_hash: bool | None = None,
    ) -> FetchResult:
        source = NetworkSource(self)
        try:
            return await fetch_file(
                reference,
                source,
                self.config,
                executor=self.executor,
                output=output,
                overwrite=overwrite,
                progress=progress,
                on_metadata=on_metadata,
                verify_hash=verify_hash,
            )
        except ChunkNotFoundError as error:
            raise _root_not_found(error, reference.root) from None

    async def check(self, root: RootHash, progress: ProgressFn | None = None) -> CheckReport:
        """Count confirmed live copies of every chunk of a file."""
        return await self._survey(root, repair=False, progress=progress)

    async def repair(self, root: RootHash, progress: ProgressFn | None = None) -> CheckReport:
        """Bring every chunk of a file back to ``replicas`` live copies."""
        return await self._survey(root, repair=True, progress=progress)

    async def _survey(
        self, root: RootHash, *, repair: bool, progress: ProgressFn | None
    ) -> CheckReport:
        started = time.monotonic()
        report = CheckReport(root=root, replicas=self.config.replicas)
        source = NetworkSource(self)
        batch: list[tuple[ChunkId, int, bool]] = []
        try:
            async for item in walk_public(source, root, self.executor):
                batch.append(item)
                if len(batch) >= 256:
                    await self._survey_batch(batch, report, repair=repair)
                    batch = []
                    if progress is not None:
                        progress(report.chunks, 0)
            if batch:
                await self._survey_batch(batch, report, repair=repair)
            if progress is not None:
                progress(report.chunks, report.chunks)
        except ChunkNotFoundError as error:
            raise _root_not_found(error, root.root) from None
        report.seconds = time.monotonic() - started
        return report

    async def _survey_batch(
        self, batch: list[tuple[ChunkId, int, bool]], report: CheckReport, *, repair: bool
    ) -> None:
        ids = [chunk_id for chunk_id, _, _ in batch]
        holders = await self.live_holders(ids)
        semaphore = asyncio.Semaphore(self.config.transfer_window)

        async def fix(chunk_id: ChunkId) -> None:
            async with semaphore:
                try:
                    added = await self.replicate(chunk_id, holders[chunk_id])
                except DhtfsError as error:
                    log.warning("cannot repair chunk %s: %s", chunk_id.hex(), error)
                    report.errors.append(f"{chunk_id.hex()}: {error}")
                    return
                holders[chunk_id] = holders[chunk_id] + added
                report.copies_added += len(added)

        if repair:
            short = [c for c in ids if len(holders[c]) < self.config.replicas and holders[c]]
            async with asyncio.TaskGroup() as group:
                for chunk_id in short:
                    group.create_task(fix(chunk_id))
        for chunk_id, size, is_manifest in batch:
            report.add(ChunkHealth(chunk_id, size, is_manifest, tuple(holders[chunk_id])))

    # --- replica accounting ------------------------------------------------------------

    async def live_holders(self, chunk_ids: Sequence[ChunkId]) -> dict[ChunkId, list[NodeId]]:
        """For each chunk, the live nodes that confirm holding it right now.

        Candidates are the DHT's providers and this node itself; each
        candidate peer is asked once (a batched HAVE), so a stale record of a
        dead or emptied node does not count.
        """
        result: dict[ChunkId, list[NodeId]] = {chunk_id: [] for chunk_id in chunk_ids}
        if self.store is not None:
            held = await self.run(self.store.have_which, list(chunk_ids))
            for chunk_id, here in zip(chunk_ids, held, strict=True):
                if here:
                    result[chunk_id].append(self.node_id)
        candidates: dict[NodeId, tuple[PeerAddress, list[ChunkId]]] = {}
        semaphore = asyncio.Semaphore(self.config.transfer_window)

        async def providers_of(chunk_id: ChunkId) -> None:
            # One lookup gives both the announced providers and the nodes
            # closest to the id, where copies belong even if their records
            # were lost; all of them are asked.
            async with semaphore:
                found = await self.dht.lookup(chunk_id.dht_key)
            addresses = [address_of_record(record) for record in found.providers]
            addresses += [address_of(c) for c in found.closest[: 2 * self.config.replicas]]
            for address in addresses:
                if address.node_id is None or address.node_id == self.node_id:
                    continue
                entry = candidates.setdefault(address.node_id, (address, []))
                if chunk_id not in entry[1]:
                    entry[1].append(chunk_id)

        async with asyncio.TaskGroup() as group:
            for chunk_id in chunk_ids:
                group.create_task(providers_of(chunk_id))

        answers = await self.ask_have(candidates)
        for node_id, (_, asked) in candidates.items():
            flags = answers[node_id]
            for position, chunk_id in enumerate(asked):
                if flags is not None and flags[position]:
                    result[chunk_id].append(node_id)
                else:
                    # A held record of a provider that is gone or no longer
                    # has the chunk is stale.
                    self.dht.forget_provider(chunk_id.dht_key, node_id)
        return result

    async def ask_have(
        self, asks: Mapping[NodeId, tuple[PeerAddress, list[ChunkId]]]
    ) -> dict[NodeId, list[bool] | None]:
        """Ask each peer, once and all at the same time, which of its chunks it holds.

        The answer per peer is one flag per id asked, or None if the peer
        could not be reached or did not answer.
        """
        answers: dict[NodeId, list[bool] | None] = {}

        async def ask(node_id: NodeId, address: PeerAddress, chunk_ids: list[ChunkId]) -> None:
            try:
                connection = await self.connect(address)
                answers[node_id] = await connection.have(chunk_ids)
            except (NetworkError, OSError) as error:
                log.debug("%s did not answer HAVE: %s", address, error)
                answers[node_id] = None

        async with asyncio.TaskGroup() as group:
            for node_id, (address, chunk_ids) in asks.items():
                group.create_task(ask(node_id, address, chunk_ids))
        return answers

    async def copy_to(
        self,
        chunk_id: ChunkId,
        data: bytes,
        closest: Sequence[Contact],
        candidates: Sequence[Contact],
        wanted: int,
    ) -> list[NodeId]:
        """Put ``wanted`` copies on ``candidates`` (in order, moving on past
        failures), then announce the storers' records to the ``closest``
        nodes. Returns the nodes that took a copy; raises NotEnoughNodesError
        if none did.
        """
        added, records = await Placer(self, chunk_id, data, closest).place(candidates, wanted)
        if records:
            try:
                await self.dht.put_records(records, {chunk_id.dht_key: closest})
            except NetworkError as error:
                # The copies stay in place; the storers' own re-announcements
                # make them findable.
                log.info("announcing new copies of chunk %s failed: %s", chunk_id, error)
        return added

    async def replicate(self, chunk_id: ChunkId, holders: Sequence[NodeId]) -> list[NodeId]:
        """Copy a chunk to the closest live nodes lacking it, up to ``replicas``.

        Returns the nodes that took a copy. The bytes come from this node's
        store or a holder and are verified before they are sent on.
        """
        missing = self.config.replicas - len(holders)
        if missing <= 0:
            return []
        data = await get_verified(NetworkSource(self), chunk_id)
        closest = await self.dht.closest_live_nodes(
            chunk_id.dht_key, self.config.ksize, include_self=self.store is not None
        )
        held = set(holders)
        targets = [c for c in closest if c.node_id not in held]
        return await self.copy_to(chunk_id, bytes(data), closest, targets, missing)


def _root_not_found(error: ChunkNotFoundError, root: ChunkId) -> ChunkNotFoundError:
    """The error to report when a chunk was missing: worded for the root itself."""
    if error.chunk_hex != root.hex():
        return error
    return RootNotFoundError(
        f"no node has root {root.hex()}: the file was never published on this network, "
        "or every copy is gone",
        error.chunk_hex,
    )


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


# --- placement ------------------------------------------------------------------------


class Placer:
    """Puts one chunk on ``wanted`` nodes of a candidate list, in parallel.

    Starts ``wanted`` stores at once; each failure (down, full, refused)
    starts the next candidate, until enough succeeded or none are left.
    """

    def __init__(
        self, network: Network, chunk_id: ChunkId, data: bytes, closest: Sequence[Contact]
    ) -> None:
        self._network = network
        self._chunk_id = chunk_id
        self._data = data
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
            await network.run(network.store.put, self._chunk_id, self._data)
            return network.dht.sign_record(key)
        connection = await network.connect(address_of(contact))
        result = await connection.store(self._chunk_id, self._data)
        if result.status is StoreStatus.FULL:
            raise PeerRefusedError(f"node {contact.node_id} is full")
        if result.status is StoreStatus.REJECTED:
            raise PeerRefusedError(f"node {contact.node_id} rejected the chunk bytes")
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
    """Places published chunks on the network (see module docstring)."""

    def __init__(self, network: Network) -> None:
        self._network = network
        self._records: list[ProviderRecord] = []
        self._closest: dict[bytes, Sequence[Contact]] = {}
        self._announce_lock = asyncio.Lock()
        self.under_replicated = 0
        self.placed = 0

    async def put(self, chunk: SealedChunk) -> None:
        network = self._network
        key = chunk.chunk_id.dht_key
        closest = await network.dht.closest_live_nodes(
            key, network.config.ksize, include_self=network.store is not None
        )
        placer = Placer(network, chunk.chunk_id, chunk.data, closest)
        placed, records = await placer.place(closest, network.config.replicas)
        self.placed += len(placed)
        if len(placed) < network.config.replicas:
            self.under_replicated += 1
        self._records.extend(records)
        self._closest[key] = closest
        if len(self._records) >= _ANNOUNCE_BATCH:
            await self._announce()

    async def _announce(self) -> None:
        async with self._announce_lock:
            records, self._records = self._records, []
            closest, self._closest = self._closest, {}
            if records:
                confirmed = await self._network.dht.put_records(records, closest)
                lonely = [key for key, count in confirmed.items() if count == 0]
                if lonely:
                    log.debug("%d provider record(s) found no DHT node to keep them", len(lonely))

    async def flush(self) -> None:
        await self._announce()


class NetworkSource:
    """Gets verified chunks from whichever holder answers (see module docstring)."""

    def __init__(self, network: Network) -> None:
        self._network = network
        self._hints: dict[ChunkId, list[PeerAddress]] = {}
        self._failures: dict[NodeId, int] = {}
        self._restore: set[ChunkId] = set()
        """Chunks whose local copy was found corrupt (and removed) by this source."""

    async def prefetch(self, chunk_ids: Sequence[ChunkId]) -> None:
        """Ask connected (and a few known) peers which of these chunks they hold."""
        network = self._network
        self._hints.clear()
        if not chunk_ids:
            return
        wanted = list(chunk_ids)
        peers: dict[NodeId, PeerAddress] = {}
        for contact in network.dht.known_contacts()[:_PREFETCH_PEERS]:
            peers[contact.node_id] = address_of(contact)
        for node_id in network.endpoint.connected_peers():
            connection = network.endpoint.connection_to(node_id)
            if connection is not None and not connection.wire.peer_is_client:
                peers.setdefault(node_id, PeerAddress("", 0, node_id))
        peers.pop(network.node_id, None)

        async def ask(address: PeerAddress) -> None:
            try:
                connection = await network.connect(address)
                held = await connection.have(wanted)
            except (NetworkError, OSError):
                return
            for chunk_id, here in zip(wanted, held, strict=True):
                if here:
                    self._hints.setdefault(chunk_id, []).append(address)

        # A hint only: whatever has not answered in time is found through the DHT.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(network.config.request_timeout):
                await asyncio.gather(*(ask(address) for address in peers.values()))

    async def fetch(self, chunk_id: ChunkId, size_hint: int | None, consume: Consume[T]) -> T:
        network = self._network
        if network.store is not None:
            local = await self._local(chunk_id, consume)
            if local is not None:
                return local[0]
        tried: set[NodeId] = {network.node_id}
        errors: list[str] = []
        # Not popped: a file may list the same chunk many times (zero blocks).
        hinted = self._hints.get(chunk_id, [])
        found = await self._try_each(chunk_id, hinted, tried, errors, consume)
        if found is not None:
            return found[0]
        records = await network.dht.find_providers(chunk_id.dht_key)
        found = await self._try_each(
            chunk_id, [address_of_record(r) for r in records], tried, errors, consume
        )
        if found is not None:
            return found[0]
        # No announced holder answered. Copies are placed on the nodes closest
        # to the id, so ask those directly: this finds chunks whose provider
        # records were lost (say, every record holder restarted at once).
        closest = await network.dht.closest_live_nodes(
            chunk_id.dht_key, 2 * network.config.replicas, include_self=False
        )
        found = await self._try_each(
            chunk_id, [address_of(c) for c in closest], tried, errors, consume
        )
        if found is not None:
            return found[0]
        if errors:
            detail = f"; tried {len(errors)} holder(s): " + "; ".join(errors[-3:])
        else:
            detail = ": no node announces it"
        raise ChunkNotFoundError(f"chunk {chunk_id.hex()} is unavailable{detail}", chunk_id.hex())

    async def _local(self, chunk_id: ChunkId, consume: Consume[T]) -> tuple[T] | None:
        store = self._network.store
        assert store is not None

        def read() -> tuple[T] | None:
            try:
                return (consume(store.get(chunk_id)),)
            except ChunkNotFoundError:
                return None

        try:
            return await self._network.run(read)
        except DhtfsError as error:
            # The store removed its corrupt copy; the good copy fetched from
            # a peer will be put back (read repair).
            log.warning("%s", error)
            self._restore.add(chunk_id)
            return None

    def _ordered(self, addresses: Iterable[PeerAddress]) -> list[PeerAddress]:
        """Least busy first, then fewest failures, random among equals (spreads load)."""
        endpoint = self._network.endpoint

        def load(address: PeerAddress) -> tuple[int, int, float]:
            connection = endpoint.connection_to(address.node_id) if address.node_id else None
            in_flight = connection.in_flight if connection is not None else 0
            failures = self._failures.get(address.node_id, 0) if address.node_id else 0
            return failures, in_flight, random.random()

        return sorted(addresses, key=load)

    async def _try_each(
        self,
        chunk_id: ChunkId,
        addresses: Sequence[PeerAddress],
        tried: set[NodeId],
        errors: list[str],
        consume: Consume[T],
    ) -> tuple[T] | None:
        for address in self._ordered(addresses):
            if address.node_id in tried:
                continue
            if address.node_id is not None:
                tried.add(address.node_id)
            found = await self._try_one(chunk_id, address, errors, consume)
            if found is not None:
                return found
        return None

    async def _try_one(
        self, chunk_id: ChunkId, address: PeerAddress, errors: list[str], consume: Consume[T]
    ) -> tuple[T] | None:
        network = self._network
        try:
            connection = await network.connect(address)
            body = await connection.get(chunk_id)
        except (PeerUnavailableError, HandshakeError, PeerRefusedError, OSError) as error:
            self._failed(address, errors, str(error))
            return None
        if body is None:
            errors.append(f"{address.node_id} no longer has it")
            if address.node_id is not None:
                network.dht.forget_provider(chunk_id.dht_key, address.node_id)
            return None
        try:
            result = await network.run(consume, body)
        except IntegrityError:
            log.warning(
                "node %s served a corrupt copy of chunk %s; trying the next holder",
                address.node_id,
                chunk_id.hex(),
            )
            self._failed(address, errors, "served a corrupt copy")
            network.endpoint.buffers.give_back(body)
            return None
        if chunk_id in self._restore and network.store is not None:
            self._restore.discard(chunk_id)
            await self._put_back(chunk_id, bytes(body))
        if result is not body:
            # consume is done with the received buffer (it kept a length or
            # a copy), so the next chunk can be received into it.
            network.endpoint.buffers.give_back(body)
        return (result,)

    async def _put_back(self, chunk_id: ChunkId, data: bytes) -> None:
        """Replace this node's corrupt copy with the good one just fetched."""
        store = self._network.store
        assert store is not None
        try:
            await self._network.run(store.put, chunk_id, data)
        except DhtfsError as error:
            log.warning("could not restore chunk %s after finding it corrupt: %s", chunk_id, error)
            return
        log.info("replaced the corrupt local copy of chunk %s with a good one", chunk_id)

    def _failed(self, address: PeerAddress, errors: list[str], reason: str) -> None:
        errors.append(f"{address.node_id or address}: {reason}")
        if address.node_id is not None:
            self._failures[address.node_id] = self._failures.get(address.node_id, 0) + 1


__all__ = [
    "CheckReport",
    "ChunkHealth",
    "Network",
    "NetworkSink",
    "NetworkSource",
]
