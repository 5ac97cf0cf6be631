"""An in-memory network for the transfer layer, like Tahoe's ``no_network``.

Fake nodes hold chunks in a dict, or in a real ``ChunkStore`` when one is
given (the node whose ``Maintainer`` a test runs needs one). ``MemLocator``
satisfies ``transfer.ports.Locator``: closest nodes by XOR distance over the
live fake nodes, one provider-record table for the whole network.
``MemDialer`` satisfies ``Dialer``: its ``MemLink``s call the fake nodes
directly. Per-node faults:

- ``dead``: every request raises PeerUnavailableError, and the node is no
  longer among the closest live nodes;
- ``die_after``: the node dies once it has answered that many requests;
- ``full``: STORE answers FULL; ``refuse``: STORE answers REJECTED;
- ``gate``: requests wait for this event, up to ``request_timeout`` (then
  RequestTimeoutError, as the real endpoint);
- ``corrupt``: GET serves the chunk with one byte flipped;
- ``busy``: requests counted as in flight to it (what ``in_flight_to`` says);
- ``lie``: HAVE says yes to everything, STORE says STORED and keeps nothing,
  PROVE answers made-up tags (what a Sybil that stores nothing can do).

STORE follows the real admission rule (``node.service``): a node keeps a
chunk as rightful only if fewer than ``store_closeness_slack * replicas``
other nodes (its view: all of them, dead ones too) are closer to the chunk;
otherwise as a guest, within its store's guest budgets (a real store) or
``guest_budget`` bytes (a dict node; None: no limit), else REFUSED.

``fake_records`` makes provider records of fresh identities that point at
one node's port: connecting to one waits on that node's ``gate`` (a
listener that never finishes a handshake) up to ``connect_timeout``, or,
ungated, fails as a wrong identity would.

No sockets, no threads of its own, no sleeping: a test runs in milliseconds.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from dht_dfs.core.addresses import PeerAddress
from dht_dfs.core.config import Config
from dht_dfs.core.crypto import Identity
from dht_dfs.core.errors import (
    ChunkNotFoundError,
    GuestRefusedError,
    HandshakeError,
    LocalProtocolError,
    PeerUnavailableError,
    RequestTimeoutError,
)
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.core.proofs import PROOF_TAG_SIZE, proof_tag
from dht_dfs.dht.values import Contact, LookupResult, LookupStats, ProviderRecord
from dht_dfs.store.chunks import ChunkStore
from dht_dfs.store.guests import Guest
from dht_dfs.transfer.network import Network
from dht_dfs.wire import StoreResult, StoreStatus

_NO_STATS = LookupStats(hops=1, messages=0, answered=0, failed=0, seconds=0.0, timed_out=False)


@dataclass(eq=False)
class FakeNode:
    """One node of the in-memory network, with its faults."""

    identity: Identity
    port: int
    store: ChunkStore | None = None
    """A real store (for the node a test runs maintenance on); else ``chunks``."""
    chunks: dict[ChunkId, bytes] = field(default_factory=dict)
    dead: bool = False
    die_after: int | None = None
    full: bool = False
    refuse: bool = False
    corrupt: bool = False
    gate: asyncio.Event | None = None
    busy: int = 0
    lie: bool = False
    guest_budget: int | None = None
    """Bytes of guest chunks a dict node keeps (None: no limit); a store has its own."""
    guests: set[ChunkId] = field(default_factory=set)
    """The chunks a dict node keeps as guests."""
    requests: int = 0
    """Requests answered (or refused) so far."""
    gets: int = 0
    stores: int = 0
    proves: int = 0
    """Chunk ids this node was asked to prove."""
    leases: dict[ChunkId, float] = field(default_factory=dict)
    """Until when each chunk is leased (nodes without a store)."""
    lease_requests: int = 0

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id

    @property
    def contact(self) -> Contact:
        return Contact(self.node_id, "127.0.0.1", self.port, self.port)

    @property
    def address(self) -> PeerAddress:
        return PeerAddress("127.0.0.1", self.port, self.node_id)

    def has(self, chunk_id: ChunkId) -> bool:
        return self.store.has(chunk_id) if self.store is not None else chunk_id in self.chunks

    def read(self, chunk_id: ChunkId) -> bytes | None:
        if self.store is None:
            return self.chunks.get(chunk_id)
        try:
            return self.store.get(chunk_id, verify=False)
        except ChunkNotFoundError:
            return None

    def keep(
        self,
        chunk_id: ChunkId,
        data: bytes,
        *,
        guest: Guest | None = None,
        lease_until: float | None = None,
    ) -> None:
        """Keep a chunk (as a guest of ``guest``; GuestRefusedError beyond the budget)."""
        if self.store is not None:
            self.store.put(chunk_id, data, guest=guest, lease_until=lease_until)
            return
        if lease_until is not None:
            self.leases[chunk_id] = max(lease_until, self.leases.get(chunk_id, 0.0))
        if guest is not None and chunk_id not in self.chunks:
            used = sum(len(self.chunks[c]) for c in self.guests)
            if self.guest_budget is not None and used + len(data) > self.guest_budget:
                raise GuestRefusedError(f"{self.node_id}: no room for guests")
            self.guests.add(chunk_id)
        elif guest is None:
            self.guests.discard(chunk_id)
        self.chunks[chunk_id] = bytes(data)

    def is_guest(self, chunk_id: ChunkId) -> bool:
        return self.store.is_guest(chunk_id) if self.store is not None else chunk_id in self.guests

    def drop(self, chunk_id: ChunkId) -> None:
        if self.store is not None:
            self.store.delete(chunk_id)
        else:
            self.chunks.pop(chunk_id, None)
            self.guests.discard(chunk_id)

    def record(self, key: bytes) -> ProviderRecord:
        return ProviderRecord.create(
            self.identity, key, "127.0.0.1", self.port, 3600.0, time.time()
        )


@dataclass(frozen=True, slots=True)
class Joined:
    """A participant's Network and the fakes behind it (to look at what it asked)."""

    network: Network
    locator: MemLocator
    dialer: MemDialer


