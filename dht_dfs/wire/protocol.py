"""The chunk protocol between nodes, as a sans-IO state machine.

No sockets and no asyncio here (as h11 and aioquic's ``quic`` package): bytes
go in through ``Connection.receive_data``, typed events come out of
``Connection.next_event``, and ``Connection.send`` turns a message into bytes
for the caller to write. ``transport.py`` is the asyncio glue.

Frame layout (integers big-endian)::

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

Handshake (mutual authentication; each side proves the Ed25519 key behind
its node id by signing a transcript bound to fresh X25519 keys)::

    initiator -> HELLO  min version | max version | initiator ephemeral (32)
                        | flags
    responder -> WELCOME version | responder ephemeral (32) | responder
                        static key (32) | signature (64)
    initiator -> AUTH   initiator static key (32) | signature (64)

The responder signs ``"dhtfs/handshake/responder" | H(HELLO | WELCOME
without signature)``; the initiator signs ``"dhtfs/handshake/initiator" |
H(HELLO | WELCOME)``. Session keys come from the X25519 secret and the hash
of the whole transcript. The initiator may send requests right after AUTH.

Errors: ``RemoteProtocolError`` for anything the peer got wrong (close that
connection), ``LocalProtocolError`` for misuse of this API.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from dht_dfs.core.crypto import (
    SESSION_TAG_SIZE,
    EphemeralKey,
    Identity,
    derive_session_keys,
    session_open,
    session_seal,
    verify_signature,
)
from dht_dfs.core.errors import LocalProtocolError, RemoteProtocolError
from dht_dfs.core.ids import CHUNK_ID_SIZE, ChunkId, NodeId

MAGIC: Final = b"DF"
FRAME_VERSION: Final = 1
PROTOCOL_VERSIONS: Final = (1, 1)
"""Lowest and highest protocol version this implementation speaks."""

_HEADER = struct.Struct(">2sBBII")
HEADER_SIZE: Final = _HEADER.size
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
    ERROR = 0x7F


_HANDSHAKE_TYPES = frozenset({MessageType.HELLO, MessageType.WELCOME, MessageType.AUTH})


class StoreStatus(enum.IntEnum):
    STORED = 0
    ALREADY_HAD = 1
    FULL = 2
    """The node's quota or disk is full; place the chunk elsewhere."""
    REJECTED = 3
    """The body did not hash to the chunk id."""


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
class ErrorReply:
    request_id: int
    code: ErrorCode
    message: str


Request = Ping | StoreChunk | GetChunk | HaveQuery
Response = Pong | StoreResult | ChunkData | ChunkMissing | HaveAnswer | ErrorReply
Message = Request | Response

REQUEST_TYPES: Final = (Ping, StoreChunk, GetChunk, HaveQuery)


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


# --- body codecs ----------------------------------------------------------------------
# Pairs of pack/unpack helpers; every unpack checks its exact length.

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_CHUNK_AND_LEN = struct.Struct(">32sI")


