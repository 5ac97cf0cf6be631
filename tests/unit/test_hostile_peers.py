"""Peers that flood or stall hold bounded memory (no sockets).

A ``PeerConnection`` is driven through a fake transport that keeps every
written byte queued until the test drains it, and calls ``pause_writing``
and ``resume_writing`` at its high-water mark as asyncio's does; a real
``wire.Connection`` is the peer. Memory is measured with counters (bytes
queued, bytes allocated for bodies), never RSS.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from dht_dfs import wire
from dht_dfs.core.config import Config, MiB
from dht_dfs.core.crypto import Identity
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.transport.buffers import BodyBudget, BufferPool, ChunkBody
from dht_dfs.transport.connection import PeerConnection

CHUNK = 1 * MiB
REQUESTS = 64


class QueueingTransport(asyncio.Transport):
    """A socket nobody reads from until ``drain``: everything written stays queued."""

    def __init__(self, protocol: PeerConnection) -> None:
        super().__init__()
        self.protocol = protocol
        self.queue = bytearray()
        self.peak = 0
        self.high = 64 * 1024
        self.writing_paused = False
        self.reading_paused = False
        self.closing = False

    def write(self, data: Any) -> None:
        self.queue += data
        self.peak = max(self.peak, len(self.queue))
        if len(self.queue) > self.high and not self.writing_paused:
            self.writing_paused = True
            self.protocol.pause_writing()

    def drain(self) -> bytes:
        data = bytes(self.queue)
        self.queue.clear()
        if self.writing_paused:
            self.writing_paused = False
            self.protocol.resume_writing()
        return data

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def is_reading(self) -> bool:
        return not self.reading_paused

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is not None:
            self.high = high

    def get_write_buffer_size(self) -> int:
        return len(self.queue)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


@dataclass
class Handler:
    """Answers every GET with CHUNK bytes; keeps every STORE."""

    stored: list[int] = field(default_factory=list)

    async def handle_get(self, peer: NodeId, chunk_id: ChunkId) -> ChunkBody | None:
        return bytes(CHUNK)

    async def handle_store(
        self, peer: NodeId, chunk_id: ChunkId, body: bytes | bytearray, *, host: str, lease: int
    ) -> tuple[wire.StoreStatus, bytes]:
        self.stored.append(len(body))
        return wire.StoreStatus.STORED, b""

    async def handle_have(self, peer: NodeId, chunk_ids: tuple[ChunkId, ...]) -> list[bool]:
        return [False] * len(chunk_ids)


class CountingPool(BufferPool):
    """Counts the body bytes the connections allocate."""

    def __init__(self) -> None:
        super().__init__()
        self.allocated = 0

    def take(self, size: int) -> bytearray:
        self.allocated += size
        return super().take(size)


@dataclass
class Owner:
    handler: Handler = field(default_factory=Handler)
    config: Config = field(default_factory=Config)
    identity: Identity = field(default_factory=Identity.generate)
    limits: wire.Limits = field(default_factory=wire.Limits)
    client_mode: bool = False
    buffers: CountingPool = field(default_factory=CountingPool)
    body_budget: BodyBudget = field(default_factory=lambda: BodyBudget(64 * MiB, 32 * MiB))
    receive_buffer: bytearray = field(default_factory=lambda: bytearray(256 * 1024))

    def adopt(self, connection: PeerConnection) -> None:
        pass

    def release(self, connection: PeerConnection) -> None:
        pass

    def authenticated(self, connection: PeerConnection) -> None:
        pass


def deliver(connection: PeerConnection, transport: QueueingTransport, data: bytes) -> int:
    """Feed bytes as asyncio's reader does, only while reading is not paused; returns count fed."""
    view = memoryview(data)
    fed = 0
    while view and not transport.reading_paused:
        buffer = connection.get_buffer(len(view))
        take = min(len(buffer), len(view))
        buffer[:take] = view[:take]
        connection.buffer_updated(take)
        view = view[take:]
        fed += take
    return fed


async def run_loop(rounds: int = 20) -> None:
    # Handlers that can go on do so within a few loop iterations; a bounded
    # number of them lets every runnable task reach its next wait.
    for _ in range(rounds):
        await asyncio.sleep(0)


async def connect(
    owner: Owner, role: wire.Role
) -> tuple[PeerConnection, QueueingTransport, wire.Connection]:
    """A PeerConnection in ``role`` and a wire peer, through the handshake."""
    ours = PeerConnection(owner, role, None)
    transport = QueueingTransport(ours)
    peer_role = wire.Role.RESPONDER if role is wire.Role.INITIATOR else wire.Role.INITIATOR
    peer = wire.Connection(peer_role, Identity.generate(), limits=owner.limits)
    ours.connection_made(transport)
    for _ in range(4):  # HELLO, WELCOME, AUTH: bounded exchange
        peer.receive_data(transport.drain())
        deliver(ours, transport, peer.data_to_send())
    peer.receive_data(transport.drain())
    assert ours.handshake.done()
    assert isinstance(peer.next_event(), wire.HandshakeComplete)
    return ours, transport, peer


