"""The sans-IO wire protocol, without sockets.

Two state machines are joined in memory; every message is fed whole, one
byte at a time, and followed by the next frame's bytes; malformed input of
every kind must raise RemoteProtocolError and nothing else.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dht_dfs import wire
from dht_dfs.core.crypto import Identity
from dht_dfs.core.errors import LocalProtocolError, RemoteProtocolError
from dht_dfs.core.ids import ChunkId

ALICE = Identity.generate()
BOB = Identity.generate()


def drain(connection: wire.Connection) -> list[wire.Event]:
    events = []
    while True:
        event = connection.next_event()
        if isinstance(event, wire.NeedData):
            return events
        events.append(event)


def client_and_server(
    **server_options: object,
) -> tuple[wire.Connection, wire.Connection]:
    """An initiator and a responder that completed the handshake in memory."""
    client = wire.Connection(wire.Role.INITIATOR, ALICE, expected_peer=BOB.node_id)
    server = wire.Connection(wire.Role.RESPONDER, BOB, **server_options)  # type: ignore[arg-type]
    server.receive_data(client.data_to_send())  # HELLO
    client.receive_data(server.data_to_send())  # WELCOME
    (client_done,) = drain(client)
    server.receive_data(client.data_to_send())  # AUTH
    (server_done,) = drain(server)
    assert isinstance(client_done, wire.HandshakeComplete)
    assert isinstance(server_done, wire.HandshakeComplete)
    assert client_done.peer_id == BOB.node_id
    assert server_done.peer_id == ALICE.node_id
    assert client.state is server.state is wire.State.OPEN
    return client, server


CHUNK = ChunkId(os.urandom(32))
BODY = os.urandom(3000)

MESSAGES: list[tuple[wire.Message, bytes]] = [
    (wire.Ping(1, b"12345678"), b""),
    (wire.Pong(2, b"abcdefgh"), b""),
    (wire.StoreChunk(3, CHUNK, len(BODY)), BODY),
    (wire.StoreChunk(4, CHUNK, 0), b""),
    (wire.StoreChunk(18, CHUNK, len(BODY), lease=30 * 86400), BODY),
    (wire.StoreChunk(19, CHUNK, 0, lease=0xFFFFFFFF), b""),
    (wire.LeaseQuery(20, 3600, (CHUNK, ChunkId(bytes(32)))), b""),
    (wire.LeaseQuery(21, 0, ()), b""),
    (wire.LeaseAnswer(22, (True, False, True)), b""),
    (wire.LeaseAnswer(23, ()), b""),
    (wire.StoreResult(5, CHUNK, wire.StoreStatus.FULL, b"receipt"), b""),
    (wire.StoreResult(6, CHUNK, wire.StoreStatus.STORED), b""),
    (wire.GetChunk(7, CHUNK), b""),
    (wire.ChunkData(8, CHUNK, len(BODY)), BODY),
    (wire.ChunkMissing(9, CHUNK), b""),
    (wire.HaveQuery(10, (CHUNK, ChunkId(bytes(32)))), b""),
    (wire.HaveQuery(11, ()), b""),
    (wire.HaveAnswer(12, (True, False, True, True, False, False, False, False, True)), b""),
    (wire.ErrorReply(13, wire.ErrorCode.BUSY, "slow down ✓"), b""),
    (wire.ProveQuery(14, b"n" * 32, (CHUNK, ChunkId(bytes(32)))), b""),
    (wire.ProveQuery(15, b"\x00" * 32, ()), b""),
    (
        wire.ProofAnswer(16, (b"t" * 32, None, None, b"u" * 32, None, None, None, None, b"v" * 32)),
        b"",
    ),
    (wire.ProofAnswer(17, ()), b""),
    (wire.Pong(wire.MAX_REQUEST_ID, b"\x00" * 8), b""),
]


def expected_event(message: wire.Message, body: bytes) -> wire.Message:
    if isinstance(message, wire.StoreChunk):
        return wire.StoreChunk(message.request_id, message.chunk_id, len(body), message.lease, body)
    if isinstance(message, wire.ChunkData):
        return wire.ChunkData(message.request_id, message.chunk_id, len(body), body)
    return message


def feed_whole(connection: wire.Connection, data: bytes) -> None:
    connection.receive_data(data)


def feed_bytewise(connection: wire.Connection, data: bytes) -> None:
    for index in range(len(data)):
        connection.receive_data(data[index : index + 1])


FEEDERS: list[Callable[[wire.Connection, bytes], None]] = [feed_whole, feed_bytewise]


@pytest.mark.parametrize(("message", "body"), MESSAGES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("feed", FEEDERS, ids=["whole", "bytewise"])
def test_every_message_round_trips(message: wire.Message, body: bytes, feed) -> None:  # type: ignore[no-untyped-def]
    for sender_is_client in (True, False):
        client, server = client_and_server()
        sender, receiver = (client, server) if sender_is_client else (server, client)
        feed(receiver, sender.send(message) + body)
        assert drain(receiver) == [expected_event(message, body)]


@pytest.mark.parametrize(("message", "body"), MESSAGES, ids=lambda m: type(m).__name__)
def test_trailing_bytes_wait_for_the_next_frame(message: wire.Message, body: bytes) -> None:
    client, server = client_and_server()
    follow_up = wire.Ping(99, b"trailing")
    data = client.send(message) + body + client.send(follow_up)
    server.receive_data(data[:-5])
    assert drain(server) == [expected_event(message, body)]
    server.receive_data(data[-5:])
    assert drain(server) == [follow_up]


def test_many_frames_in_one_read() -> None:
    client, server = client_and_server()
    data = b"".join(client.send(m) + b for m, b in MESSAGES)
    server.receive_data(data)
    assert drain(server) == [expected_event(m, b) for m, b in MESSAGES]


def test_handshake_bytewise_and_early_requests() -> None:
    client = wire.Connection(wire.Role.INITIATOR, ALICE)
    server = wire.Connection(wire.Role.RESPONDER, BOB)
    feed_bytewise(server, client.data_to_send())
    feed_bytewise(client, server.data_to_send())
    assert isinstance(drain(client)[0], wire.HandshakeComplete)
    # The initiator may send a request right behind its AUTH.
    early = client.data_to_send() + client.send(wire.Ping(1, b"earlybrd"))
    feed_bytewise(server, early)
    events = drain(server)
    assert isinstance(events[0], wire.HandshakeComplete)
    assert events[1] == wire.Ping(1, b"earlybrd")


def test_client_mode_is_visible_to_the_responder() -> None:
    client = wire.Connection(wire.Role.INITIATOR, ALICE, client_mode=True)
    server = wire.Connection(wire.Role.RESPONDER, BOB)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    (done,) = drain(server)
    assert isinstance(done, wire.HandshakeComplete) and done.peer_is_client


def test_wrong_expected_peer_is_refused() -> None:
    client = wire.Connection(wire.Role.INITIATOR, ALICE, expected_peer=ALICE.node_id)
    server = wire.Connection(wire.Role.RESPONDER, BOB)
    server.receive_data(client.data_to_send())
    with pytest.raises(RemoteProtocolError, match="expected"):
        client.receive_data(server.data_to_send())
    assert client.state is wire.State.CLOSED


def test_forged_identity_signature_is_refused() -> None:
    """A responder that claims BOB's key without holding it fails."""
    mallory = Identity.generate()
    client = wire.Connection(wire.Role.INITIATOR, ALICE, expected_peer=BOB.node_id)
    server = wire.Connection(wire.Role.RESPONDER, mallory)
    server.receive_data(client.data_to_send())
    frame = bytearray(server.data_to_send())
    # Replace mallory's static key in WELCOME with BOB's public key.
    offset = wire.HEADER_SIZE + 1 + 32
    frame[offset : offset + 32] = BOB.public_key
    with pytest.raises(RemoteProtocolError, match="signature is invalid"):
        client.receive_data(bytes(frame))


