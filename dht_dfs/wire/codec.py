"""Encoding and decoding of frame bodies (the part after the 12-byte header).

Pairs of pack/pull helpers; every pull checks there are enough bytes and a
body with trailing bytes is refused, each with an exact message. A peer's
mistake raises ``RemoteProtocolError``; ours (a message that cannot be
encoded) ``LocalProtocolError``.

Imports nothing but ``dht_dfs.core`` and the messages.
"""

from __future__ import annotations

import struct

from dht_dfs.core.errors import LocalProtocolError, RemoteProtocolError
from dht_dfs.core.ids import CHUNK_ID_SIZE, ChunkId
from dht_dfs.core.proofs import PROOF_NONCE_SIZE, PROOF_TAG_SIZE
from dht_dfs.wire.messages import (
    ChunkData,
    ChunkMissing,
    ErrorCode,
    ErrorReply,
    GetChunk,
    HaveAnswer,
    HaveQuery,
    LeaseAnswer,
    LeaseQuery,
    Limits,
    Message,
    MessageType,
    Ping,
    Pong,
    ProofAnswer,
    ProveQuery,
    StoreChunk,
    StoreResult,
    StoreStatus,
)

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_CHUNK_AND_LEN = struct.Struct(">32sI")
_STORE = struct.Struct(">32sII")
"""STORE: chunk id, bulk length, lease seconds."""


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


def _push_flags(flags: list[bool]) -> bytes:
    """A u16 count, then one bit per flag, most significant bit first."""
    bits = bytearray((len(flags) + 7) // 8)
    for index, flag in enumerate(flags):
        if flag:
            bits[index // 8] |= 0x80 >> (index % 8)
    return _U16.pack(len(flags)) + bytes(bits)


def _pull_flags(reader: _Reader, limit: int, what: str) -> tuple[bool, ...]:
    count = reader.pull_u16()
    if count > limit:
        raise RemoteProtocolError(f"{what} of {count} flags exceeds the limit of {limit}")
    bits = reader.pull((count + 7) // 8)
    return tuple(bool(bits[i // 8] & (0x80 >> (i % 8))) for i in range(count))


def _lease_seconds(seconds: int) -> int:
    if not 0 <= seconds <= 0xFFFFFFFF:
        raise LocalProtocolError(f"a lease of {seconds} s does not fit the wire's 32 bits")
    return seconds


def _pull_ids(reader: _Reader, limit: int, what: str) -> tuple[ChunkId, ...]:
    count = reader.pull_u16()
    if count > limit:
        raise RemoteProtocolError(f"{what} of {count} ids exceeds the limit of {limit}")
    return tuple(reader.pull_chunk_id() for _ in range(count))


def encode_body(message: Message, limits: Limits) -> tuple[MessageType, bytes]:
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
            if isinstance(message, StoreChunk):
                return MessageType.STORE, _STORE.pack(
                    chunk_id.digest, length, _lease_seconds(message.lease)
                )
            return MessageType.CHUNK, _CHUNK_AND_LEN.pack(chunk_id.digest, length)
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
            return MessageType.HAVE_RESULT, _push_flags(list(held))
        case ProveQuery(nonce=nonce, chunk_ids=chunk_ids):
            if len(nonce) != PROOF_NONCE_SIZE:
                raise LocalProtocolError(f"a proof nonce is {PROOF_NONCE_SIZE} bytes")
            if len(chunk_ids) > limits.max_prove_ids:
                raise LocalProtocolError(f"a PROVE query holds at most {limits.max_prove_ids} ids")
            return MessageType.PROVE, nonce + _U16.pack(len(chunk_ids)) + b"".join(
                c.digest for c in chunk_ids
            )
        case ProofAnswer(tags=tags):
            if len(tags) > limits.max_prove_ids:
                raise LocalProtocolError(f"a PROOF holds at most {limits.max_prove_ids} tags")
            present = [tag for tag in tags if tag is not None]
            if any(len(tag) != PROOF_TAG_SIZE for tag in present):
                raise LocalProtocolError(f"a proof tag is {PROOF_TAG_SIZE} bytes")
            flags = _push_flags([tag is not None for tag in tags])
            return MessageType.PROOF, flags + b"".join(present)
        case LeaseQuery(seconds=seconds, chunk_ids=chunk_ids):
            if len(chunk_ids) > limits.max_have_ids:
                raise LocalProtocolError(f"a LEASE query holds at most {limits.max_have_ids} ids")
            return MessageType.LEASE, _U32.pack(_lease_seconds(seconds)) + _U16.pack(
                len(chunk_ids)
            ) + b"".join(c.digest for c in chunk_ids)
        case LeaseAnswer(held=held):
            if len(held) > limits.max_have_ids:
                raise LocalProtocolError(
                    f"a LEASE answer holds at most {limits.max_have_ids} flags"
                )
            return MessageType.LEASE_RESULT, _push_flags(list(held))
        case ErrorReply(code=code, message=text):
            encoded = text.encode("utf-8")[: limits.max_text]
            return MessageType.ERROR, _U16.pack(code) + _push_text(encoded, limits.max_text)
    raise LocalProtocolError(f"not a message: {message!r}")


def decode_body(
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
        if kind == MessageType.STORE:
            message = StoreChunk(request_id, chunk_id, bulk, reader.pull_u32())
        else:
            message = ChunkData(request_id, chunk_id, bulk)
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
        message = HaveQuery(request_id, _pull_ids(reader, limits.max_have_ids, "HAVE query"))
    elif kind == MessageType.HAVE_RESULT:
        message = HaveAnswer(request_id, _pull_flags(reader, limits.max_have_ids, "HAVE answer"))
    elif kind == MessageType.PROVE:
        nonce = reader.pull(PROOF_NONCE_SIZE)
        count = reader.pull_u16()
        if count > limits.max_prove_ids:
            raise RemoteProtocolError(
                f"PROVE query of {count} ids exceeds the limit of {limits.max_prove_ids}"
            )
        message = ProveQuery(request_id, nonce, tuple(reader.pull_chunk_id() for _ in range(count)))
    elif kind == MessageType.PROOF:
        held = _pull_flags(reader, limits.max_prove_ids, "PROOF")
        tags = tuple(reader.pull(PROOF_TAG_SIZE) if here else None for here in held)
        message = ProofAnswer(request_id, tags)
    elif kind == MessageType.LEASE:
        seconds = reader.pull_u32()
        message = LeaseQuery(
            request_id, seconds, _pull_ids(reader, limits.max_have_ids, "LEASE query")
        )
    elif kind == MessageType.LEASE_RESULT:
        message = LeaseAnswer(request_id, _pull_flags(reader, limits.max_have_ids, "LEASE answer"))
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