class _Reader:
    """Cursor over a body; every pull checks there are enough bytes."""

    __slots__ = ("_data", "_position", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._position = 0
        self._what = what

    def pull(self, size: int) -> bytes:
        end = self._position + size
        if end > len(self._data):
            raise RemoteProtocolError(
                f"{self._what} body truncated: needs {end} bytes, has {len(self._data)}"
            )
        piece = self._data[self._position : end]
        self._position = end
        return piece

    def pull_u8(self) -> int:
        return int(_U8.unpack(self.pull(1))[0])

    def pull_u16(self) -> int:
        return int(_U16.unpack(self.pull(2))[0])

    def pull_u32(self) -> int:
        return int(_U32.unpack(self.pull(4))[0])

    def pull_chunk_id(self) -> ChunkId:
        return ChunkId(self.pull(CHUNK_ID_SIZE))

    def finish(self) -> None:
        if self._position != len(self._data):
            raise RemoteProtocolError(
                f"{self._what} body has {len(self._data) - self._position} trailing bytes"
            )


def _push_text(text: bytes, limit: int) -> bytes:
    if len(text) > limit:
        raise LocalProtocolError(f"text of {len(text)} bytes exceeds the limit of {limit}")
    return _U16.pack(len(text)) + text


def _pull_text(reader: _Reader, limit: int, what: str) -> bytes:
    length = reader.pull_u16()
    if length > limit:
        raise RemoteProtocolError(f"{what} of {length} bytes exceeds the limit of {limit}")
    return reader.pull(length)


def _encode_body(message: Message, limits: Limits) -> tuple[MessageType, bytes]:
    match message:
        case Ping(nonce=nonce) | Pong(nonce=nonce):
            if len(nonce) != 8:
                raise LocalProtocolError("a ping nonce is 8 bytes")
            kind = MessageType.PING if isinstance(message, Ping) else MessageType.PONG
            return kind, nonce
        case (
            StoreChunk(chunk_id=chunk_id, length=length)
            | ChunkData(chunk_id=chunk_id, length=length)
        ):
            if not 0 <= length <= limits.max_bulk:
                raise LocalProtocolError(f"chunk body of {length} bytes exceeds the bulk limit")
            kind = MessageType.STORE if isinstance(message, StoreChunk) else MessageType.CHUNK
            return kind, _CHUNK_AND_LEN.pack(chunk_id.digest, length)
        case StoreResult(chunk_id=chunk_id, status=status, receipt=receipt):
            body = chunk_id.digest + _U8.pack(status) + _push_text(receipt, limits.max_text)
            return MessageType.STORE_RESULT, body
        case GetChunk(chunk_id=chunk_id):
            return MessageType.GET, chunk_id.digest
        case ChunkMissing(chunk_id=chunk_id):
            return MessageType.NOT_FOUND, chunk_id.digest
        case HaveQuery(chunk_ids=chunk_ids):
            if len(chunk_ids) > limits.max_have_ids:
                raise LocalProtocolError(f"a HAVE query holds at most {limits.max_have_ids} ids")
            return MessageType.HAVE, _U16.pack(len(chunk_ids)) + b"".join(
                c.digest for c in chunk_ids
            )
        case HaveAnswer(held=held):
            if len(held) > limits.max_have_ids:
                raise LocalProtocolError(f"a HAVE answer holds at most {limits.max_have_ids} flags")
            bits = bytearray((len(held) + 7) // 8)
            for index, flag in enumerate(held):
                if flag:
                    bits[index // 8] |= 0x80 >> (index % 8)
            return MessageType.HAVE_RESULT, _U16.pack(len(held)) + bytes(bits)
        case ErrorReply(code=code, message=text):
            encoded = text.encode("utf-8")[: limits.max_text]
            return MessageType.ERROR, _U16.pack(code) + _push_text(encoded, limits.max_text)
    raise LocalProtocolError(f"not a message: {message!r}")


def _decode_body(
    kind: MessageType, request_id: int, body: bytes, limits: Limits
) -> tuple[Message, int]:
    """Parse a control body; returns the message and the bulk length to follow."""
    reader = _Reader(body, kind.name)
    message: Message
    bulk = 0
    if kind in (MessageType.PING, MessageType.PONG):
        nonce = reader.pull(8)
        message = Ping(request_id, nonce) if kind == MessageType.PING else Pong(request_id, nonce)
    elif kind in (MessageType.STORE, MessageType.CHUNK):
        chunk_id = reader.pull_chunk_id()
        bulk = reader.pull_u32()
        if bulk > limits.max_bulk:
            raise RemoteProtocolError(
                f"chunk body of {bulk} bytes exceeds the limit of {limits.max_bulk}"
            )
        message = (
            StoreChunk(request_id, chunk_id, bulk)
            if kind == MessageType.STORE
            else ChunkData(request_id, chunk_id, bulk)
        )
    elif kind == MessageType.STORE_RESULT:
        chunk_id = reader.pull_chunk_id()
        raw_status = reader.pull_u8()
        try:
            status = StoreStatus(raw_status)
        except ValueError:
            raise RemoteProtocolError(f"unknown store status {raw_status}") from None
        receipt = _pull_text(reader, limits.max_text, "store receipt")
        message = StoreResult(request_id, chunk_id, status, receipt)
    elif kind == MessageType.GET:
        message = GetChunk(request_id, reader.pull_chunk_id())
    elif kind == MessageType.NOT_FOUND:
        message = ChunkMissing(request_id, reader.pull_chunk_id())
    elif kind == MessageType.HAVE:
        count = reader.pull_u16()
        if count > limits.max_have_ids:
            raise RemoteProtocolError(
                f"HAVE query of {count} ids exceeds the limit of {limits.max_have_ids}"
            )
        ids = tuple(reader.pull_chunk_id() for _ in range(count))
        message = HaveQuery(request_id, ids)
    elif kind == MessageType.HAVE_RESULT:
        count = reader.pull_u16()
        if count > limits.max_have_ids:
            raise RemoteProtocolError(
                f"HAVE answer of {count} flags exceeds the limit of {limits.max_have_ids}"
            )
        bits = reader.pull((count + 7) // 8)
        held = tuple(bool(bits[i // 8] & (0x80 >> (i % 8))) for i in range(count))
        message = HaveAnswer(request_id, held)
    elif kind == MessageType.ERROR:
        raw_code = reader.pull_u16()
        try:
            code = ErrorCode(raw_code)
        except ValueError:
            code = ErrorCode.INTERNAL
        text = _pull_text(reader, limits.max_text, "error message")
        message = ErrorReply(request_id, code, text.decode("utf-8", errors="replace"))
    else:  # pragma: no cover - handshake types never reach here
        raise RemoteProtocolError(f"unexpected {kind.name} frame")
    reader.finish()
    return message, bulk


# --- handshake bodies ---------------------------------------------------------------

_HELLO = struct.Struct(">BB32sB")
_WELCOME = struct.Struct(">B32s32s64s")
_AUTH = struct.Struct(">32s64s")
_FLAG_CLIENT = 0x01
_RESPONDER_CONTEXT = b"dhtfs/handshake/responder"
_INITIATOR_CONTEXT = b"dhtfs/handshake/initiator"


def _hash(*parts: bytes) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    return digest.digest()


# --- the connection state machine ------------------------------------------------------


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class State(enum.Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_WELCOME = "await-welcome"
    AWAIT_AUTH = "await-auth"
    OPEN = "open"
    CLOSED = "closed"


class _Phase(enum.Enum):
    HEADER = 0
    BODY = 1
    BULK = 2


class Connection:
    """One side of one connection: handshake, framing, session encryption.

    Feed received bytes to ``receive_data``; take events from ``next_event``
    until it returns ``NEED_DATA``; write whatever ``data_to_send`` returns.
    After a ``RemoteProtocolError`` the connection is closed for good.
    """

    def __init__(
        self,
        role: Role,
        identity: Identity,
        *,
        expected_peer: NodeId | None = None,
        limits: Limits | None = None,
        versions: tuple[int, int] = PROTOCOL_VERSIONS,
        client_mode: bool = False,
        allocate: Callable[[int], bytearray] = bytearray,
    ) -> None:
        self.role = role
        self._allocate = allocate
        self.limits = limits or Limits()
        self._identity = identity
        self._expected_peer = expected_peer
        self._versions = versions
        self._client_mode = client_mode
        self._ephemeral = EphemeralKey()
        self._outgoing = bytearray()
        self._events: deque[Event] = deque()
        self._buffer = bytearray()
        self._phase = _Phase.HEADER
        self._frame_type = MessageType.PING
        self._frame_request = 0
        self._frame_header = b""
        self._frame_length = 0
        self._bulk_message: StoreChunk | ChunkData | None = None
        self._bulk = bytearray()
        self._bulk_filled = 0
        self._hello = b""
        self._welcome = b""
        self._peer_ephemeral = b""
        self._send_key = b""
        self._receive_key = b""
        self._send_counter = 0
        self._receive_counter = 0
        self.version = 0
        self.peer_id: NodeId | None = None
        self.peer_is_client = False
        if role is Role.INITIATOR:
            flags = _FLAG_CLIENT if client_mode else 0
            self._hello = _HELLO.pack(versions[0], versions[1], self._ephemeral.public, flags)
            self._outgoing += self._frame(MessageType.HELLO, 0, self._hello)
            self.state = State.AWAIT_WELCOME
        else:
            self.state = State.AWAIT_HELLO

    # --- output -------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes the state machine produced (handshake replies) to write now."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def send(self, message: Message) -> bytes:
        """Encode one message as a sealed frame.

        For StoreChunk and ChunkData only the frame is returned; the caller
        must write exactly ``message.length`` body bytes right after it.
        """
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send {type(message).__name__} in state {self.state}")
        if not 0 <= message.request_id <= MAX_REQUEST_ID:
            raise LocalProtocolError("request id out of range")
        kind, body = _encode_body(message, self.limits)
        if len(body) + SESSION_TAG_SIZE > self.limits.max_body:
            raise LocalProtocolError(f"{kind.name} body exceeds the frame limit")
        header = _HEADER.pack(
            MAGIC, FRAME_VERSION, kind, message.request_id, len(body) + SESSION_TAG_SIZE
        )
        sealed = session_seal(self._send_key, self._send_counter, header, body)
        self._send_counter += 1
        return header + sealed

    def _frame(self, kind: MessageType, request_id: int, body: bytes) -> bytes:
        return _HEADER.pack(MAGIC, FRAME_VERSION, kind, request_id, len(body)) + body

    def error_frame(self, code: ErrorCode, text: str) -> bytes:
        """An error to send before closing, readable whatever the state."""
        message = ErrorReply(0, code, text)
        if self.state is State.OPEN:
            return self.send(message)
        _, body = _encode_body(message, self.limits)
        return self._frame(MessageType.ERROR, 0, body)

    # --- input --------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Consume received bytes; parsed events queue up for ``next_event``.

        Raises RemoteProtocolError if the bytes break the protocol; the
        connection is then closed.
        """
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        try:
            self._consume(memoryview(data))
        except RemoteProtocolError:
            self.state = State.CLOSED
            raise

    def next_event(self) -> Event | NeedData:
        if self._events:
            return self._events.popleft()
        return NEED_DATA

    def close(self) -> None:
        self.state = State.CLOSED

    @property
    def receiving_bulk(self) -> int:
        """Bulk bytes still expected for the current chunk (0 when none)."""
        if self._phase is _Phase.BULK and self._bulk_message is not None:
            return self._bulk_message.length - self._bulk_filled
        return 0

    def bulk_buffer(self) -> memoryview | None:
        """While a chunk body is arriving: the unfilled rest of its buffer.

        A caller that can read straight into memory (``BufferedProtocol``)
        may receive into this view and report the count with
        ``bulk_received``, saving a copy of every body byte.
        """
        if self._phase is _Phase.BULK and self.state is State.OPEN:
            return memoryview(self._bulk)[self._bulk_filled :]
        return None

    def bulk_received(self, nbytes: int) -> None:
        """``nbytes`` were written into the view ``bulk_buffer`` returned."""
        if not 0 <= nbytes <= self.receiving_bulk:
            raise LocalProtocolError(f"bulk_received({nbytes}) with {self.receiving_bulk} expected")
        self._bulk_filled += nbytes
        if self.receiving_bulk == 0:
            self._finish_bulk()

    def _consume(self, view: memoryview) -> None:
        while view:
            if self._phase is _Phase.BULK:
                view = self._consume_bulk(view)
                continue
            needed = HEADER_SIZE if self._phase is _Phase.HEADER else self._frame_length
            take = min(len(view), needed - len(self._buffer))
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) < needed:
                return
            if self._phase is _Phase.HEADER:
                self._parse_header(bytes(self._buffer))
            else:
                body = bytes(self._buffer)
                self._buffer.clear()
                self._phase = _Phase.HEADER
                self._handle_body(body)
                continue
            self._buffer.clear()
            if self._frame_length == 0:
                self._phase = _Phase.HEADER
                self._handle_body(b"")
            else:
                self._phase = _Phase.BODY

    def _parse_header(self, header: bytes) -> None:
        magic, version, raw_type, request_id, length = _HEADER.unpack(header)
        if magic != MAGIC:
            raise RemoteProtocolError(f"bad frame magic {magic!r}: not a dhtfs peer")
        if version != FRAME_VERSION:
            raise RemoteProtocolError(
                f"unsupported frame version {version} (this node speaks {FRAME_VERSION})"
            )
        try:
            kind = MessageType(raw_type)
        except ValueError:
            raise RemoteProtocolError(f"unknown message type {raw_type:#04x}") from None
        if length > self.limits.max_body:
            raise RemoteProtocolError(
                f"frame body of {length} bytes exceeds the limit of {self.limits.max_body}"
            )
        self._frame_type = kind
        self._frame_request = request_id
        self._frame_length = length
        self._frame_header = header

    def _handle_body(self, body: bytes) -> None:
        kind = self._frame_type
        if self.state is not State.OPEN:
            self._handle_handshake(kind, body)
            return
        if kind in _HANDSHAKE_TYPES:
            raise RemoteProtocolError(f"unexpected {kind.name} after the handshake")
        if len(body) < SESSION_TAG_SIZE:
            raise RemoteProtocolError(
                f"{kind.name} frame body of {len(body)} bytes is too short to be sealed"
            )
        plain = session_open(self._receive_key, self._receive_counter, self._frame_header, body)
        if plain is None:
            raise RemoteProtocolError(f"{kind.name} frame failed authentication")
        self._receive_counter += 1
        message, bulk = _decode_body(kind, self._frame_request, plain, self.limits)
        if isinstance(message, StoreChunk | ChunkData):
            self._bulk_message = message
            # Every byte of the buffer is overwritten before the event goes
            # out, so a recycled (not zeroed) buffer is fine.
            self._bulk = self._allocate(bulk)
            if len(self._bulk) != bulk:
                raise LocalProtocolError("allocate returned a buffer of the wrong size")
            self._bulk_filled = 0
            self._phase = _Phase.BULK
            if bulk == 0:
                self._finish_bulk()
            return
        self._events.append(message)

    def _consume_bulk(self, view: memoryview) -> memoryview:
        take = min(len(view), self.receiving_bulk)
        self._bulk[self._bulk_filled : self._bulk_filled + take] = view[:take]
        self._bulk_filled += take
        if self.receiving_bulk == 0:
            self._finish_bulk()
        return view[take:]

    def _finish_bulk(self) -> None:
        message = self._bulk_message
        assert message is not None
        body = self._bulk
        self._bulk = bytearray()
        self._bulk_message = None
        self._bulk_filled = 0
        self._phase = _Phase.HEADER
        if isinstance(message, StoreChunk):
            self._events.append(StoreChunk(message.request_id, message.chunk_id, len(body), body))
        else:
            self._events.append(ChunkData(message.request_id, message.chunk_id, len(body), body))

    # --- handshake ----------------------------------------------------------------

    def _handle_handshake(self, kind: MessageType, body: bytes) -> None:
        if kind == MessageType.ERROR:
            message, _ = _decode_body(kind, self._frame_request, body, self.limits)
            assert isinstance(message, ErrorReply)
            raise RemoteProtocolError(f"peer refused the handshake: {message.message}")
        expected = {
            State.AWAIT_HELLO: MessageType.HELLO,
            State.AWAIT_WELCOME: MessageType.WELCOME,
            State.AWAIT_AUTH: MessageType.AUTH,
        }[self.state]
        if kind != expected:
            raise RemoteProtocolError(
                f"expected {expected.name} during the handshake, got {kind.name}"
            )
        if kind == MessageType.HELLO:
            self._on_hello(body)
        elif kind == MessageType.WELCOME:
            self._on_welcome(body)
        else:
            self._on_auth(body)

    def _on_hello(self, body: bytes) -> None:
        if len(body) != _HELLO.size:
            raise RemoteProtocolError(f"HELLO body is {len(body)} bytes, expected {_HELLO.size}")
        low, high, peer_ephemeral, flags = _HELLO.unpack(body)
        version = min(high, self._versions[1])
        if version < max(low, self._versions[0]):
            text = (
                f"no common protocol version: peer speaks {low}-{high}, "
                f"this node {self._versions[0]}-{self._versions[1]}"
            )
            self._outgoing += self.error_frame(ErrorCode.NO_VERSION, text)
            raise RemoteProtocolError(text)
        self.version = version
        self.peer_is_client = bool(flags & _FLAG_CLIENT)
        self._hello = body
        unsigned = _WELCOME.pack(
            version, self._ephemeral.public, self._identity.public_key, bytes(64)
        )[:-64]
        signature = self._identity.sign(_RESPONDER_CONTEXT + _hash(body, unsigned))
        welcome = unsigned + signature
        self._outgoing += self._frame(MessageType.WELCOME, 0, welcome)
        self._welcome = welcome
        self._peer_ephemeral = self._checked_ephemeral(peer_ephemeral)
        self.state = State.AWAIT_AUTH

    def _on_welcome(self, body: bytes) -> None:
        if len(body) != _WELCOME.size:
            raise RemoteProtocolError(
                f"WELCOME body is {len(body)} bytes, expected {_WELCOME.size}"
            )
        version, peer_ephemeral, peer_static, signature = _WELCOME.unpack(body)
        if not self._versions[0] <= version <= self._versions[1]:
            raise RemoteProtocolError(
                f"peer chose protocol version {version}, which was not offered"
            )
        if not verify_signature(
            peer_static, _RESPONDER_CONTEXT + _hash(self._hello, body[:-64]), signature
        ):
            raise RemoteProtocolError("peer's handshake signature is invalid")
        peer_id = NodeId.for_public_key(peer_static)
        if self._expected_peer is not None and peer_id != self._expected_peer:
            raise RemoteProtocolError(
                f"peer proved node id {peer_id.hex()}, expected {self._expected_peer.hex()}"
            )
        self.version = version
        auth_unsigned = self._identity.public_key
        auth_signature = self._identity.sign(_INITIATOR_CONTEXT + _hash(self._hello, body))
        auth = _AUTH.pack(auth_unsigned, auth_signature)
        self._outgoing += self._frame(MessageType.AUTH, 0, auth)
        shared = self._ephemeral_shared(self._checked_ephemeral(peer_ephemeral))
        to_responder, to_initiator = derive_session_keys(shared, _hash(self._hello, body, auth))
        self._send_key, self._receive_key = to_responder, to_initiator
        self._open(peer_id, peer_static, peer_is_client=False)

    def _on_auth(self, body: bytes) -> None:
        if len(body) != _AUTH.size:
            raise RemoteProtocolError(f"AUTH body is {len(body)} bytes, expected {_AUTH.size}")
        peer_static, signature = _AUTH.unpack(body)
        if not verify_signature(
            peer_static, _INITIATOR_CONTEXT + _hash(self._hello, self._welcome), signature
        ):
            raise RemoteProtocolError("peer's handshake signature is invalid")
        peer_id = NodeId.for_public_key(peer_static)
        if self._expected_peer is not None and peer_id != self._expected_peer:
            raise RemoteProtocolError(
                f"peer proved node id {peer_id.hex()}, expected {self._expected_peer.hex()}"
            )
        shared = self._ephemeral_shared(self._peer_ephemeral)
        to_responder, to_initiator = derive_session_keys(
            shared, _hash(self._hello, self._welcome, body)
        )
        self._send_key, self._receive_key = to_initiator, to_responder
        self._open(peer_id, peer_static, peer_is_client=self.peer_is_client)

    def _checked_ephemeral(self, key: bytes) -> bytes:
        if key == bytes(32):
            raise RemoteProtocolError("peer sent an all-zero ephemeral key")
        return key

    def _ephemeral_shared(self, peer_ephemeral: bytes) -> bytes:
        try:
            return self._ephemeral.shared_secret(peer_ephemeral)
        except ValueError:
            raise RemoteProtocolError("peer sent a degenerate ephemeral key") from None

    def _open(self, peer_id: NodeId, peer_static: bytes, *, peer_is_client: bool) -> None:
        self.peer_id = peer_id
        self.state = State.OPEN
        self._events.append(HandshakeComplete(peer_id, peer_static, self.version, peer_is_client))