def test_forged_initiator_auth_is_refused() -> None:
    mallory = Identity.generate()
    client = wire.Connection(wire.Role.INITIATOR, mallory)
    server = wire.Connection(wire.Role.RESPONDER, BOB)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    auth = bytearray(client.data_to_send())
    auth[wire.HEADER_SIZE : wire.HEADER_SIZE + 32] = ALICE.public_key  # claim to be ALICE
    with pytest.raises(RemoteProtocolError, match="signature is invalid"):
        server.receive_data(bytes(auth))


def test_no_common_version_sends_an_error_then_fails() -> None:
    client = wire.Connection(wire.Role.INITIATOR, ALICE, versions=(5, 7))
    server = wire.Connection(wire.Role.RESPONDER, BOB)
    with pytest.raises(RemoteProtocolError, match="no common protocol version"):
        server.receive_data(client.data_to_send())
    with pytest.raises(RemoteProtocolError, match="peer refused the handshake: no common"):
        client.receive_data(server.data_to_send())


def test_version_negotiation_picks_highest_common() -> None:
    client = wire.Connection(wire.Role.INITIATOR, ALICE, versions=(1, 3))
    server = wire.Connection(wire.Role.RESPONDER, BOB, versions=(1, 2))
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    assert client.version == server.version == 2


