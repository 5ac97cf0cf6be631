"""The seams of the transfer layer: what its engines need, as protocols.

- ``ChunkSink`` / ``ChunkSource``: where the publish engine puts sealed
  chunks and where the fetch engine gets them (a local store or the network).
- ``Locator``: what transfer needs of the DHT (closest nodes, providers,
  records). ``dht.node.DhtNode`` satisfies it as it is.
- ``Dialer`` and ``PeerLink``: what transfer needs of the TCP endpoint (a
  link to a peer, its load, receive buffers). ``transport.endpoint.Endpoint``
  and its ``PeerConnection`` satisfy them as they are.
- ``NetworkView``: the parts a network transfer works with, as held by
  ``network.Network``.

All protocols are structural (``typing.Protocol``): nothing here is
subclassed, so the in-memory network of the tests plugs in the same way.

Must not import: dht (except ``dht.values``), transport, node, asyncio I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Protocol, TypeVar

from dht_dfs.core.addresses import PeerAddress
from dht_dfs.core.config import Config
from dht_dfs.core.crypto import SealedChunk
from dht_dfs.core.errors import IntegrityError
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.dht.values import Contact, LookupResult, ProviderRecord
from dht_dfs.store.chunks import ChunkStore

if TYPE_CHECKING:
    from dht_dfs.transfer.nearby import Neighbourhoods
from dht_dfs.wire import StoreResult

T = TypeVar("T")

# --- where chunks go and come from ----------------------------------------------------


class ChunkSink(Protocol):
    """Where the publish engine puts sealed chunks."""

    async def put(self, chunk: SealedChunk) -> None:
        """Store one chunk durably (on every replica it needs), or raise."""

    async def flush(self) -> None:
        """Finish anything ``put`` left in the background."""


Consume = Callable[[bytes | bytearray], T]
"""Runs on a chunk's bytes in a worker thread; raises IntegrityError if they are bad."""


def verified(chunk_id: ChunkId) -> Consume[bytes | bytearray]:
    """A consume function that only checks the bytes hash to ``chunk_id``."""

    def check(data: bytes | bytearray) -> bytes | bytearray:
        if not chunk_id.matches(data):
            raise IntegrityError(f"chunk {chunk_id.hex()} is corrupt", chunk_id.hex())
        return data

    return check


class ChunkSource(Protocol):
    """Where the fetch engine gets chunks."""

    async def fetch(self, chunk_id: ChunkId, size_hint: int | None, consume: Consume[T]) -> T:
        """Get a chunk and run ``consume`` on its bytes in a worker thread.

        If ``consume`` raises IntegrityError the copy was bad: another holder
        is tried. Raises ChunkNotFoundError when no good copy can be had.
        Checking, decrypting and writing in the one worker call saves a
        thread hop per chunk.
        """

    async def prefetch(self, chunk_ids: Sequence[ChunkId]) -> None:
        """A hint: these chunks will be asked for soon, in this order."""


async def get_verified(
    source: ChunkSource, chunk_id: ChunkId, size_hint: int | None = None
) -> bytes | bytearray:
    """A chunk's bytes, checked against its id."""
    return await source.fetch(chunk_id, size_hint, verified(chunk_id))


# --- the DHT and the endpoint, as transfer sees them --------------------------------------


class Locator(Protocol):
    """Finds nodes and providers by DHT key; keeps provider records."""

    @property
    def contact(self) -> Contact:
        """This node's own contact."""

    async def lookup(self, key: bytes) -> LookupResult:
        """One iterative lookup: the providers and the live nodes closest to ``key``."""

    async def find_providers(self, key: bytes) -> list[ProviderRecord]:
        """Verified, unexpired provider records for ``key``, one per provider."""

    async def closest_live_nodes(
        self, key: bytes, count: int, *, include_self: bool = True
    ) -> list[Contact]:
        """The ``count`` nodes closest to ``key`` that answered, closest first."""

    async def put_records(
        self,
        records: Sequence[ProviderRecord],
        closest: Mapping[bytes, Sequence[Contact]],
    ) -> dict[bytes, int]:
        """Store signed records on the nodes closest to each key; copies kept per key."""

    def sign_record(self, key: bytes) -> ProviderRecord:
        """This node's own provider record for ``key``."""

    def forget_provider(self, key: bytes, node_id: NodeId) -> None:
        """Drop a held record of a provider found gone or lacking the chunk."""

    def known_contacts(self) -> list[Contact]:
        """The routing table, closest to this node first."""


class PeerLink(Protocol):
    """An authenticated link to one peer: the chunk protocol's six requests."""

    async def ping(self) -> float:
        """Round-trip time in seconds."""

    async def have(self, chunk_ids: list[ChunkId]) -> list[bool]:
        """Which of the ids the peer holds, one flag per id."""

    async def get(self, chunk_id: ChunkId) -> bytes | bytearray | None:
        """The peer's copy of a chunk (unverified), or None if it lacks it."""

    async def store(self, chunk_id: ChunkId, data: bytes, lease: int) -> StoreResult:
        """Hand the peer a chunk to keep ``lease`` seconds at least; its answer says
        stored, full or rejected."""

    async def lease(self, seconds: int, chunk_ids: list[ChunkId]) -> list[bool]:
        """Ask the peer to keep those it holds ``seconds`` more; one flag per id: held."""

    async def prove(self, nonce: bytes, chunk_ids: list[ChunkId]) -> list[bytes | None]:
        """The peer's proof tags (unchecked), one per id; None where it says it lacks one."""


class Dialer(Protocol):
    """Reaches peers; knows which are connected and how busy they are."""

    async def connect(self, address: PeerAddress) -> PeerLink:
        """A link to the peer, reused when one is open; raises NetworkError."""

    def in_flight_to(self, node_id: NodeId) -> int:
        """Requests waiting for an answer from that peer (0 if not connected)."""

    def serving_peers(self) -> list[NodeId]:
        """Connected peers that are nodes (clients serve no chunks)."""

    def give_back(self, buffer: bytes | bytearray) -> None:
        """A received chunk body nobody uses any more, to receive the next one into."""


class NetworkView(Protocol):
    """The parts a network transfer works with (``network.Network`` holds them)."""

    config: Config
    locator: Locator
    dialer: Dialer
    executor: Executor
    store: ChunkStore | None
    """This node's own store; None for a short-lived client."""
    nearby: Neighbourhoods
    """Closest nodes of many keys from few lookups (``transfer.nearby``)."""

    @property
    def node_id(self) -> NodeId: ...

    async def run(self, func: Callable[..., T], *args: object) -> T:
        """``func(*args)`` in the worker threads (hashing, crypto, file I/O)."""


def address_of(contact: Contact) -> PeerAddress:
    return PeerAddress(contact.host, contact.tcp_port, contact.node_id)


def address_of_record(record: ProviderRecord) -> PeerAddress:
    return PeerAddress(record.host, record.tcp_port, record.node_id)


__all__ = [
    "ChunkSink",
    "ChunkSource",
    "Consume",
    "Dialer",
    "Locator",
    "NetworkView",
    "PeerLink",
    "address_of",
    "address_of_record",
    "get_verified",
    "verified",
]