class MemNet:
    """The fake nodes, their provider records, and the config they share."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.nodes: dict[NodeId, FakeNode] = {}
        self.records: dict[bytes, dict[NodeId, ProviderRecord]] = {}
        self._next_port = 20000

    def add(self, count: int = 1, *, stores: Path | None = None) -> list[FakeNode]:
        """New nodes; with ``stores``, each gets a real ChunkStore in a folder there."""
        added = []
        for _ in range(count):
            self._next_port += 1
            node = FakeNode(Identity.generate(), self._next_port)
            if stores is not None:
                node.store = ChunkStore(stores / f"node-{node.port}", fsync=False).open()
            self.nodes[node.node_id] = node
            added.append(node)
        return added

    def client(self) -> FakeNode:
        """A participant that is in no one's view: no store, never among the closest."""
        self._next_port += 1
        return FakeNode(Identity.generate(), self._next_port)

    def live(self) -> list[FakeNode]:
        return [node for node in self.nodes.values() if not node.dead]

    def by_distance(self, key: bytes, *, live_only: bool = False) -> list[FakeNode]:
        """All nodes (or the live ones), closest to ``key`` first."""
        nodes = self.live() if live_only else list(self.nodes.values())
        return sorted(nodes, key=lambda node: node.node_id.distance(key))

    def is_rightful(self, node: FakeNode, chunk_id: ChunkId) -> bool:
        """The admission rule, by ``node``'s view (every other node, dead or not)."""
        key = chunk_id.dht_key
        rank = self.config.store_closeness_slack * self.config.replicas
        own = node.node_id.distance(key)
        closer = sum(
            1
            for other in self.nodes.values()
            if other is not node and other.node_id.distance(key) < own
        )
        return closer < rank

    def holders(self, chunk_id: ChunkId) -> set[NodeId]:
        return {node.node_id for node in self.nodes.values() if node.has(chunk_id)}

    def announce(self, node: FakeNode, chunk_id: ChunkId) -> None:
        """Give ``node`` a provider record for the chunk (it may not hold it: a stale one)."""
        key = chunk_id.dht_key
        self.records.setdefault(key, {})[node.node_id] = node.record(key)

    def fake_records(self, node: FakeNode, chunk_id: ChunkId, count: int) -> None:
        """``count`` provider records of made-up identities, all at ``node``'s port."""
        key = chunk_id.dht_key
        for _ in range(count):
            record = ProviderRecord.create(
                Identity.generate(), key, "127.0.0.1", node.port, 3600.0, time.time()
            )
            self.records.setdefault(key, {})[record.node_id] = record

    def listener_at(self, port: int) -> FakeNode | None:
        return next((node for node in self.nodes.values() if node.port == port), None)

    def join(self, me: FakeNode, executor: Executor, config: Config | None = None) -> Joined:
        """``me``'s Network over this memnet (with its own store, if it has one)."""
        config = config or self.config
        locator = MemLocator(self, me)
        dialer = MemDialer(self, me, config.request_timeout, config.connect_timeout)
        network = Network(config, locator, dialer, executor, me.store)
        return Joined(network, locator, dialer)

    def close(self) -> None:
        for node in self.nodes.values():
            if node.store is not None:
                node.store.close()


