"""A node's TCP side: listening, dialing, one pooled connection per peer.

Owns the listening socket and the pool; each connection's flow control,
requests and serving are ``connection.PeerConnection``, and the protocol
itself (framing, handshake, encryption) is ``wire.Connection``. Every
connection is both client and server: either side may send requests on it,
so a node reaches a peer through whichever authenticated connection already
exists, whoever opened it. A malformed frame, a failed handshake or a
handshake that takes too long closes only that connection, with one log
line.

Must not import: dht, store, transfer, node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from dht_dfs import wire
from dht_dfs.core.addresses import PeerAddress
from dht_dfs.core.config import Config
from dht_dfs.core.crypto import Identity
from dht_dfs.core.errors import HandshakeError, LocalProtocolError, PeerUnavailableError
from dht_dfs.core.ids import NodeId
from dht_dfs.transport.buffers import BufferPool
from dht_dfs.transport.connection import PeerConnection, RequestHandler

log = logging.getLogger(__name__)


class Endpoint:
    """A node's TCP side: listens, dials, pools one connection per peer."""

    def __init__(
        self,
        identity: Identity,
        config: Config,
        handler: RequestHandler | None = None,
        *,
        client_mode: bool = False,
    ) -> None:
        self.identity = identity
        self.config = config
        self.handler = handler
        self.client_mode = client_mode
        self.limits = wire.Limits(max_bulk=config.max_chunk_size)
        self.buffers = BufferPool()
        self._server: asyncio.Server | None = None
        self._connections: set[PeerConnection] = set()
        self._pool: dict[NodeId, PeerConnection] = {}
        self._dialing: dict[tuple[str, int, NodeId | None], asyncio.Future[PeerConnection]] = {}
        self._janitor: asyncio.Task[None] | None = None
        self.port = 0

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen for peers; returns the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: PeerConnection(self, wire.Role.RESPONDER, None),
            host,
            port,
            reuse_address=True,
            backlog=512,
        )
        sockets = self._server.sockets
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        self._janitor = loop.create_task(self._close_idle())
        return self.port

    async def close(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
            # wait() never raises the janitor's CancelledError, and still
            # raises ours if close() itself is cancelled.
            await asyncio.wait([self._janitor])
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        for connection in connections:
            connection.abort("endpoint closing", level=logging.DEBUG)
        for connection in connections:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(connection.closed), 2)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _close_idle(self) -> None:
        idle = self.config.idle_connection_timeout
        while True:
            await asyncio.sleep(max(1.0, idle / 4))
            now = time.monotonic()
            for connection in list(self._connections):
                if connection.in_flight == 0 and now - connection.last_used > idle:
                    connection.abort("idle", level=logging.DEBUG)

    # --- bookkeeping (called by PeerConnection) -------------------------------------------

    def adopt(self, connection: PeerConnection) -> None:
        if connection.accepted and len(self._connections) >= self.config.max_connections:
            connection.abort("too many connections")
            return
        self._connections.add(connection)

    def release(self, connection: PeerConnection) -> None:
        self._connections.discard(connection)
        peer = connection.peer_id
        if peer is not None and self._pool.get(peer) is connection:
            del self._pool[peer]

    def authenticated(self, connection: PeerConnection) -> None:
        peer = connection.peer_id
        assert peer is not None
        current = self._pool.get(peer)
        if current is None or not current.is_open:
            self._pool[peer] = connection

    def connected_peers(self) -> list[NodeId]:
        return [peer for peer, connection in self._pool.items() if connection.is_open]

    def connection_to(self, peer: NodeId) -> PeerConnection | None:
        connection = self._pool.get(peer)
        return connection if connection is not None and connection.is_open else None

    # --- dialing --------------------------------------------------------------------------

    async def connect(self, address: PeerAddress) -> PeerConnection:
        """An open, authenticated connection to a peer, reused when one exists."""
        if address.node_id is not None:
            existing = self.connection_to(address.node_id)
            if existing is not None:
                return existing
            if address.node_id == self.identity.node_id:
                raise LocalProtocolError("a node does not connect to itself")
        key = (address.host, address.port, address.node_id)
        dialing = self._dialing.get(key)
        if dialing is not None:
            return await asyncio.shield(dialing)
        future: asyncio.Future[PeerConnection] = asyncio.get_running_loop().create_future()
        self._dialing[key] = future
        try:
            connection = await self._dial(address)
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: waiters re-raise it themselves
            raise
        else:
            future.set_result(connection)
        finally:
            del self._dialing[key]
        return connection

    async def _dial(self, address: PeerAddress) -> PeerConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: PeerConnection(self, wire.Role.INITIATOR, address.node_id),
                    address.host,
                    address.port,
                )
        except (OSError, TimeoutError) as error:
            detail = "timed out" if isinstance(error, TimeoutError) else error.strerror or error
            raise PeerUnavailableError(f"cannot connect to {address}: {detail}") from None
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                await asyncio.shield(connection.handshake)
        except TimeoutError:
            connection.abort("handshake timed out")
            raise HandshakeError(f"{address} did not complete the handshake in time") from None
        except PeerUnavailableError as error:
            raise HandshakeError(f"handshake with {address} failed: {error}") from None
        return connection

    # --- what the transfer layer asks of a dialer (transfer.ports.Dialer) -----------------

    def in_flight_to(self, peer: NodeId) -> int:
        """Requests waiting for an answer from ``peer`` (0 if not connected)."""
        connection = self.connection_to(peer)
        return connection.in_flight if connection is not None else 0

    def serving_peers(self) -> list[NodeId]:
        """Connected peers that are nodes; a client serves no chunks."""
        return [
            peer
            for peer, connection in self._pool.items()
            if connection.is_open and not connection.wire.peer_is_client
        ]

    def give_back(self, buffer: bytes | bytearray) -> None:
        """A received chunk body its consumer is done with, to receive the next into."""
        self.buffers.give_back(buffer)
