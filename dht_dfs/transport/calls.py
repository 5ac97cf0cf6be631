"""The typed calls one side of a connection makes: ping, store, get, have, prove, lease.

A base class of ``connection.PeerConnection``: each call builds its wire
request, and checks that the answer is of the kind and for the chunk it
asked about; a refusal or a wrong answer is a ``PeerRefusedError``. Sending,
matching answers to requests and their deadlines are the connection's
(``_request``).

Must not import: asyncio (nothing here waits but through ``_request``), dht,
store, transfer, node.
"""

from __future__ import annotations

import os
import time

from dht_dfs.core.errors import PeerRefusedError
from dht_dfs.core.ids import ChunkId
from dht_dfs.wire import (
    MAX_REQUEST_ID,
    ChunkData,
    ChunkMissing,
    Connection,
    ErrorReply,
    GetChunk,
    HaveAnswer,
    HaveQuery,
    LeaseAnswer,
    LeaseQuery,
    Ping,
    Pong,
    ProofAnswer,
    ProveQuery,
    Request,
    Response,
    StoreChunk,
    StoreResult,
)


class ChunkCalls:
    """Typed requests over ``_request``, which the connection provides."""

    peer_label: str
    wire: Connection
    _next_request_id: int

    async def _request(
        self,
        message: Request,
        body: bytes | bytearray | memoryview | None,
        within: float | None = None,
    ) -> Response:
        raise NotImplementedError

    async def request(self, message: Request, *, within: float | None = None) -> Response:
        """Send a request and wait for its answer (``within`` seconds at most)."""
        return await self._request(message, None, within)

    def new_request_id(self) -> int:
        request_id = self._next_request_id
        self._next_request_id = request_id + 1 if request_id < MAX_REQUEST_ID else 1
        return request_id

    # --- typed client calls ---------------------------------------------------------------

    async def ping(self) -> float:
        """Round-trip time in seconds."""
        nonce = os.urandom(8)
        started = time.perf_counter()
        answer = await self.request(Ping(self.new_request_id(), nonce))
        if not isinstance(answer, Pong) or answer.nonce != nonce:
            raise PeerRefusedError(f"{self.peer_label} answered a ping with {answer!r}")
        return time.perf_counter() - started

    async def store(
        self, chunk_id: ChunkId, data: bytes | bytearray | memoryview, lease: int
    ) -> StoreResult:
        """Hand the peer a chunk to keep for ``lease`` seconds at least."""
        message = StoreChunk(self.new_request_id(), chunk_id, len(data), lease)
        answer = await self._request(message, data)
        if isinstance(answer, StoreResult) and answer.chunk_id == chunk_id:
            return answer
        raise _unexpected(self.peer_label, "STORE", answer)

    async def get(self, chunk_id: ChunkId) -> bytes | bytearray | None:
        """The peer's copy of a chunk (unverified), or None if it lacks it."""
        answer = await self.request(GetChunk(self.new_request_id(), chunk_id))
        if isinstance(answer, ChunkData) and answer.chunk_id == chunk_id:
            return answer.body
        if isinstance(answer, ChunkMissing) and answer.chunk_id == chunk_id:
            return None
        raise _unexpected(self.peer_label, "GET", answer)

    async def have(self, chunk_ids: list[ChunkId]) -> list[bool]:
        """Which of the ids the peer holds (any number; sent in batches)."""
        limit = self.wire.limits.max_have_ids
        held: list[bool] = []
        for start in range(0, len(chunk_ids), limit):
            batch = tuple(chunk_ids[start : start + limit])
            answer = await self.request(HaveQuery(self.new_request_id(), batch))
            if not isinstance(answer, HaveAnswer) or len(answer.held) != len(batch):
                raise _unexpected(self.peer_label, "HAVE", answer)
            held.extend(answer.held)
        return held

    async def lease(self, seconds: int, chunk_ids: list[ChunkId]) -> list[bool]:
        """Ask the peer to keep the ids it holds ``seconds`` more; which it holds."""
        limit = self.wire.limits.max_have_ids
        held: list[bool] = []
        for start in range(0, len(chunk_ids), limit):
            batch = tuple(chunk_ids[start : start + limit])
            answer = await self.request(LeaseQuery(self.new_request_id(), seconds, batch))
            if not isinstance(answer, LeaseAnswer) or len(answer.held) != len(batch):
                raise _unexpected(self.peer_label, "LEASE", answer)
            held.extend(answer.held)
        return held

    async def prove(self, nonce: bytes, chunk_ids: list[ChunkId]) -> list[bytes | None]:
        """The peer's proof tags for the ids (any number; sent in batches, one nonce).

        The tags are unchecked: only whoever has the bytes can check them.
        """
        limit = self.wire.limits.max_prove_ids
        tags: list[bytes | None] = []
        for start in range(0, len(chunk_ids), limit):
            batch = tuple(chunk_ids[start : start + limit])
            answer = await self.request(ProveQuery(self.new_request_id(), nonce, batch))
            if not isinstance(answer, ProofAnswer) or len(answer.tags) != len(batch):
                raise _unexpected(self.peer_label, "PROVE", answer)
            tags.extend(answer.tags)
        return tags


def _unexpected(label: str, what: str, answer: Response) -> Exception:
    if isinstance(answer, ErrorReply):
        return PeerRefusedError(f"{label} refused {what}: {answer.message}", int(answer.code))
    return PeerRefusedError(f"{label} answered {what} with {type(answer).__name__}")
