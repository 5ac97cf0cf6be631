"""The DHT layer: locating chunks by content hash over Kademlia (UDP).

Owns the node's DHT identity proof, its routing table, provider records (who
holds which chunk, DESIGN property 6), iterative lookups, announcement and
re-announcement, and the persisted contact list. This is the only module of
dht_dfs that imports ``kademlia`` (or its ``rpcudp``); the values it sends
and their MessagePack codec are in ``dhtwire.py``, which has no I/O. It
knows nothing of chunk bytes, the chunk store or TCP.

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

Joining follows section 2.3 of the paper: a lookup of our own id, then one
per distance level farther than our closest neighbour, so that every holder
of records we should now hold hears of us and pushes them (section 2.5).

Known limits. Ids cost nothing to mint, so this is no defence against a Sybil
attacker with many keys (it filling a key's record slots, or a region of the
id space). An identity proof is not bound to the prover's address: a node
that relays challenges to another can appear in routing tables under that
node's id at its own address (it still cannot sign records for it). The
limits are protocol constants rather than Config fields.

The values and the datagram format live in ``dhtwire.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
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

from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable

from dht_dfs.core.config import Config
from dht_dfs.core.crypto import Identity
from dht_dfs.core.errors import LocalProtocolError, NetworkError, RemoteProtocolError
from dht_dfs.core.ids import DHT_KEY_SIZE, NODE_ID_SIZE, NodeId
from dht_dfs.core.pacer import Pacer
from dht_dfs.dht.values import (
    CLOCK_SKEW_ALLOWANCE,
    DATAGRAM_BUDGET,
    FLAG_CLIENT,
    FRAME_HEADER_SIZE,
    KIND_REQUEST,
    MAX_CONTACTS_PER_REPLY,
    MAX_NONCE_SIZE,
    MAX_RECORDS_PER_MESSAGE,
    MESSAGE_ID_SIZE,
    MIN_NONCE_SIZE,
    NONCE_SIZE,
    REMOTE_PROCEDURES,
    UNSPECIFIED_HOSTS,
    Address,
    Contact,
    Datagram,
    Encoded,
    FindReply,
    IdentityProof,
    LookupResult,
    LookupStats,
    ProviderRecord,
    ProviderStore,
    array_header,
    check_key,
    check_ping_reply,
    decode_datagram,
    encode_reply,
    encode_request,
    expect_bytes,
    expect_int,
    expect_list,
    is_ip_literal,
    normalize_address,
    pack,
    parse_address,
    parse_find_reply,
    ping_proof_message,
    remote_error,
    split_into_batches,
)

log = logging.getLogger(__name__)

__all__ = [
    "Address",
    "Contact",
    "DhtNode",
    "LookupResult",
    "LookupStats",
    "ProviderRecord",
    "parse_address",
]


# --- node behaviour limits --------------------------------------------------------
# Fixed by the protocol rather than tuned per deployment.

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
"""Lookups and add_providers requests in flight for one announcement."""
PUT_GROUP_KEYS: Final = 256
"""Keys whose records put_records places together (one lookup task each)."""
MAX_REANNOUNCE_KEYS: Final = 10_000_000
MAINTENANCE_INTERVAL: Final = 60.0
STATE_SAVE_INTERVAL: Final = 60.0
MAX_STATE_FILE_SIZE: Final = 1024 * 1024
MAX_SAVED_CONTACTS: Final = 1000
STATE_FORMAT: Final = "dhtfs-dht-contacts/1"
BOOTSTRAP_BACKOFF_BASE: Final = 0.25
BOOTSTRAP_BACKOFF_MAX: Final = 5.0
_NO_SUCH_NAME: Final = frozenset(
    code
    for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
    if code is not None
)
"""Resolver answers that a name does not exist (not that it could not ask)."""
MAX_JOIN_REFRESHES: Final = NODE_ID_SIZE * 8
MAX_BOOTSTRAP_CONTACTS: Final = 64
"""Saved contacts pinged at once when rejoining (the closest to this node)."""
MAX_OBSERVED_HOSTS: Final = 16
DROP_LOG_BURST: Final = 20
DROP_LOG_WINDOW: Final = 10.0


# --- routing table ---------------------------------------------------------------------------


class DhtPeer(Node):  # type: ignore[misc]  # kademlia is untyped: Node is Any to mypy
    """A routing-table entry: kademlia's Node carrying our Contact."""

    def __init__(self, contact: Contact, public_key: bytes | None = None) -> None:
        super().__init__(contact.node_id.digest, contact.host, contact.udp_port)
        self.contact: Contact = contact
        self.public_key: bytes | None = public_key
        self.packed: bytes = pack(contact.to_wire())
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

    def contact_evicted(self, node_id: NodeId) -> None:
        """A contact failed too often in a row and left the routing table."""


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
        self.hooks.contact_evicted(node_id)

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
        address = normalize_address(addr)
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
            raise remote_error("request is not [name, args]")
        name, args = body
        if not isinstance(name, str):
            raise remote_error("procedure name is not a string")
        handler = self._handlers.get(name)
        if handler is None:
            raise remote_error(f"unknown procedure {name[:40]!r}")
        if not isinstance(args, list):
            raise remote_error(f"{name} arguments are not a list")
        try:
            reply = handler(address, args)
        except RemoteProtocolError as exc:
            raise remote_error(f"bad {name} request: {exc}") from None
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
            raise remote_error("reply from an address the request was not sent to")
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
        items = expect_list(header, "sender header", exact=3)
        node_id = NodeId(expect_bytes(items[0], NODE_ID_SIZE, "sender node id"))
        flags = expect_int(items[2], 0, 255, "sender flags")
        client = bool(flags & FLAG_CLIENT)
        tcp_port = expect_int(items[1], 0 if client else 1, 65535, "sender TCP port")
        if not client and node_id != self.identity.node_id:
            self.hooks.sender_seen(node_id, tcp_port, address)
        return node_id

    def _serve_ping(self, address: Address, args: list[Any]) -> object:
        expect_list(args, "ping arguments", exact=2)
        nonce = args[1]
        if not isinstance(nonce, bytes) or not MIN_NONCE_SIZE <= len(nonce) <= MAX_NONCE_SIZE:
            raise remote_error(f"nonce must be {MIN_NONCE_SIZE} to {MAX_NONCE_SIZE} bytes")
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
        expect_list(args, "find_node arguments", exact=2)
        key = expect_bytes(args[1], DHT_KEY_SIZE, "key")
        sender = self._sender(address, args[0])
        contacts, _size = self._contacts_near(key, sender, DATAGRAM_BUDGET - 64)
        return Encoded(contacts)

    def _serve_get_providers(self, address: Address, args: list[Any]) -> object:
        expect_list(args, "get_providers arguments", exact=3)
        key = expect_bytes(args[1], DHT_KEY_SIZE, "key")
        limit = expect_int(args[2], 0, 1 << 16, "limit")
        sender = self._sender(address, args[0])
        contacts, contacts_size = self._contacts_near(key, sender, DATAGRAM_BUDGET // 3)
        records = self.providers.get(key, self.clock())
        total = len(records)
        # Frame, the outer array, two array headers and the total: under 32 bytes.
        room = DATAGRAM_BUDGET - FRAME_HEADER_SIZE - contacts_size - 32
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
        return Encoded(array_header(3) + pack(chosen) + pack(total) + contacts)

    def _serve_add_providers(self, address: Address, args: list[Any]) -> object:
        expect_list(args, "add_providers arguments", exact=2)
        items = expect_list(args[1], "records", limit=MAX_RECORDS_PER_MESSAGE)
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
        encoded = array_header(len(chosen)) + b"".join(chosen)
        return encoded, len(encoded)


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
        self._push_pacer = Pacer(PUSH_DATAGRAMS_PER_SECOND, PUSH_DATAGRAMS_PER_SECOND)
        self._announce_pacer = Pacer(REANNOUNCE_KEYS_PER_SECOND, ANNOUNCE_GROUP)
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
        if self._observed_hosts and self._bound_host in UNSPECIFIED_HOSTS:
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

    def contact_evicted(self, node_id: NodeId) -> None:
        # The node stopped answering: the records it signed point at nothing
        # now. If it comes back it re-announces (a restarted node does so at
        # once), so forgetting them costs nothing but saves every fetcher a
        # dead end.
        dropped = self.providers.remove_provider(node_id)
        if dropped:
            log.info("forgot %d provider record(s) of departed node %s", dropped, node_id)

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

    @property
    def has_saved_contacts(self) -> bool:
        """Whether the contact file of a previous run listed any contact."""
        return bool(self._saved_contacts)

    async def bootstrap(
        self, addresses: Sequence[str | tuple[str, int]], *, attempts: int | None = None
    ) -> int:
        """Join through these nodes (and the saved contacts); returns contacts known.

        Retries with backoff, ``attempts`` times (by default
        ``config.bootstrap_attempts``, a client's ``client_bootstrap_attempts``),
        while nobody answers; raises NetworkError
        then, or at once when no address can be resolved and none ever will be
        (the resolver says the name does not exist). With no address and no saved
        contact this node is the first of its network and 0 is returned. Once
        joined, the contacts are saved at once, so a node killed soon after can
        rejoin without being told where.
        """
        targets = [parse_address(a) for a in addresses]
        own = self.identity.node_id.digest
        nearest_saved = sorted(self._saved_contacts, key=lambda c: c.distance(own))
        saved = [c.udp_address for c in nearest_saved[:MAX_BOOTSTRAP_CONTACTS]]
        if not targets and not saved:
            return len(self.known_contacts())
        if attempts is None:
            attempts = (
                self.config.client_bootstrap_attempts
                if self.client_mode
                else self.config.bootstrap_attempts
            )
        attempts = max(1, attempts)
        for attempt in range(attempts):
            resolved, unknown = await self._resolve([*targets, *saved])
            if not resolved and len(unknown) == len(targets) + len(saved):
                raise NetworkError(f"cannot resolve bootstrap host {unknown[0]}")
            if attempt == 0:
                for name in unknown:
                    log.warning("cannot resolve bootstrap host %s", name)
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
                self._save_state()
                return len(self.known_contacts())
            if attempt + 1 < attempts:
                delay = min(BOOTSTRAP_BACKOFF_MAX, BOOTSTRAP_BACKOFF_BASE * 2**attempt)
                log.info("no DHT node answered; retrying bootstrap in %.1f s", delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        shown = ", ".join(f"{h}:{p}" for h, p in [*targets, *saved][:5])
        tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        raise NetworkError(f"no DHT node answered at {shown} after {tries}")

    async def _resolve(self, addresses: list[Address]) -> tuple[list[Address], list[str]]:
        """The addresses resolved, and "host: reason" for each name that does not exist.

        A name the resolver could not look up for now (no DNS server answering)
        is in neither list: the next attempt may resolve it.
        """
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self._bound_host else socket.AF_INET
        resolved: list[Address] = []
        unknown: list[str] = []
        for host, port in addresses:
            if is_ip_literal(host):
                resolved.append((host, port))
                continue
            try:
                infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
            except socket.gaierror as exc:
                if exc.errno in _NO_SUCH_NAME:
                    unknown.append(f"{host}: {exc.strerror}")
                else:
                    log.warning("cannot resolve bootstrap host %s: %s", host, exc.strerror)
                continue
            except OSError as exc:
                log.warning("cannot resolve bootstrap host %s: %s", host, exc)
                continue
            if infos:
                resolved.append(normalize_address(infos[0][4]))
        return list(dict.fromkeys(resolved)), unknown

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
                    raise remote_error("contact entry is not an object")
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
        return await self._lookup(check_key(key), want=want, with_providers=providers)

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

        def absorb(candidate: _Candidate, reply: FindReply) -> None:
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

        in_flight: dict[asyncio.Task[FindReply | None], _Candidate] = {}
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
    ) -> FindReply | None:
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
            return parse_find_reply(raw, with_providers)
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
            check_key(key),
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
            await asyncio.sleep(self._announce_pacer.reserve(len(group), time.monotonic()))
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
                await asyncio.sleep(self._push_pacer.reserve(1, time.monotonic()))
                reply = await protocol.call_contact(
                    newcomer, "add_providers", [protocol.header, [r.to_wire() for r in batch]]
                )
                if reply is None:
                    break  # gone already: do not wait out a timeout per batch
                self.counters.records_pushed += len(batch)
