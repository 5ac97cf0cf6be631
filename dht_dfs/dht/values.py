"""The DHT's values: contacts, signed provider records, identity proofs, lookup
results and counters. Pure: no sockets, no kademlia, no asyncio.

Owns what the DHT's messages carry and how each is checked (including the
parsing of find_node / get_providers and ping replies, and the batching of
records into datagrams): every parser here raises RemoteProtocolError for a
peer's mistake, so the protocol can drop a bad datagram with one log line.
The datagram framing and MessagePack primitives are in ``codec``; this
module builds on it.

Must not import: asyncio, kademlia, rpcudp, or any ``dht`` module but ``codec``.

A ping signature covers ``PING_DOMAIN | len(nonce) | nonce | node_id |
tcp_port(2) | flags(1) | len(host) | host | udp_port(2)``, where host and
udp_port are the address the challenge was sent to (the challenger says
which, the prover signs it only if it is its own; empty for a liveness ping
that names none), so a proof relayed through another address does not verify
there; a record signature covers ``RECORD_DOMAIN | key |
node_id | len(host) | host | tcp_port(2) | expiry(8)``. A record does not
depend on who sends it, so any node may forward it (that is how late
joiners receive records).
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from dht_dfs.core.crypto import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, verify_signature
from dht_dfs.core.errors import RemoteProtocolError
from dht_dfs.core.ids import DHT_KEY_SIZE, NODE_ID_SIZE, NodeId
from dht_dfs.dht.codec import (
    DATAGRAM_BUDGET,
    FLAG_CLIENT,
    FRAME_HEADER_SIZE,
    TOKEN_SIZE,
    expect_bytes,
    expect_int,
    expect_list,
    pack,
    remote_error,
    unpack_exact,
)

Address = tuple[str, int]
"""A UDP or TCP endpoint: (host, port)."""

# --- limits --------------------------------------------------------------------------
# Fixed by the protocol rather than tuned per deployment, so they live here and
# not in Config.

MIN_NONCE_SIZE: Final = 16
MAX_NONCE_SIZE: Final = 64
NONCE_SIZE: Final = 20
MAX_HOST_LENGTH: Final = 253
MAX_CONTACTS_PER_REPLY: Final = 64
MAX_RECORDS_PER_MESSAGE: Final = 64
MAX_EXPIRY: Final = 2**40
"""Unix seconds; far beyond any real expiry, small enough for 8 bytes."""
MAX_RECORD_BYTES: Final = 512
"""A record's MessagePack encoding is about 190 bytes with a 15-character host."""

MAX_PROVIDER_TTL: Final = 7 * 24 * 3600.0
"""Default upper bound on a record's remaining lifetime in ProviderRecord.verify."""
CLOCK_SKEW_ALLOWANCE: Final = 300.0
"""Seconds a record may expire beyond now + provider_ttl (clocks differ)."""


PING_DOMAIN: Final = b"dhtfs/dht/ping-proof/v2\x00"
"""v2 adds the address the challenge was sent to (v1 proofs could be relayed)."""
RECORD_DOMAIN: Final = b"dhtfs/dht/provider-record/v1\x00"

HOST_CHARACTERS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:%_"
)
UNSPECIFIED_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})


# --- host and key validation -----------------------------------------------------------


