"""A connection's request limit holds before any handler starts (no sockets).

A ``PeerConnection`` is driven through a fake transport that honours
``pause_reading``, with a real initiator ``wire.Connection`` on the other
side: the test decides exactly which bytes arrive when.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from dht_dfs import wire
from dht_dfs.core.config import Config
from dht_dfs.core.crypto import Identity
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.transport.buffers import BodyBudget, BufferPool, ChunkBody
from dht_dfs.transport.connection import PeerConnection

LIMIT = 8


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.paused = False
        self.pauses = 0
        self.closing = False

    def write(self, data: Any) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


@dataclass
class GatedHandler:
    """Counts GET handlers running at once; each waits until the gate opens."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    running: int = 0
    peak: int = 0
    started: int = 0

    async def handle_get(self, peer: NodeId, chunk_id: ChunkId) -> ChunkBody | None:
        self.running += 1
        self.started += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        return None

    async def handle_store(
        self, peer: NodeId, chunk_id: ChunkId, body: bytes | bytearray, *, host: str, lease: int
    ) -> tuple[wire.StoreStatus, bytes]:
        raise AssertionError("not used")

    async def handle_have(self, peer: NodeId, chunk_ids: tuple[ChunkId, ...]) -> list[bool]:
        raise AssertionError("not used")


@dataclass
class Owner:
    """The endpoint's side of the bargain, minus sockets."""

    handler: GatedHandler
    config: Config = field(default_factory=lambda: Config(max_concurrent_requests=LIMIT))
    identity: Identity = field(default_factory=Identity.generate)
    limits: wire.Limits = field(default_factory=wire.Limits)
    client_mode: bool = False
    buffers: BufferPool = field(default_factory=BufferPool)
    body_budget: BodyBudget = field(default_factory=lambda: BodyBudget(64 << 20, 32 << 20))
    receive_buffer: bytearray = field(default_factory=lambda: bytearray(256 * 1024))

    def adopt(self, connection: PeerConnection) -> None:
        pass

    def release(self, connection: PeerConnection) -> None:
        pass

    def authenticated(self, connection: PeerConnection) -> None:
        pass


def deliver(connection: PeerConnection, data: bytes) -> None:
    """Feed bytes the way asyncio's reader does: only while reading is not paused."""
    view = memoryview(data)
    while view:
        buffer = connection.get_buffer(len(view))
        take = min(len(buffer), len(view))
        buffer[:take] = view[:take]
        connection.buffer_updated(take)
        view = view[take:]
        transport = connection._transport
        assert isinstance(transport, FakeTransport)
        if transport.paused:
            break


async def open_pair() -> tuple[PeerConnection, FakeTransport, wire.Connection, GatedHandler]:
    handler = GatedHandler()
    owner = Owner(handler)
    server = PeerConnection(owner, wire.Role.RESPONDER, None)
    transport = FakeTransport()
    server.connection_made(transport)
    client = wire.Connection(wire.Role.INITIATOR, Identity.generate())
    deliver(server, client.data_to_send())
    client.receive_data(bytes(transport.written))
    transport.written.clear()
    deliver(server, client.data_to_send())  # AUTH
    assert server.handshake.done()
    assert isinstance(client.next_event(), wire.HandshakeComplete)
    return server, transport, client, handler


async def let_handlers_run() -> None:
    # Each started handler reaches its gate within one loop iteration; a
    # bounded number of iterations lets every task that was created start.
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_read_of_many_requests_starts_at_most_the_limit() -> None:
    server, transport, client, handler = await open_pair()
    requests = b"".join(
        client.send(wire.GetChunk(request_id, ChunkId(bytes(32)))) for request_id in range(1, 501)
    )
    assert len(requests) < 256 * 1024, "all 500 requests fit in one read"
    deliver(server, requests)
    await let_handlers_run()
    assert handler.started == LIMIT
    assert handler.peak == LIMIT
    assert transport.paused, "a peer over the limit is not read from"

    handler.gate.set()
    for _ in range(5000):  # bounded: each round lets finished handlers take the next
        if handler.started == 500 and handler.running == 0:
            break
        await asyncio.sleep(0)
    assert handler.started == 500
    assert handler.peak == LIMIT
    assert not transport.paused, "reading resumes once the backlog is served"
    client.receive_data(bytes(transport.written))
    answers = []
    while not isinstance(event := client.next_event(), wire.NeedData):
        answers.append(event)
    assert len(answers) == 500
    assert all(isinstance(answer, wire.ChunkMissing) for answer in answers)
    server.abort("test over")
    server.connection_lost(None)


async def test_a_paused_connection_still_fails_cleanly_when_lost() -> None:
    server, transport, client, handler = await open_pair()
    deliver(
        server, b"".join(client.send(wire.GetChunk(i, ChunkId(bytes(32)))) for i in range(1, 100))
    )
    await let_handlers_run()
    assert handler.started == LIMIT
    transport.closing = True
    server.connection_lost(None)
    await let_handlers_run()
    assert handler.running == 0, "handlers of a lost connection are cancelled"
    assert handler.started == LIMIT, "queued requests of a lost connection never start"
