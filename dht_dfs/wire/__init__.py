"""The chunk protocol, sans-IO (h11 style): frames, messages, the handshake, one connection.

Bytes in, events out; no sockets, no clock, no asyncio. ``messages`` holds
the values and the frame layout, ``codec`` the body encodings,
``handshake`` the mutual authentication, ``connection`` the state machine
that ties them together. The names users need are re-exported here, so
callers write ``from dht_dfs import wire`` and ``wire.Connection``.

Must not import: asyncio, socket, or any dht_dfs package but core.
"""

from dht_dfs.wire.connection import Connection, Role, State
from dht_dfs.wire.messages import (
    HEADER_SIZE,
    MAX_REQUEST_ID,
    NEED_DATA,
    PROTOCOL_VERSIONS,
    REQUEST_TYPES,
    ChunkData,
    ChunkMissing,
    ErrorCode,
    ErrorReply,
    Event,
    GetChunk,
    HandshakeComplete,
    HaveAnswer,
    HaveQuery,
    LeaseAnswer,
    LeaseQuery,
    Limits,
    Message,
    MessageType,
    NeedData,
    Ping,
    Pong,
    ProofAnswer,
    ProveQuery,
    Request,
    Response,
    StoreChunk,
    StoreResult,
    StoreStatus,
)

__all__ = [
    "HEADER_SIZE",
    "MAX_REQUEST_ID",
    "NEED_DATA",
    "PROTOCOL_VERSIONS",
    "REQUEST_TYPES",
    "ChunkData",
    "ChunkMissing",
    "Connection",
    "ErrorCode",
    "ErrorReply",
    "Event",
    "GetChunk",
    "HandshakeComplete",
    "HaveAnswer",
    "HaveQuery",
    "LeaseAnswer",
    "LeaseQuery",
    "Limits",
    "Message",
    "MessageType",
    "NeedData",
    "Ping",
    "Pong",
    "ProofAnswer",
    "ProveQuery",
    "Request",
    "Response",
    "Role",
    "State",
    "StoreChunk",
    "StoreResult",
    "StoreStatus",
]