def expect_host(value: object, what: str, *, ip_only: bool) -> str:
    if not isinstance(value, str):
        raise remote_error(f"{what} must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_HOST_LENGTH or not set(value) <= HOST_CHARACTERS:
        raise remote_error(f"{what} is not a host name or address")
    if not ip_only:
        return value
    # Contacts are sent to at once: a host name would block the event loop in a
    # DNS lookup inside sendto, so only IP literals are accepted, in the form the
    # kernel reports (replies are matched against the address a request went to).
    canonical = canonical_ip(value)
    if canonical is None:
        raise remote_error(f"{what} is not an IP address")
    return canonical


def canonical_ip(host: str) -> str | None:
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


def is_ip_literal(host: str) -> bool:
    return canonical_ip(host) is not None


def check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != DHT_KEY_SIZE:
        raise ValueError(f"a DHT key is {DHT_KEY_SIZE} bytes (ChunkId.dht_key)")
    return key


def normalize_address(address: Any) -> Address:
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
        items = expect_list(value, "contact", exact=4)
        return cls(
            NodeId(expect_bytes(items[0], NODE_ID_SIZE, "contact node id")),
            expect_host(items[1], "contact host", ip_only=True),
            expect_int(items[2], 1, 65535, "contact UDP port"),
            expect_int(items[3], 1, 65535, "contact TCP port"),
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
            expect_host(self.host, "record host", ip_only=False)
            expect_int(self.tcp_port, 1, 65535, "record TCP port")
            expect_int(self.expiry, 0, MAX_EXPIRY, "record expiry")
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
        check_key(key)
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
        items = expect_list(value, "record", exact=7)
        return cls(
            expect_bytes(items[0], DHT_KEY_SIZE, "record key"),
            NodeId(expect_bytes(items[1], NODE_ID_SIZE, "record node id")),
            expect_bytes(items[2], PUBLIC_KEY_SIZE, "record public key"),
            expect_host(items[3], "record host", ip_only=False),
            expect_int(items[4], 1, 65535, "record TCP port"),
            expect_int(items[5], 0, MAX_EXPIRY, "record expiry"),
            expect_bytes(items[6], SIGNATURE_SIZE, "record signature"),
        )

    def to_bytes(self) -> bytes:
        """The record as one MessagePack value (e.g. a store receipt on TCP)."""
        return pack(self.to_wire())

    @classmethod
    def from_bytes(cls, data: bytes) -> ProviderRecord:
        """Parse (not verify) ``to_bytes`` output; raises ValueError if malformed."""
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"a provider record is at most {MAX_RECORD_BYTES} bytes")
        try:
            return cls.from_wire(unpack_exact(bytes(data)))
        except RemoteProtocolError as exc:
            raise ValueError(f"malformed provider record: {exc}") from None

    def wire_size(self) -> int:
        """An upper bound of ``len(self.to_bytes())``, without encoding."""
        # array(1) key(22) node id(22) public key(34) host(2+n) port(3) expiry(9) signature(66)
        return 159 + len(self.host)

    def __repr__(self) -> str:
        where = f"{self.host}:{self.tcp_port}"
        return f"ProviderRecord({self.key.hex()[:12]}… by {self.node_id} at {where})"


LOOKUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the lookup-time histogram's buckets."""


@dataclass(slots=True)
class Histogram:
    """Counts of observations at or under each bound, their count and sum
    (a Prometheus histogram's state, kept without the library)."""

    bounds: tuple[float, ...] = LOOKUP_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * len(LOOKUP_BUCKETS))
    count: int = 0
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(bound, observations at or under it), then (inf, all of them)."""
        return [*zip(self.bounds, self.counts, strict=True), (float("inf"), self.count)]


@dataclass(slots=True)
class NodeCounters:
    """Running totals of one DhtNode, for ``status`` and metrics."""

    lookup_seconds: Histogram = field(default_factory=Histogram)
    lookups: int = 0
    verified: int = 0
    verification_failures: int = 0
    records_pushed: int = 0
    reannounce_passes: int = 0


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


# --- messages built from values ----------------------------------------------------------


def split_into_batches(
    records: Sequence[ProviderRecord], budget: int = DATAGRAM_BUDGET
) -> list[list[ProviderRecord]]:
    """Group records so that each add_providers request fits in ``budget`` bytes."""
    # Frame header, [name, [header, [...]]] and the sender header: under 96 bytes.
    room = budget - FRAME_HEADER_SIZE - 96
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


LEAVE_DOMAIN: Final = b"dhtfs/dht/leave/v1\x00"
LEAVE_WINDOW: Final = 60.0
"""Seconds a signed goodbye stays good (clock skew included); replays after
that are ignored."""


def leave_message(node_id: NodeId, address: Address, timestamp: int) -> bytes:
    """The domain-separated bytes a node signs to say it leaves: its id, the UDP
    address it leaves from, and when (a goodbye cannot be moved or kept)."""
    return b"".join(
        (
            LEAVE_DOMAIN,
            node_id.digest,
            address[0].encode("ascii"),
            b"\x00",
            address[1].to_bytes(2, "big"),
            timestamp.to_bytes(8, "big"),
        )
    )


def ping_proof_message(
    nonce: bytes, node_id: NodeId, tcp_port: int, flags: int, target: Address | None
) -> bytes:
    """The domain-separated bytes a node signs to answer a challenge ping sent to
    ``target`` (None: a ping that named no address, which proves no address)."""
    host = b"" if target is None else target[0].encode("ascii")
    port = 0 if target is None else target[1]
    return b"".join(
        (
            PING_DOMAIN,
            bytes([len(nonce)]),
            nonce,
            node_id.digest,
            tcp_port.to_bytes(2, "big"),
            bytes([flags]),
            bytes([len(host)]),
            host,
            port.to_bytes(2, "big"),
        )
    )


def canonical_address(address: Address) -> Address:
    """``address`` with its host in canonical form (as the kernel reports it)."""
    return (canonical_ip(address[0]) or address[0], address[1])


def parse_ping_target(value: object) -> Address:
    """The [host, port] a challenger says it sent a ping to; raises RemoteProtocolError."""
    items = expect_list(value, "ping target", exact=2)
    return (
        expect_host(items[0], "ping target host", ip_only=True),
        expect_int(items[1], 1, 65535, "ping target port"),
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
    items = expect_list(reply, "ping reply", exact=6)
    node_id = NodeId(expect_bytes(items[0], NODE_ID_SIZE, "node id"))
    public_key = expect_bytes(items[1], PUBLIC_KEY_SIZE, "public key")
    flags = expect_int(items[3], 0, 255, "flags")
    client = bool(flags & FLAG_CLIENT)
    tcp_port = expect_int(items[2], 0 if client else 1, 65535, "TCP port")
    signature = expect_bytes(items[4], SIGNATURE_SIZE, "signature")
    observed: Address | None = None
    seen = items[5]
    if isinstance(seen, list) and len(seen) == 2:
        with contextlib.suppress(RemoteProtocolError):
            observed = (
                expect_host(seen[0], "observed host", ip_only=True),
                expect_int(seen[1], 1, 65535, "observed port"),
            )
    if NodeId.for_public_key(public_key) != node_id:
        raise remote_error("node id is not the hash of its public key")
    # The proof must cover the very address we sent the challenge to: a node that
    # relays the challenge to another gets a proof for its own address, not ours.
    target = canonical_address(address)
    if not verify_signature(
        public_key, ping_proof_message(nonce, node_id, tcp_port, flags, target), signature
    ):
        raise remote_error("bad signature on the ping proof (or not for this address)")
    contact = Contact(node_id, address[0], address[1], tcp_port)
    return IdentityProof(contact, public_key, client, observed)


@dataclass(frozen=True, slots=True)
class FindReply:
    contact_items: list[Any]
    """Contacts in wire form, not yet validated (see parse_find_reply)."""
    records: list[ProviderRecord]
    token: bytes = b""
    """The replier's address-validation token for us (empty if none)."""
    more: bool = False
    """The replier trimmed the reply to the size our request allowed."""