class MemLocator:
    """A ``Locator`` over the memnet, as seen from ``me``."""

    def __init__(self, net: MemNet, me: FakeNode) -> None:
        self._net = net
        self._me = me
        self.calls: list[str] = []
        """The lookups asked for, by method name, in order."""
        self.forgotten: list[tuple[bytes, NodeId]] = []

    @property
    def contact(self) -> Contact:
        return self._me.contact

    def _closest(self, key: bytes) -> tuple[Contact, ...]:
        return tuple(
            node.contact
            for node in self._net.by_distance(key, live_only=True)
            if node is not self._me
        )[: self._net.config.ksize]

    def _providers(self, key: bytes) -> list[ProviderRecord]:
        held = self._net.records.get(key, {}).values()
        return sorted(held, key=lambda record: record.node_id.distance(key))

    async def lookup(self, key: bytes) -> LookupResult:
        self.calls.append("lookup")
        return LookupResult(key, tuple(self._providers(key)), self._closest(key), _NO_STATS)

    async def find_providers(self, key: bytes) -> list[ProviderRecord]:
        self.calls.append("find_providers")
        return self._providers(key)

    async def closest_live_nodes(
        self, key: bytes, count: int, *, include_self: bool = True
    ) -> list[Contact]:
        self.calls.append("closest_live_nodes")
        contacts = list(self._closest(key))
        if include_self and self._me.node_id in self._net.nodes and not self._me.dead:
            contacts.append(self._me.contact)
        contacts.sort(key=lambda contact: contact.distance(key))
        return contacts[:count]

    async def put_records(
        self, records: Sequence[ProviderRecord], closest: Mapping[bytes, Sequence[Contact]]
    ) -> dict[bytes, int]:
        kept: dict[bytes, int] = {}
        for record in records:
            self._net.records.setdefault(record.key, {})[record.node_id] = record
            kept[record.key] = len(closest.get(record.key, ()))
        return kept

    def sign_record(self, key: bytes) -> ProviderRecord:
        return self._me.record(key)

    def forget_provider(self, key: bytes, node_id: NodeId) -> None:
        self.forgotten.append((key, node_id))
        self._net.records.get(key, {}).pop(node_id, None)

    def known_contacts(self) -> list[Contact]:
        # A routing table keeps dead contacts until they fail: so does this one.
        own = self._me.node_id.digest
        others = [node for node in self._net.nodes.values() if node is not self._me]
        return [node.contact for node in sorted(others, key=lambda n: n.node_id.distance(own))]


class MemDialer:
    """A ``Dialer`` over the memnet, as seen from ``me``."""

    def __init__(
        self, net: MemNet, me: FakeNode, request_timeout: float, connect_timeout: float = 5.0
    ) -> None:
        self.net = net
        self.me = me
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.connects = 0
        self.in_flight: dict[NodeId, int] = {}
        self.connected: set[NodeId] = set()
        self.given_back: list[bytes | bytearray] = []

    async def connect(self, address: PeerAddress) -> MemLink:
        if address.node_id == self.me.node_id:
            raise LocalProtocolError("a node does not connect to itself")
        self.connects += 1
        node = self.net.nodes.get(address.node_id) if address.node_id else None
        if node is None:
            await self._handshake_with_stranger(address)
        if node is None or node.dead:
            raise PeerUnavailableError(f"cannot connect to {address}: connection refused")
        self.connected.add(node.node_id)
        return MemLink(self, node)

    async def _handshake_with_stranger(self, address: PeerAddress) -> None:
        """A record's identity no node has: what its address's listener does."""
        listener = self.net.listener_at(address.port)
        if listener is None or listener.dead:
            return  # refused, as for a dead node
        if listener.gate is not None:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await listener.gate.wait()
            except TimeoutError:
                raise HandshakeError(
                    f"{address}: no handshake within {self.connect_timeout:g} s"
                ) from None
        raise HandshakeError(f"{address} is {listener.node_id}, not {address.node_id}")

    def in_flight_to(self, node_id: NodeId) -> int:
        node = self.net.nodes.get(node_id)
        return self.in_flight.get(node_id, 0) + (node.busy if node is not None else 0)

    def serving_peers(self) -> list[NodeId]:
        return [
            node_id
            for node_id in self.connected
            if node_id in self.net.nodes and not self.net.nodes[node_id].dead
        ]

    def give_back(self, buffer: bytes | bytearray) -> None:
        self.given_back.append(buffer)


