"""Real endpoints on 127.0.0.1 against peers that stall or hoard slots.

The attacker speaks the protocol with the sans-IO ``wire.Connection`` over
plain asyncio streams, from loopback source addresses of its own
(127.0.0.2, ...: all of 127/8 is local on Linux), so that per-address caps
can tell it from the honest peer on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dht_dfs import wire
from dht_dfs.core.addresses import PeerAddress
from dht_dfs.core.config import Config, MiB
from dht_dfs.core.crypto import Identity, seal_chunk
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.node.service import ChunkService
from dht_dfs.store.chunks import ChunkStore
from dht_dfs.transport.buffers import ChunkBody
from dht_dfs.transport.endpoint import Endpoint

WAIT = 10.0
"""Seconds any one wait in these tests may take."""


@dataclass
class Victim:
    store: ChunkStore
    endpoint: Endpoint
    service: ChunkService

    @property
    def address(self) -> PeerAddress:
        return PeerAddress("127.0.0.1", self.endpoint.port, self.endpoint.identity.node_id)


@contextlib.asynccontextmanager
async def victim(tmp_path: Path, config: Config) -> AsyncIterator[Victim]:
    store = ChunkStore(tmp_path / "victim", fsync=False).open()
    service = ChunkService(store)
    endpoint = Endpoint(Identity.generate(), config, service)
    await endpoint.start("127.0.0.1", 0)
    try:
        yield Victim(store, endpoint, service)
    finally:
        await endpoint.close()
        store.close()


@dataclass
class Attacker:
    """One raw connection that completed the handshake with a throwaway identity."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    wire: wire.Connection

    def send(self, message: wire.Message) -> None:
        self.writer.write(self.wire.send(message))

    def close(self) -> None:
        self.writer.close()


async def attack_connection(
    port: int, source: str = "127.0.0.2", *, receive_buffer: int | None = None
) -> Attacker:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    connection = wire.Connection(wire.Role.INITIATOR, Identity.generate())
    writer.write(connection.data_to_send())
    async with asyncio.timeout(WAIT):
        while connection.state is not wire.State.OPEN:
            data = await reader.read(65536)
            if not data:
                writer.close()
                raise ConnectionResetError("the victim closed the connection")
            connection.receive_data(data)
            writer.write(connection.data_to_send())
    assert isinstance(connection.next_event(), wire.HandshakeComplete)
    attacker = Attacker(reader, writer, connection)
    # A pong proves the victim took our AUTH (and kept the connection).
    attacker.send(wire.Ping(1, b"areyouup"))
    async with asyncio.timeout(WAIT):
        while isinstance(event := connection.next_event(), wire.NeedData):
            data = await reader.read(65536)
            if not data:
                writer.close()
                raise ConnectionResetError("the victim closed the connection")
            connection.receive_data(data)
    assert isinstance(event, wire.Pong)
    return attacker


async def honest_round_trip(target: Victim) -> None:
    """An honest peer stores and fetches a chunk, within the request timeout."""
    client = Endpoint(Identity.generate(), Config(request_timeout=WAIT))
    try:
        connection = await client.connect(target.address)
        sealed = seal_chunk(os.urandom(100_000))
        result = await connection.store(sealed.chunk_id, sealed.data, 3600)
        assert result.status is wire.StoreStatus.STORED
        assert await connection.get(sealed.chunk_id) == sealed.data
    finally:
        await client.close()


def store_fds(store: ChunkStore) -> int:
    """Descriptors this process holds on chunk files of ``store``."""
    root = str(store.path_of(ChunkId(bytes(32))).parent.parent)
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}").startswith(root):
                count += 1
    return count


async def wait_for(event: asyncio.Event | asyncio.Future[None]) -> None:
    async with asyncio.timeout(WAIT):
        if isinstance(event, asyncio.Event):
            await event.wait()
        else:
            await event


async def until_calls(counter: list[int], wanted: int, called: asyncio.Event) -> None:
    async with asyncio.timeout(WAIT):
        while counter[0] < wanted:
            called.clear()
            await called.wait()


# --- item 3: descriptors ----------------------------------------------------------


async def test_unread_gets_hold_no_descriptors(tmp_path: Path) -> None:
    async with victim(tmp_path, Config()) as target:
        sealed = seal_chunk(os.urandom(MiB))
        target.store.put(sealed.chunk_id, sealed.data)
        calls = [0]
        called = asyncio.Event()
        inner = target.service.handle_get

        async def counted(peer: NodeId, chunk_id: ChunkId) -> ChunkBody | None:
            body = await inner(peer, chunk_id)
            calls[0] += 1
            called.set()
            return body

        target.service.handle_get = counted  # type: ignore[method-assign]
        attacker = await attack_connection(target.endpoint.port, receive_buffer=4096)
        try:
            for request_id in range(1, 65):
                attacker.send(wire.GetChunk(request_id, sealed.chunk_id))
            await until_calls(calls, 64, called)
            for _ in range(20):  # bounded: let every answer reach its wait
                await asyncio.sleep(0)
            assert store_fds(target.store) <= 1, "queued answers hold chunk files open"
        finally:
            attacker.close()
        await honest_round_trip(target)


