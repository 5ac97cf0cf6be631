"""The DHT datagram format and MessagePack codec. Pure: no sockets, no kademlia.

Owns how a datagram's bytes become a value and back, and the argument checks
every value from a peer goes through (``expect_*``). It knows no value type
of the DHT (those are in ``values``, which builds on this module); every
function here raises RemoteProtocolError for a peer's mistake, so the
protocol can drop a bad datagram with one log line.

Must not import: asyncio, kademlia, rpcudp, or any other module of ``dht``.

Wire format. Datagrams keep rpcudp's framing: one kind byte (0x00 request,
0x01 reply), a 20-byte random message id, then exactly one MessagePack
value. A request's value is ``[name, args]`` and its first argument is the
sender header ``[node_id, tcp_port, flags, token, padding]`` (flags bit 0:
client mode; token: empty or the TOKEN_SIZE bytes the receiver last gave this
address; padding: bytes, ignored; a 3-item header is one without token)::

    ping(header, nonce, [host, port]) -> [node_id, public_key, tcp_port, flags,
                                         signature, [observed_host, observed_port]]
    find_node(header, key)           -> [[contact, ...], token, more]
    get_providers(header, key, limit) -> [[record, ...], total, [contact, ...],
                                          token, more]
    add_providers(header, [record, ...]) -> [accepted, ...]

(format v2: v1 had no token, no ping target, and bare find_node replies). A
request without a valid token is answered with at most AMPLIFICATION_LIMIT
times its size; ``more`` says the reply was trimmed to that, and ``token``
lets the requester ask again for all of it. ``[host, port]`` of a ping is
the address the challenge was sent to (omitted by liveness pings).

    contact = [node_id(20), host (IP literal), udp_port, tcp_port]
    record  = [key(20), node_id(20), public_key(32), host, tcp_port,
               expiry (unix seconds), signature(64)]

The signed messages of a ping proof and of a provider record are described
in ``values``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from dht_dfs.core.errors import RemoteProtocolError

# --- limits --------------------------------------------------------------------------
# Fixed by the protocol rather than tuned per deployment, so they live here and
# not in Config.

MAX_DATAGRAM_SIZE: Final = 8192
"""Largest datagram accepted; anything longer is dropped unread."""
DATAGRAM_BUDGET: Final = 6144
"""Largest datagram this node sends. Well under the receive limit, so a peer
running the same code never drops what we send, and fewer IP fragments."""
MESSAGE_ID_SIZE: Final = 20
FRAME_HEADER_SIZE: Final = 1 + MESSAGE_ID_SIZE
KIND_REQUEST: Final = 0x00
KIND_REPLY: Final = 0x01
FLAG_CLIENT: Final = 0x01
"""Sender header flag: the sender is a client and never enters a routing table."""

AMPLIFICATION_LIMIT: Final = 3
"""A reply to an address that has not proven it receives is at most this many
times the request's size (QUIC's anti-amplification rule, RFC 9000 section 8.1)."""
TOKEN_SIZE: Final = 16
"""An address-validation token: a keyed hash of the requester's address and a
time bucket, handed out in replies and echoed in requests (BEP 5's ``token``)."""
MAX_PADDING: Final = 2048
"""Padding a request may carry at most (it buys the requester a larger reply
before it holds a token, as a QUIC client pads its Initial, RFC 9000 section 14.1)."""
PADDED_REQUEST_SIZE: Final = 600
"""A find_node / get_providers request sent without a token is padded to this
size, so that 3x covers a typical full reply (k contacts and a few records)."""

REMOTE_PROCEDURES: Final = frozenset(
    {"ping", "find_node", "get_providers", "add_providers", "leave"}
)
"""The only procedure names this node calls or serves."""


# --- argument validation (shared by requests, replies, state file) --------------------


def remote_error(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message)


def expect_bytes(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise remote_error(f"{what} must be bytes, got {type(value).__name__}")
    if len(value) != size:
        raise remote_error(f"{what} must be {size} bytes, got {len(value)}")
    return value


def expect_int(value: object, low: int, high: int, what: str) -> int:
    # bool is an int subclass; a peer that sends true for a port is wrong.
    if not isinstance(value, int) or isinstance(value, bool):
        raise remote_error(f"{what} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise remote_error(f"{what} must be in [{low}, {high}], got {value}")
    return value


def expect_list(
    value: object, what: str, *, exact: int | None = None, limit: int | None = None
) -> list[Any]:
    if not isinstance(value, list):
        raise remote_error(f"{what} must be a list, got {type(value).__name__}")
    if exact is not None and len(value) != exact:
        raise remote_error(f"{what} must have {exact} items, got {len(value)}")
    if limit is not None and len(value) > limit:
        raise remote_error(f"{what} has {len(value)} items, more than {limit}")
    return value


# --- MessagePack and framing (sans-IO) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Datagram:
    """One decoded datagram."""

    kind: int
    """KIND_REQUEST or KIND_REPLY."""
    message_id: bytes
    """20 random bytes that pair a reply with its request."""
    body: Any
    """The decoded MessagePack value (not yet validated)."""


@dataclass(frozen=True, slots=True)
class Encoded:
    """A value already in MessagePack form, assembled from cached pieces."""

    data: bytes


def pack(value: object) -> bytes:
    packed: bytes = msgpack.packb(value)
    return packed


def encode_request(message_id: bytes, name: str, args: Sequence[object]) -> bytes:
    return bytes([KIND_REQUEST]) + message_id + pack([name, list(args)])


def encode_reply(message_id: bytes, body: object) -> bytes:
    packed = body.data if isinstance(body, Encoded) else pack(body)
    return bytes([KIND_REPLY]) + message_id + packed


def array_header(count: int) -> bytes:
    """The MessagePack header of an array of ``count`` items."""
    if count < 16:
        return bytes([0x90 | count])
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def unpack_exact(payload: bytes) -> Any:
    """One MessagePack value filling ``payload`` exactly; raises RemoteProtocolError.

    Decoded by the msgpack package's C unpacker, as umsgpack decodes it
    (what rpcudp peers send): any map keys, bin as bytes, str as str.
    """
    try:
        return msgpack.unpackb(payload, strict_map_key=False)
    except msgpack.ExtraData as extra:
        raise remote_error(
            f"{len(extra.extra)} trailing byte(s) after the MessagePack body"
        ) from None
    except msgpack.StackError:
        raise remote_error("body is not MessagePack (nested too deep)") from None
    # Hostile input reaches FormatError (reserved codes), ValueError
    # (truncation) and the rest of the decoder's exceptions: all "bad input".
    except Exception as exc:
        reason = "truncated" if "incomplete" in str(exc) else type(exc).__name__
        raise remote_error(f"body is not MessagePack ({reason})") from None


def decode_datagram(data: bytes) -> Datagram:
    """Split and decode a datagram; raises RemoteProtocolError with the reason."""
    if len(data) > MAX_DATAGRAM_SIZE:
        raise remote_error(
            f"datagram of {len(data)} bytes exceeds the {MAX_DATAGRAM_SIZE}-byte limit"
        )
    if len(data) <= FRAME_HEADER_SIZE:
        raise remote_error(
            f"datagram of {len(data)} bytes is shorter than the "
            f"{FRAME_HEADER_SIZE + 1}-byte minimum"
        )
    kind = data[0]
    if kind not in (KIND_REQUEST, KIND_REPLY):
        raise remote_error(f"unknown datagram kind 0x{kind:02x}")
    body = unpack_exact(bytes(data[FRAME_HEADER_SIZE:]))
    return Datagram(kind, bytes(data[1:FRAME_HEADER_SIZE]), body)