def test_tampered_sealed_frame_fails_authentication() -> None:
    client, server = client_and_server()
    frame = bytearray(client.send(wire.GetChunk(1, CHUNK)))
    frame[-1] ^= 1
    with pytest.raises(RemoteProtocolError, match="GET frame failed authentication"):
        server.receive_data(bytes(frame))


def test_replayed_frame_fails_authentication() -> None:
    client, server = client_and_server()
    frame = client.send(wire.GetChunk(1, CHUNK))
    server.receive_data(frame)
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        server.receive_data(frame)


def test_sending_before_handshake_is_a_local_error() -> None:
    client = wire.Connection(wire.Role.INITIATOR, ALICE)
    with pytest.raises(LocalProtocolError, match="cannot send"):
        client.send(wire.Ping(1, b"12345678"))
    _, server = client_and_server()
    with pytest.raises(LocalProtocolError, match="8 bytes"):
        server.send(wire.Ping(1, b"short"))
    with pytest.raises(LocalProtocolError, match="at most 1024 ids"):
        server.send(wire.HaveQuery(1, (CHUNK,) * 1025))
    with pytest.raises(LocalProtocolError, match="at most 32 ids"):
        server.send(wire.ProveQuery(1, b"n" * 32, (CHUNK,) * 33))
    with pytest.raises(LocalProtocolError, match="nonce is 32 bytes"):
        server.send(wire.ProveQuery(1, b"short", (CHUNK,)))
    with pytest.raises(LocalProtocolError, match="tag is 32 bytes"):
        server.send(wire.ProofAnswer(1, (b"short",)))
    with pytest.raises(LocalProtocolError, match="does not fit the wire's 32 bits"):
        server.send(wire.LeaseQuery(1, 1 << 32, (CHUNK,)))
    with pytest.raises(LocalProtocolError, match="does not fit the wire's 32 bits"):
        server.send(wire.StoreChunk(1, CHUNK, 0, lease=-1))
    with pytest.raises(LocalProtocolError, match="LEASE query holds at most 1024 ids"):
        server.send(wire.LeaseQuery(1, 60, (CHUNK,) * 1025))


def header(kind: int, length: int, *, magic: bytes = b"DF", version: int = 1) -> bytes:
    return struct.pack(">2sBBII", magic, version, kind, 0, length)


def sealed(server: wire.Connection, peer: wire.Connection, kind: int, body: bytes) -> bytes:
    """A correctly sealed frame from ``peer`` carrying an arbitrary body."""
    from dht_dfs.core.crypto import SESSION_TAG_SIZE, session_seal

    head = struct.pack(">2sBBII", b"DF", 1, kind, 7, len(body) + SESSION_TAG_SIZE)
    sealed_body = session_seal(peer._send_key, peer._send_counter, head, body)
    peer._send_counter += 1
    return head + sealed_body