async def test_a_send_without_progress_ends_the_connection(tmp_path: Path) -> None:
    async with victim(tmp_path, Config(send_stall_timeout=0.5)) as target:
        sealed = seal_chunk(os.urandom(MiB))
        target.store.put(sealed.chunk_id, sealed.data)
        attacker = await attack_connection(target.endpoint.port, receive_buffer=4096)
        try:
            for request_id in range(1, 17):
                attacker.send(wire.GetChunk(request_id, sealed.chunk_id))
            served = next(iter(target.endpoint._connections))
            await wait_for(served.closed)
            assert store_fds(target.store) == 0
        finally:
            attacker.close()


# --- item 2: bodies that never come -------------------------------------------------


async def test_a_store_body_that_never_comes_times_out(tmp_path: Path) -> None:
    async with victim(tmp_path, Config(body_timeout=0.3)) as target:
        attacker = await attack_connection(target.endpoint.port)
        try:
            attacker.send(wire.StoreChunk(1, ChunkId(bytes(32)), 16 * MiB))
            attacker.writer.write(b"x" * 1000)
            served = next(iter(target.endpoint._connections))
            await wait_for(served.closed)
            assert target.endpoint.body_budget.reserved == 0
        finally:
            attacker.close()


async def test_store_headers_from_one_address_cannot_take_the_node_budget(
    tmp_path: Path,
) -> None:
    async with victim(tmp_path, Config()) as target:
        attackers = [await attack_connection(target.endpoint.port) for _ in range(10)]
        try:
            for attacker in attackers:
                attacker.send(wire.StoreChunk(1, ChunkId(bytes(32)), 16 * MiB))
            await honest_round_trip(target)  # meanwhile the victim read every header
            budget = target.endpoint.body_budget
            assert 0 < budget.reserved_by("127.0.0.2") <= budget.per_peer
        finally:
            for attacker in attackers:
                attacker.close()


# --- item 4: connection slots -------------------------------------------------------


async def test_one_host_cannot_take_every_slot(tmp_path: Path) -> None:
    async with victim(tmp_path, Config(max_connections=40)) as target:
        held: list[Attacker] = []
        try:
            for _ in range(40):
                try:
                    held.append(await attack_connection(target.endpoint.port))
                except (ConnectionError, OSError):
                    continue  # refused: the cap works
            await honest_round_trip(target)
            cap = target.endpoint.config.max_connections_per_address
            assert target.endpoint.accepted_count <= cap + 1  # + the honest one
        finally:
            for attacker in held:
                attacker.close()


async def test_idle_connections_make_room_for_a_newcomer(tmp_path: Path) -> None:
    config = Config(max_connections=24, max_connections_per_address=8)
    async with victim(tmp_path, config) as target:
        held: list[Attacker] = []
        try:
            for index in range(24):
                with contextlib.suppress(ConnectionError, OSError):
                    held.append(
                        await attack_connection(target.endpoint.port, f"127.0.0.{2 + index // 8}")
                    )
            await honest_round_trip(target)
            assert target.endpoint.accepted_count <= 24
            assert target.endpoint.evicted >= 1 or len(held) < 24
        finally:
            for attacker in held:
                attacker.close()


async def test_peers_this_node_dialed_keep_reserved_slots(tmp_path: Path) -> None:
    config = Config(max_connections=16, max_connections_per_address=16, reserved_connections=4)
    async with victim(tmp_path, config) as target:
        friend_store = ChunkStore(tmp_path / "friend", fsync=False).open()
        friend = Endpoint(Identity.generate(), Config(), ChunkService(friend_store))
        await friend.start("127.0.0.1", 0)
        held: list[Attacker] = []
        try:
            await target.endpoint.connect(
                PeerAddress("127.0.0.1", friend.port, friend.identity.node_id)
            )
            for index in range(16):
                with contextlib.suppress(ConnectionError, OSError):
                    attacker = await attack_connection(target.endpoint.port)
                    # A body on its way: busy, so never the idle one evicted.
                    attacker.send(wire.StoreChunk(2, ChunkId(bytes([index]) * 32), MiB))
                    attacker.writer.write(b"x" * 10)
                    held.append(attacker)
            assert len(held) >= 12, "strangers fill all but the reserved slots"
            # The friend dials the victim (a connection the victim accepts),
            # after the victim's own connection to it went away.
            await friend.close()
            friend = Endpoint(friend.identity, Config(), None)
            back = await friend.connect(target.address)
            assert await back.ping() > 0
            assert target.endpoint.is_known_good(friend.identity.node_id)
            assert target.endpoint.accepted_count <= 16 - target.endpoint.reserved_slots + 1
        finally:
            for attacker in held:
                attacker.close()
            await friend.close()
            friend_store.close()


@pytest.fixture(autouse=True)
def _loopback_aliases() -> None:
    """These tests bind 127.0.0.2..; skip where 127/8 is not all local."""
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 is not a local address here")
    finally:
        probe.close()
