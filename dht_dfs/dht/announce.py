"""Where provider records go: placing them on each key's k closest nodes.

Owns ``put_records`` (records batched per target, in groups of keys), the
announcement of this node's own records and their periodic re-announcement
(reading the keys it provides in a worker thread, paced), and the push of
held records to a newly verified node that is now among their k closest
(paper section 2.5). The records a node holds are in ``records``; signing
and lookups are the owner's (``DhtNode``).

Must not import: kademlia (only ``compat`` does), nor ``membership`` or ``node``.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
import random
import time
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Final, TypeVar

from dht_dfs.core.config import Config
from dht_dfs.core.ids import DHT_KEY_SIZE, NodeId
from dht_dfs.core.pacer import Pacer
from dht_dfs.dht.protocol import DhtProtocol
from dht_dfs.dht.records import ProviderStore
from dht_dfs.dht.values import (
    CLOCK_SKEW_ALLOWANCE,
    Contact,
    LookupResult,
    NodeCounters,
    ProviderRecord,
    split_into_batches,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

WELCOME_PUSHERS: Final = 3
"""A holder pushes records to a new node only if it is among this many
closest holders it knows of (Kademlia section 2.5, relaxed from 1 so that one
holder that never hears of the newcomer does not leave it empty-handed)."""
MAX_WELCOME_QUEUE: Final = 1024
PUSH_DATAGRAMS_PER_SECOND: Final = 200.0
REANNOUNCE_KEYS_PER_SECOND: Final = 100.0
ANNOUNCE_GROUP: Final = 32
"""Keys announced together in one re-announcement step."""
ANNOUNCE_CONCURRENCY: Final = 8
"""Lookups and add_providers requests in flight for one announcement."""
PUT_GROUP_KEYS: Final = 256
"""Keys whose records put_records places together (one lookup task each)."""
MAX_REANNOUNCE_KEYS: Final = 10_000_000
KEY_PULL_BATCH: Final = 1024
"""Keys read from ``provided_keys`` per trip to a worker thread."""


class AnnounceOwner(typing.Protocol):
    """What announcing needs from the node that owns it (a DhtNode)."""

    @property
    def protocol(self) -> DhtProtocol:
        """The running protocol (raises if the node is not started)."""

    @property
    def stopping(self) -> bool:
        """True once the node began to stop: queue no new work."""

    async def lookup(
        self, key: bytes, *, want: int | None = None, providers: bool = True
    ) -> LookupResult:
        """An iterative lookup of ``key``."""

    def sign_record(self, key: bytes, ttl: float | None = None) -> ProviderRecord:
        """This node's own provider record for ``key``."""


async def run_pass(what: str, step: Callable[[], typing.Awaitable[object]]) -> None:
    """Run one pass of a long-lived loop, logging (not raising) a failure."""
    try:
        await step()
    # A bug in one pass must not end a loop the node relies on; cancellation
    # (a BaseException) still does.
    except Exception:
        log.exception("DHT %s pass failed", what)


def _take(keys: Iterator[bytes], count: int) -> list[bytes]:
    return list(islice(keys, count))


def _iterate(provided_keys: Callable[[], Iterable[bytes]]) -> Iterator[bytes]:
    return iter(provided_keys())


async def _in_worker_thread(work: Callable[[], _T]) -> _T:
    """``work()`` in a worker thread; if cancelled, re-raise only once it returned.

    A thread cannot be stopped: without the wait, a node's stop() would return
    while the thread still reads the caller's store, which its owner closes next.
    """
    future = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        # Our own cancellation: let the read finish, then propagate it.
        await asyncio.wait([future])
        raise


