"""Answering peers' chunk requests from a node's store.

Implements ``transport.RequestHandler`` over a ``ChunkStore``: a stored
chunk is verified (in a thread) before it is kept, so a bad body never
reaches the disk; a full store answers FULL so the sender places the chunk
elsewhere; stored chunks are served as open files for ``sendfile``.

Leases: every STORE says how long to keep the chunk, and LEASE extends that
for chunks held; a chunk keeps the latest expiry it was given, capped at
``max_lease`` seconds from now, and is dropped by the node's collection
pass once that expiry and a grace period are over (``store.chunks``).

Admission: a node keeps a chunk as its own only if it is a rightful holder
by its own view of the DHT (the ``rightful`` callable). Anything else is a
*guest*, kept within the store's per-peer and node-wide guest budgets and
never copied on by repair; beyond them the answer is REFUSED. Without that,
any identity could park bytes on any node and have repair multiply them
onto the chunk's rightful holders.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from dht_dfs.core.config import Config
from dht_dfs.core.errors import (
    ChunkNotFoundError,
    GuestRefusedError,
    IntegrityError,
    StoreError,
    StoreFullError,
)
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.core.proofs import proof_tag
from dht_dfs.store.chunks import ChunkStore, PutOutcome
from dht_dfs.store.guests import Guest
from dht_dfs.transport.buffers import ChunkBody, FileBody, LazyFileBody
from dht_dfs.wire import StoreStatus

log = logging.getLogger(__name__)

STORE_OUTCOMES = tuple(status.name.lower() for status in StoreStatus)
"""Labels of the STORE answers counted in ``ChunkService.counts``."""

REFUSAL_LOG_INTERVAL = 60.0
"""Seconds between log lines about refused chunks of one kind (a full node
refuses every chunk offered: one line per minute with the count, not one each)."""


class RefusalLog:
    """The first refusal of a kind logged at once, then one line per interval
    saying how many more there were."""

    def __init__(
        self, interval: float = REFUSAL_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def __call__(self, kind: str, level: int, message: str, *args: object) -> None:
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._since[kind] = self._since.get(kind, 0) + 1
            return
        more = self._since.pop(kind, 0)
        self._last[kind] = now
        if more:
            message += " (and %d more like it since the last such line)"
            args = (*args, more)
        log.log(level, message, *args)


T = TypeVar("T")

_DEFAULTS = Config()

MAX_CONCURRENT_LEASES = 4
"""LEASE requests this node works on at once, from all peers together: each
writes up to ``Limits.max_have_ids`` index rows under the store's lock, so
more would only queue there and delay STOREs and GETs."""

MAX_CONCURRENT_PROOFS = 2
"""PROVE requests this node works on at once, from all peers together.