def address_token(secret: bytes, address: Address, epoch: int) -> bytes:
    """The token proving that ``address`` received a reply in ``epoch``: a keyed
    BLAKE2b of the address (BEP 5 hashes the IP with a rotating secret)."""
    digest = hashlib.blake2b(key=secret, digest_size=TOKEN_SIZE, person=b"dhtfs/dht/token")
    digest.update(address[0].encode("ascii", "replace"))
    digest.update(address[1].to_bytes(2, "big"))
    digest.update(epoch.to_bytes(8, "big"))
    return digest.digest()


def parse_find_reply(reply: object, with_providers: bool) -> FindReply:
    """Check a find_node / get_providers reply's shape and parse its records.

    Contacts stay in wire form (a bounded list): a lookup parses only those it
    has not met yet, most of a reply being contacts it already knows.
    """
    if not with_providers:
        parts = expect_list(reply, "find_node reply", exact=3)
        items = expect_list(parts[0], "contacts", limit=MAX_CONTACTS_PER_REPLY)
        return FindReply(items, [], _token(parts[1]), _more(parts[2]))
    parts = expect_list(reply, "get_providers reply", exact=5)
    records = expect_list(parts[0], "records", limit=MAX_RECORDS_PER_MESSAGE)
    expect_int(parts[1], 0, 1 << 32, "record total")
    contacts = expect_list(parts[2], "contacts", limit=MAX_CONTACTS_PER_REPLY)
    return FindReply(
        contacts,
        [ProviderRecord.from_wire(item) for item in records],
        _token(parts[3]),
        _more(parts[4]),
    )


def _token(value: object) -> bytes:
    if value == b"":
        return b""
    return expect_bytes(value, TOKEN_SIZE, "token")


def _more(value: object) -> bool:
    if not isinstance(value, bool):
        raise remote_error(f"more must be a boolean, got {type(value).__name__}")
    return value


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
