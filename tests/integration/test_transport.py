"""Two real endpoints on 127.0.0.1: store, fetch, identity, hostile peers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dht_dfs import wire
from dht_dfs.core.addresses import PeerAddress
from dht_dfs.core.config import Config
from dht_dfs.core.crypto import Identity, seal_chunk
from dht_dfs.core.errors import HandshakeError, PeerUnavailableError, RequestTimeoutError
from dht_dfs.core.ids import ChunkId
from dht_dfs.node.service import ChunkService
from dht_dfs.store.chunks import ChunkStore
from dht_dfs.transport.endpoint import Endpoint

# The garbage flood opens 70 connections at once from 127.0.0.1: above the
# default per-address cap, which has its own tests (test_hostile_transport).
CONFIG = Config(handshake_timeout=1.0, request_timeout=5.0, max_connections_per_address=100)


@dataclass
class Peer:
    identity: Identity
    store: ChunkStore
    endpoint: Endpoint

    @property
    def address(self) -> PeerAddress:
        return PeerAddress("127.0.0.1", self.endpoint.port, self.identity.node_id)


@pytest.fixture
async def peers(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    started: list[Peer] = []
    for index in range(2):
        identity = Identity.generate()
        store = ChunkStore(tmp_path / f"store-{index}", quota=4 * 1024 * 1024).open()
        endpoint = Endpoint(identity, CONFIG, ChunkService(store))
        await endpoint.start("127.0.0.1", 0)
        started.append(Peer(identity, store, endpoint))
    yield started
    for peer in started:
        await peer.endpoint.close()
        peer.store.close()


async def test_store_then_fetch_between_two_nodes(peers: list[Peer]) -> None:
    alice, bob = peers
    sealed = seal_chunk(os.urandom(300_000))
    connection = await alice.endpoint.connect(bob.address)
    result = await connection.store(sealed.chunk_id, sealed.data, 3600)
    assert result.status is wire.StoreStatus.STORED
    assert bob.store.has(sealed.chunk_id)
    again = await connection.store(sealed.chunk_id, sealed.data, 3600)
    assert again.status is wire.StoreStatus.ALREADY_HAD
    # Fetch back over the connection bob accepted (served with sendfile).
    assert await connection.get(sealed.chunk_id) == sealed.data
    assert await connection.get(ChunkId(os.urandom(32))) is None
    assert await connection.have([sealed.chunk_id, ChunkId(bytes(32))]) == [True, False]
    # Bob reuses the same authenticated connection to ask alice (no sendfile side).
    alice.store.put(sealed.chunk_id, sealed.data)
    reverse = await bob.endpoint.connect(PeerAddress("127.0.0.1", 1, alice.identity.node_id))
    assert reverse.peer_id == alice.identity.node_id
    assert await reverse.get(sealed.chunk_id) == sealed.data
    round_trip = await connection.ping()
    assert 0 < round_trip < CONFIG.request_timeout


async def test_pool_reuses_one_connection_per_peer(peers: list[Peer]) -> None:
    alice, bob = peers
    connections = await asyncio.gather(*(alice.endpoint.connect(bob.address) for _ in range(10)))
    assert len({id(c) for c in connections}) == 1
    assert alice.endpoint.connected_peers() == [bob.identity.node_id]


async def test_many_requests_in_flight_on_one_connection(peers: list[Peer]) -> None:
    alice, bob = peers
    chunks = [seal_chunk(os.urandom(20_000 + i)) for i in range(40)]
    connection = await alice.endpoint.connect(bob.address)
    results = await asyncio.gather(*(connection.store(c.chunk_id, c.data, 3600) for c in chunks))
    assert all(r.status is wire.StoreStatus.STORED for r in results)
    bodies = await asyncio.gather(*(connection.get(c.chunk_id) for c in chunks))
    assert bodies == [c.data for c in chunks]


async def test_bad_chunk_is_rejected_and_never_stored(peers: list[Peer]) -> None:
    alice, bob = peers
    sealed = seal_chunk(os.urandom(1000))
    connection = await alice.endpoint.connect(bob.address)
    result = await connection.store(sealed.chunk_id, sealed.data[:-1] + b"!", 3600)
    assert result.status is wire.StoreStatus.REJECTED
    assert not bob.store.has(sealed.chunk_id)


async def test_full_store_answers_full(peers: list[Peer]) -> None:
    alice, bob = peers
    connection = await alice.endpoint.connect(bob.address)
    statuses = []
    for _ in range(6):
        sealed = seal_chunk(os.urandom(1024 * 1024))
        statuses.append((await connection.store(sealed.chunk_id, sealed.data, 3600)).status)
    assert statuses[:3] == [wire.StoreStatus.STORED] * 3
    assert statuses[-1] is wire.StoreStatus.FULL


async def test_expected_node_id_mismatch_is_refused(peers: list[Peer]) -> None:
    alice, bob = peers
    impostor = PeerAddress("127.0.0.1", bob.endpoint.port, Identity.generate().node_id)
    with pytest.raises(HandshakeError, match="expected"):
        await alice.endpoint.connect(impostor)


async def test_forged_node_id_in_handshake_is_refused(peers: list[Peer]) -> None:
    """A client that claims alice's key without holding it is disconnected."""
    alice, bob = peers
    mallory = wire.Connection(wire.Role.INITIATOR, Identity.generate())
    reader, writer = await asyncio.open_connection("127.0.0.1", bob.endpoint.port)
    try:
        writer.write(mallory.data_to_send())
        mallory.receive_data(await reader.readexactly(wire.HEADER_SIZE + 129))
        auth = bytearray(mallory.data_to_send())
        auth[wire.HEADER_SIZE : wire.HEADER_SIZE + 32] = alice.identity.public_key
        writer.write(bytes(auth) + mallory.send(wire.Ping(1, b"12345678")))
        assert await asyncio.wait_for(reader.read(), 5) == b"", "server must hang up"
    finally:
        writer.close()


