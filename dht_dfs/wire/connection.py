"""One side of one chunk-protocol connection, as a sans-IO state machine.

No sockets and no asyncio here (as h11 and aioquic's ``quic`` package): bytes
go in through ``Connection.receive_data``, typed events come out of
``Connection.next_event``, and ``Connection.send`` turns a message into bytes
for the caller to write. ``dht_dfs.transport`` is the asyncio glue. The frame
layout is in ``messages``, body codecs in ``codec``, the handshake in
``handshake``.

Errors: ``RemoteProtocolError`` for anything the peer got wrong (close that
connection), ``LocalProtocolError`` for misuse of this API.

Imports nothing but ``dht_dfs.core`` and this package.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable

from dht_dfs.core.crypto import SESSION_TAG_SIZE, Identity, session_open, session_seal
from dht_dfs.core.errors import LocalProtocolError, RemoteProtocolError
from dht_dfs.core.ids import NodeId
from dht_dfs.wire.codec import decode_body, encode_body
from dht_dfs.wire.handshake import Established, Handshake, NoCommonVersion
from dht_dfs.wire.messages import (
    FRAME_VERSION,
    HANDSHAKE_TYPES,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_REQUEST_ID,
    NEED_DATA,
    PROTOCOL_VERSIONS,
    ChunkData,
    ErrorCode,
    ErrorReply,
    Event,
    HandshakeComplete,
    Limits,
    Message,
    MessageType,
    NeedData,
    StoreChunk,
)


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

    ``allocate(n)`` gives the buffer a chunk body is received into, when its
    header arrives; it may return None (no room in the caller's budget):
    see ``awaiting_buffer``.
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
        allocate: Callable[[int], bytearray | None] = bytearray,
    ) -> None:
        self.role = role
        self._allocate = allocate
        self.limits = limits or Limits()
        self._handshake = Handshake(
            identity, expected_peer=expected_peer, versions=versions, client_mode=client_mode
        )
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
        self._bulk_waiting = False
        self._held = b""
        self._send_key = b""
        self._receive_key = b""
        self._send_counter = 0
        self._receive_counter = 0
        self.version = 0
        self.peer_id: NodeId | None = None
        self.peer_is_client = False
        if role is Role.INITIATOR:
            self._outgoing += self._frame(MessageType.HELLO, 0, self._handshake.hello())
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
        kind, body = encode_body(message, self.limits)
        if len(body) + SESSION_TAG_SIZE > self.limits.max_body:
            raise LocalProtocolError(f"{kind.name} body exceeds the frame limit")
        header = HEADER.pack(
            MAGIC, FRAME_VERSION, kind, message.request_id, len(body) + SESSION_TAG_SIZE
        )
        sealed = session_seal(self._send_key, self._send_counter, header, body)
        self._send_counter += 1
        return header + sealed

    def _frame(self, kind: MessageType, request_id: int, body: bytes) -> bytes:
        return HEADER.pack(MAGIC, FRAME_VERSION, kind, request_id, len(body)) + body

    def error_frame(self, code: ErrorCode, text: str) -> bytes:
        """An error to send before closing, readable whatever the state."""
        message = ErrorReply(0, code, text)
        if self.state is State.OPEN:
            return self.send(message)
        _, body = encode_body(message, self.limits)
        return self._frame(MessageType.ERROR, 0, body)

    # --- input --------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Consume received bytes; parsed events queue up for ``next_event``.

        Raises RemoteProtocolError if the bytes break the protocol; the
        connection is then closed.
        """
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        if self._bulk_waiting:
            raise LocalProtocolError("receive_data while awaiting a body buffer: stop reading")
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
        """Closed for good; buffered input and unread events are dropped now.

        Dropping them here, not when the object is collected, matters: the
        caller often sits in a reference cycle, and a half-received body
        can be 16 MiB.
        """
        self.state = State.CLOSED
        self._bulk = bytearray()
        self._bulk_message = None
        self._bulk_waiting = False
        self._held = b""
        self._buffer = bytearray()
        self._events.clear()

    @property
    def awaiting_buffer(self) -> bool:
        """A chunk header came but ``allocate`` had no room for its body yet.

        Received bytes after that header are held (at most what the last
        ``receive_data`` brought) and nothing more is parsed: the caller
        stops reading and calls ``retry_allocate`` when room may have freed.
        """
        return self._bulk_waiting

    def retry_allocate(self) -> bool:
        """Ask ``allocate`` again for the waiting body; True once it got one.

        On success the held bytes are consumed (which may queue events, or
        wait again for the next body). Raises RemoteProtocolError as
        ``receive_data`` does.
        """
        if not self._bulk_waiting:
            return True
        if not self._allocate_bulk():
            return False
        held, self._held = self._held, b""
        try:
            if self._bulk_message is not None and self._bulk_message.length == 0:
                self._finish_bulk()
            self._consume(memoryview(held))
        except RemoteProtocolError:
            self.state = State.CLOSED
            raise
        return not self._bulk_waiting

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
        if self._phase is _Phase.BULK and self.state is State.OPEN and not self._bulk_waiting:
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
            if self._bulk_waiting:
                self._held = bytes(view)
                return
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
        magic, version, raw_type, request_id, length = HEADER.unpack(header)
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
        if kind in HANDSHAKE_TYPES:
            raise RemoteProtocolError(f"unexpected {kind.name} after the handshake")
        if len(body) < SESSION_TAG_SIZE:
            raise RemoteProtocolError(
                f"{kind.name} frame body of {len(body)} bytes is too short to be sealed"
            )
        plain = session_open(self._receive_key, self._receive_counter, self._frame_header, body)
        if plain is None:
            raise RemoteProtocolError(f"{kind.name} frame failed authentication")
        self._receive_counter += 1
        message, bulk = decode_body(kind, self._frame_request, plain, self.limits)
        if isinstance(message, StoreChunk | ChunkData):
            self._bulk_message = message
            self._bulk_filled = 0
            self._phase = _Phase.BULK
            if not self._allocate_bulk():
                self._bulk_waiting = True
                return
            if bulk == 0:
                self._finish_bulk()
            return
        self._events.append(message)

    def _allocate_bulk(self) -> bool:
        message = self._bulk_message
        assert message is not None
        # Every byte of the buffer is overwritten before the event goes
        # out, so a recycled (not zeroed) buffer is fine.
        buffer = self._allocate(message.length)
        if buffer is None:
            return False
        if len(buffer) != message.length:
            raise LocalProtocolError("allocate returned a buffer of the wrong size")
        self._bulk = buffer
        self._bulk_waiting = False
        return True

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
            self._events.append(
                StoreChunk(message.request_id, message.chunk_id, len(body), message.lease, body)
            )
        else:
            self._events.append(ChunkData(message.request_id, message.chunk_id, len(body), body))

    # --- handshake ----------------------------------------------------------------

    def _handle_handshake(self, kind: MessageType, body: bytes) -> None:
        if kind == MessageType.ERROR:
            message, _ = decode_body(kind, self._frame_request, body, self.limits)
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
        try:
            welcome = self._handshake.on_hello(body)
        except NoCommonVersion as error:
            self._outgoing += self.error_frame(ErrorCode.NO_VERSION, str(error))
            raise
        self.version = self._handshake.version
        self.peer_is_client = self._handshake.peer_is_client
        self._outgoing += self._frame(MessageType.WELCOME, 0, welcome)
        self.state = State.AWAIT_AUTH

    def _on_welcome(self, body: bytes) -> None:
        auth, session = self._handshake.on_welcome(body)
        self._outgoing += self._frame(MessageType.AUTH, 0, auth)
        self._open(session)

    def _on_auth(self, body: bytes) -> None:
        self._open(self._handshake.on_auth(body))

    def _open(self, session: Established) -> None:
        self._send_key, self._receive_key = session.send_key, session.receive_key
        self.version = session.version
        self.peer_is_client = session.peer_is_client
        self.peer_id = session.peer_id
        self.state = State.OPEN
        self._events.append(
            HandshakeComplete(
                session.peer_id, session.peer_static, session.version, session.peer_is_client
            )
        )
