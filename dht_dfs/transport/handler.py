"""What a node does with the requests that reach it: the ``RequestHandler`` protocol.

The serving side's contract: a connection parses and checks a request, then
calls its owner's handler (a node's ``ChunkService``) and sends the answer.

Must not import: asyncio, dht, store, transfer, node.
"""

from __future__ import annotations

from typing import Protocol

from dht_dfs import wire
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.transport.buffers import ChunkBody


class RequestHandler(Protocol):
    """What a node does with requests that arrive on any connection."""

    async def handle_store(
        self, peer: NodeId, chunk_id: ChunkId, body: bytes | bytearray, *, host: str, lease: int
    ) -> tuple[wire.StoreStatus, bytes]:
        """Keep a chunk (verify it first) for ``lease`` seconds; the status and a receipt.

        ``host``: the IP address the connection comes from, for budgets that
        many identities on one address share."""

    async def handle_get(self, peer: NodeId, chunk_id: ChunkId) -> ChunkBody | None:
        """The chunk's bytes or file, or None if this node lacks it."""

    async def handle_have(self, peer: NodeId, chunk_ids: tuple[ChunkId, ...]) -> list[bool]:
        """Which of these chunks this node holds."""

    async def handle_lease(
        self, peer: NodeId, seconds: int, chunk_ids: tuple[ChunkId, ...]
    ) -> list[bool]:
        """Keep the chunks held for ``seconds`` more; which of them this node holds."""

    async def handle_prove(
        self, peer: NodeId, nonce: bytes, chunk_ids: tuple[ChunkId, ...]
    ) -> list[bytes | None]:
        """A proof tag (``core.proofs.proof_tag``) per chunk held, None per chunk not held."""