MALFORMED_PLAIN = [
    (header(1, 0, magic=b"GE"), "bad frame magic"),
    (b"GET / HTTP/1.1\r\n\r\n", "bad frame magic"),
    (header(1, 0, version=9), "unsupported frame version 9"),
    (header(0x55, 0), "unknown message type 0x55"),
    (header(1, 10_000_000), "exceeds the limit of 65536"),
    (header(2, 0), "expected HELLO"),
    (header(0x10, 0), "expected HELLO"),
    (header(1, 3) + b"abc", "HELLO body is 3 bytes"),
]


@pytest.mark.parametrize(("data", "message"), MALFORMED_PLAIN)
def test_malformed_handshake_input(data: bytes, message: str) -> None:
    server = wire.Connection(wire.Role.RESPONDER, BOB)
    with pytest.raises(RemoteProtocolError, match=message):
        server.receive_data(data)
    assert server.state is wire.State.CLOSED


MALFORMED_SEALED = [
    (0x10, b"1234", "PING body truncated"),
    (0x10, b"123456789", "PING body has 1 trailing bytes"),
    (0x20, CHUNK.digest + struct.pack(">I", 1 << 30), "chunk body of 1073741824 bytes exceeds"),
    (0x21, CHUNK.digest + b"\x09\x00\x00", "unknown store status 9"),
    (0x21, CHUNK.digest + b"\x00\xff\xff", "store receipt of 65535 bytes exceeds"),
    (0x30, b"\x00" * 31, "GET body truncated"),
    (0x40, struct.pack(">H", 2000), "HAVE query of 2000 ids exceeds"),
    (0x40, struct.pack(">H", 2) + CHUNK.digest, "HAVE body truncated"),
    (0x41, struct.pack(">H", 9) + b"\x00", "HAVE_RESULT body truncated"),
    (0x7F, struct.pack(">HH", 1, 5000), "error message of 5000 bytes exceeds"),
    (0x50, b"n" * 31, "PROVE body truncated"),
    (0x50, b"n" * 32 + struct.pack(">H", 33), "PROVE query of 33 ids exceeds the limit of 32"),
    (0x50, b"n" * 32 + struct.pack(">H", 1) + CHUNK.digest + b"x", "PROVE body has 1 trailing"),
    (0x51, struct.pack(">H", 40) + b"\xff" * 5, "PROOF of 40 flags exceeds the limit of 32"),
    (0x51, struct.pack(">H", 2) + b"\xc0" + b"t" * 32, "PROOF body truncated"),
    (0x51, struct.pack(">H", 1) + b"\x00" + b"t" * 32, "PROOF body has 32 trailing bytes"),
    (0x20, CHUNK.digest + struct.pack(">I", 10), "STORE body truncated"),
    (0x20, CHUNK.digest + struct.pack(">IIB", 0, 5, 1), "STORE body has 1 trailing bytes"),
    (0x60, struct.pack(">I", 5), "LEASE body truncated"),
    (0x60, struct.pack(">IH", 5, 1025), "LEASE query of 1025 ids exceeds the limit of 1024"),
    (0x60, struct.pack(">IH", 5, 1) + CHUNK.digest + b"x", "LEASE body has 1 trailing bytes"),
    (0x61, struct.pack(">H", 2000), "LEASE answer of 2000 flags exceeds"),
    (0x61, struct.pack(">H", 9) + b"\x00", "LEASE_RESULT body truncated"),
    (0x01, b"", "unexpected HELLO after the handshake"),
]


@pytest.mark.parametrize(("kind", "body", "message"), MALFORMED_SEALED)
def test_malformed_sealed_input(kind: int, body: bytes, message: str) -> None:
    client, server = client_and_server()
    with pytest.raises(RemoteProtocolError, match=message):
        server.receive_data(sealed(server, client, kind, body))


def test_receive_after_close_is_a_local_error() -> None:
    server = wire.Connection(wire.Role.RESPONDER, BOB)
    with pytest.raises(RemoteProtocolError):
        server.receive_data(b"garbage garbage garbage")
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_before_handshake_parse_or_raise_remote_error(data: bytes) -> None:
    """Anything else escaping (struct.error, ValueError...) fails the test."""
    server = wire.Connection(wire.Role.RESPONDER, BOB)
    try:
        server.receive_data(data)
    except RemoteProtocolError:
        assert server.state is wire.State.CLOSED
        return
    # Unsigned bytes never get a peer past the handshake: no event, no
    # request served, the connection still waiting for a HELLO or an AUTH.
    assert drain(server) == []
    assert server.state in (wire.State.AWAIT_HELLO, wire.State.AWAIT_AUTH)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 0xFF))
