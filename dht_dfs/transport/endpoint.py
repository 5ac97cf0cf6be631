"""A node's TCP side: listening, dialing, one pooled connection per peer.

Owns the listening socket and the pool; each connection's flow control,
requests and serving are ``connection.PeerConnection``, and the protocol
itself (framing, handshake, encryption) is ``wire.Connection``. Every
connection is both client and server: either side may send requests on it,
so a node reaches a peer through whichever authenticated connection already
exists, whoever opened it. A malformed frame, a failed handshake or a
handshake that takes too long closes only that connection, with one log
line.

Connection slots (DESIGN property 14): accepted connections are capped per
IP address (handshakes included), per node id, and in all (never above the
descriptor limit minus ``Config.reserved_file_descriptors``). A newcomer
over a cap takes the slot of the longest-idle connection in its class, and
is refused only when none is idle. Peers this node dialed itself are known
good: ``Config.reserved_connections`` slots are held for them, other peers
may authenticate at most the rest.

Must not import: dht, store, transfer, node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

from dht_dfs import wire
from dht_dfs.core.addresses import PeerAddress
from dht_dfs.core.config import Config
from dht_dfs.core.crypto import Identity
from dht_dfs.core.errors import HandshakeError, LocalProtocolError, PeerUnavailableError
from dht_dfs.core.ids import NodeId
from dht_dfs.transport.buffers import BodyBudget, BufferPool
from dht_dfs.transport.connection import RECEIVE_BUFFER, PeerConnection
from dht_dfs.transport.handler import RequestHandler

log = logging.getLogger(__name__)

_KNOWN_GOOD_KEEP = 4096
"""Node ids remembered as known good (the most recently dialed)."""


def descriptor_limit() -> int:
    """This process's soft RLIMIT_NOFILE (a large number when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


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
        self.body_budget = BodyBudget(config.max_body_memory, config.max_body_memory_per_address)
        self.receive_buffer = bytearray(RECEIVE_BUFFER)
        self.connection_limit = max(
            1, min(config.max_connections, descriptor_limit() - config.reserved_file_descriptors)
        )
        """Accepted connections at once: the configured cap within the fd limit."""
        self.reserved_slots = min(config.reserved_connections, self.connection_limit // 4)
        """Of those, slots only known-good peers may authenticate in."""
        self.known_good: OrderedDict[NodeId, None] = OrderedDict()
        """Peers this node dialed and authenticated (most recent last)."""
        self.evicted = 0
        """Idle connections closed to make room for a newcomer."""
        self.refused = 0
        """Connections closed at once for want of a slot."""
        self._accepted: set[PeerConnection] = set()
        self._accepted_by_host: Counter[str] = Counter()
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
        if connection.accepted:
            host = connection.peer_host
            crowded = self._accepted_by_host[host] >= self.config.max_connections_per_address
            if crowded and not self._evict_idle(lambda c: c.peer_host == host):
                self._refuse(connection, f"too many connections from {host}")
                return
            full = len(self._accepted) >= self.connection_limit
            if full and not (
                self._evict_idle(lambda c: not self.is_known_good(c.peer_id))
                or self._evict_idle(lambda c: True)
            ):
                self._refuse(connection, "too many connections")
                return
            self._accepted.add(connection)
            self._accepted_by_host[host] += 1
        self._connections.add(connection)

    def release(self, connection: PeerConnection) -> None:
        self._connections.discard(connection)
        self._uncount(connection)
        peer = connection.peer_id
        if peer is not None and self._pool.get(peer) is connection:
            del self._pool[peer]

    def authenticated(self, connection: PeerConnection) -> None:
        peer = connection.peer_id
        assert peer is not None
        if not connection.accepted:
            self.known_good[peer] = None  # we chose to dial it
            self.known_good.move_to_end(peer)
            while len(self.known_good) > _KNOWN_GOOD_KEEP:
                self.known_good.popitem(last=False)
        elif not self._admit_identity(connection, peer):
            return
        current = self._pool.get(peer)
        if current is None or not current.is_open:
            self._pool[peer] = connection

    def is_known_good(self, peer: NodeId | None) -> bool:
        return peer is not None and peer in self.known_good

    @property
    def accepted_count(self) -> int:
        return len(self._accepted)

    def _admit_identity(self, connection: PeerConnection, peer: NodeId) -> bool:
        """Per-identity cap and reserved room, once the peer proved who it is."""
        others = [c for c in self._accepted if c is not connection and c.peer_id is not None]
        same = [c for c in others if c.peer_id == peer]
        crowded = len(same) >= self.config.max_connections_per_identity
        if crowded and not self._evict_idle(lambda c: c.peer_id == peer, exclude=connection):
            self._refuse(connection, "too many connections with this identity")
            return False
        if self.is_known_good(peer):
            return True
        room = self.connection_limit - self.reserved_slots
        strangers = sum(1 for c in others if not self.is_known_good(c.peer_id))
        if strangers >= room and not self._evict_idle(
            lambda c: not self.is_known_good(c.peer_id), exclude=connection
        ):
            self._refuse(connection, "no slot left for peers not known good")
            return False
        return True

    def _evict_idle(
        self, eligible: Callable[[PeerConnection], bool], exclude: PeerConnection | None = None
    ) -> bool:
        """Close the longest-idle authenticated accepted connection ``eligible`` allows."""
        idle = [
            c
            for c in self._accepted
            if c is not exclude and c.is_open and not c.busy and eligible(c)
        ]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.last_used)
        # Uncounted now: its connection_lost comes a loop iteration later.
        self._uncount(victim)
        self.evicted += 1
        victim.abort("idle, and its slot is needed", level=logging.INFO)
        return True

    def _refuse(self, connection: PeerConnection, reason: str) -> None:
        self._uncount(connection)
        self.refused += 1
        connection.abort(reason, level=logging.INFO)

    def _uncount(self, connection: PeerConnection) -> None:
        if connection in self._accepted:
            self._accepted.discard(connection)
            host = connection.peer_host
            self._accepted_by_host[host] -= 1
            if self._accepted_by_host[host] <= 0:
                del self._accepted_by_host[host]

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
