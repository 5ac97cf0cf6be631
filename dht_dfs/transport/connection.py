"""One authenticated TCP connection to a peer: asyncio glue around ``wire.Connection``.

Owns one socket's flow control, request/response matching, timeouts and the
serving of requests that arrive on it (a connection is both client and
server). Flow control: writes wait while the kernel and asyncio buffers are
above their high-water mark (``pause_writing``); requests beyond
``max_concurrent_requests`` in progress stay parsed but unhandled in the
wire state machine, and reading pauses until a handler finishes, so the
limit holds before any handler starts, however many requests one read
brought.

Bounds (DESIGN property 14): a message is queued for the socket only while
fewer than ``Config.max_write_buffer`` bytes wait there, so a peer that stops
reading holds at most that plus one message, and a send with no progress for
``Config.send_stall_timeout`` closes the connection. A stored chunk is opened
only once it is its turn to go out (``LazyFileBody``), so queued GETs hold no
descriptor. Incoming chunk bodies are reserved from the endpoint's
``BodyBudget`` when their header arrives (reading stops while it has no
room) and must arrive within ``Config.body_timeout``. All connections read
through the endpoint's one receive buffer (a read is handled before the
next begins), so an idle connection costs no buffer memory.

Serving chunks: on connections this node accepted, a stored chunk file goes
out with ``loop.sendfile`` (zero copy). asyncio pauses reading during a
sendfile, so two peers doing it to each other on one connection could both
stall with full buffers; only the accepting side ever uses sendfile, which
rules that out. The initiating side sends chunk bytes with plain writes.

Must not import: dht, store, transfer, node. The pool of connections is the
``ConnectionOwner`` (the endpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import time
from typing import NoReturn, Protocol

from dht_dfs import wire
from dht_dfs.core.config import Config
from dht_dfs.core.crypto import Identity
from dht_dfs.core.errors import (
    HandshakeError,
    LocalProtocolError,
    PeerUnavailableError,
    RemoteProtocolError,
    RequestTimeoutError,
)
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.transport.buffers import (
    BodyBudget,
    BufferPool,
    ChunkBody,
    FileBody,
    LazyFileBody,
    close_body,
    read_chunk,
)
from dht_dfs.transport.calls import ChunkCalls
from dht_dfs.transport.handler import RequestHandler

log = logging.getLogger(__name__)

RECEIVE_BUFFER = 256 * 1024
"""Bytes of one read into the (shared) receive buffer."""
_DIRECT_RECEIVE_MIN = 16 * 1024
_SENDFILE_SLICE = 1024 * 1024
"""Bytes per loop.sendfile call: each must finish within the stall timeout."""


class ConnectionOwner(Protocol):
    """What a connection needs of the pool it belongs to (the endpoint)."""

    config: Config
    identity: Identity
    limits: wire.Limits
    client_mode: bool
    buffers: BufferPool
    body_budget: BodyBudget
    receive_buffer: bytearray
    """One read's buffer, shared by all connections of the owner."""
    handler: RequestHandler | None

    def adopt(self, connection: PeerConnection) -> None:
        """A socket connected; may abort it (too many connections)."""

    def release(self, connection: PeerConnection) -> None:
        """The socket is gone."""

    def authenticated(self, connection: PeerConnection) -> None:
        """The handshake proved the peer's id; the connection may be pooled."""