class MemLink:
    """A ``PeerLink`` that calls a fake node directly, with its faults."""

    def __init__(self, dialer: MemDialer, node: FakeNode) -> None:
        self._dialer = dialer
        self._node = node

    async def _enter(self) -> None:
        node = self._node
        if node.dead:
            raise PeerUnavailableError(f"connection to {node.address} lost")
        if node.die_after is not None and node.requests >= node.die_after:
            node.dead = True
            self._dialer.connected.discard(node.node_id)
            raise PeerUnavailableError(f"connection to {node.address} lost: it died")
        node.requests += 1
        if node.gate is not None:
            timeout = self._dialer.request_timeout
            counts = self._dialer.in_flight
            counts[node.node_id] = counts.get(node.node_id, 0) + 1
            try:
                async with asyncio.timeout(timeout):
                    await node.gate.wait()
            except TimeoutError:
                raise RequestTimeoutError(
                    f"{node.address} did not answer within {timeout:g} s"
                ) from None
            finally:
                counts[node.node_id] -= 1

    async def ping(self) -> float:
        await self._enter()
        return 0.0

    async def have(self, chunk_ids: list[ChunkId]) -> list[bool]:
        await self._enter()
        return [self._node.lie or self._node.has(chunk_id) for chunk_id in chunk_ids]

    async def prove(self, nonce: bytes, chunk_ids: list[ChunkId]) -> list[bytes | None]:
        await self._enter()
        node = self._node
        node.proves += len(chunk_ids)
        tags: list[bytes | None] = []
        for chunk_id in chunk_ids:
            data = node.read(chunk_id)
            if node.lie:
                tags.append(os.urandom(PROOF_TAG_SIZE))
            elif data is None:
                tags.append(None)
            else:
                if node.corrupt:
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                tags.append(proof_tag(nonce, chunk_id, data))
        return tags

    async def get(self, chunk_id: ChunkId) -> bytes | bytearray | None:
        await self._enter()
        self._node.gets += 1
        data = self._node.read(chunk_id)
        if data is None:
            return None
        body = bytearray(data)
        if self._node.corrupt:
            body[len(body) // 2] ^= 0xFF
        return body

    async def lease(self, seconds: int, chunk_ids: list[ChunkId]) -> list[bool]:
        await self._enter()
        node = self._node
        node.lease_requests += 1
        if node.lie:
            return [True] * len(chunk_ids)
        if node.store is not None:
            return node.store.lease(chunk_ids, time.time() + seconds)
        held = [node.has(chunk_id) for chunk_id in chunk_ids]
        for chunk_id, here in zip(chunk_ids, held, strict=True):
            if here:
                until = time.time() + seconds
                node.leases[chunk_id] = max(until, node.leases.get(chunk_id, 0.0))
        return held

    async def store(self, chunk_id: ChunkId, data: bytes, lease: int) -> StoreResult:
        await self._enter()
        node = self._node
        node.stores += 1
        if node.full:
            return StoreResult(0, chunk_id, StoreStatus.FULL)
        if node.refuse or not chunk_id.matches(data):
            return StoreResult(0, chunk_id, StoreStatus.REJECTED)
        status = StoreStatus.ALREADY_HAD if node.has(chunk_id) else StoreStatus.STORED
        if not node.lie:
            rightful = self._dialer.net.is_rightful(node, chunk_id)
            guest = None if rightful else Guest(self._dialer.me.node_id, "127.0.0.1")
            try:
                node.keep(chunk_id, data, guest=guest, lease_until=time.time() + lease)
            except GuestRefusedError:
                return StoreResult(0, chunk_id, StoreStatus.REFUSED)
        return StoreResult(0, chunk_id, status, node.record(chunk_id.dht_key).to_bytes())


__all__ = ["FakeNode", "Joined", "MemDialer", "MemLink", "MemLocator", "MemNet"]