async def test_unknown_peer_times_out_cleanly(peers: list[Peer]) -> None:
    alice, _ = peers
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        silent = PeerAddress("127.0.0.1", listener.getsockname()[1])
        with pytest.raises(HandshakeError, match="did not complete the handshake"):
            await alice.endpoint.connect(silent)


async def test_dead_peer_is_unavailable(peers: list[Peer]) -> None:
    alice, bob = peers
    port = bob.endpoint.port
    await bob.endpoint.close()
    with pytest.raises(PeerUnavailableError, match="cannot connect"):
        await alice.endpoint.connect(PeerAddress("127.0.0.1", port))


async def test_pending_requests_fail_when_peer_goes_away(peers: list[Peer]) -> None:
    alice, bob = peers
    connection = await alice.endpoint.connect(bob.address)
    await bob.endpoint.close()
    with pytest.raises(PeerUnavailableError):
        await connection.get(ChunkId(bytes(32)))


async def test_request_timeout(peers: list[Peer]) -> None:
    alice, bob = peers
    connection = await alice.endpoint.connect(bob.address)
    never = asyncio.Event()

    async def stuck(*args: object) -> None:
        await never.wait()

    bob.endpoint.handler.handle_get = stuck  # type: ignore[union-attr,method-assign]
    with pytest.raises(RequestTimeoutError, match=r"did not answer GetChunk within 0\.2 s"):
        await connection.request(
            wire.GetChunk(connection.new_request_id(), ChunkId(bytes(32))), within=0.2
        )
    round_trip = await connection.ping()
    assert 0 < round_trip < CONFIG.request_timeout, "the connection survives a timed-out request"


GARBAGE = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    struct.pack(">2sBBII", b"DF", 9, 1, 0, 0),  # wrong frame version
    struct.pack(">2sBBII", b"DF", 1, 1, 0, 0xFFFFFFF0),  # oversized length
    struct.pack(">2sBBII", b"DF", 1, 1, 0, 34)[:7],  # truncated header, then EOF
    struct.pack(">2sBBII", b"DF", 1, 1, 0, 34) + b"\x01\x01",  # truncated body, then EOF
    os.urandom(4096),
    b"",  # connect and hang up
]


async def test_garbage_flood_leaves_server_serving(
    peers: list[Peer], caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = peers
    sealed = seal_chunk(os.urandom(50_000))
    bob.store.put(sealed.chunk_id, sealed.data)

    async def attack(payload: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", bob.endpoint.port)
        writer.write(payload)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            writer.write_eof()  # a truncated frame, then end of stream
        try:
            return await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            return b""
        finally:
            writer.close()

    with caplog.at_level(logging.WARNING, logger="dht_dfs.transport"):
        replies = await asyncio.gather(*(attack(GARBAGE[i % len(GARBAGE)]) for i in range(70)))
    assert all(reply == b"" or reply.startswith(b"DF") for reply in replies)
    closing_lines = [r for r in caplog.records if "closing connection" in r.getMessage()]
    assert any("bad frame magic" in r.getMessage() for r in closing_lines)
    assert any("unsupported frame version 9" in r.getMessage() for r in closing_lines)
    assert any("exceeds the limit" in r.getMessage() for r in closing_lines)
    connection = await alice.endpoint.connect(bob.address)
    assert await connection.get(sealed.chunk_id) == sealed.data


async def test_silent_connection_is_closed_after_handshake_timeout(peers: list[Peer]) -> None:
    _, bob = peers
    reader, writer = await asyncio.open_connection("127.0.0.1", bob.endpoint.port)
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


async def test_client_endpoint_without_handler_can_fetch(peers: list[Peer], tmp_path: Path) -> None:
    _, bob = peers
    sealed = seal_chunk(os.urandom(10_000))
    bob.store.put(sealed.chunk_id, sealed.data)
    client = Endpoint(Identity.generate(), CONFIG, None, client_mode=True)
    try:
        connection = await client.connect(bob.address)
        assert await connection.get(sealed.chunk_id) == sealed.data
    finally:
        await client.close()
