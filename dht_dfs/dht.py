"""The DHT layer: locating chunks by content hash over Kademlia (UDP).

Owns the node's DHT identity proof, its routing table, provider records (who
holds which chunk, DESIGN property 6), iterative lookups, announcement and
re-announcement, and the persisted contact list. This is the only module of
dht_dfs that imports ``kademlia``, ``rpcudp`` or ``umsgpack``; it knows
nothing of chunk bytes, the chunk store or TCP.

It depends on kademlia 2.2.3 / rpcudp 5.0.1 and overrides, in subclasses,
what those releases get wrong. Each fix has a regression test that runs
against the library too (marked xfail there):

* keys are never hashed again: a 20-byte key is the key (``set(k)`` then
  ``get(k)`` missed in the library);
* a "stored" result counts the nodes that confirmed it (``set`` returned
  True when nobody stored anything);
* datagrams above ``MAX_DATAGRAM_SIZE`` are dropped on receipt, and what we
  send, replies included, stays within ``DATAGRAM_BUDGET`` (batches split,
  replies trimmed);
* neighbour selection returns the true k closest contacts
  (``find_neighbors`` walked buckets in list order), and ``get_bucket_for``
  treats bucket ranges as inclusive (it was off by one);
* a newly verified contact receives the records it is now among the k
  closest to (``welcome_if_new`` hashed stored keys again);
* a contact is evicted after ``contact_failures_before_eviction``
  consecutive failures, not one; the RPC timeout is ``dht_rpc_timeout``;
  lookups issue a query as soon as any reply arrives (no round barrier), stop
  waiting on a node slow to answer (paper section 2.3) and skip contacts that
  recently failed repeatedly;
* only whitelisted procedure names can be called (rpcudp turned any unknown
  attribute into a remote call) or served (``store``, ``find_value`` and
  ``stun`` are not); every argument is validated and a bad datagram is
  dropped with one log line, synchronously, so no task can end with an
  unretrieved exception;
* a node enters a routing table only after proving it holds the key behind
  its id (challenge ping); client-mode nodes never enter one;
* the contact list is persisted as JSON, never pickle; the bucket refresh
  is a task this node owns and cancels.

Wire format. Datagrams keep rpcudp's framing: one kind byte (0x00 request,
0x01 reply), a 20-byte random message id, then exactly one MessagePack
value. A request's value is ``[name, args]`` and its first argument is the
sender header ``[node_id, tcp_port, flags]`` (flags bit 0: client mode)::

    ping(header, nonce)              -> [node_id, public_key, tcp_port, flags,
                                         signature, [observed_host, observed_port]]
    find_node(header, key)           -> [contact, ...]
    get_providers(header, key, limit) -> [[record, ...], total, [contact, ...]]
    add_providers(header, [record, ...]) -> [accepted, ...]

    contact = [node_id(20), host (IP literal), udp_port, tcp_port]
    record  = [key(20), node_id(20), public_key(32), host, tcp_port,
               expiry (unix seconds), signature(64)]

Joining follows section 2.3 of the paper: a lookup of our own id, then one
per distance level farther than our closest neighbour, so that every holder
of records we should now hold hears of us and pushes them (section 2.5).

Known limits. Ids cost nothing to mint, so this is no defence against a Sybil
attacker with many keys (it filling a key's record slots, or a region of the
id space). An identity proof is not bound to the prover's address: a node
that relays challenges to another can appear in routing tables under that
node's id at its own address (it still cannot sign records for it). The
limits below are protocol constants rather than Config fields.

A ping signature covers ``PING_DOMAIN | len(nonce) | nonce | node_id |
tcp_port(2) | flags(1)``; a record signature covers ``RECORD_DOMAIN | key |
node_id | len(host) | host | tcp_port(2) | expiry(8)``. A record does not
depend on who sends it, so any node may forward it (that is how late
joiners receive records).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import io
import json
import logging
import os
import random
import socket
import time
import typing
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Final

import umsgpack
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable

from dht_dfs.config import Config
from dht_dfs.crypto import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, verify_signature
from dht_dfs.errors import LocalProtocolError, NetworkError, RemoteProtocolError
from dht_dfs.ids import DHT_KEY_SIZE, NODE_ID_SIZE, NodeId

log = logging.getLogger(__name__)

Address = tuple[str, int]
"""A UDP or TCP endpoint: (host, port)."""

# --- limits --------------------------------------------------------------------------
# Fixed by the protocol rather than tuned per deployment, so they live here and
# not in Config.

MAX_DATAGRAM_SIZE: Final = 8192
"""Largest datagram accepted; anything longer is dropped unread."""
DATAGRAM_BUDGET: Final = 6144
"""Largest datagram this node sends. Well under the receive limit, so a peer
running the same code never drops what we send, and fewer IP fragments."""
MESSAGE_ID_SIZE: Final = 20
_FRAME_HEADER_SIZE: Final = 1 + MESSAGE_ID_SIZE
KIND_REQUEST: Final = 0x00
KIND_REPLY: Final = 0x01

MIN_NONCE_SIZE: Final = 16
MAX_NONCE_SIZE: Final = 64
NONCE_SIZE: Final = 20
MAX_HOST_LENGTH: Final = 253
MAX_CONTACTS_PER_REPLY: Final = 64
MAX_RECORDS_PER_MESSAGE: Final = 64
MAX_EXPIRY: Final = 2**40
"""Unix seconds; far beyond any real expiry, small enough for 8 bytes."""
FLAG_CLIENT: Final = 0x01
MAX_RECORD_BYTES: Final = 512
"""A record's MessagePack encoding is about 190 bytes with a 15-character host."""

MAX_PROVIDER_TTL: Final = 7 * 24 * 3600.0
"""Default upper bound on a record's remaining lifetime in ProviderRecord.verify."""
CLOCK_SKEW_ALLOWANCE: Final = 300.0
"""Seconds a record may expire beyond now + provider_ttl (clocks differ)."""

MAX_LOOKUP_QUERIES: Final = 256
"""Queries one lookup may send at most, whatever the network answers."""
MAX_LOOKUP_CANDIDATES: Final = 1024
SLOW_REPLY_FRACTION: Final = 0.25
"""A query unanswered after this fraction of dht_rpc_timeout stops holding one
of the alpha slots (paper section 2.3: "nodes that fail to respond quickly are
removed from consideration until and unless they do respond")."""
FAILURE_MEMORY_SIZE: Final = 4096
DEAD_CONTACT_MEMORY: Final = 300.0
"""Seconds a contact that failed repeatedly is skipped by lookups (unless it
answers or sends us a request meanwhile)."""

VERIFY_CONCURRENCY: Final = 16
MAX_PENDING_VERIFICATIONS: Final = 512
VERIFIED_CACHE_SIZE: Final = 8192
FAILED_VERIFICATION_MEMORY: Final = 60.0
"""Seconds a failed identity proof is remembered, so a flood of forged ids
cannot make this node ping the same address over and over."""

WELCOME_PUSHERS: Final = 3
"""A holder pushes records to a new node only if it is among this many
closest holders it knows of (Kademlia section 2.5, relaxed from 1 so that one
holder that never hears of the newcomer does not leave it empty-handed)."""
MAX_WELCOME_QUEUE: Final = 1024
PUSH_DATAGRAMS_PER_SECOND: Final = 200.0
REANNOUNCE_KEYS_PER_SECOND: Final = 100.0
ANNOUNCE_GROUP: Final = 32
"""Keys announced together in one re-announcement step."""
ANNOUNCE_CONCURRENCY: Final = 8
PUT_GROUP_KEYS: Final = 256
"""Keys whose records put_records places together (one lookup task each)."""
"""Lookups and add_providers requests in flight for one announcement."""
MAX_REANNOUNCE_KEYS: Final = 10_000_000

MAINTENANCE_INTERVAL: Final = 60.0
STATE_SAVE_INTERVAL: Final = 600.0
MAX_STATE_FILE_SIZE: Final = 1024 * 1024
MAX_SAVED_CONTACTS: Final = 1000
STATE_FORMAT: Final = "dhtfs-dht-contacts/1"
BOOTSTRAP_BACKOFF_BASE: Final = 0.25
BOOTSTRAP_BACKOFF_MAX: Final = 5.0
MAX_JOIN_REFRESHES: Final = NODE_ID_SIZE * 8
MAX_BOOTSTRAP_CONTACTS: Final = 64
"""Saved contacts pinged at once when rejoining (the closest to this node)."""
MAX_OBSERVED_HOSTS: Final = 16

DROP_LOG_BURST: Final = 20
DROP_LOG_WINDOW: Final = 10.0

PING_DOMAIN: Final = b"dhtfs/dht/ping-proof/v1\x00"
RECORD_DOMAIN: Final = b"dhtfs/dht/provider-record/v1\x00"

_HOST_CHARACTERS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:%_"
)
_UNSPECIFIED_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})

REMOTE_PROCEDURES: Final = frozenset({"ping", "find_node", "get_providers", "add_providers"})
"""The only procedure names this node calls or serves."""


# --- argument validation (shared by requests, replies, state file) --------------------


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message)