async def test_a_dialed_connection_queues_at_most_its_write_budget() -> None:
    owner = Owner()
    budget = owner.config.max_write_buffer
    ours, transport, peer = await connect(owner, wire.Role.INITIATOR)
    requests = b"".join(
        peer.send(wire.GetChunk(request_id, ChunkId(bytes(32))))
        for request_id in range(1, REQUESTS + 1)
    )
    deliver(ours, transport, requests)
    await run_loop()
    bound = budget + CHUNK + 4096  # the budget, one more message, its frame
    assert transport.peak <= bound, f"{transport.peak} bytes queued for a peer that reads nothing"
    assert ours.queued_peak <= bound

    # The peer starts reading: every answer still arrives, and the bound holds.
    answers = 0
    for _ in range(10 * REQUESTS):  # bounded: each drain lets at least one more out
        peer.receive_data(transport.drain())
        while isinstance(peer.next_event(), wire.ChunkData):
            answers += 1
        if answers == REQUESTS:
            break
        await run_loop()
    assert answers == REQUESTS
    assert transport.peak <= bound
    ours.abort("test over")
    ours.connection_lost(None)


async def test_store_headers_reserve_from_a_budget_not_from_their_promise() -> None:
    owner = Owner()
    per_address = owner.body_budget.per_peer
    big = owner.limits.max_bulk
    connections = [await connect(owner, wire.Role.RESPONDER) for _ in range(10)]
    for index, (ours, transport, peer) in enumerate(connections):
        header = peer.send(wire.StoreChunk(1, ChunkId(bytes([index]) * 32), big))
        deliver(ours, transport, header)
    assert owner.buffers.allocated <= per_address, (
        f"{owner.buffers.allocated} bytes allocated for headers whose bodies never came"
    )
    assert owner.body_budget.reserved <= per_address
    waiting = [c for c in connections if c[0].wire.awaiting_buffer]
    assert len(waiting) == 10 - per_address // big
    assert all(transport.reading_paused for _, transport, _ in waiting), "not read from"

    # The first body arrives and is stored: its reservation goes to a waiter.
    ours, transport, peer = connections[0]
    deliver(ours, transport, bytes(big))
    await run_loop()
    assert owner.handler.stored == [big]
    assert ours.body_bytes_reserved == 0
    assert owner.body_budget.reserved <= per_address
    assert sum(not c[0].wire.awaiting_buffer for c in waiting) == 1, "one waiter got the room"
    resumed = next(c for c in waiting if not c[0].wire.awaiting_buffer)
    assert not resumed[1].reading_paused

    # Lost connections give their reservations back.
    for ours, transport, _ in connections:
        transport.closing = True
        ours.connection_lost(None)
    await run_loop()
    assert owner.body_budget.reserved == 0
    assert owner.body_budget.waiting == 0
    # ...and drop the buffers at once: a connection sits in reference cycles,
    # so waiting for the collector would keep released bodies in memory.
    assert all(ours.wire.receiving_bulk == 0 for ours, _, _ in connections)


def test_wire_holds_input_while_no_buffer_is_free() -> None:
    """Whole, and one byte at a time: the body waits for room, then arrives intact."""
    body = bytes(range(256)) * 300
    for step in (None, 1):
        room = [False]

        def allocate(size: int, room: list[bool] = room) -> bytearray | None:
            return bytearray(size) if room[0] else None

        client = wire.Connection(wire.Role.INITIATOR, Identity.generate())
        server = wire.Connection(wire.Role.RESPONDER, Identity.generate(), allocate=allocate)
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        server.receive_data(client.data_to_send())
        assert isinstance(server.next_event(), wire.HandshakeComplete)
        data = client.send(wire.StoreChunk(7, ChunkId(bytes(32)), len(body))) + body
        data += client.send(wire.Ping(8, b"12345678"))
        fed = 0
        while fed < len(data) and not server.awaiting_buffer:
            size = len(data) if step is None else step
            server.receive_data(data[fed : fed + size])
            fed += size
        assert server.awaiting_buffer
        assert isinstance(server.next_event(), wire.NeedData)
        assert server.bulk_buffer() is None
        assert not server.retry_allocate(), "still no room"
        room[0] = True
        assert server.retry_allocate()
        if fed < len(data):
            server.receive_data(data[fed:])
        event = server.next_event()
        assert isinstance(event, wire.StoreChunk) and event.body == body
        assert isinstance(server.next_event(), wire.Ping)