A proof costs the prover a read and a BLAKE2b pass per chunk (up to
``Limits.max_prove_ids`` chunks per request); requests beyond this wait
(and their senders' request timeouts bound the wait), so proving can take
at most this many worker threads away from serving and storing.
"""


class ChunkService:
    """The request handler of a storing node."""

    def __init__(
        self,
        store: ChunkStore,
        executor: Executor | None = None,
        *,
        receipt_for: Callable[[ChunkId], bytes] | None = None,
        on_stored: Callable[[ChunkId], None] | None = None,
        rightful: Callable[[ChunkId], bool] | None = None,
        max_lease: float = _DEFAULTS.max_lease_ttl,
    ) -> None:
        """``rightful``: whether this node is a rightful holder of a chunk by its
        own view; None takes every chunk as rightful (a store with no DHT).
        ``max_lease``: the longest lease granted, whatever a peer asks for."""
        self.store = store
        self._max_lease = max_lease
        self.leases = self.chunks_leased = 0
        """LEASE requests answered, and chunk leases they extended."""
        self._rightful = rightful
        self.chunks_refused = 0
        """STOREs answered REFUSED: not rightful here and no guest room."""
        self._refusals = RefusalLog()
        self._executor = executor
        self._receipt_for = receipt_for
        self._on_stored = on_stored
        self.chunks_served = 0
        self.bytes_served = 0
        self.counts: dict[str, int] = dict.fromkeys(STORE_OUTCOMES, 0)
        """STOREs answered, by outcome (for metrics)."""
        self.bytes_stored = 0
        """Bytes of chunks newly stored through STORE."""
        self.haves = self.proofs = 0
        self._proving = asyncio.Semaphore(MAX_CONCURRENT_PROOFS)
        self._leasing = asyncio.Semaphore(MAX_CONCURRENT_LEASES)

    async def _run(self, func: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    def _lease_until(self, seconds: int) -> float:
        return time.time() + min(float(seconds), self._max_lease)

    async def handle_store(
        self, peer: NodeId, chunk_id: ChunkId, body: bytes | bytearray, *, host: str, lease: int
    ) -> tuple[StoreStatus, bytes]:
        status, receipt = await self._store(
            peer, chunk_id, body, host=host, until=self._lease_until(lease)
        )
        self.counts[status.name.lower()] += 1
        if status is StoreStatus.STORED:
            self.bytes_stored += len(body)
        return status, receipt

    async def _store(
        self, peer: NodeId, chunk_id: ChunkId, body: bytes | bytearray, *, host: str, until: float
    ) -> tuple[StoreStatus, bytes]:
        guest = None
        if self._rightful is not None and not self._rightful(chunk_id):
            guest = Guest(peer, host)
        try:
            outcome = await self._run(self._put, chunk_id, body, guest, until)
        except IntegrityError:
            self._refusals(
                "rejected", logging.WARNING,
                "peer %s sent chunk %s with wrong bytes; refused", peer, chunk_id,
            )  # fmt: skip
            return StoreStatus.REJECTED, b""
        except GuestRefusedError as error:
            self.chunks_refused += 1
            self._refusals(
                "guest", logging.INFO,
                "refusing chunk %s from %s at %s: %s", chunk_id, peer, host, error,
            )  # fmt: skip
            return StoreStatus.REFUSED, b""
        except StoreFullError as error:
            self._refusals(
                "full", logging.INFO, "refusing chunk %s from %s: %s", chunk_id, peer, error
            )
            return StoreStatus.FULL, b""
        except StoreError:
            log.exception("cannot store chunk %s", chunk_id)
            return StoreStatus.FULL, b""
        if outcome is PutOutcome.STORED and self._on_stored is not None:
            self._on_stored(chunk_id)
        receipt = self._receipt_for(chunk_id) if self._receipt_for is not None else b""
        status = StoreStatus.STORED if outcome is PutOutcome.STORED else StoreStatus.ALREADY_HAD
        return status, receipt

    def _put(
        self, chunk_id: ChunkId, body: bytes | bytearray, guest: Guest | None, until: float
    ) -> PutOutcome:
        return self.store.put(chunk_id, body, guest=guest, lease_until=until)

    async def handle_get(self, peer: NodeId, chunk_id: ChunkId) -> ChunkBody | None:
        # Not opened here: the transport opens the file when it is this
        # answer's turn to go out (a peer can queue many GETs and stop
        # reading), and answers "missing" if it is gone by then. The open is
        # microseconds, done on the event loop or in the thread that reads
        # the file, which then owns and closes the descriptor.
        return LazyFileBody(lambda: self._open(chunk_id))

    def _open(self, chunk_id: ChunkId) -> FileBody | None:
        opened = self.store.open_for_sending(chunk_id)
        if opened is None:
            return None
        fd, size = opened
        self.chunks_served += 1
        self.bytes_served += size
        return FileBody(fd, size)

    async def handle_have(self, peer: NodeId, chunk_ids: tuple[ChunkId, ...]) -> list[bool]:
        self.haves += 1
        return await self._run(self.store.have_which, list(chunk_ids))

    async def handle_lease(
        self, peer: NodeId, seconds: int, chunk_ids: tuple[ChunkId, ...]
    ) -> list[bool]:
        self.leases += 1
        async with self._leasing:
            until = self._lease_until(seconds)
            held = await self._run(self.store.lease, list(chunk_ids), until)
        self.chunks_leased += sum(held)
        return held

    async def handle_prove(
        self, peer: NodeId, nonce: bytes, chunk_ids: tuple[ChunkId, ...]
    ) -> list[bytes | None]:
        # The wire bounds the ids per request; the semaphore bounds requests.
        self.proofs += 1
        async with self._proving:
            return [await self._run(self._tag, nonce, chunk_id) for chunk_id in chunk_ids]

    def _tag(self, nonce: bytes, chunk_id: ChunkId) -> bytes | None:
        # Read without re-verifying: a rotten copy gives a wrong tag, and
        # the verifier then replaces it, which is what scrub would do.
        try:
            data = self.store.get(chunk_id, verify=False)
        except ChunkNotFoundError:
            return None
        return proof_tag(nonce, chunk_id, data)