def _expect_bytes(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise _bad(f"{what} must be bytes, got {type(value).__name__}")
    if len(value) != size:
        raise _bad(f"{what} must be {size} bytes, got {len(value)}")
    return value


def _expect_int(value: object, low: int, high: int, what: str) -> int:
    # bool is an int subclass; a peer that sends true for a port is wrong.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{what} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise _bad(f"{what} must be in [{low}, {high}], got {value}")
    return value


def _expect_list(
    value: object, what: str, *, exact: int | None = None, limit: int | None = None
) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(f"{what} must be a list, got {type(value).__name__}")
    if exact is not None and len(value) != exact:
        raise _bad(f"{what} must have {exact} items, got {len(value)}")
    if limit is not None and len(value) > limit:
        raise _bad(f"{what} has {len(value)} items, more than {limit}")
    return value


def _expect_host(value: object, what: str, *, ip_only: bool) -> str:
    if not isinstance(value, str):
        raise _bad(f"{what} must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_HOST_LENGTH or not set(value) <= _HOST_CHARACTERS:
        raise _bad(f"{what} is not a host name or address")
    if not ip_only:
        return value
    # Contacts are sent to at once: a host name would block the event loop in a
    # DNS lookup inside sendto, so only IP literals are accepted, in the form the
    # kernel reports (replies are matched against the address a request went to).
    canonical = _canonical_ip(value)
    if canonical is None:
        raise _bad(f"{what} is not an IP address")
    return canonical


def _canonical_ip(host: str) -> str | None:
    """The IP literal ``host`` in canonical form, or None if it is not one."""
    # inet_pton rather than ipaddress: this runs for every contact of every reply.
    address, percent, scope = host.partition("%")
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            packed = socket.inet_pton(family, address)
        except OSError:
            continue
        return socket.inet_ntop(family, packed) + percent + scope
    return None


def _is_ip_literal(host: str) -> bool:
    return _canonical_ip(host) is not None


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != DHT_KEY_SIZE:
        raise ValueError(f"a DHT key is {DHT_KEY_SIZE} bytes (ChunkId.dht_key)")
    return key


def _normalize_address(address: Any) -> Address:
    """(host, port) from what a datagram transport reports (IPv6 adds two fields)."""
    return (str(address[0]), int(address[1]))


# --- values ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Contact:
    """A DHT node as other nodes reach it."""

    node_id: NodeId
    """The node's key-derived id, also its position in the DHT key space."""
    host: str
    """IP address (as observed by whoever reported the contact)."""
    udp_port: int
    """The DHT port."""
    tcp_port: int
    """The chunk transport port (the same number as udp_port by convention)."""

    @property
    def udp_address(self) -> Address:
        return (self.host, self.udp_port)

    @property
    def tcp_address(self) -> Address:
        return (self.host, self.tcp_port)

    def distance(self, key: bytes) -> int:
        return self.node_id.distance(key)

    def to_wire(self) -> list[object]:
        return [self.node_id.digest, self.host, self.udp_port, self.tcp_port]

    @classmethod
    def from_wire(cls, value: object) -> Contact:
        """Parse a contact from a peer; raises RemoteProtocolError."""
        items = _expect_list(value, "contact", exact=4)
        return cls(
            NodeId(_expect_bytes(items[0], NODE_ID_SIZE, "contact node id")),
            _expect_host(items[1], "contact host", ip_only=True),
            _expect_int(items[2], 1, 65535, "contact UDP port"),
            _expect_int(items[3], 1, 65535, "contact TCP port"),
        )

    def __str__(self) -> str:
        return f"{self.node_id}@{self.host}:{self.udp_port}"


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """A signed statement: the node ``node_id`` serves the chunk under ``key``."""

    key: bytes
    """The 160-bit DHT key (``ChunkId.dht_key``)."""
    node_id: NodeId
    """The provider; must equal ``NodeId.for_public_key(public_key)``."""
    public_key: bytes
    """The provider's Ed25519 public key (32 bytes)."""
    host: str
    """Where the provider serves chunks over TCP."""
    tcp_port: int
    expiry: int
    """Absolute unix time (seconds) after which the record is void."""
    signature: bytes
    """Ed25519 signature by the provider over ``signed_message``."""

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != DHT_KEY_SIZE:
            raise ValueError(f"a record key is {DHT_KEY_SIZE} bytes")
        if not isinstance(self.node_id, NodeId):
            raise TypeError("a record's node_id is a NodeId")
        if not isinstance(self.public_key, bytes) or len(self.public_key) != PUBLIC_KEY_SIZE:
            raise ValueError(f"a record public key is {PUBLIC_KEY_SIZE} bytes")
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_SIZE:
            raise ValueError(f"a record signature is {SIGNATURE_SIZE} bytes")
        try:
            _expect_host(self.host, "record host", ip_only=False)
            _expect_int(self.tcp_port, 1, 65535, "record TCP port")
            _expect_int(self.expiry, 0, MAX_EXPIRY, "record expiry")
        except RemoteProtocolError as exc:
            raise ValueError(str(exc)) from None

    @staticmethod
    def signed_message(key: bytes, node_id: NodeId, host: str, tcp_port: int, expiry: int) -> bytes:
        """The domain-separated bytes a provider signs."""
        host_bytes = host.encode("ascii")
        return b"".join(
            (
                RECORD_DOMAIN,
                key,
                node_id.digest,
                bytes([len(host_bytes)]),
                host_bytes,
                tcp_port.to_bytes(2, "big"),
                expiry.to_bytes(8, "big"),
            )
        )

    @classmethod
    def create(  # noqa: PLR0917  # the node engine's agreed positional signature
        cls, identity: Identity, key: bytes, host: str, tcp_port: int, ttl: float, now: float
    ) -> ProviderRecord:
        """This identity's record for ``key``, valid for ``ttl`` seconds from ``now``."""
        _check_key(key)
        if ttl < 1:
            raise ValueError("a provider record lives at least one second")
        expiry = int(now + ttl)
        signature = identity.sign(cls.signed_message(key, identity.node_id, host, tcp_port, expiry))
        return cls(key, identity.node_id, identity.public_key, host, tcp_port, expiry, signature)

    def problem(self, now: float, *, max_ttl: float = MAX_PROVIDER_TTL) -> str | None:
        """Why this record must be refused at ``now``, or None if it is valid."""
        if self.expiry <= now:
            return "expired"
        if self.expiry > now + max_ttl:
            return f"expires {self.expiry - now:.0f} s from now, beyond the {max_ttl:.0f} s limit"
        if NodeId.for_public_key(self.public_key) != self.node_id:
            return "node id is not the hash of the public key"
        message = self.signed_message(self.key, self.node_id, self.host, self.tcp_port, self.expiry)
        if not verify_signature(self.public_key, message, self.signature):
            return "bad signature"
        return None

    def verify(self, now: float, *, max_ttl: float = MAX_PROVIDER_TTL) -> bool:
        """True if the record is authentic and live at ``now``."""
        return self.problem(now, max_ttl=max_ttl) is None

    def expired(self, now: float) -> bool:
        return self.expiry <= now

    @property
    def tcp_address(self) -> Address:
        return (self.host, self.tcp_port)

    def to_wire(self) -> list[object]:
        return [
            self.key,
            self.node_id.digest,
            self.public_key,
            self.host,
            self.tcp_port,
            self.expiry,
            self.signature,
        ]

    @classmethod
    def from_wire(cls, value: object) -> ProviderRecord:
        """Parse (not verify) a record from a peer; raises RemoteProtocolError."""
        items = _expect_list(value, "record", exact=7)
        return cls(
            _expect_bytes(items[0], DHT_KEY_SIZE, "record key"),
            NodeId(_expect_bytes(items[1], NODE_ID_SIZE, "record node id")),
            _expect_bytes(items[2], PUBLIC_KEY_SIZE, "record public key"),
            _expect_host(items[3], "record host", ip_only=False),
            _expect_int(items[4], 1, 65535, "record TCP port"),
            _expect_int(items[5], 0, MAX_EXPIRY, "record expiry"),
            _expect_bytes(items[6], SIGNATURE_SIZE, "record signature"),
        )

    def to_bytes(self) -> bytes:
        """The record as one MessagePack value (e.g. a store receipt on TCP)."""
        return _pack(self.to_wire())

    @classmethod
    def from_bytes(cls, data: bytes) -> ProviderRecord:
        """Parse (not verify) ``to_bytes`` output; raises ValueError if malformed."""
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"a provider record is at most {MAX_RECORD_BYTES} bytes")
        try:
            return cls.from_wire(_unpack_exact(bytes(data)))
        except RemoteProtocolError as exc:
            raise ValueError(f"malformed provider record: {exc}") from None

    def wire_size(self) -> int:
        """An upper bound of ``len(self.to_bytes())``, without encoding."""
        # array(1) key(22) node id(22) public key(34) host(2+n) port(3) expiry(9) signature(66)
        return 159 + len(self.host)

    def __repr__(self) -> str:
        where = f"{self.host}:{self.tcp_port}"
        return f"ProviderRecord({self.key.hex()[:12]}… by {self.node_id} at {where})"


@dataclass(frozen=True, slots=True)
class LookupStats:
    """What one lookup cost, for the benchmark and for logs."""

    hops: int
    """Deepest hop that answered: contacts from the routing table are hop 1, the
    contacts they return hop 2, and so on."""
    messages: int
    """Requests sent."""
    answered: int
    failed: int
    seconds: float
    timed_out: bool
    """The whole-lookup deadline (``dht_lookup_timeout``) cut it short."""


@dataclass(frozen=True, slots=True)
class LookupResult:
    """The outcome of one iterative lookup."""

    key: bytes
    providers: tuple[ProviderRecord, ...]
    """Verified, unexpired, one per provider, closest provider to the key first."""
    closest: tuple[Contact, ...]
    """Nodes that answered, closest to the key first."""
    stats: LookupStats


# --- datagram codec (sans-IO) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Datagram:
    """One decoded datagram."""

    kind: int
    """KIND_REQUEST or KIND_REPLY."""
    message_id: bytes
    """20 random bytes that pair a reply with its request."""
    body: Any
    """The decoded MessagePack value (not yet validated)."""


def _pack(value: object) -> bytes:
    packed: bytes = umsgpack.packb(value)
    return packed


def encode_request(message_id: bytes, name: str, args: Sequence[object]) -> bytes:
    return bytes([KIND_REQUEST]) + message_id + _pack([name, list(args)])


def encode_reply(message_id: bytes, body: object) -> bytes:
    packed = body.data if isinstance(body, Encoded) else _pack(body)
    return bytes([KIND_REPLY]) + message_id + packed


@dataclass(frozen=True, slots=True)
class Encoded:
    """A value already in MessagePack form, assembled from cached pieces."""

    data: bytes


def _array_header(count: int) -> bytes:
    """The MessagePack header of an array of ``count`` items."""
    if count < 16:
        return bytes([0x90 | count])
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def _unpack_exact(payload: bytes) -> Any:
    """One MessagePack value filling ``payload`` exactly; raises RemoteProtocolError."""
    stream = io.BytesIO(payload)
    try:
        value = umsgpack.unpack(stream)
    # umsgpack raises its own UnpackException family, but hostile input also reaches
    # RecursionError (deep nesting), ValueError/OverflowError (timestamps) and more;
    # the decoder does not document the full set, so everything it raises is "bad input".
    except Exception as exc:
        raise _bad(f"body is not MessagePack ({type(exc).__name__})") from None
    trailing = len(payload) - stream.tell()
    if trailing:
        raise _bad(f"{trailing} trailing byte(s) after the MessagePack body")
    return value


def decode_datagram(data: bytes) -> Datagram:
    """Split and decode a datagram; raises RemoteProtocolError with the reason."""
    if len(data) > MAX_DATAGRAM_SIZE:
        raise _bad(f"datagram of {len(data)} bytes exceeds the {MAX_DATAGRAM_SIZE}-byte limit")
    if len(data) <= _FRAME_HEADER_SIZE:
        raise _bad(
            f"datagram of {len(data)} bytes is shorter than the "
            f"{_FRAME_HEADER_SIZE + 1}-byte minimum"
        )
    kind = data[0]
    if kind not in (KIND_REQUEST, KIND_REPLY):
        raise _bad(f"unknown datagram kind 0x{kind:02x}")
    body = _unpack_exact(bytes(data[_FRAME_HEADER_SIZE:]))
    return Datagram(kind, bytes(data[1:_FRAME_HEADER_SIZE]), body)


def split_into_batches(
    records: Sequence[ProviderRecord], budget: int = DATAGRAM_BUDGET
) -> list[list[ProviderRecord]]:
    """Group records so that each add_providers request fits in ``budget`` bytes."""
    # Frame header, [name, [header, [...]]] and the sender header: under 96 bytes.
    room = budget - _FRAME_HEADER_SIZE - 96
    batches: list[list[ProviderRecord]] = []
    current: list[ProviderRecord] = []
    used = 0
    for record in records:
        size = record.wire_size()
        if current and (used + size > room or len(current) >= MAX_RECORDS_PER_MESSAGE):
            batches.append(current)
            current, used = [], 0
        current.append(record)
        used += size
    if current:
        batches.append(current)
    return batches


# --- provider records held by this node (pure) -----------------------------------------------


class ProviderStore:
    """The provider records this node holds for others, bounded and expiring.

    At most ``max_per_key`` records per key and ``max_total`` in all; when full,
    the record that expires soonest gives way to one that lives longer. Records
    are verified before they get here; this class only keeps them.
    """

    def __init__(self, max_per_key: int, max_total: int) -> None:
        if max_per_key < 1 or max_total < 1:
            raise ValueError("provider store limits must be positive")
        self.max_per_key = max_per_key
        self.max_total = max_total
        self._by_key: dict[bytes, dict[NodeId, ProviderRecord]] = {}
        # (expiry, key, node id) with lazy deletion: an entry whose record was
        # replaced or removed is skipped when it surfaces.
        self._expiry_heap: list[tuple[int, bytes, bytes]] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def keys(self) -> list[bytes]:
        return list(self._by_key)

    def holds(self, record: ProviderRecord) -> bool:
        """True if this exact record is already held (so it needs no new check)."""
        return self._by_key.get(record.key, {}).get(record.node_id) == record

    def get(self, key: bytes, now: float) -> list[ProviderRecord]:
        """Unexpired records for ``key``, longest-lived first."""
        records = [r for r in self._by_key.get(key, {}).values() if not r.expired(now)]
        records.sort(key=lambda r: r.expiry, reverse=True)
        return records

    def add(self, record: ProviderRecord, now: float) -> bool:
        """Keep a verified record; False if it is expired or loses to the caps."""
        if record.expired(now):
            return False
        per_key = self._by_key.get(record.key, {})
        held = per_key.get(record.node_id)
        if held is not None:
            if held.expiry >= record.expiry:
                return True  # already held, as long-lived: the store confirms it
            per_key[record.node_id] = record
            self._push(record)
            return True
        if len(per_key) >= self.max_per_key:
            soonest = min(per_key.values(), key=lambda r: r.expiry)
            if soonest.expiry >= record.expiry and not soonest.expired(now):
                return False
            self._remove(soonest.key, soonest.node_id)
        if self._count >= self.max_total:
            self.expire(now)
        if self._count >= self.max_total:
            victim = self._soonest()
            if victim is None or victim.expiry >= record.expiry:
                return False
            self._remove(victim.key, victim.node_id)
        self._by_key.setdefault(record.key, {})[record.node_id] = record
        self._count += 1
        self._push(record)
        return True

    def remove(self, key: bytes, node_id: NodeId) -> bool:
        return self._remove(key, node_id)

    def expire(self, now: float) -> int:
        """Drop every record expired at ``now``; returns how many."""
        dropped = 0
        # Bounded: each iteration pops one heap entry.
        while self._expiry_heap and self._expiry_heap[0][0] <= now:
            _expiry, key, digest = heapq.heappop(self._expiry_heap)
            node_id = NodeId(digest)
            record = self._by_key.get(key, {}).get(node_id)
            if record is not None and record.expired(now):
                self._remove(key, node_id)
                dropped += 1
        return dropped

    def _push(self, record: ProviderRecord) -> None:
        heapq.heappush(self._expiry_heap, (record.expiry, record.key, record.node_id.digest))
        if len(self._expiry_heap) > 2 * self._count + 1024:
            self._expiry_heap = [
                (r.expiry, r.key, r.node_id.digest)
                for per_key in self._by_key.values()
                for r in per_key.values()
            ]
            heapq.heapify(self._expiry_heap)

    def _soonest(self) -> ProviderRecord | None:
        # Bounded by the heap's length; stale entries are discarded on the way.
        while self._expiry_heap:
            expiry, key, digest = self._expiry_heap[0]
            record = self._by_key.get(key, {}).get(NodeId(digest))
            if record is not None and record.expiry == expiry:
                return record
            heapq.heappop(self._expiry_heap)
        return None

    def _remove(self, key: bytes, node_id: NodeId) -> bool:
        per_key = self._by_key.get(key)
        if per_key is None or per_key.pop(node_id, None) is None:
            return False
        self._count -= 1
        if not per_key:
            del self._by_key[key]
        return True


# --- routing table ---------------------------------------------------------------------------


class DhtPeer(Node):  # type: ignore[misc]  # kademlia is untyped: Node is Any to mypy
    """A routing-table entry: kademlia's Node carrying our Contact."""

    def __init__(self, contact: Contact, public_key: bytes | None = None) -> None:
        super().__init__(contact.node_id.digest, contact.host, contact.udp_port)
        self.contact: Contact = contact
        self.public_key: bytes | None = public_key
        self.packed: bytes = _pack(contact.to_wire())
        """The contact in MessagePack form: it goes into many replies, so encode it once."""


class DhtRoutingTable(RoutingTable):  # type: ignore[misc]  # kademlia is untyped
    """kademlia's bucket tree, with correct bucket lookup and neighbour selection."""

    def __init__(
        self,
        protocol: object,
        ksize: int,
        node: Any,
        on_full_bucket: Callable[[Any], None] | None = None,
    ) -> None:
        super().__init__(protocol, ksize, node)
        self.on_full_bucket = on_full_bucket
        # Every contact's id and entry in one flat list, rebuilt only when the set
        # of contacts changes: find_neighbors runs for every request served.
        self._flat_ids: list[int] | None = None
        self._flat_peers: list[Any] = []

    def _flat(self) -> tuple[list[int], list[Any]]:
        if self._flat_ids is None:
            self._flat_peers = [peer for bucket in self.buckets for peer in bucket.nodes.values()]
            self._flat_ids = [peer.long_id for peer in self._flat_peers]
        return self._flat_ids, self._flat_peers

    def flush(self) -> None:
        super().flush()
        self._flat_ids = None

    def remove_contact(self, node: Any) -> None:
        super().remove_contact(node)
        self._flat_ids = None

    def get_bucket_for(self, node: Any) -> int:
        # Bucket ranges are inclusive at both ends (KBucket.split and has_in_range
        # say so); the library compared with `<` and put a node whose id equals a
        # range's upper bound in the next bucket, outside its range.
        long_id: int = node.long_id
        for index, bucket in enumerate(self.buckets):
            if long_id <= bucket.range[1]:
                return index
        return len(self.buckets) - 1

    def add_contact(self, node: Any) -> bool:
        """Add or refresh a contact; False if it only went to a replacement cache."""
        # The library's version pinged the head of a full bucket in a
        # fire-and-forget task; here the owner decides (on_full_bucket) and owns it.
        # Each split halves a range of 2**160 ids, so 161 rounds always suffice.
        index = self.get_bucket_for(node)
        if self.buckets[index].nodes.get(node.id) is node:
            self.buckets[index].add_node(node)  # seen again: only its recency changes
            return True
        self._flat_ids = None
        for _ in range(NODE_ID_SIZE * 8 + 1):
            index = self.get_bucket_for(node)
            bucket = self.buckets[index]
            if bucket.add_node(node):
                return True
            # Section 4.2 of the paper: split a full bucket whose range holds our
            # own id, or whose depth is not a multiple of 5 (kademlia's rule).
            if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
                self.split_bucket(index)
                continue
            if self.on_full_bucket is not None:
                self.on_full_bucket(bucket.head())
            return False
        return False

    def find_neighbors(self, node: Any, k: int | None = None, exclude: Any = None) -> list[Any]:
        """The k known contacts closest to ``node`` by XOR distance (true order).

        The library walked buckets in list order and stopped after k nodes, which
        misses closer contacts in other buckets. A table holds a few hundred
        contacts, so sorting them all is cheap and exact.
        """
        count = k or self.ksize
        self.buckets[self.get_bucket_for(node)].touch_last_updated()
        target: int = node.long_id
        ids, peers = self._flat()
        # Unlike the library, a contact whose id equals the target is kept: for a
        # provider key, that node is the closest of all, not the one looking.
        if exclude is not None:
            kept = [i for i, peer in enumerate(peers) if not peer.same_home_as(exclude)]
            ids, peers = [ids[i] for i in kept], [peers[i] for i in kept]
        distances = [long_id ^ target for long_id in ids]
        nearest = heapq.nsmallest(count, range(len(ids)), key=distances.__getitem__)
        return [peers[i] for i in nearest]

    def has_room_for(self, node_id: NodeId) -> bool:
        """True if ``add_contact`` would put this id in a bucket (not a replacement cache)."""
        node = Node(node_id.digest)
        bucket = self.buckets[self.get_bucket_for(node)]
        if node_id.digest in bucket.nodes or len(bucket) < self.ksize:
            return True
        return bool(bucket.has_in_range(self.node) or bucket.depth() % 5 != 0)

    def peers(self) -> list[DhtPeer]:
        return list(self._flat()[1])

    def get(self, node_id: NodeId) -> DhtPeer | None:
        bucket = self.buckets[self.get_bucket_for(Node(node_id.digest))]
        peer: DhtPeer | None = bucket.nodes.get(node_id.digest)
        return peer


# --- the UDP protocol --------------------------------------------------------------------------


class ProtocolHooks(typing.Protocol):
    """What the protocol tells its owner (a DhtNode, or a test double)."""

    def sender_seen(self, node_id: NodeId, tcp_port: int, address: Address) -> None:
        """A non-client node sent us a well-formed request."""

    def contact_answered(self, contact: Contact) -> None:
        """A contact answered one of our requests."""

    def bucket_full(self, head: DhtPeer) -> None:
        """A full bucket refused a contact: check that its head is still alive."""

    def contact_welcomed(self, contact: Contact) -> None:
        """A verified node entered the routing table for the first time."""


class _LogLimiter:
    """At most ``burst`` warnings per ``window`` seconds, then one summary line."""

    def __init__(self, burst: int = DROP_LOG_BURST, window: float = DROP_LOG_WINDOW) -> None:
        self.burst = burst
        self.window = window
        self._window_start = time.monotonic()
        self._lines = 0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start >= self.window:
            if self._suppressed:
                log.warning(
                    "%d more dropped-datagram lines suppressed in %.0f s",
                    self._suppressed,
                    self.window,
                )
            self._window_start, self._lines, self._suppressed = now, 0, 0
        if self._lines < self.burst:
            self._lines += 1
            log.warning(message, *args)
        else:
            self._suppressed += 1


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Any]
    address: Address