class Announcer:
    """Places provider records and keeps this node's own ones alive."""

    def __init__(
        self,
        owner: AnnounceOwner,
        *,
        own_id: NodeId,
        config: Config,
        providers: ProviderStore,
        counters: NodeCounters,
        activity: asyncio.Event,
        client_mode: bool,
        provided_keys: Callable[[], Iterable[bytes]] | None,
        clock: Callable[[], float],
    ) -> None:
        self._owner = owner
        self.own_id = own_id
        self.config = config
        self.providers = providers
        self.counters = counters
        self.client_mode = client_mode
        self.clock = clock
        self._provided_keys = provided_keys
        self._activity = activity
        """The owner's: set when a push pass ends (``DhtNode.settled`` waits on it)."""
        self._welcome_queue: dict[NodeId, Contact] = {}
        self._welcome_wakeup = asyncio.Event()
        self._pushing = False
        self._push_pacer = Pacer(PUSH_DATAGRAMS_PER_SECOND, PUSH_DATAGRAMS_PER_SECOND)
        self._announce_pacer = Pacer(REANNOUNCE_KEYS_PER_SECOND, ANNOUNCE_GROUP)
        self.reannounced = asyncio.Event()
        """Set after each re-announcement pass (tests and status wait on it)."""

    @property
    def reannounces(self) -> bool:
        """Whether this node re-announces at all (it provides keys, not a client)."""
        return self._provided_keys is not None and not self.client_mode

    def busy(self) -> bool:
        """True while record pushes are queued or in flight."""
        return bool(self._welcome_queue or self._pushing)

    # --- placing records ------------------------------------------------------------

    async def announce(self, keys: Sequence[bytes]) -> dict[bytes, int]:
        """Sign this node's records for ``keys`` and put them on each key's k closest."""
        records = [self._owner.sign_record(key) for key in dict.fromkeys(keys)]
        return await self.put_records(records)

    async def put_records(
        self,
        records: Sequence[ProviderRecord],
        closest: Mapping[bytes, Sequence[Contact]] | None = None,
    ) -> dict[bytes, int]:
        """See ``DhtNode.put_records``."""
        by_key: dict[bytes, list[ProviderRecord]] = {}
        for record in records:
            by_key.setdefault(record.key, []).append(record)
        confirmations: dict[bytes, int] = {}
        keys = iter(list(by_key))
        # A group of keys at a time, so a large publish never holds thousands of
        # tasks; each group's records still travel batched per target.
        for _ in range(len(by_key) // PUT_GROUP_KEYS + 1):
            group_keys = list(islice(keys, PUT_GROUP_KEYS))
            if not group_keys:
                break
            group = {key: by_key[key] for key in group_keys}
            confirmations.update(await self._put_group(group, closest))
        return confirmations

    async def _put_group(
        self,
        by_key: dict[bytes, list[ProviderRecord]],
        closest: Mapping[bytes, Sequence[Contact]] | None,
    ) -> dict[bytes, int]:
        targets: dict[bytes, list[Contact]] = {}
        slots = asyncio.Semaphore(ANNOUNCE_CONCURRENCY)
        missing = [key for key in by_key if closest is None or key not in closest]
        async with asyncio.TaskGroup() as group:
            lookups = {
                key: group.create_task(self._closest_for_storage(slots, key)) for key in missing
            }
        for key in by_key:
            if key in lookups:
                targets[key] = lookups[key].result()
            elif closest is not None:
                targets[key] = list(closest[key])[: self.config.ksize]

        now = self.clock()
        own = self.own_id
        per_target: dict[Contact, list[ProviderRecord]] = {}
        for key, key_records in by_key.items():
            contacts = [c for c in targets[key] if c.node_id != own]
            kth = max((c.distance(key) for c in contacts), default=-1)
            if not self.client_mode and (
                len(contacts) < self.config.ksize or own.distance(key) < kth
            ):
                # This node is among the k closest itself: hold the records too.
                for record in key_records:
                    if record.verify(now, max_ttl=self.config.provider_ttl + CLOCK_SKEW_ALLOWANCE):
                        self.providers.add(record, now)
            for contact in contacts:
                # A storer keeps its own record when it signs it (see
                # DhtNode.hold_own_record): sent back, it would cost it a
                # signature check for nothing.
                others = [r for r in key_records if r.node_id != contact.node_id]
                if others:
                    per_target.setdefault(contact, []).extend(others)

        confirmed: dict[bytes, set[NodeId]] = {key: set() for key in by_key}
        async with asyncio.TaskGroup() as group:
            for contact, target_records in per_target.items():
                for batch in split_into_batches(target_records):
                    group.create_task(self._send_batch(slots, contact, batch, confirmed))
        return {key: len(nodes) for key, nodes in confirmed.items()}

    async def _closest_for_storage(self, slots: asyncio.Semaphore, key: bytes) -> list[Contact]:
        async with slots:
            result = await self._owner.lookup(key, providers=False)
        return list(result.closest[: self.config.ksize])

    async def _send_batch(
        self,
        slots: asyncio.Semaphore,
        contact: Contact,
        batch: list[ProviderRecord],
        confirmed: dict[bytes, set[NodeId]],
    ) -> None:
        protocol = self._owner.protocol
        async with slots:
            reply = await protocol.call_contact(
                contact, "add_providers", [protocol.header, [r.to_wire() for r in batch]]
            )
        flags = reply if isinstance(reply, list) and len(reply) == len(batch) else None
        if flags is None:
            if reply is not None:
                protocol.drop(contact.udp_address, "bad add_providers reply")
            return
        for record, accepted in zip(batch, flags, strict=True):
            if accepted is True and record.key in confirmed:
                confirmed[record.key].add(contact.node_id)

    # --- re-announcement --------------------------------------------------------------

    async def reannounce(self) -> int:
        """Announce every key ``provided_keys`` yields again; returns how many."""
        if self._provided_keys is None or self.client_mode:
            return 0
        done = 0
        # provided_keys walks the chunk store's index (SQLite): it runs in a worker
        # thread, KEY_PULL_BATCH keys a trip, so a large store never stalls the
        # event loop. One trip at a time: the iterator is never used concurrently.
        provided_keys = self._provided_keys
        keys = await _in_worker_thread(lambda: _iterate(provided_keys))
        # Bounded by MAX_REANNOUNCE_KEYS keys, ANNOUNCE_GROUP at a time, paced.
        while done < MAX_REANNOUNCE_KEYS:
            pulled = await _in_worker_thread(functools.partial(_take, keys, KEY_PULL_BATCH))
            if not pulled:
                break
            for start in range(0, len(pulled), ANNOUNCE_GROUP):
                if done >= MAX_REANNOUNCE_KEYS:
                    break
                batch = pulled[start : start + ANNOUNCE_GROUP]
                group = [k for k in batch if isinstance(k, bytes) and len(k) == DHT_KEY_SIZE]
                if len(group) != len(batch):
                    log.warning(
                        "provided_keys yielded %d keys that are not 20 bytes",
                        len(batch) - len(group),
                    )
                await asyncio.sleep(self._announce_pacer.reserve(len(group), time.monotonic()))
                await self.announce(group)
                done += len(group)
        self.counters.reannounce_passes += 1
        self.reannounced.set()
        return done

    async def reannounce_loop(self) -> None:
        """Re-announce for the node's lifetime (its owner cancels this task)."""
        # Records are renewed at half their lifetime so one failed pass still
        # leaves them alive.
        interval = max(1.0, self.config.provider_ttl / 2)
        while True:
            await asyncio.sleep(interval * random.uniform(0.9, 1.0))
            self.reannounced.clear()
            await run_pass("re-announcement", self.reannounce)

    # --- welcome pushes (section 2.5) ---------------------------------------------------

    def welcome(self, contact: Contact) -> None:
        """Queue a newly verified node for the records it is now among the k closest to."""
        if (
            self.client_mode
            or self._owner.stopping
            or len(self._welcome_queue) >= MAX_WELCOME_QUEUE
        ):
            return
        self._welcome_queue[contact.node_id] = contact
        self._welcome_wakeup.set()

    async def welcome_loop(self) -> None:
        """Push records to newcomers for the node's lifetime (its owner cancels this)."""
        # Each pass handles a snapshot of the queue, which ``welcome`` bounds.
        while True:
            await self._welcome_wakeup.wait()
            self._welcome_wakeup.clear()
            newcomers = list(self._welcome_queue.values())
            self._welcome_queue.clear()
            self._pushing = True
            try:
                await run_pass("record push", functools.partial(self._push_to, newcomers))
            finally:
                self._pushing = False
                self._activity.set()

    async def _push_to(self, newcomers: list[Contact]) -> None:
        """Hand newcomers the records they are now among the k closest to."""
        if not newcomers or not len(self.providers):
            return
        protocol = self._owner.protocol
        now = self.clock()
        own = self.own_id.as_int
        newcomer_ids = {c.node_id for c in newcomers}
        known = [
            p.long_id for p in protocol.router.peers() if p.contact.node_id not in newcomer_ids
        ]
        k = self.config.ksize
        outgoing: dict[Contact, list[ProviderRecord]] = {c: [] for c in newcomers}
        for index, key in enumerate(self.providers.keys()):
            if index % 1024 == 1023:
                await asyncio.sleep(0)  # a large store must not stall the event loop
            target = int.from_bytes(key, "big")
            mine = own ^ target
            if sum(1 for peer in known if peer ^ target < mine) >= WELCOME_PUSHERS:
                continue  # closer holders will push it
            nearest = heapq.nsmallest(k, (peer ^ target for peer in known))
            kth = nearest[-1] if len(nearest) >= k else 1 << 160
            records = None
            for newcomer in newcomers:
                if newcomer.node_id.as_int ^ target < kth:
                    records = records if records is not None else self.providers.get(key, now)
                    outgoing[newcomer].extend(records)
        for newcomer, records in outgoing.items():
            for batch in split_into_batches(records):
                await asyncio.sleep(self._push_pacer.reserve(1, time.monotonic()))
                reply = await protocol.call_contact(
                    newcomer, "add_providers", [protocol.header, [r.to_wire() for r in batch]]
                )
                if reply is None:
                    break  # gone already: do not wait out a timeout per batch
                self.counters.records_pushed += len(batch)