def test_any_sealed_body_decodes_or_raises_remote_error(body: bytes, kind: int) -> None:
    client, server = client_and_server()
    try:
        server.receive_data(sealed(server, client, kind, body))
    except RemoteProtocolError:
        assert server.state is wire.State.CLOSED
        return
    # A body that parses is one typed message carrying the frame's request
    # id (or a chunk header still waiting for its bulk bytes).
    events = drain(server)
    assert len(events) <= 1
    assert all(isinstance(e, wire.Message) and e.request_id == 7 for e in events)
    assert server.state is wire.State.OPEN


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_stream_parses_or_raises_remote_error(data: st.DataObject) -> None:
    client, server = client_and_server()
    stream = bytearray(b"".join(client.send(m) + b for m, b in MESSAGES[:6]))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(stream) - 1))
        stream[position] = data.draw(st.integers(0, 255))
    try:
        server.receive_data(bytes(stream))
    except RemoteProtocolError:
        assert server.state is wire.State.CLOSED
        return
    # Mutations inside chunk bodies are not the wire's to see (the chunk
    # hash catches them), and a longer length just waits for more bytes;
    # whatever was delivered is well-typed messages on an open connection.
    assert all(isinstance(e, wire.Message) for e in drain(server))
    assert server.state is wire.State.OPEN


def test_sealed_frame_shorter_than_its_tag_is_a_remote_error() -> None:
    """Found by the mutation fuzz: libsodium raised ValueError on these."""
    _, server = client_and_server()
    with pytest.raises(RemoteProtocolError, match="too short to be sealed"):
        server.receive_data(header(0x10, 3) + b"abc")


def test_chunk_body_can_be_received_directly_into_its_buffer() -> None:
    client, server = client_and_server()
    frame = client.send(wire.ChunkData(4, CHUNK, len(BODY)))
    server.receive_data(frame + BODY[:100])
    assert drain(server) == []
    for start in range(100, len(BODY), 1000):
        view = server.bulk_buffer()
        assert view is not None and len(view) == len(BODY) - start
        piece = BODY[start : start + 1000]
        view[: len(piece)] = piece
        server.bulk_received(len(piece))
    assert server.bulk_buffer() is None
    assert drain(server) == [wire.ChunkData(4, CHUNK, len(BODY), BODY)]
    with pytest.raises(LocalProtocolError):
        server.bulk_received(1)


def test_chunk_bodies_come_from_the_given_allocator() -> None:
    recycled = bytearray(b"\xee" * len(BODY))  # not zeroed: must be fully overwritten
    handed_out: list[int] = []

    def allocate(size: int) -> bytearray:
        handed_out.append(size)
        return recycled

    client = wire.Connection(wire.Role.INITIATOR, ALICE)
    server = wire.Connection(wire.Role.RESPONDER, BOB, allocate=allocate)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    drain(server)
    server.receive_data(client.send(wire.StoreChunk(1, CHUNK, len(BODY))) + BODY)
    (event,) = drain(server)
    assert isinstance(event, wire.StoreChunk)
    assert event.body is recycled and bytes(event.body) == BODY
    assert handed_out == [len(BODY)]


def test_buffer_pool_recycles_one_size_class() -> None:
    from dht_dfs.transport.buffers import BufferPool

    pool = BufferPool(keep=2)
    first = pool.take(1 << 20)
    pool.give_back(first)
    assert pool.take(1 << 20) is first
    assert pool.reused == 1
    pool.give_back(b"immutable bytes are never pooled")
    pool.give_back(bytearray(100))  # too small to be worth it
    assert pool.take(100) is not None and pool.reused == 1
    for _ in range(5):
        pool.give_back(bytearray(1 << 20))
    assert len(pool._free[1 << 20]) == 2