@dataclass(slots=True)
class ProtocolCounters:
    """Running totals of one protocol instance."""

    requests_sent: int = 0
    requests_served: int = 0
    replies_received: int = 0
    timeouts: int = 0
    dropped: int = 0
    evictions: int = 0


class DhtProtocol(KademliaProtocol):  # type: ignore[misc]  # kademlia is untyped
    """kademlia's protocol with a validated, synchronous receive path.

    Requests are served in ``datagram_received`` itself: nothing is scheduled
    per datagram, so a bad datagram cannot leave a failed task behind. Only the
    procedures in REMOTE_PROCEDURES are served (an explicit table) or called
    (``__getattr__`` refuses other names).
    """

    def __init__(
        self,
        *,
        identity: Identity,
        config: Config,
        providers: ProviderStore,
        hooks: ProtocolHooks,
        tcp_port: int = 0,
        client_mode: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        source = Node(identity.node_id.digest)
        super().__init__(source, providers, config.ksize)
        self.router = DhtRoutingTable(self, config.ksize, source, hooks.bucket_full)
        self._wait_timeout = config.dht_rpc_timeout
        self.identity = identity
        self.config = config
        self.providers = providers
        self.hooks = hooks
        self.tcp_port = tcp_port
        self.client_mode = client_mode
        self.clock = clock
        self.counters = ProtocolCounters()
        self.closed = asyncio.Event()
        self._pending: dict[bytes, _Pending] = {}
        # Consecutive failures and the time of the last one, for any contact (not
        # only routing-table ones), so lookups can skip nodes known to be dead.
        self._failures: OrderedDict[NodeId, tuple[int, float]] = OrderedDict()
        self._drop_log = _LogLimiter()
        self._handlers: dict[str, Callable[[Address, list[Any]], object]] = {
            "ping": self._serve_ping,
            "find_node": self._serve_find_node,
            "get_providers": self._serve_get_providers,
            "add_providers": self._serve_add_providers,
        }

    # rpcudp's __getattr__ turned every unknown attribute into a remote call, so a
    # typo sent a datagram. Only whitelisted names become calls here.
    def __getattr__(self, name: str) -> Any:
        if name in REMOTE_PROCEDURES:

            async def remote(address: Address, *args: object) -> Any:
                return await self.call(address, name, list(args))

            return remote
        raise AttributeError(
            f"{type(self).__name__!r} has no attribute {name!r} "
            f"(remote procedures: {', '.join(sorted(REMOTE_PROCEDURES))})"
        )

    # --- header and bookkeeping -----------------------------------------------------

    @property
    def header(self) -> list[object]:
        flags = FLAG_CLIENT if self.client_mode else 0
        return [self.identity.node_id.digest, self.tcp_port, flags]

    @property
    def failure_threshold(self) -> int:
        return max(1, self.config.contact_failures_before_eviction)

    def note_failure(self, node_id: NodeId) -> None:
        """One more consecutive failure of a contact; evict at the threshold."""
        failures = self._failures.pop(node_id, (0, 0.0))[0] + 1
        self._failures[node_id] = (failures, time.monotonic())
        while len(self._failures) > FAILURE_MEMORY_SIZE:
            self._failures.popitem(last=False)
        peer = self.router.get(node_id)
        if peer is None or failures < self.failure_threshold:
            return
        self.router.remove_contact(peer)
        self.counters.evictions += 1
        log.info("evicted %s after %d consecutive failures", peer.contact, failures)

    def note_success(self, node_id: NodeId) -> None:
        self._failures.pop(node_id, None)

    def presumed_dead(self, node_id: NodeId) -> bool:
        """True if the contact failed ``failure_threshold`` times in a row lately."""
        entry = self._failures.get(node_id)
        if entry is None or entry[0] < self.failure_threshold:
            return False
        return time.monotonic() - entry[1] < DEAD_CONTACT_MEMORY

    def handle_call_response(self, result: tuple[bool, Any], node: Any) -> tuple[bool, Any]:
        # The library removed a contact on its first timeout; one lost datagram is
        # not a dead node.
        node_id = NodeId(node.id)
        if result[0]:
            self.note_success(node_id)
        else:
            self.note_failure(node_id)
        return result

    def welcome_if_new(self, node: Any) -> None:
        """Add a verified peer; tell the owner if it is new (it may need records)."""
        # The library also pushed stored values here, choosing them by hashing the
        # stored keys a second time; the owner does the push, with the real keys.
        is_new = bool(self.router.is_new_node(node))
        self.router.add_contact(node)
        self.note_success(NodeId(node.id))
        if is_new and isinstance(node, DhtPeer):
            self.hooks.contact_welcomed(node.contact)

    # --- receive path ------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_result(None)
        self._pending.clear()
        self.closed.set()

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier sends (port unreachable, ...): the request
        # concerned simply times out.
        log.debug("UDP error: %s", exc)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        address = _normalize_address(addr)
        try:
            datagram = decode_datagram(data)
            if datagram.kind == KIND_REQUEST:
                self._serve(datagram, address)
            else:
                self._accept_reply(datagram, address)
        except RemoteProtocolError as exc:
            self.drop(address, str(exc))
        # A bug of ours, not bad input: keep serving, but with the traceback.
        except Exception:
            log.exception("error handling a datagram from %s:%d", *address)

    def drop(self, address: Address, reason: str) -> None:
        self.counters.dropped += 1
        self._drop_log.warning("dropped datagram from %s:%d: %s", address[0], address[1], reason)

    def _serve(self, datagram: Datagram, address: Address) -> None:
        body = datagram.body
        if not isinstance(body, list) or len(body) != 2:
            raise _bad("request is not [name, args]")
        name, args = body
        if not isinstance(name, str):
            raise _bad("procedure name is not a string")
        handler = self._handlers.get(name)
        if handler is None:
            raise _bad(f"unknown procedure {name[:40]!r}")
        if not isinstance(args, list):
            raise _bad(f"{name} arguments are not a list")
        try:
            reply = handler(address, args)
        except RemoteProtocolError as exc:
            raise _bad(f"bad {name} request: {exc}") from None
        packed = encode_reply(datagram.message_id, reply)
        if len(packed) > DATAGRAM_BUDGET:
            # Handlers trim their replies; reaching this is a bug here, not the peer's.
            log.error("not sending a %d-byte %s reply to %s:%d", len(packed), name, *address)
            return
        self.counters.requests_served += 1
        if self.transport is not None:
            self.transport.sendto(packed, address)

    def _accept_reply(self, datagram: Datagram, address: Address) -> None:
        pending = self._pending.get(datagram.message_id)
        if pending is None:
            # Usually a reply that arrived after its request timed out.
            log.debug("reply from %s:%d matches no request", *address)
            return
        if pending.address != address:
            raise _bad("reply from an address the request was not sent to")
        del self._pending[datagram.message_id]
        self.counters.replies_received += 1
        if not pending.future.done():
            pending.future.set_result(datagram.body)

    # --- send path ----------------------------------------------------------------------

    async def call(self, address: Address, name: str, args: list[object]) -> Any:
        """Send one request; the decoded reply, or None if none came in time."""
        if name not in REMOTE_PROCEDURES:
            raise LocalProtocolError(f"{name!r} is not a remote procedure")
        if self.transport is None or self.transport.is_closing() or self.closed.is_set():
            return None
        message_id = os.urandom(MESSAGE_ID_SIZE)
        packed = encode_request(message_id, name, args)
        if len(packed) > DATAGRAM_BUDGET:
            raise LocalProtocolError(
                f"{name} request of {len(packed)} bytes exceeds the "
                f"{DATAGRAM_BUDGET}-byte datagram budget"
            )
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = _Pending(future, address)
        self.counters.requests_sent += 1
        try:
            self.transport.sendto(packed, address)
            async with asyncio.timeout(self._wait_timeout):
                return await future
        except TimeoutError:
            self.counters.timeouts += 1
            return None
        finally:
            self._pending.pop(message_id, None)

    async def call_contact(self, contact: Contact, name: str, args: list[object]) -> Any:
        """``call`` to a known contact, counting its failures toward eviction."""
        reply = await self.call(contact.udp_address, name, args)
        if reply is None:
            self.note_failure(contact.node_id)
        else:
            self.note_success(contact.node_id)
            self.hooks.contact_answered(contact)
        return reply

    # --- handlers: each validates every argument, then answers synchronously -----------

    def _sender(self, address: Address, header: object) -> NodeId:
        items = _expect_list(header, "sender header", exact=3)
        node_id = NodeId(_expect_bytes(items[0], NODE_ID_SIZE, "sender node id"))
        flags = _expect_int(items[2], 0, 255, "sender flags")
        client = bool(flags & FLAG_CLIENT)
        tcp_port = _expect_int(items[1], 0 if client else 1, 65535, "sender TCP port")
        if not client and node_id != self.identity.node_id:
            self.hooks.sender_seen(node_id, tcp_port, address)
        return node_id

    def _serve_ping(self, address: Address, args: list[Any]) -> object:
        _expect_list(args, "ping arguments", exact=2)
        nonce = args[1]
        if not isinstance(nonce, bytes) or not MIN_NONCE_SIZE <= len(nonce) <= MAX_NONCE_SIZE:
            raise _bad(f"nonce must be {MIN_NONCE_SIZE} to {MAX_NONCE_SIZE} bytes")
        self._sender(address, args[0])
        flags = FLAG_CLIENT if self.client_mode else 0
        signature = self.identity.sign(
            ping_proof_message(nonce, self.identity.node_id, self.tcp_port, flags)
        )
        return [
            self.identity.node_id.digest,
            self.identity.public_key,
            self.tcp_port,
            flags,
            signature,
            [address[0], address[1]],
        ]

    def _serve_find_node(self, address: Address, args: list[Any]) -> object:
        _expect_list(args, "find_node arguments", exact=2)
        key = _expect_bytes(args[1], DHT_KEY_SIZE, "key")
        sender = self._sender(address, args[0])
        contacts, _size = self._contacts_near(key, sender, DATAGRAM_BUDGET - 64)
        return Encoded(contacts)

    def _serve_get_providers(self, address: Address, args: list[Any]) -> object:
        _expect_list(args, "get_providers arguments", exact=3)
        key = _expect_bytes(args[1], DHT_KEY_SIZE, "key")
        limit = _expect_int(args[2], 0, 1 << 16, "limit")
        sender = self._sender(address, args[0])
        contacts, contacts_size = self._contacts_near(key, sender, DATAGRAM_BUDGET // 3)
        records = self.providers.get(key, self.clock())
        total = len(records)
        # Frame, the outer array, two array headers and the total: under 32 bytes.
        room = DATAGRAM_BUDGET - _FRAME_HEADER_SIZE - contacts_size - 32
        if len(records) > limit:
            # Different nodes then return different subsets, so a union over a
            # lookup covers more providers than any one reply can carry.
            records = random.sample(records, limit)
        chosen: list[object] = []
        used = 0
        for record in records:
            size = record.wire_size()
            if used + size > room or len(chosen) >= MAX_RECORDS_PER_MESSAGE:
                break
            chosen.append(record.to_wire())
            used += size
        return Encoded(_array_header(3) + _pack(chosen) + _pack(total) + contacts)

    def _serve_add_providers(self, address: Address, args: list[Any]) -> object:
        _expect_list(args, "add_providers arguments", exact=2)
        items = _expect_list(args[1], "records", limit=MAX_RECORDS_PER_MESSAGE)
        records = [ProviderRecord.from_wire(item) for item in items]
        self._sender(address, args[0])
        now = self.clock()
        max_ttl = self.config.provider_ttl + CLOCK_SKEW_ALLOWANCE
        accepted: list[bool] = []
        for record in records:
            if self.providers.holds(record):
                accepted.append(not record.expired(now))
                continue
            problem = record.problem(now, max_ttl=max_ttl)
            if problem is not None:
                self.drop(address, f"refused provider record {record!r}: {problem}")
                accepted.append(False)
                continue
            accepted.append(self.providers.add(record, now))
        return accepted

    def _contacts_near(self, key: bytes, exclude: NodeId, budget: int) -> tuple[bytes, int]:
        """The encoded array of the k contacts closest to ``key`` that fit in
        ``budget`` bytes, and its length."""
        peers = self.router.find_neighbors(Node(key), self.config.ksize + 1)
        chosen: list[bytes] = []
        used = 3  # the largest array header needed
        for peer in peers:
            if peer.id == exclude.digest:
                continue
            if used + len(peer.packed) > budget or len(chosen) >= min(
                self.config.ksize, MAX_CONTACTS_PER_REPLY
            ):
                break
            chosen.append(peer.packed)
            used += len(peer.packed)
        encoded = _array_header(len(chosen)) + b"".join(chosen)
        return encoded, len(encoded)


def ping_proof_message(nonce: bytes, node_id: NodeId, tcp_port: int, flags: int) -> bytes:
    """The domain-separated bytes a node signs to answer a challenge ping."""
    return b"".join(
        (
            PING_DOMAIN,
            bytes([len(nonce)]),
            nonce,
            node_id.digest,
            tcp_port.to_bytes(2, "big"),
            bytes([flags]),
        )
    )


@dataclass(frozen=True, slots=True)
class IdentityProof:
    """A verified answer to a challenge ping."""

    contact: Contact
    """The node, at the address the challenge was sent to."""
    public_key: bytes
    client: bool
    observed: Address | None
    """Our own address as the peer saw it."""


def check_ping_reply(reply: object, nonce: bytes, address: Address) -> IdentityProof:
    """Validate a ping reply against the challenge; raises RemoteProtocolError."""
    items = _expect_list(reply, "ping reply", exact=6)
    node_id = NodeId(_expect_bytes(items[0], NODE_ID_SIZE, "node id"))
    public_key = _expect_bytes(items[1], PUBLIC_KEY_SIZE, "public key")
    flags = _expect_int(items[3], 0, 255, "flags")
    client = bool(flags & FLAG_CLIENT)
    tcp_port = _expect_int(items[2], 0 if client else 1, 65535, "TCP port")
    signature = _expect_bytes(items[4], SIGNATURE_SIZE, "signature")
    observed: Address | None = None
    seen = items[5]
    if isinstance(seen, list) and len(seen) == 2:
        with contextlib.suppress(RemoteProtocolError):
            observed = (
                _expect_host(seen[0], "observed host", ip_only=True),
                _expect_int(seen[1], 1, 65535, "observed port"),
            )
    if NodeId.for_public_key(public_key) != node_id:
        raise _bad("node id is not the hash of its public key")
    if not verify_signature(
        public_key, ping_proof_message(nonce, node_id, tcp_port, flags), signature
    ):
        raise _bad("bad signature on the ping proof")
    contact = Contact(node_id, address[0], address[1], tcp_port)
    return IdentityProof(contact, public_key, client, observed)


@dataclass(frozen=True, slots=True)
class _FindReply:
    contact_items: list[Any]
    """Contacts in wire form, not yet validated (see _parse_find_reply)."""
    records: list[ProviderRecord]


def _parse_find_reply(reply: object, with_providers: bool) -> _FindReply:
    """Check a find_node / get_providers reply's shape and parse its records.

    Contacts stay in wire form (a bounded list): a lookup parses only those it
    has not met yet, most of a reply being contacts it already knows.
    """
    if not with_providers:
        items = _expect_list(reply, "find_node reply", limit=MAX_CONTACTS_PER_REPLY)
        return _FindReply(items, [])
    parts = _expect_list(reply, "get_providers reply", exact=3)
    records = _expect_list(parts[0], "records", limit=MAX_RECORDS_PER_MESSAGE)
    _expect_int(parts[1], 0, 1 << 32, "record total")
    contacts = _expect_list(parts[2], "contacts", limit=MAX_CONTACTS_PER_REPLY)
    return _FindReply(contacts, [ProviderRecord.from_wire(item) for item in records])


# --- the kademlia Server, trimmed to what is safe ----------------------------------------------


class _Server(Server):  # type: ignore[misc]  # kademlia is untyped
    """kademlia's Server for binding and stopping; its unsafe parts refuse to run."""

    def __init__(
        self, node_id: bytes, config: Config, make_protocol: Callable[[], DhtProtocol]
    ) -> None:
        super().__init__(ksize=config.ksize, alpha=config.alpha, node_id=node_id, storage=None)
        self._make_protocol = make_protocol

    def _create_protocol(self) -> DhtProtocol:
        return self._make_protocol()

    def refresh_table(self, interval: int = 3600) -> None:
        # The library schedules refreshes as unowned tasks from listen(); the
        # DhtNode's maintenance task refreshes buckets and is cancelled on stop.
        return None

    # Values under SHA-1'd keys, a success flag that ignores the replies, and
    # pickled state: DhtNode has the provider-record, JSON equivalents.
    async def set(self, key: object, value: object) -> bool:
        raise NotImplementedError("use DhtNode.announce / put_records")

    async def set_digest(self, dkey: bytes, value: object) -> bool:
        raise NotImplementedError("use DhtNode.announce / put_records")

    async def get(self, key: object) -> object:
        raise NotImplementedError("use DhtNode.find_providers")

    async def bootstrap(self, addrs: object) -> object:
        raise NotImplementedError("use DhtNode.bootstrap")

    def save_state(self, fname: object) -> None:
        raise NotImplementedError("pickle is unsafe; DhtNode persists contacts as JSON")

    def save_state_regularly(self, fname: object, frequency: int = 600) -> None:
        raise NotImplementedError("pickle is unsafe; DhtNode persists contacts as JSON")

    @classmethod
    async def load_state(cls, fname: object, port: int, interface: str = "0.0.0.0") -> object:
        raise NotImplementedError("pickle is unsafe; DhtNode reads contacts from JSON")


# --- helpers for the node ----------------------------------------------------------------------


class _Pacer:
    """Token bucket: ``acquire`` waits just long enough to keep ``rate`` per second."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = time.monotonic()

    async def acquire(self, amount: float = 1.0) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= amount
        if self._tokens < 0:
            # Concurrent callers each wait out their own deficit: one sleep, no loop.
            await asyncio.sleep(-self._tokens / self.rate)


def parse_address(address: str | tuple[str, int]) -> Address:
    """'HOST:PORT', '[V6]:PORT' or (host, port) -> (host, port)."""
    if isinstance(address, tuple):
        host, port = address
    else:
        text = address.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise ValueError(f"not HOST:PORT: {address!r}")
            port_text = rest[1:]
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                raise ValueError(f"not HOST:PORT: {address!r}")
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"not a port number in {address!r}") from None
    if not host or not 1 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {address!r}")
    return (host, int(port))


def _random_ids_in(buckets: Iterable[Any]) -> list[bytes]:
    """One random id in each bucket's range, for refresh lookups."""
    # KademliaProtocol.get_refresh_ids does the same, but can draw 2**160 (the
    # first bucket's range ends there), which does not fit in 20 bytes.
    ids = []
    for bucket in islice(buckets, NODE_ID_SIZE * 8 + 1):
        low, high = bucket.range
        ids.append(
            random.randint(low, min(high, 2 ** (NODE_ID_SIZE * 8) - 1)).to_bytes(
                NODE_ID_SIZE, "big"
            )
        )
    return ids


@dataclass(slots=True)
class _Candidate:
    contact: Contact
    distance: int
    hops: int
    state: str = "new"
    """new, asked, slow, answered or failed."""
    asked_at: float = 0.0


@dataclass(slots=True)
class NodeCounters:
    """Running totals of one DhtNode, for ``status``."""

    lookups: int = 0
    verified: int = 0
    verification_failures: int = 0
    records_pushed: int = 0
    reannounce_passes: int = 0


# --- the node -------------------------------------------------------------------------------------


class DhtNode:
    """One node's part of the DHT: the facade the node engine uses.

    Owns a kademlia Server subclass (the UDP socket), its protocol and routing
    table, the provider records it holds, and its background tasks
    (verification, welcome pushes, re-announcement, maintenance); ``stop``
    cancels all of them.
    """

    def __init__(
        self,
        identity: Identity,
        config: Config,
        *,
        tcp_port: int | None = None,
        advertise_host: str | None = None,
        client_mode: bool = False,
        state_path: Path | None = None,
        provided_keys: Callable[[], Iterable[bytes]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.config = config
        self.client_mode = client_mode
        self.state_path = state_path
        self.clock = clock
        self._requested_tcp_port = tcp_port
        self._advertise_host = advertise_host
        self._observed_hosts: dict[str, int] = {}
        """How many verified peers saw us at each address (bounded)."""
        self._bound_host = "127.0.0.1"
        self._port = 0
        self._provided_keys = provided_keys
        self._server: _Server | None = None
        self._protocol: DhtProtocol | None = None
        self._stopping = False
        self.providers = ProviderStore(config.max_providers_per_key, config.max_provider_records)
        self.counters = NodeCounters()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._transient: set[asyncio.Task[Any]] = set()
        """Short tasks (identity checks, head pings) that ``settled`` waits for."""
        self._activity = asyncio.Event()
        self._pushing = False
        self._verified: OrderedDict[NodeId, IdentityProof] = OrderedDict()
        self._failed_proofs: OrderedDict[tuple[NodeId, Address], float] = OrderedDict()
        self._verifying: set[NodeId] = set()
        self._verify_slots = asyncio.Semaphore(VERIFY_CONCURRENCY)
        self._checking_heads: set[NodeId] = set()
        self._welcome_queue: dict[NodeId, Contact] = {}
        self._welcome_wakeup = asyncio.Event()
        self._push_pacer = _Pacer(PUSH_DATAGRAMS_PER_SECOND, PUSH_DATAGRAMS_PER_SECOND)
        self._announce_pacer = _Pacer(REANNOUNCE_KEYS_PER_SECOND, ANNOUNCE_GROUP)
        self._saved_contacts: list[Contact] = []
        self.reannounced = asyncio.Event()
        """Set after each re-announcement pass (tests and status wait on it)."""

    # --- lifecycle ------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind the UDP socket (port 0: any free port) and start background work."""
        if self._server is not None:
            raise LocalProtocolError("this DHT node was already started")
        server = _Server(self.identity.node_id.digest, self.config, self._make_protocol)
        await server.listen(port, interface=host)
        self._server = server
        self._protocol = server.protocol
        sockname = server.transport.get_extra_info("sockname")
        self._bound_host = host
        self._port = int(sockname[1])
        tcp_port = self._requested_tcp_port
        if tcp_port is None:
            tcp_port = 0 if self.client_mode else self._port
        self.protocol.tcp_port = tcp_port
        self._saved_contacts = self._load_state()
        self._spawn(self._maintenance_loop(), "dht-maintenance")
        if not self.client_mode:
            self._spawn(self._welcome_loop(), "dht-welcome")
            if self._provided_keys is not None:
                self._spawn(self._reannounce_loop(), "dht-reannounce")
        log.info("DHT node %s listening on UDP %s:%d", self.identity.node_id, host, self._port)

    async def stop(self) -> None:
        """Cancel every task, save the contact list, close the socket."""
        if self._server is None or self._stopping:
            return
        self._stopping = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._save_state()
        protocol = self.protocol
        self._server.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(protocol.closed.wait(), timeout=2.0)

    def _make_protocol(self) -> DhtProtocol:
        return DhtProtocol(
            identity=self.identity,
            config=self.config,
            providers=self.providers,
            hooks=self,
            tcp_port=self._requested_tcp_port or 0,
            client_mode=self.client_mode,
            clock=self.clock,
        )

    @property
    def protocol(self) -> DhtProtocol:
        if self._protocol is None:
            raise LocalProtocolError("the DHT node is not started")
        return self._protocol

    @property
    def running(self) -> bool:
        return self._protocol is not None and not self._stopping

    @property
    def port(self) -> int:
        """The bound UDP port."""
        return self._port

    @property
    def advertised_host(self) -> str:
        if self._advertise_host:
            return self._advertise_host
        if self._observed_hosts and self._bound_host in _UNSPECIFIED_HOSTS:
            # The address most verified peers saw: one lying peer cannot set it.
            return max(self._observed_hosts.items(), key=lambda item: item[1])[0]
        return self._bound_host

    @property
    def contact(self) -> Contact:
        """This node's own contact (advertised host, ports)."""
        tcp_port = self.protocol.tcp_port if self._protocol is not None else 0
        return Contact(self.identity.node_id, self.advertised_host, self._port, tcp_port)

    def _spawn(
        self, coro: typing.Coroutine[Any, Any, Any], name: str, *, transient: bool = False
    ) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        if transient:
            self._transient.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _adopt(self, task: asyncio.Task[Any]) -> None:
        """Take ownership of a task someone else started (stop() cancels it)."""
        if self._stopping:
            task.cancel()
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._transient.discard(task)
        self._activity.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("DHT task %s failed", task.get_name(), exc_info=task.exception())

    def busy(self) -> bool:
        """True while identity checks or record pushes are in flight or queued."""
        return bool(self._transient or self._welcome_queue or self._pushing)

    async def settled(self, max_wait: float = 10.0) -> None:
        """Wait until ``busy()`` is false; raises TimeoutError after ``max_wait`` seconds."""
        async with asyncio.timeout(max_wait):
            # Bounded by the timeout; each round waits for some task to finish.
            while self.busy():
                self._activity.clear()
                await self._activity.wait()

    # --- contacts -------------------------------------------------------------------

    def known_contacts(self) -> list[Contact]:
        """The routing table, closest to this node first."""
        own = self.identity.node_id.digest
        peers = self.protocol.router.peers() if self._protocol is not None else []
        contacts = [peer.contact for peer in peers]
        contacts.sort(key=lambda c: c.distance(own))
        return contacts

    # ProtocolHooks -----------------------------------------------------------------

    def sender_seen(self, node_id: NodeId, tcp_port: int, address: Address) -> None:
        proof = self._verified.get(node_id)
        contact = Contact(node_id, address[0], address[1], tcp_port)
        if proof is None or proof.contact != contact:
            self._schedule_verification(contact)
            return
        # Proven before, from this very address: only its recency changes.
        self._verified.move_to_end(node_id)
        router = self.protocol.router
        peer = router.get(node_id)
        if peer is not None and peer.contact == contact:
            router.add_contact(peer)
            self.protocol.note_success(node_id)
        else:
            self.protocol.welcome_if_new(DhtPeer(contact, proof.public_key))

    def contact_answered(self, contact: Contact) -> None:
        proof = self._verified.get(contact.node_id)
        if proof is None or proof.contact.udp_address != contact.udp_address:
            self._schedule_verification(contact)
            return
        # Proven before at this address; back into the table if it was evicted.
        if self.protocol.router.get(contact.node_id) is None:
            self.protocol.welcome_if_new(DhtPeer(proof.contact, proof.public_key))

    def bucket_full(self, head: DhtPeer) -> None:
        node_id = head.contact.node_id
        if self._stopping or node_id in self._checking_heads or len(self._checking_heads) > 64:
            return
        self._checking_heads.add(node_id)
        self._spawn(self._check_head(head.contact), f"dht-head-{node_id}", transient=True)

    def contact_welcomed(self, contact: Contact) -> None:
        if self.client_mode or self._stopping or len(self._welcome_queue) >= MAX_WELCOME_QUEUE:
            return
        self._welcome_queue[contact.node_id] = contact
        self._welcome_wakeup.set()

    # identity proofs ------------------------------------------------------------------

    def _schedule_verification(self, contact: Contact) -> None:
        node_id = contact.node_id
        if self._stopping or node_id in self._verifying or node_id == self.identity.node_id:
            return
        if not self.protocol.router.has_room_for(node_id):
            # A full bucket that may not split would only keep it as a spare: an
            # identity check (two datagrams, two signatures) for little gain.
            return
        if len(self._verifying) >= MAX_PENDING_VERIFICATIONS:
            log.debug("too many identity checks in flight; not checking %s", contact)
            return
        failed_at = self._failed_proofs.get((node_id, contact.udp_address))
        if failed_at is not None and time.monotonic() - failed_at < FAILED_VERIFICATION_MEMORY:
            return
        self._verifying.add(node_id)
        self._spawn(self._verify(contact), f"dht-verify-{node_id}", transient=True)

    async def _verify(self, contact: Contact) -> None:
        try:
            async with self._verify_slots:
                proof = await self._challenge(contact.udp_address)
            if proof is None or proof.contact.node_id != contact.node_id:
                self.counters.verification_failures += 1
                self._failed_proofs[(contact.node_id, contact.udp_address)] = time.monotonic()
                while len(self._failed_proofs) > VERIFIED_CACHE_SIZE:
                    self._failed_proofs.popitem(last=False)
                log.debug("%s failed its identity check", contact)
                return
            self._accept_proof(proof)
        finally:
            self._verifying.discard(contact.node_id)

    async def _limited_challenge(self, address: Address) -> IdentityProof | None:
        async with self._verify_slots:
            return await self._challenge(address)

    async def _challenge(self, address: Address) -> IdentityProof | None:
        """Ping with a fresh nonce; the proof if the answer is signed by its id's key."""
        nonce = os.urandom(NONCE_SIZE)
        reply = await self.protocol.call(address, "ping", [self.protocol.header, nonce])
        if reply is None:
            return None
        try:
            return check_ping_reply(reply, nonce, address)
        except RemoteProtocolError as exc:
            self.protocol.drop(address, f"bad ping reply: {exc}")
            return None

    def _accept_proof(self, proof: IdentityProof) -> None:
        self.counters.verified += 1
        if proof.observed is not None:
            host = proof.observed[0]
            if host in self._observed_hosts or len(self._observed_hosts) < MAX_OBSERVED_HOSTS:
                self._observed_hosts[host] = self._observed_hosts.get(host, 0) + 1
        if proof.client or proof.contact.node_id == self.identity.node_id:
            return
        self._verified[proof.contact.node_id] = proof
        self._verified.move_to_end(proof.contact.node_id)
        while len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        self.protocol.welcome_if_new(DhtPeer(proof.contact, proof.public_key))

    async def _check_head(self, contact: Contact) -> None:
        # Section 2.2 of the paper: a full bucket keeps its least-recently seen
        # contact if it still answers; call_contact counts a silence toward eviction
        # (which then promotes a contact from the replacement cache).
        try:
            await self.protocol.call_contact(
                contact, "ping", [self.protocol.header, os.urandom(NONCE_SIZE)]
            )
        finally:
            self._checking_heads.discard(contact.node_id)

    # --- bootstrap and state ------------------------------------------------------------

    async def bootstrap(self, addresses: Sequence[str | tuple[str, int]]) -> int:
        """Join through these nodes (and the saved contacts); returns contacts known.

        Retries with backoff, ``config.bootstrap_attempts`` times, while nobody
        answers; raises NetworkError then. With no address and no saved contact
        this node is the first of its network and 0 is returned.
        """
        targets = [parse_address(a) for a in addresses]
        own = self.identity.node_id.digest
        nearest_saved = sorted(self._saved_contacts, key=lambda c: c.distance(own))
        saved = [c.udp_address for c in nearest_saved[:MAX_BOOTSTRAP_CONTACTS]]
        if not targets and not saved:
            return len(self.known_contacts())
        attempts = max(1, self.config.bootstrap_attempts)
        for attempt in range(attempts):
            resolved = await self._resolve([*targets, *saved])
            proofs = await asyncio.gather(*(self._limited_challenge(a) for a in resolved))
            answered = [p for p in proofs if p is not None]
            for proof in answered:
                self._accept_proof(proof)
            if answered or self.known_contacts():
                await self._join_lookups()
                # The lookups met nodes whose identity checks are still in flight;
                # wait for them (bounded) so the count returned is the table's.
                with contextlib.suppress(TimeoutError):
                    await self.settled(2 * self.config.dht_rpc_timeout)
                return len(self.known_contacts())
            if attempt + 1 < attempts:
                delay = min(BOOTSTRAP_BACKOFF_MAX, BOOTSTRAP_BACKOFF_BASE * 2**attempt)
                log.info("no DHT node answered; retrying bootstrap in %.1f s", delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        shown = ", ".join(f"{h}:{p}" for h, p in [*targets, *saved][:5])
        raise NetworkError(f"no DHT node answered at {shown} after {attempts} attempts")

    async def _resolve(self, addresses: list[Address]) -> list[Address]:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self._bound_host else socket.AF_INET
        resolved: list[Address] = []
        for host, port in addresses:
            if _is_ip_literal(host):
                resolved.append((host, port))
                continue
            try:
                infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
            except OSError as exc:
                log.warning("cannot resolve bootstrap host %s: %s", host, exc)
                continue
            if infos:
                resolved.append(_normalize_address(infos[0][4]))
        return list(dict.fromkeys(resolved))

    async def _join_lookups(self) -> None:
        """Look up our own id, then one random id at each distance level farther
        than our closest neighbour (paper section 2.3, "refreshes all k-buckets
        further away than its closest neighbor").

        Every node closer than us to some key lies in a subtree, at one of those
        levels, that holds fewer than k nodes; that level's lookup reaches all of
        them, so the holders that should hand us records hear of us.
        """
        own = self.identity.node_id
        await self._lookup(own.digest, want=None, with_providers=False)
        contacts = self.known_contacts()
        if not contacts:
            return
        nearest_level = (contacts[0].node_id.as_int ^ own.as_int).bit_length() - 1
        targets = [
            (own.as_int ^ (1 << level) ^ random.getrandbits(level)).to_bytes(NODE_ID_SIZE, "big")
            for level in range(max(0, nearest_level), NODE_ID_SIZE * 8)
        ]
        slots = asyncio.Semaphore(self.config.alpha)
        async with asyncio.TaskGroup() as group:
            for key in targets[:MAX_JOIN_REFRESHES]:
                group.create_task(self._limited_lookup(slots, key))

    async def _limited_lookup(self, slots: asyncio.Semaphore, key: bytes) -> LookupResult:
        async with slots:
            return await self._lookup(key, want=None, with_providers=False)

    def _load_state(self) -> list[Contact]:
        path = self.state_path
        if path is None:
            return []
        try:
            if path.stat().st_size > MAX_STATE_FILE_SIZE:
                log.warning(
                    "ignoring DHT contact file %s: larger than %d bytes", path, MAX_STATE_FILE_SIZE
                )
                return []
            document = json.loads(path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable DHT contact file %s: %s", path, exc)
            return []
        if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
            log.warning("ignoring DHT contact file %s: not %s", path, STATE_FORMAT)
            return []
        entries = document.get("contacts")
        contacts: list[Contact] = []
        for entry in entries[:MAX_SAVED_CONTACTS] if isinstance(entries, list) else []:
            try:
                if not isinstance(entry, dict):
                    raise _bad("contact entry is not an object")
                node_id = NodeId.from_hex(str(entry.get("node_id")))
                contacts.append(
                    Contact.from_wire(
                        [
                            node_id.digest,
                            entry.get("host"),
                            entry.get("udp_port"),
                            entry.get("tcp_port"),
                        ]
                    )
                )
            except (RemoteProtocolError, ValueError) as exc:
                log.warning("skipping a bad entry in %s: %s", path, exc)
        return contacts

    def _save_state(self) -> None:
        path = self.state_path
        if path is None or self._protocol is None:
            return
        contacts = self.known_contacts()[:MAX_SAVED_CONTACTS]
        if not contacts:
            return  # keep the previous list: an isolated node should not forget its network
        document = {
            "format": STATE_FORMAT,
            "node_id": self.identity.node_id.hex(),
            "saved_at": int(time.time()),
            "contacts": [
                {
                    "node_id": c.node_id.hex(),
                    "host": c.host,
                    "udp_port": c.udp_port,
                    "tcp_port": c.tcp_port,
                }
                for c in contacts
            ],
        }
        temporary = path.with_name(path.name + ".tmp")
        try:
            temporary.write_text(json.dumps(document, indent=1) + "\n")
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("cannot save DHT contacts to %s: %s", path, exc)

    # --- lookups ---------------------------------------------------------------------

    async def lookup(
        self, key: bytes, *, want: int | None = None, providers: bool = True
    ) -> LookupResult:
        """An iterative lookup of ``key`` with its statistics (see find_providers)."""
        return await self._lookup(_check_key(key), want=want, with_providers=providers)

    async def find_providers(self, key: bytes, want: int | None = None) -> list[ProviderRecord]:
        """Verified, unexpired provider records for ``key``, one per provider.

        Unions the records of every node the lookup visits (and this node's own);
        stops early once ``want`` providers are known.
        """
        result = await self.lookup(key, want=want, providers=True)
        return list(result.providers)

    async def closest_live_nodes(
        self, key: bytes, count: int, *, include_self: bool = True
    ) -> list[Contact]:
        """The ``count`` nodes closest to ``key`` that answered during a lookup."""
        result = await self.lookup(key, providers=False)
        contacts = list(result.closest)
        if include_self and not self.client_mode:
            contacts.append(self.contact)
        contacts.sort(key=lambda c: c.distance(key))
        return contacts[:count]

    async def _lookup(self, key: bytes, *, want: int | None, with_providers: bool) -> LookupResult:
        """Kademlia's node lookup (paper section 2.3), without rounds.

        Up to alpha queries are in flight; each reply immediately frees a slot for
        the closest candidate not yet asked. A query that is slow to answer (see
        SLOW_REPLY_FRACTION) frees its slot and leaves the window of k closest, but
        its reply is still used if it comes. The lookup ends when the k closest
        candidates not failed or slow have all answered, when ``want`` providers
        are known, after MAX_LOOKUP_QUERIES queries, or at ``dht_lookup_timeout``.
        """
        protocol = self.protocol
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.config.dht_lookup_timeout
        slow_after = self.config.dht_rpc_timeout * SLOW_REPLY_FRACTION
        k, alpha = self.config.ksize, max(1, self.config.alpha)
        target = int.from_bytes(key, "big")
        own = self.identity.node_id
        now = self.clock()
        max_ttl = self.config.provider_ttl + CLOCK_SKEW_ALLOWANCE
        limit = want if want is not None else self.config.max_providers_per_key
        self.counters.lookups += 1

        candidates: dict[NodeId, _Candidate] = {}

        seen: set[bytes] = {own.digest}
        """Node ids met so far, as bytes, to skip contacts a reply repeats."""

        def consider(contact: Contact, hops: int) -> None:
            seen.add(contact.node_id.digest)
            if contact.node_id == own or contact.node_id in candidates:
                return
            if protocol.presumed_dead(contact.node_id):
                return
            if len(candidates) < MAX_LOOKUP_CANDIDATES:
                candidates[contact.node_id] = _Candidate(
                    contact, contact.node_id.as_int ^ target, hops
                )

        for peer in protocol.router.find_neighbors(Node(key), k):
            consider(peer.contact, 1)
        found: dict[NodeId, ProviderRecord] = {}
        if with_providers:
            for record in self.providers.get(key, now):
                found[record.node_id] = record

        def absorb(candidate: _Candidate, reply: _FindReply) -> None:
            for item in reply.contact_items:
                if isinstance(item, list) and item and item[0] in seen:
                    continue
                try:
                    contact = Contact.from_wire(item)
                except RemoteProtocolError as exc:
                    protocol.drop(candidate.contact.udp_address, f"bad contact in reply: {exc}")
                    continue
                consider(contact, candidate.hops + 1)
            for record in reply.records:
                held = found.get(record.node_id)
                if record.key != key or (held is not None and held.expiry >= record.expiry):
                    continue
                problem = record.problem(now, max_ttl=max_ttl)
                if problem is None:
                    found[record.node_id] = record
                else:
                    protocol.drop(candidate.contact.udp_address, f"bad record in reply: {problem}")

        in_flight: dict[asyncio.Task[_FindReply | None], _Candidate] = {}
        messages = answered = failed = hops = 0
        timed_out = False
        try:
            # Each round launches, completes or slows at least one query, or ends.
            for _ in range(3 * MAX_LOOKUP_QUERIES + 2):
                if want is not None and len(found) >= want:
                    break
                clock_now = loop.time()
                for candidate in in_flight.values():
                    if candidate.state == "asked" and clock_now - candidate.asked_at >= slow_after:
                        candidate.state = "slow"
                window = sorted(
                    (c for c in candidates.values() if c.state not in ("failed", "slow")),
                    key=lambda c: c.distance,
                )[:k]
                active = sum(1 for c in in_flight.values() if c.state == "asked")
                for candidate in window:
                    if active >= alpha or messages >= MAX_LOOKUP_QUERIES:
                        break
                    if candidate.state == "new":
                        candidate.state, candidate.asked_at = "asked", clock_now
                        messages += 1
                        active += 1
                        task = loop.create_task(
                            self._query(candidate.contact, key, with_providers, limit)
                        )
                        in_flight[task] = candidate
                slow_pending = any(c.state == "slow" for c in in_flight.values())
                if all(c.state == "answered" for c in window) and (
                    len(window) >= k or not slow_pending
                ):
                    break
                if not in_flight:
                    break
                if clock_now >= deadline:
                    timed_out = True
                    break
                next_slow = min(
                    (c.asked_at + slow_after for c in in_flight.values() if c.state == "asked"),
                    default=deadline,
                )
                done, _pending = await asyncio.wait(
                    in_flight,
                    timeout=max(0.0, min(deadline, next_slow) - clock_now),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    candidate = in_flight.pop(task)
                    reply = task.result()
                    if reply is None:
                        candidate.state = "failed"
                        failed += 1
                        continue
                    candidate.state = "answered"
                    answered += 1
                    hops = max(hops, candidate.hops)
                    absorb(candidate, reply)
        except BaseException:
            for task in in_flight:
                task.cancel()
            raise
        finally:
            # Slow queries run on, owned by the node, so that a dead contact's
            # timeout still counts toward its eviction; the others stop here.
            for task, candidate in in_flight.items():
                if candidate.state == "slow" and not task.cancelling():
                    self._adopt(task)
                else:
                    task.cancel()
            stopped = [task for task in in_flight if task.cancelling()]
            if stopped:
                await asyncio.wait(stopped)

        closest = sorted(
            (c for c in candidates.values() if c.state == "answered"), key=lambda c: c.distance
        )
        providers = sorted(found.values(), key=lambda r: r.node_id.as_int ^ target)
        stats = LookupStats(
            hops=hops,
            messages=messages,
            answered=answered,
            failed=failed,
            seconds=loop.time() - started,
            timed_out=timed_out,
        )
        return LookupResult(key, tuple(providers), tuple(c.contact for c in closest), stats)

    async def _query(
        self, contact: Contact, key: bytes, with_providers: bool, limit: int
    ) -> _FindReply | None:
        protocol = self.protocol
        if with_providers:
            raw = await protocol.call_contact(
                contact, "get_providers", [protocol.header, key, limit]
            )
        else:
            raw = await protocol.call_contact(contact, "find_node", [protocol.header, key])
        if raw is None:
            return None
        try:
            return _parse_find_reply(raw, with_providers)
        except RemoteProtocolError as exc:
            protocol.drop(contact.udp_address, f"bad reply: {exc}")
            return None

    # --- provider records --------------------------------------------------------------

    def sign_record(self, key: bytes, ttl: float | None = None) -> ProviderRecord:
        """This node's own provider record for ``key``."""
        if self.client_mode:
            raise LocalProtocolError("a client-mode node provides nothing")
        contact = self.contact
        return ProviderRecord.create(
            self.identity,
            _check_key(key),
            contact.host,
            contact.tcp_port,
            self.config.provider_ttl if ttl is None else ttl,
            self.clock(),
        )

    def local_providers(self, key: bytes) -> list[ProviderRecord]:
        """The unexpired records this node holds for ``key``."""
        return self.providers.get(key, self.clock())

    def forget_provider(self, key: bytes, node_id: NodeId) -> None:
        """Drop a held record, e.g. when a fetch found that provider dead."""
        self.providers.remove(key, node_id)

    async def announce(self, keys: Sequence[bytes]) -> dict[bytes, int]:
        """Sign this node's records for ``keys`` and store them on each key's k closest.

        Returns, per key, how many other nodes confirmed storing the record (0 means
        nobody did).
        """
        records = [self.sign_record(key) for key in dict.fromkeys(keys)]
        return await self.put_records(records)

    async def put_records(
        self,
        records: Sequence[ProviderRecord],
        closest: Mapping[bytes, Sequence[Contact]] | None = None,
    ) -> dict[bytes, int]:
        """Store signed records (anyone's) on the k closest nodes of each key.

        Looks the closest nodes up unless ``closest`` gives them; records for one
        target travel together, split into datagrams that fit the budget. Returns
        per key the number of other nodes that confirmed holding its record(s).
        """
        by_key: dict[bytes, list[ProviderRecord]] = {}
        for record in records:
            by_key.setdefault(record.key, []).append(record)
        confirmations: dict[bytes, int] = {}
        keys = iter(list(by_key))
        # A group of keys at a time, so a large publish never holds thousands of
        # tasks; each group's records still travel batched per target.
        for _ in range(len(by_key) // PUT_GROUP_KEYS + 1):
            group_keys = list(islice(keys, PUT_GROUP_KEYS))
            if not group_keys:
                break
            group = {key: by_key[key] for key in group_keys}
            confirmations.update(await self._put_group(group, closest))
        return confirmations

    async def _put_group(
        self,
        by_key: dict[bytes, list[ProviderRecord]],
        closest: Mapping[bytes, Sequence[Contact]] | None,
    ) -> dict[bytes, int]:
        targets: dict[bytes, list[Contact]] = {}
        slots = asyncio.Semaphore(ANNOUNCE_CONCURRENCY)
        missing = [key for key in by_key if closest is None or key not in closest]
        async with asyncio.TaskGroup() as group:
            lookups = {
                key: group.create_task(self._closest_for_storage(slots, key)) for key in missing
            }
        for key in by_key:
            if key in lookups:
                targets[key] = lookups[key].result()
            elif closest is not None:
                targets[key] = list(closest[key])[: self.config.ksize]

        now = self.clock()
        own = self.identity.node_id
        per_target: dict[Contact, list[ProviderRecord]] = {}
        for key, key_records in by_key.items():
            contacts = [c for c in targets[key] if c.node_id != own]
            kth = max((c.distance(key) for c in contacts), default=-1)
            if not self.client_mode and (
                len(contacts) < self.config.ksize or own.distance(key) < kth
            ):
                # This node is among the k closest itself: hold the records too.
                for record in key_records:
                    if record.verify(now, max_ttl=self.config.provider_ttl + CLOCK_SKEW_ALLOWANCE):
                        self.providers.add(record, now)
            for contact in contacts:
                per_target.setdefault(contact, []).extend(key_records)

        confirmed: dict[bytes, set[NodeId]] = {key: set() for key in by_key}
        async with asyncio.TaskGroup() as group:
            for contact, target_records in per_target.items():
                for batch in split_into_batches(target_records):
                    group.create_task(self._send_batch(slots, contact, batch, confirmed))
        return {key: len(nodes) for key, nodes in confirmed.items()}

    async def _closest_for_storage(self, slots: asyncio.Semaphore, key: bytes) -> list[Contact]:
        async with slots:
            result = await self._lookup(key, want=None, with_providers=False)
        return list(result.closest[: self.config.ksize])

    async def _send_batch(
        self,
        slots: asyncio.Semaphore,
        contact: Contact,
        batch: list[ProviderRecord],
        confirmed: dict[bytes, set[NodeId]],
    ) -> None:
        protocol = self.protocol
        async with slots:
            reply = await protocol.call_contact(
                contact, "add_providers", [protocol.header, [r.to_wire() for r in batch]]
            )
        flags = reply if isinstance(reply, list) and len(reply) == len(batch) else None
        if flags is None:
            if reply is not None:
                protocol.drop(contact.udp_address, "bad add_providers reply")
            return
        for record, accepted in zip(batch, flags, strict=True):
            if accepted is True and record.key in confirmed:
                confirmed[record.key].add(contact.node_id)

    # --- background work ------------------------------------------------------------------

    async def reannounce(self) -> int:
        """Announce every key ``provided_keys`` yields again; returns how many."""
        if self._provided_keys is None or self.client_mode:
            return 0
        done = 0
        keys = iter(self._provided_keys())
        # Bounded by MAX_REANNOUNCE_KEYS keys, ANNOUNCE_GROUP at a time, paced.
        while done < MAX_REANNOUNCE_KEYS:
            batch = list(islice(keys, ANNOUNCE_GROUP))
            if not batch:
                break
            group = [k for k in batch if isinstance(k, bytes) and len(k) == DHT_KEY_SIZE]
            if len(group) != len(batch):
                log.warning(
                    "provided_keys yielded %d keys that are not 20 bytes", len(batch) - len(group)
                )
            await self._announce_pacer.acquire(len(group))
            await self.announce(group)
            done += len(group)
        self.counters.reannounce_passes += 1
        self.reannounced.set()
        return done

    async def _reannounce_loop(self) -> None:
        # Runs for the node's lifetime (stop() cancels it); records are renewed at
        # half their lifetime so one failed pass still leaves them alive.
        interval = max(1.0, self.config.provider_ttl / 2)
        while True:
            await asyncio.sleep(interval * random.uniform(0.9, 1.0))
            self.reannounced.clear()
            await self._guarded("re-announcement", self.reannounce)

    async def _maintenance_loop(self) -> None:
        # Runs for the node's lifetime (stop() cancels it).
        last_save = time.monotonic()
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            await self._guarded("maintenance", self._maintain)
            if time.monotonic() - last_save >= STATE_SAVE_INTERVAL:
                self._save_state()
                last_save = time.monotonic()

    async def _maintain(self) -> None:
        expired = self.providers.expire(self.clock())
        if expired:
            log.debug("expired %d provider records", expired)
        # Section 2.3: refresh buckets that saw no lookup for an hour.
        for key in _random_ids_in(self.protocol.router.lonely_buckets()):
            await self._lookup(key, want=None, with_providers=False)

    @staticmethod
    async def _guarded(what: str, step: Callable[[], typing.Awaitable[object]]) -> None:
        try:
            await step()
        # A bug in one pass must not end a loop the node relies on; cancellation
        # (a BaseException) still does.
        except Exception:
            log.exception("DHT %s pass failed", what)

    async def _welcome_loop(self) -> None:
        # Runs for the node's lifetime (stop() cancels it); each pass handles a
        # snapshot of the queue, which contact_welcomed bounds.
        while True:
            await self._welcome_wakeup.wait()
            self._welcome_wakeup.clear()
            newcomers = list(self._welcome_queue.values())
            self._welcome_queue.clear()
            self._pushing = True
            try:
                await self._guarded(
                    "record push", functools.partial(self._push_to_newcomers, newcomers)
                )
            finally:
                self._pushing = False
                self._activity.set()

    async def _push_to_newcomers(self, newcomers: list[Contact]) -> None:
        """Hand newcomers the records they are now among the k closest to (section 2.5)."""
        if not newcomers or not len(self.providers):
            return
        now = self.clock()
        own = self.identity.node_id.as_int
        newcomer_ids = {c.node_id for c in newcomers}
        known = [
            p.long_id for p in self.protocol.router.peers() if p.contact.node_id not in newcomer_ids
        ]
        k = self.config.ksize
        outgoing: dict[Contact, list[ProviderRecord]] = {c: [] for c in newcomers}
        for index, key in enumerate(self.providers.keys()):
            if index % 1024 == 1023:
                await asyncio.sleep(0)  # a large store must not stall the event loop
            target = int.from_bytes(key, "big")
            mine = own ^ target
            if sum(1 for peer in known if peer ^ target < mine) >= WELCOME_PUSHERS:
                continue  # closer holders will push it
            nearest = heapq.nsmallest(k, (peer ^ target for peer in known))
            kth = nearest[-1] if len(nearest) >= k else 1 << 160
            records = None
            for newcomer in newcomers:
                if newcomer.node_id.as_int ^ target < kth:
                    records = records if records is not None else self.providers.get(key, now)
                    outgoing[newcomer].extend(records)
        protocol = self.protocol
        for newcomer, records in outgoing.items():
            for batch in split_into_batches(records):
                await self._push_pacer.acquire()
                reply = await protocol.call_contact(
                    newcomer, "add_providers", [protocol.header, [r.to_wire() for r in batch]]
                )
                if reply is None:
                    break  # gone already: do not wait out a timeout per batch
                self.counters.records_pushed += len(batch)