class PeerConnection(ChunkCalls, asyncio.BufferedProtocol):
    """One authenticated TCP connection to a peer."""

    def __init__(
        self, endpoint: ConnectionOwner, role: wire.Role, expected_peer: NodeId | None
    ) -> None:
        self._endpoint = endpoint
        self.accepted = role is wire.Role.RESPONDER
        self._config = endpoint.config
        self.wire = wire.Connection(
            role,
            endpoint.identity,
            expected_peer=expected_peer,
            limits=endpoint.limits,
            client_mode=endpoint.client_mode,
            allocate=self._allocate_body,
        )
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.handshake: asyncio.Future[wire.HandshakeComplete] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._transport: asyncio.Transport | None = None
        self._budget = endpoint.body_budget
        self._budget_key = "?"
        self._wire_reserved = 0
        """Body bytes reserved for bodies the wire holds (arriving or queued)."""
        self._bodies_begun = 0
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_timer_for = 0
        self._budget_wake_scheduled = False
        self._in_sendfile = False
        self._direct = False
        self._pending: dict[int, asyncio.Future[wire.Response]] = {}
        self._next_request_id = 1
        self._send_lock = asyncio.Lock()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._serving: set[asyncio.Task[None]] = set()
        self._reading_paused = False
        self._limit_paused = False
        self.queued_peak = 0
        """Most bytes this connection ever had queued in its transport."""
        self.peer_host = "?"
        self.peer_label = "?"
        self.last_used = time.monotonic()
        self._handshake_timer: asyncio.TimerHandle | None = None

    # --- asyncio callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=self._config.max_write_buffer)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer_host = str(peer[0])
            self.peer_label = f"{peer[0]}:{peer[1]}"
        self._budget_key = self.peer_host
        self._handshake_timer = self._loop.call_later(
            self._config.handshake_timeout, self._handshake_timed_out
        )
        self._endpoint.adopt(self)
        self._flush_wire()

    def get_buffer(self, sizehint: int) -> memoryview:
        # Chunk bodies go straight from the kernel into their final buffer.
        direct = self.wire.bulk_buffer()
        if direct is not None and len(direct) >= _DIRECT_RECEIVE_MIN:
            self._direct = True
            return direct
        self._direct = False
        return memoryview(self._endpoint.receive_buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.last_used = time.monotonic()
        try:
            if self._direct:
                self.wire.bulk_received(nbytes)
            else:
                self.wire.receive_data(memoryview(self._endpoint.receive_buffer)[:nbytes])
            self._after_input()
        except RemoteProtocolError as error:
            self._flush_wire()  # e.g. a version-mismatch error frame for the peer
            self.abort(f"protocol error: {error}")

    def _after_input(self) -> None:
        self._flush_wire()
        if self.wire.awaiting_buffer:
            self._budget.wait(self, self._budget_freed)
        self._handle_events()
        self._update_reading()

    # --- incoming bodies --------------------------------------------------------------

    @property
    def body_bytes_reserved(self) -> int:
        """Bytes reserved for bodies this connection's wire holds."""
        return self._wire_reserved

    def _allocate_body(self, size: int) -> bytearray | None:
        if not self._budget.try_reserve(self._budget_key, size):
            return None
        self._wire_reserved += size
        self._bodies_begun += 1
        return self._endpoint.buffers.take(size)

    def _body_handed_over(self, size: int) -> None:
        """A body left the wire (as an event): its reservation is now the handler's."""
        self._wire_reserved = max(0, self._wire_reserved - size)

    def _release_body(self, size: int) -> None:
        self._budget.release(self._budget_key, size)

    def _budget_freed(self) -> None:
        if not self._budget_wake_scheduled:
            self._budget_wake_scheduled = True
            self._loop.call_soon(self._retry_body)

    def _retry_body(self) -> None:
        self._budget_wake_scheduled = False
        if self._transport is None or self._transport.is_closing():
            return
        try:
            if not self.wire.retry_allocate():
                return
            self._budget.cancel_wait(self)
            self._after_input()
        except RemoteProtocolError as error:
            self._flush_wire()
            self.abort(f"protocol error: {error}")

    def _update_body_deadline(self) -> None:
        """Run the body deadline while a body is arriving and we are reading it."""
        arriving = (
            self.wire.receiving_bulk > 0
            and not self.wire.awaiting_buffer
            and not self._reading_paused
            and not self._in_sendfile
        )
        timer = self._body_timer
        if timer is not None and (not arriving or self._body_timer_for != self._bodies_begun):
            timer.cancel()
            self._body_timer = timer = None
        if arriving and timer is None:
            self._body_timer_for = self._bodies_begun
            self._body_timer = self._loop.call_later(
                self._config.body_timeout, self._body_timed_out
            )

    def _body_timed_out(self) -> None:
        self._body_timer = None
        self.abort(f"chunk body not received within {self._config.body_timeout:g} s of its header")

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        paused = self._limit_paused or self.wire.awaiting_buffer
        if paused != self._reading_paused:
            self._reading_paused = paused
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()
        self._update_body_deadline()

    def eof_received(self) -> bool:
        self.abort("peer closed the connection", level=logging.DEBUG)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._budget.cancel_wait(self)
        # Bodies still in the wire die with it; handlers release their own.
        held, self._wire_reserved = self._wire_reserved, 0
        self._release_body(held)
        reason = f"connection to {self.peer_label} lost" + (f": {exc}" if exc else "")
        if not self.handshake.done():
            self.handshake.set_exception(PeerUnavailableError(reason))
            self.handshake.exception()  # retrieved: a failed connect reports it itself
        for future in self._pending.values():
            if not future.done():
                future.set_exception(PeerUnavailableError(reason))
        self._pending.clear()
        for task in self._serving:
            task.cancel()
        self._can_write.set()
        self.wire.close()
        if not self.closed.done():
            self.closed.set_result(None)
        self._endpoint.release(self)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # --- state ------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return (
            self._transport is not None
            and not self._transport.is_closing()
            and self.handshake.done()
            and not self.handshake.cancelled()
            and self.handshake.exception() is None
        )

    @property
    def peer_id(self) -> NodeId | None:
        return self.wire.peer_id

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        """Requests pending or being served, or a body arriving."""
        return bool(self._pending or self._serving or self.wire.receiving_bulk)

    @property
    def queued(self) -> int:
        """Bytes waiting in the transport for the socket."""
        transport = self._transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def abort(self, reason: str, *, level: int = logging.WARNING) -> None:
        """Close this connection now (pending requests fail)."""
        if self._transport is None or self._transport.is_closing():
            return
        log.log(level, "closing connection with %s: %s", self.peer_label, reason)
        if not self.handshake.done():
            self.handshake.set_exception(HandshakeError(f"{self.peer_label}: {reason}"))
            self.handshake.exception()
        self._transport.close()

    def _handshake_timed_out(self) -> None:
        if not self.handshake.done():
            self.abort(f"no handshake within {self._config.handshake_timeout:g} s")

    def _flush_wire(self) -> None:
        data = self.wire.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    # --- events -------------------------------------------------------------------------

    def _handle_event(self, event: wire.Event) -> None:
        if isinstance(event, wire.StoreChunk | wire.ChunkData):
            self._body_handed_over(len(event.body))
            if isinstance(event, wire.ChunkData):
                # An answer goes to whoever asked: bounded by our own requests.
                self._release_body(len(event.body))
        if isinstance(event, wire.HandshakeComplete):
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()
            self.peer_label = f"{self.peer_label} ({event.peer_id})"
            if not self.handshake.done():
                self.handshake.set_result(event)
            self._endpoint.authenticated(self)
            return
        if isinstance(event, wire.REQUEST_TYPES):
            self._serve(event)
            return
        future = self._pending.pop(event.request_id, None)
        if future is None:
            # A late answer to a request that timed out; its body was consumed.
            log.debug(
                "dropping answer to unknown request %d from %s", event.request_id, self.peer_label
            )
            return
        if not future.done():
            future.set_result(event)

    def _handle_events(self) -> None:
        """Take parsed events from the wire while this connection may serve more.

        At ``max_concurrent_requests`` handlers in progress the rest stay
        queued in the wire state machine (at most one read's worth) and
        reading pauses; each finished handler takes the next one.
        """
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        limit = self._config.max_concurrent_requests
        while len(self._serving) < limit:
            event = self.wire.next_event()
            if isinstance(event, wire.NeedData):
                self._limit_paused = False
                self._update_reading()
                return
            self._handle_event(event)
        self._limit_paused = True
        self._update_reading()

    def _serve(self, request: wire.Request) -> None:
        task = self._loop.create_task(self._answer(request))
        self._serving.add(task)
        task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task[None]) -> None:
        self._serving.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "serving a request from %s failed", self.peer_label, exc_info=task.exception()
            )
        if self._limit_paused:
            self._handle_events()

    async def _answer(self, request: wire.Request) -> None:
        handler = self._endpoint.handler
        peer = self.wire.peer_id
        assert peer is not None
        try:
            if isinstance(request, wire.Ping):
                await self._send(wire.Pong(request.request_id, request.nonce))
            elif handler is None:
                await self._send(
                    wire.ErrorReply(
                        request.request_id,
                        wire.ErrorCode.BAD_REQUEST,
                        "this endpoint serves no chunks",
                    )
                )
            elif isinstance(request, wire.StoreChunk):
                status, receipt = await handler.handle_store(
                    peer, request.chunk_id, request.body, host=self.peer_host, lease=request.lease
                )
                await self._send(
                    wire.StoreResult(request.request_id, request.chunk_id, status, receipt)
                )
            elif isinstance(request, wire.GetChunk):
                body = await handler.handle_get(peer, request.chunk_id)
                if body is None:
                    await self._send(wire.ChunkMissing(request.request_id, request.chunk_id))
                else:
                    await self._send_chunk(request.request_id, request.chunk_id, body)
            elif isinstance(request, wire.ProveQuery):
                tags = await handler.handle_prove(peer, request.nonce, request.chunk_ids)
                await self._send(wire.ProofAnswer(request.request_id, tuple(tags)))
            elif isinstance(request, wire.LeaseQuery):
                held = await handler.handle_lease(peer, request.seconds, request.chunk_ids)
                await self._send(wire.LeaseAnswer(request.request_id, tuple(held)))
            else:
                held = await handler.handle_have(peer, request.chunk_ids)
                await self._send(wire.HaveAnswer(request.request_id, tuple(held)))
        except (PeerUnavailableError, ConnectionError):
            pass  # the connection went away while we answered
        except Exception as error:
            if self._transport is None or self._transport.is_closing():
                return  # e.g. the send stalled and the connection was closed
            log.exception("answering %s from %s failed", type(request).__name__, self.peer_label)
            with contextlib.suppress(PeerUnavailableError, ConnectionError, LocalProtocolError):
                await self._send(
                    wire.ErrorReply(
                        request.request_id,
                        wire.ErrorCode.INTERNAL,
                        f"internal error: {type(error).__name__}",
                    )
                )
        finally:
            if isinstance(request, wire.StoreChunk):
                self._release_body(len(request.body))

    # --- sending ------------------------------------------------------------------------

    def _open_transport(self) -> asyncio.Transport:
        transport = self._transport
        if transport is None or transport.is_closing() or self.wire.state is not wire.State.OPEN:
            raise PeerUnavailableError(f"connection to {self.peer_label} is closed")
        return transport

    async def _send(
        self, message: wire.Message, body: bytes | bytearray | memoryview | None = None
    ) -> None:
        # Sealing consumes the next nonce counter, so seal and write under the
        # lock with no await in between: frames leave in counter order, and a
        # request cancelled while it waits for the lock consumes nothing.
        async with self._send_lock:
            transport = await self._writable()
            self._write(transport, self.wire.send(message), body)

    def _write(
        self,
        transport: asyncio.Transport,
        frame: bytes,
        body: bytes | bytearray | memoryview | None = None,
    ) -> None:
        transport.write(frame)
        if body is not None:
            transport.write(body)
        self.queued_peak = max(self.queued_peak, transport.get_write_buffer_size())

    async def _writable(self) -> asyncio.Transport:
        """The open transport, once it has fewer than ``max_write_buffer`` bytes queued.

        Called with the send lock held, before anything is read or sealed
        for the next message. Waiting is fine while the queue shrinks; with
        no progress for ``send_stall_timeout`` the connection is closed.
        """
        transport = self._open_transport()
        stall = self._config.send_stall_timeout
        while not self._can_write.is_set():
            before = transport.get_write_buffer_size()
            try:
                async with asyncio.timeout(stall):
                    await self._can_write.wait()
            except TimeoutError:
                if transport.get_write_buffer_size() < before:
                    continue
                self._stalled()
            transport = self._open_transport()
        return transport

    def _stalled(self) -> NoReturn:
        stall = self._config.send_stall_timeout
        self.abort(f"peer took nothing we sent for {stall:g} s", level=logging.INFO)
        raise PeerUnavailableError(f"{self.peer_label} stopped reading")

    async def _send_chunk(self, request_id: int, chunk_id: ChunkId, body: ChunkBody) -> None:
        if isinstance(body, bytes):
            await self._send(wire.ChunkData(request_id, chunk_id, len(body)), body)
            return
        opened = body if isinstance(body, FileBody) else None
        try:
            async with self._send_lock:
                transport = await self._writable()
                if not self.accepted:
                    # Read only now that the socket has room, in a thread
                    # that owns (and closes) the descriptor from here on.
                    opened = None
                    data = await asyncio.to_thread(read_chunk, body)
                    transport = self._open_transport()
                    if data is None:
                        self._write(
                            transport, self.wire.send(wire.ChunkMissing(request_id, chunk_id))
                        )
                    else:
                        message = wire.ChunkData(request_id, chunk_id, len(data))
                        self._write(transport, self.wire.send(message), data)
                    return
                if opened is None:
                    assert isinstance(body, LazyFileBody)
                    opened = body.open()  # our turn: only now take a descriptor
                if opened is None:
                    self._write(transport, self.wire.send(wire.ChunkMissing(request_id, chunk_id)))
                    return
                await self._sendfile(transport, request_id, chunk_id, opened)
        finally:
            if opened is not None:
                close_body(opened)

    async def _sendfile(
        self, transport: asyncio.Transport, request_id: int, chunk_id: ChunkId, body: FileBody
    ) -> None:
        self._write(transport, self.wire.send(wire.ChunkData(request_id, chunk_id, body.size)))
        self._in_sendfile = True
        self._update_body_deadline()  # we are not reading meanwhile: not the peer's fault
        try:
            offset = self._try_sendfile_now(transport, body)
            if offset < body.size:
                with io.FileIO(body.fd, "rb", closefd=False) as handle:
                    # In slices, each with the stall deadline: a slice that
                    # completes is progress, a peer that takes nothing is cut off.
                    while offset < body.size:
                        count = min(_SENDFILE_SLICE, body.size - offset)
                        try:
                            async with asyncio.timeout(self._config.send_stall_timeout):
                                await self._loop.sendfile(transport, handle, offset, count)
                        except TimeoutError:
                            self._stalled()
                        offset += count
        except BaseException:
            # A frame header went out without all of its body: the
            # stream can no longer be parsed, so end the connection.
            self.abort("sending a chunk was interrupted", level=logging.INFO)
            raise
        finally:
            self._in_sendfile = False
        if self._reading_paused and not transport.is_closing():
            transport.pause_reading()  # sendfile resumed it; our limits still hold
        self._update_body_deadline()

    @staticmethod
    def _try_sendfile_now(transport: asyncio.Transport, body: FileBody) -> int:
        """Send what the socket takes right now; the rest goes through loop.sendfile.

        Safe only with nothing queued in the transport (then asyncio has no
        writer registered and would write straight to the socket itself).
        Saves the loop.sendfile machinery for chunks that fit the socket
        buffer, which is most of them on a fast link.
        """
        if transport.get_write_buffer_size() != 0:
            return 0
        sock = transport.get_extra_info("socket")
        if sock is None:
            return 0
        try:
            return os.sendfile(sock.fileno(), body.fd, 0, body.size)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            return 0  # let loop.sendfile meet (and report) the same error

    async def _request(
        self,
        message: wire.Request,
        body: bytes | bytearray | memoryview | None,
        within: float | None = None,
    ) -> wire.Response:
        timeout = self._config.request_timeout if within is None else within
        request_id = message.request_id
        future: asyncio.Future[wire.Response] = self._loop.create_future()
        self._pending[request_id] = future
        self.last_used = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await self._send(message, body)
                return await future
        except TimeoutError:
            raise RequestTimeoutError(
                f"{self.peer_label} did not answer {type(message).__name__} within {timeout:g} s"
            ) from None
        finally:
            self._pending.pop(request_id, None)
