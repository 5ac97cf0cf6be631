"""Getting verified chunks from the network: ``NetworkSource``.

A chunk comes from whichever holder answers, tried in this order: this
node's own store; peers that said they hold it (HAVE queries sent ahead for
a whole manifest leaf, see ``prefetch``); the ``replicas`` nodes closest to
its id, where copies are placed, when a lookup kept for a nearby key proves
which they are (``nearby``: most chunks of a fetch need no lookup); the
providers the DHT knows; the nodes closest to the chunk's id (copies belong
there even when their provider records were lost). Within each group the holder with fewest
failures, then fewest requests in flight, goes first. A dead peer, a
timeout or a corrupt copy only moves the fetch on to the next holder; a
holder that no longer has the chunk has its provider record forgotten. A
corrupt local copy is replaced by the good one fetched (read repair).

Records are claims, and anyone can sign many (one per made-up identity),
all pointing at a listener that never answers. So within a group:

- addresses are de-duplicated (one attempt per host and port at a time);
  an address that failed (refused, timed out) is not tried again for that
  chunk and goes last for the rest of this fetch;
- attempts are hedged: if the current one has not answered after
  ``hedge_delay`` (or a few times the latency seen so far, if that is
  longer), the next holder is asked too; the first good copy wins and the
  others are cancelled. Only the network part races: the bytes of one
  answer at a time are checked and consumed, so a cancelled attempt never
  writes;
- at most ``max_holders_per_chunk`` holders are tried.

A record thus costs the fetch one hedge delay, not a connect or request
timeout, and a flood of them a bounded number of attempts, after which the
closest nodes (where copies belong) are still asked.

Must not import: dht (except ``dht.values``), transport, node.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Iterable, Sequence
from typing import TypeVar

from dht_dfs.core.addresses import PeerAddress
from dht_dfs.core.errors import (
    ChunkNotFoundError,
    DhtfsError,
    HandshakeError,
    IntegrityError,
    NetworkError,
    PeerRefusedError,
    PeerUnavailableError,
    RootNotFoundError,
)
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.transfer.ports import Consume, NetworkView, address_of, address_of_record

log = logging.getLogger(__name__)

T = TypeVar("T")

_PREFETCH_PEERS = 8
"""Known contacts asked (besides connected peers) which chunks they hold."""
_HEDGE_LATENCIES = 3.0
"""The hedge waits at least this many times the average answer time seen."""
_CONNECTION_FAILURES = (PeerUnavailableError, HandshakeError, OSError)
"""Failures that say nothing answers at that address (unlike a refusal or a bad copy)."""


class NetworkSource:
    """Gets verified chunks from whichever holder answers (see module docstring)."""

    def __init__(self, network: NetworkView) -> None:
        self._network = network
        self._hints: dict[ChunkId, list[PeerAddress]] = {}
        self._failures: dict[NodeId, int] = {}
        self._dead_addresses: set[tuple[str, int]] = set()
        """Addresses that failed during this fetch: tried last (once per chunk)."""
        self._latency: float | None = None
        """Moving average of a good answer's time, seconds (sets the hedge delay)."""
        self._restore: dict[ChunkId, float] = {}
        """Chunks whose local copy was found corrupt (and removed) by this source,
        with the lease it had: the good copy put back keeps that, no longer."""

    async def prefetch(self, chunk_ids: Sequence[ChunkId]) -> None:
        """Ask connected (and a few known) peers which of these chunks they hold.

        Chunks whose placement kept lookups already prove (``nearby``) are not
        asked about: their holders are known, and in a small network that is
        every chunk, so a tree of small files costs no HAVE round per file.
        """
        network = self._network
        replicas = network.config.replicas
        wanted = [
            chunk_id
            for chunk_id in chunk_ids
            if network.nearby.peek(chunk_id.dht_key, replicas, include_self=False) is None
        ]
        if not wanted:
            return
        self._hints.clear()
        peers: dict[NodeId, PeerAddress] = {}
        for contact in network.locator.known_contacts()[:_PREFETCH_PEERS]:
            peers[contact.node_id] = address_of(contact)
        for node_id in network.dialer.serving_peers():
            peers.setdefault(node_id, PeerAddress("", 0, node_id))
        peers.pop(network.node_id, None)

        async def ask(address: PeerAddress) -> None:
            try:
                link = await network.dialer.connect(address)
                held = await link.have(wanted)
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
        tried: set[NodeId | tuple[str, int]] = {network.node_id}
        errors: list[str] = []
        # Not popped: a file may list the same chunk many times (zero blocks).
        hinted = self._hints.get(chunk_id, [])
        found = await self._try_each(chunk_id, hinted, tried, errors, consume)
        if found is not None:
            return found[0]
        # Copies are placed on the nodes closest to the id: when kept lookups
        # name them for sure, they are asked before the DHT is.
        expected = network.nearby.peek(
            chunk_id.dht_key, network.config.replicas, include_self=False
        )
        if expected is not None:
            found = await self._try_each(
                chunk_id, [address_of(c) for c in expected], tried, errors, consume
            )
            if found is not None:
                return found[0]
            records = await network.locator.find_providers(chunk_id.dht_key)
        else:
            # One lookup finds the providers and, kept, the closest nodes of
            # this key and of the many keys near enough to share its answer.
            result = await network.locator.lookup(chunk_id.dht_key)
            network.nearby.learn(result)
            records = list(result.providers)
        found = await self._try_each(
            chunk_id, [address_of_record(r) for r in records], tried, errors, consume
        )
        if found is not None:
            return found[0]
        # No announced holder answered. Copies are placed on the nodes closest
        # to the id, so ask those directly: this finds chunks whose provider
        # records were lost (say, every record holder restarted at once).
        closest = await network.nearby.closest(
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

        leased: list[float] = []

        def read() -> tuple[T] | None:
            until = store.lease_until(chunk_id)
            if until is None:
                return None
            leased.append(until)
            try:
                return (consume(store.get(chunk_id)),)
            except ChunkNotFoundError:
                return None

        try:
            return await self._network.run(read)
        except DhtfsError as error:
            # The store removed its corrupt copy; the good copy fetched from
            # a peer will be put back (read repair) under the lease it had.
            log.warning("%s", error)
            if leased:
                self._restore[chunk_id] = leased[0]
            return None

    def _ordered(self, addresses: Iterable[PeerAddress]) -> list[PeerAddress]:
        """Fewest failures first, then least busy, random among equals (spreads load)."""
        dialer = self._network.dialer

        def load(address: PeerAddress) -> tuple[bool, int, int, float]:
            in_flight = dialer.in_flight_to(address.node_id) if address.node_id else 0
            failures = self._failures.get(address.node_id, 0) if address.node_id else 0
            dead = (address.host, address.port) in self._dead_addresses
            return dead, failures, in_flight, random.random()

        return sorted(addresses, key=load)

    def _hedge_delay(self) -> float:
        config = self._network.config
        seen = 0.0 if self._latency is None else _HEDGE_LATENCIES * self._latency
        return min(max(config.hedge_delay, seen), config.request_timeout)

    async def _try_each(
        self,
        chunk_id: ChunkId,
        addresses: Sequence[PeerAddress],
        tried: set[NodeId | tuple[str, int]],
        errors: list[str],
        consume: Consume[T],
    ) -> tuple[T] | None:
        """Hedged attempts over one group of holders (see the module docstring).

        ``tried`` holds node ids and (host, port) pairs already tried for this
        chunk, across groups: a holder is asked once per chunk, and an address
        that failed is not asked again under another record's name.
        """
        # Each address first at its best-ordered record; further records at
        # an address already queued go after every distinct one, so a flood
        # of records naming one address cannot crowd the others out of the cap.
        first: list[PeerAddress] = []
        again: list[PeerAddress] = []
        places: set[tuple[str, int]] = set()
        for address in self._ordered(addresses):
            if address.node_id in tried or self._place(address) in tried:
                continue
            place = self._place(address)
            (again if place in places and address.port else first).append(address)
            places.add(place)
        queue = (first + again)[: self._network.config.max_holders_per_chunk]
        for address in queue:
            if address.node_id is not None:
                tried.add(address.node_id)
        running: dict[asyncio.Task[bytes | bytearray | None], PeerAddress] = {}
        try:
            while queue or running:
                self._start_next(chunk_id, queue, running, tried)
                if not running:
                    continue  # what is left of the queue is at addresses that failed
                delay = self._hedge_delay() if queue else None
                done, _ = await asyncio.wait(
                    running, timeout=delay, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    address = running.pop(task)
                    found = await self._settle(
                        chunk_id, address, task=task, tried=tried, errors=errors, consume=consume
                    )
                    if found is not None:
                        return found
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        return None

    @staticmethod
    def _place(address: PeerAddress) -> tuple[str, int]:
        return (address.host, address.port)

    def _start_next(
        self,
        chunk_id: ChunkId,
        queue: list[PeerAddress],
        running: dict[asyncio.Task[bytes | bytearray | None], PeerAddress],
        tried: set[NodeId | tuple[str, int]],
    ) -> None:
        """Start the first queued holder whose address is neither busy nor failed."""
        busy = {self._place(address) for address in running.values()}
        for index, address in enumerate(queue):
            place = self._place(address)
            if place in tried:
                queue.pop(index)  # failed for this chunk under another record
                return
            if place in busy and address.port:
                continue  # one attempt per address at a time
            queue.pop(index)
            running[asyncio.create_task(self._get_body(chunk_id, address))] = address
            return

    async def _get_body(self, chunk_id: ChunkId, address: PeerAddress) -> bytes | bytearray | None:
        started = time.monotonic()
        link = await self._network.dialer.connect(address)
        body = await link.get(chunk_id)
        took = time.monotonic() - started
        self._latency = took if self._latency is None else 0.8 * self._latency + 0.2 * took
        return body

    async def _settle(
        self,
        chunk_id: ChunkId,
        address: PeerAddress,
        *,
        task: asyncio.Task[bytes | bytearray | None],
        tried: set[NodeId | tuple[str, int]],
        errors: list[str],
        consume: Consume[T],
    ) -> tuple[T] | None:
        network = self._network
        try:
            body = task.result()
        except _CONNECTION_FAILURES as error:
            if address.port:
                self._dead_addresses.add(self._place(address))
                # A failed handshake may be a listener that is some other
                # node (records can name anyone's address): the record that
                # names it rightly must still get its turn, one at a time.
                if not isinstance(error, HandshakeError):
                    tried.add(self._place(address))
            self._failed(address, errors, str(error))
            return None
        except PeerRefusedError as error:
            self._failed(address, errors, str(error))
            return None
        if body is None:
            errors.append(f"{address.node_id} no longer has it")
            if address.node_id is not None:
                network.locator.forget_provider(chunk_id.dht_key, address.node_id)
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
            network.dialer.give_back(body)
            return None
        until = self._restore.pop(chunk_id, None)
        if until is not None and network.store is not None and until > time.time():
            await self._put_back(chunk_id, bytes(body), until)
        if result is not body:
            # consume is done with the received buffer (it kept a length or
            # a copy), so the next chunk can be received into it.
            network.dialer.give_back(body)
        return (result,)

    async def _put_back(self, chunk_id: ChunkId, data: bytes, lease_until: float) -> None:
        """Replace this node's corrupt copy with the good one just fetched."""
        store = self._network.store
        assert store is not None
        try:
            await self._network.run(
                functools.partial(store.put, chunk_id, data, lease_until=lease_until)
            )
        except DhtfsError as error:
            log.warning("could not restore chunk %s after finding it corrupt: %s", chunk_id, error)
            return
        log.info("replaced the corrupt local copy of chunk %s with a good one", chunk_id)

    def _failed(self, address: PeerAddress, errors: list[str], reason: str) -> None:
        errors.append(f"{address.node_id or address}: {reason}")
        if address.node_id is not None:
            self._failures[address.node_id] = self._failures.get(address.node_id, 0) + 1


def root_not_found(error: ChunkNotFoundError, root: ChunkId) -> ChunkNotFoundError:
    """The error to report when a chunk was missing: worded for the root itself."""
    if error.chunk_hex != root.hex():
        return error
    return RootNotFoundError(
        f"no node has root {root.hex()}: the file was never published on this network, "
        "or every copy is gone",
        error.chunk_hex,
    )


__all__ = ["NetworkSource", "root_not_found"]
