"""The chunk protocol's values: limits, message types, messages and events.

Pure data: frozen dataclasses named as nouns, one per message, and the
events a ``Connection`` hands out. The byte layout of a frame (integers
big-endian)::

    offset  size  field
    0       2     magic b"DF"
    2       1     frame format version (1)
    3       1     message type (MessageType)
    4       4     request id: the sender's id for a request, the request's
                  id for a response
    8       4     body length n (at most Limits.max_body)
    12      n     body: plain during the handshake; afterwards sealed with
                  ChaCha20-Poly1305 under the direction's session key,
                  nonce = frame counter, associated data = bytes 0..12
    12+n    b     bulk bytes, for STORE and CHUNK only: b is the length
                  given inside the (authenticated) body, at most
                  Limits.max_bulk

Bulk bytes are chunk ciphertext, already encrypted and named by their
SHA-256, which every receiver checks; they are not passed through the
session cipher. That keeps ``sendfile`` possible for serving chunks and saves
a cipher pass per byte (``bench/transport.py --encrypt-bulk`` measures the
difference). What they carry is public anyway: chunk ids are what the DHT
announces. Everything else after the handshake is encrypted and
authenticated, lengths included.

Imports nothing but ``dht_dfs.core``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from dht_dfs.core.ids import ChunkId, NodeId

MAGIC: Final = b"DF"
FRAME_VERSION: Final = 1
PROTOCOL_VERSIONS: Final = (2, 2)
"""Lowest and highest protocol version this implementation speaks (2: STORE
carries a lease, and LEASE renews them; a version-1 peer gets NO_VERSION)."""

HEADER = struct.Struct(">2sBBII")
HEADER_SIZE: Final = HEADER.size
MAX_REQUEST_ID: Final = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds on everything a peer can make us buffer or parse."""

    max_body: int = 64 * 1024
    """Largest frame body (control part)."""
    max_bulk: int = 16 * 1024 * 1024
    """Largest chunk body."""
    max_have_ids: int = 1024
    """Chunk ids in one HAVE query."""
    max_prove_ids: int = 32
    """Chunk ids in one PROVE query: the prover reads each whole chunk (at
    most 32 x 16 MiB, normally 32 x 1 MiB), so this is far below HAVE's."""
    max_text: int = 1024
    """Bytes of an error message or store receipt."""


class MessageType(enum.IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    AUTH = 0x03
    PING = 0x10
    PONG = 0x11
    STORE = 0x20
    STORE_RESULT = 0x21
    GET = 0x30
    CHUNK = 0x31
    NOT_FOUND = 0x32
    HAVE = 0x40
    HAVE_RESULT = 0x41
    PROVE = 0x50
    PROOF = 0x51
    LEASE = 0x60
    LEASE_RESULT = 0x61
    ERROR = 0x7F


HANDSHAKE_TYPES = frozenset({MessageType.HELLO, MessageType.WELCOME, MessageType.AUTH})


class StoreStatus(enum.IntEnum):
    STORED = 0
    ALREADY_HAD = 1
    FULL = 2
    """The node's quota or disk is full; place the chunk elsewhere."""
    REJECTED = 3
    """The body did not hash to the chunk id."""
    REFUSED = 4
    """Not a rightful holder of this chunk (by the node's own view) and no room
    left for guests from this peer or at all; place the chunk elsewhere."""


class ErrorCode(enum.IntEnum):
    BAD_REQUEST = 1
    INTERNAL = 2
    BUSY = 3
    NO_VERSION = 4
    """No protocol version in common."""


# --- messages -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    request_id: int
    nonce: bytes
    """8 bytes echoed in the Pong."""


@dataclass(frozen=True, slots=True)
class Pong:
    request_id: int
    nonce: bytes


@dataclass(frozen=True, slots=True)
class StoreChunk:
    """Ask the peer to keep a chunk; ``length`` body bytes follow the frame."""

    request_id: int
    chunk_id: ChunkId
    length: int
    lease: int = 0
    """Seconds the storer should keep the chunk (a lease, see ``LeaseQuery``); a
    chunk already held keeps the longer of its lease and this one."""
    body: bytes | bytearray = b""
    """The chunk bytes on receipt. When sending, the caller writes them."""


@dataclass(frozen=True, slots=True)
class StoreResult:
    request_id: int
    chunk_id: ChunkId
    status: StoreStatus
    receipt: bytes = b""
    """Opaque proof of storage (a signed provider record); may be empty."""


@dataclass(frozen=True, slots=True)
class GetChunk:
    request_id: int
    chunk_id: ChunkId


@dataclass(frozen=True, slots=True)
class ChunkData:
    """A chunk in answer to GetChunk; ``length`` body bytes follow the frame."""

    request_id: int
    chunk_id: ChunkId
    length: int
    body: bytes | bytearray = b""
    """The chunk bytes on receipt. When sending, the caller writes them."""


@dataclass(frozen=True, slots=True)
class ChunkMissing:
    request_id: int
    chunk_id: ChunkId


@dataclass(frozen=True, slots=True)
class HaveQuery:
    """Which of these chunks do you hold?"""

    request_id: int
    chunk_ids: tuple[ChunkId, ...]


@dataclass(frozen=True, slots=True)
class HaveAnswer:
    request_id: int
    held: tuple[bool, ...]
    """One flag per id of the query, same order."""


@dataclass(frozen=True, slots=True)
class ProveQuery:
    """Prove you hold these chunks: answer with a keyed hash of each (``core.proofs``)."""

    request_id: int
    nonce: bytes
    """32 fresh random bytes, the key of every tag in the answer."""
    chunk_ids: tuple[ChunkId, ...]


@dataclass(frozen=True, slots=True)
class ProofAnswer:
    request_id: int
    tags: tuple[bytes | None, ...]
    """One 32-byte tag per id of the query, same order; None for a chunk not held."""


@dataclass(frozen=True, slots=True)
class LeaseQuery:
    """Keep these chunks for at least ``seconds`` more (where you hold them)."""

    request_id: int
    seconds: int
    chunk_ids: tuple[ChunkId, ...]


@dataclass(frozen=True, slots=True)
class LeaseAnswer:
    request_id: int
    held: tuple[bool, ...]
    """One flag per id of the query, same order: held, and now leased."""


@dataclass(frozen=True, slots=True)
class ErrorReply:
    request_id: int
    code: ErrorCode
    message: str


Request = Ping | StoreChunk | GetChunk | HaveQuery | ProveQuery | LeaseQuery
Response = (
    Pong
    | StoreResult
    | ChunkData
    | ChunkMissing
    | HaveAnswer
    | ProofAnswer
    | LeaseAnswer
    | ErrorReply
)
Message = Request | Response

REQUEST_TYPES: Final = (Ping, StoreChunk, GetChunk, HaveQuery, ProveQuery, LeaseQuery)


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The peer proved its identity; requests may flow."""

    peer_id: NodeId
    """Node id of the peer, derived from the key it proved."""
    peer_public_key: bytes
    version: int
    """Negotiated protocol version."""
    peer_is_client: bool
    """The peer is a short-lived client, not a storing node."""


class NeedData:
    """Sentinel: feed more bytes before the next event."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()

Event = Message | HandshakeComplete
