"""Our DHT RPC protocol: serving and calling ping, find_node, get_providers and
add_providers over UDP.

Owns the synchronous, validated receive path (a bad datagram is dropped with
one rate-limited log line), the request/reply matching of the send path, the
four handlers, the memory of consecutive failures per contact (eviction, and
the "presumed dead" test lookups use), and the running counters. It builds on
``compat.CompatProtocol`` for what kademlia's base class does.

Must not import: kademlia, rpcudp (only ``compat`` does), nor the ``dht``
modules built on it (driver, membership, announce, node) or unrelated to it
(lookup, contacts).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import random
import time
import typing
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from dht_dfs.core.config import Config
from dht_dfs.core.crypto import SIGNATURE_SIZE, Identity, verify_signature
from dht_dfs.core.errors import LocalProtocolError, RemoteProtocolError
from dht_dfs.core.ids import DHT_KEY_SIZE, NODE_ID_SIZE, NodeId
from dht_dfs.dht.codec import (
    AMPLIFICATION_LIMIT,
    DATAGRAM_BUDGET,
    FLAG_CLIENT,
    FRAME_HEADER_SIZE,
    KIND_REQUEST,
    MAX_PADDING,
    MESSAGE_ID_SIZE,
    PADDED_REQUEST_SIZE,
    REMOTE_PROCEDURES,
    TOKEN_SIZE,
    Datagram,
    Encoded,
    array_header,
    decode_datagram,
    encode_reply,
    encode_request,
    expect_bytes,
    expect_int,
    expect_list,
    pack,
    remote_error,
)
from dht_dfs.dht.compat import CompatProtocol, DhtPeer
from dht_dfs.dht.records import ProviderStore
from dht_dfs.dht.values import (
    CLOCK_SKEW_ALLOWANCE,
    LEAVE_WINDOW,
    MAX_CONTACTS_PER_REPLY,
    MAX_EXPIRY,
    MAX_NONCE_SIZE,
    MAX_RECORDS_PER_MESSAGE,
    MIN_NONCE_SIZE,
    UNSPECIFIED_HOSTS,
    Address,
    Contact,
    FindReply,
    ProviderRecord,
    address_token,
    canonical_ip,
    leave_message,
    normalize_address,
    parse_find_reply,
    parse_ping_target,
    ping_proof_message,
)

log = logging.getLogger(__name__)

FAILURE_MEMORY_SIZE: Final = 4096
DEAD_CONTACT_MEMORY: Final = 300.0
"""Seconds a contact that failed repeatedly is skipped by lookups (unless it
answers or sends us a request meanwhile)."""
TOKEN_ROTATION: Final = 300.0
"""Seconds per token bucket; a token is accepted in its bucket and the next, so
for 5 to 10 minutes (BEP 5: "tokens up to ten minutes old are accepted")."""
TOKEN_MEMORY_SIZE: Final = 8192
"""Tokens of other nodes remembered at most (the oldest are forgotten first)."""
DROP_LOG_BURST: Final = 20
DROP_LOG_WINDOW: Final = 10.0


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


class DhtProtocol(CompatProtocol):
    """Our RPCs on kademlia's protocol, with a validated, synchronous receive path.

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
        super().__init__(
            identity.node_id, providers, config.ksize, config.dht_rpc_timeout, hooks.bucket_full
        )
        self.identity = identity
        self.config = config
        self.providers = providers
        self.hooks = hooks
        self.tcp_port = tcp_port
        self.client_mode = client_mode
        self.clock = clock
        self.counters = ProtocolCounters()
        self._token_secret = os.urandom(32)
        self._tokens: OrderedDict[Address, tuple[bytes, float]] = OrderedDict()
        """Tokens other nodes gave us, by their address, with when we got them."""
        self._request_size = 0
        self._reply_budget = DATAGRAM_BUDGET
        self.own_hosts: set[str] = set()
        """Hosts besides the bound one that are this node's (its advertised host)."""
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
            "leave": self._serve_leave,
        }

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
        failures = self._failures.get(node_id, (0, 0.0))[0] + 1
        self._remember_failures(node_id, failures)
        peer = self.router.get(node_id)
        if peer is None or failures < self.failure_threshold:
            return
        self.router.remove_contact(peer)
        self.counters.evictions += 1
        log.info("evicted %s after %d consecutive failures", peer.contact, failures)
        self.hooks.contact_evicted(node_id)

    def _remember_failures(self, node_id: NodeId, failures: int) -> None:
        """Record ``failures`` in a row for a contact, newest last, memory bounded."""
        self._failures.pop(node_id, None)
        self._failures[node_id] = (failures, time.monotonic())
        while len(self._failures) > FAILURE_MEMORY_SIZE:
            self._failures.popitem(last=False)

    def note_success(self, node_id: NodeId) -> None:
        self._failures.pop(node_id, None)

    def presumed_dead(self, node_id: NodeId) -> bool:
        """True if the contact failed ``failure_threshold`` times in a row lately."""
        entry = self._failures.get(node_id)
        if entry is None or entry[0] < self.failure_threshold:
            return False
        return time.monotonic() - entry[1] < DEAD_CONTACT_MEMORY

    def peer_welcomed(self, peer: DhtPeer) -> None:
        self.hooks.contact_welcomed(peer.contact)

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

    def receive_datagram(self, data: bytes, address: Address) -> None:
        try:
            datagram = decode_datagram(data)
            if datagram.kind == KIND_REQUEST:
                self._serve(datagram, address, len(data))
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

    def _serve(self, datagram: Datagram, address: Address, size: int) -> None:
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
        # Handlers run synchronously, one at a time: _sender sets the reply budget
        # for the request being served from its size and token.
        self._request_size = size
        self._reply_budget = min(DATAGRAM_BUDGET, AMPLIFICATION_LIMIT * size)
        try:
            reply = handler(address, args)
        except RemoteProtocolError as exc:
            raise remote_error(f"bad {name} request: {exc}") from None
        packed = encode_reply(datagram.message_id, reply)
        if len(packed) > self._reply_budget:
            # Handlers trim their replies; reaching this is a bug here, not the peer's.
            log.error(
                "not sending a %d-byte %s reply to %s:%d (budget %d)",
                len(packed),
                name,
                *address,
                self._reply_budget,
            )
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
        packed = encode_request(message_id, name, self._with_token(address, name, args))
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

    def _with_token(self, address: Address, name: str, args: list[object]) -> list[object]:
        """``args`` with the sender header completed: the token ``address`` gave us,
        or none and padding (lookups only) so that 3x our size covers the reply."""
        if not args or not isinstance(args[0], list) or len(args[0]) != 3:
            return args
        token = self.token_for(address)
        header: list[object] = [*args[0], token]
        if not token and name in {"find_node", "get_providers"}:
            unpadded = FRAME_HEADER_SIZE + len(pack([name, [[*header, b""], *args[1:]]]))
            # bin8 or bin16 headers: at most 2 bytes more than the padding itself.
            header.append(bytes(max(0, min(MAX_PADDING, PADDED_REQUEST_SIZE - unpadded - 2))))
        return [header, *args[1:]]

    def token_for(self, address: Address) -> bytes:
        """The token ``address`` gave us lately, or b"" (then it gets a padded request)."""
        held = self._tokens.get(address)
        if held is None or time.monotonic() - held[1] >= TOKEN_ROTATION:
            return b""
        return held[0]

    def learn_token(self, address: Address, token: bytes) -> None:
        if not token:
            return
        self._tokens[address] = (token, time.monotonic())
        self._tokens.move_to_end(address)
        while len(self._tokens) > TOKEN_MEMORY_SIZE:
            self._tokens.popitem(last=False)

    def issue_token(self, address: Address, epoch: int | None = None) -> bytes:
        """Our token for ``address`` in this time bucket (BEP 5's rotating secret)."""
        if epoch is None:
            epoch = int(time.monotonic() // TOKEN_ROTATION)
        return address_token(self._token_secret, address, epoch)

    def token_is_valid(self, address: Address, token: bytes) -> bool:
        """True for our token for ``address`` from this bucket or the previous one."""
        if len(token) != TOKEN_SIZE:
            return False
        epoch = int(time.monotonic() // TOKEN_ROTATION)
        return any(
            hmac.compare_digest(token, self.issue_token(address, e)) for e in (epoch, epoch - 1)
        )

    async def call_contact(self, contact: Contact, name: str, args: list[object]) -> Any:
        """``call`` to a known contact, counting its failures toward eviction."""
        reply = await self.call(contact.udp_address, name, args)
        if reply is None:
            self.note_failure(contact.node_id)
        else:
            self.note_success(contact.node_id)
            self.hooks.contact_answered(contact)
        return reply

    async def query(
        self, contact: Contact, key: bytes, with_providers: bool, limit: int
    ) -> FindReply | None:
        """One lookup step: find_node (or get_providers) to ``contact``, parsed;
        None if it did not answer or answered garbage."""
        address = contact.udp_address
        had_token = bool(self.token_for(address))
        reply = await self._query_once(contact, key, with_providers, limit)
        if reply is not None and reply.more and reply.token and not had_token:
            # Trimmed to 3x our unvalidated request: ask once more, now with the
            # token that proves we receive at this address, for the whole reply.
            reply = await self._query_once(contact, key, with_providers, limit) or reply
        return reply

    async def _query_once(
        self, contact: Contact, key: bytes, with_providers: bool, limit: int
    ) -> FindReply | None:
        if with_providers:
            raw = await self.call_contact(contact, "get_providers", [self.header, key, limit])
        else:
            raw = await self.call_contact(contact, "find_node", [self.header, key])
        if raw is None:
            return None
        try:
            reply = parse_find_reply(raw, with_providers)
        except RemoteProtocolError as exc:
            self.drop(contact.udp_address, f"bad reply: {exc}")
            return None
        self.learn_token(contact.udp_address, reply.token)
        return reply

    # --- handlers: each validates every argument, then answers synchronously -----------

    def _sender(self, address: Address, header: object) -> NodeId:
        items = expect_list(header, "sender header", limit=5)
        if len(items) < 3:
            raise remote_error(f"sender header must have 3 to 5 items, got {len(items)}")
        token = items[3] if len(items) > 3 else b""
        if not isinstance(token, bytes) or len(token) not in {0, TOKEN_SIZE}:
            raise remote_error(f"sender token must be empty or {TOKEN_SIZE} bytes")
        if len(items) > 4 and (not isinstance(items[4], bytes) or len(items[4]) > MAX_PADDING):
            raise remote_error(f"sender padding must be at most {MAX_PADDING} bytes")
        if token and self.token_is_valid(address, token):
            self._reply_budget = DATAGRAM_BUDGET  # the address proved it receives
        node_id = NodeId(expect_bytes(items[0], NODE_ID_SIZE, "sender node id"))
        flags = expect_int(items[2], 0, 255, "sender flags")
        client = bool(flags & FLAG_CLIENT)
        tcp_port = expect_int(items[1], 0 if client else 1, 65535, "sender TCP port")
        if not client and node_id != self.identity.node_id:
            self.hooks.sender_seen(node_id, tcp_port, address)
        return node_id

    def _serve_ping(self, address: Address, args: list[Any]) -> object:
        expect_list(args, "ping arguments", limit=3)
        if len(args) < 2:
            raise remote_error(f"ping arguments must have 2 or 3 items, got {len(args)}")
        nonce = args[1]
        if not isinstance(nonce, bytes) or not MIN_NONCE_SIZE <= len(nonce) <= MAX_NONCE_SIZE:
            raise remote_error(f"nonce must be {MIN_NONCE_SIZE} to {MAX_NONCE_SIZE} bytes")
        # A challenge names the address it was sent to; we sign it only if it is ours,
        # so a node relaying challenges cannot pass our proof off as its own address's.
        target = parse_ping_target(args[2]) if len(args) == 3 else None
        if target is not None and not self.owns_address(target):
            raise remote_error(f"ping for {target[0]}:{target[1]}, not this node's address")
        self._sender(address, args[0])
        flags = FLAG_CLIENT if self.client_mode else 0
        signature = self.identity.sign(
            ping_proof_message(nonce, self.identity.node_id, self.tcp_port, flags, target)
        )
        return [
            self.identity.node_id.digest,
            self.identity.public_key,
            self.tcp_port,
            flags,
            signature,
            [address[0], address[1]],
        ]

    def _serve_leave(self, address: Address, args: list[Any]) -> object:
        """A contact says it leaves: evict it at once (and presume it dead), so
        lookups stop waiting on it. Only a goodbye signed by the key the
        contact proved, recent, and sent from the address it names counts; the
        sender is never added as a contact by it."""
        expect_list(args, "leave arguments", exact=3)
        header = expect_list(args[0], "sender header", limit=5)
        if not header:
            raise remote_error("sender header is empty")
        node_id = NodeId(expect_bytes(header[0], NODE_ID_SIZE, "sender node id"))
        timestamp = expect_int(args[1], 0, MAX_EXPIRY, "leave time")
        signature = expect_bytes(args[2], SIGNATURE_SIZE, "leave signature")
        peer = self.router.get(node_id)
        if peer is None or peer.public_key is None:
            return [False]
        if (peer.contact.host, peer.contact.udp_port) != address:
            return [False]
        if abs(self.clock() - timestamp) > LEAVE_WINDOW:
            return [False]
        message = leave_message(node_id, address, timestamp)
        if not verify_signature(peer.public_key, message, signature):
            raise remote_error("leave signature does not verify")
        self.router.remove_contact(peer)
        self._remember_failures(node_id, self.failure_threshold)  # presumed dead
        self.counters.evictions += 1
        log.info("%s left the network", peer.contact)
        self.hooks.contact_evicted(node_id)
        return [True]

    def notify(self, address: Address, name: str, args: list[object]) -> None:
        """Send one request without waiting for its answer (a goodbye)."""
        if name not in REMOTE_PROCEDURES:
            raise LocalProtocolError(f"{name!r} is not a remote procedure")
        if self.transport is not None:
            self.transport.sendto(encode_request(os.urandom(20), name, args), address)
            self.counters.requests_sent += 1

    def owns_address(self, target: Address) -> bool:
        """True if ``target`` is this node's UDP address as far as it can tell: its
        bound port, and its bound host, or any host when bound to all of them
        (``own_hosts`` adds the advertised one, e.g. behind a port-preserving NAT)."""
        if self.transport is None:
            return False
        bound = normalize_address(self.transport.get_extra_info("sockname"))
        if target[1] != bound[1]:
            return False
        host = canonical_ip(bound[0]) or bound[0]
        return host in UNSPECIFIED_HOSTS or target[0] == host or target[0] in self.own_hosts

    def _serve_find_node(self, address: Address, args: list[Any]) -> object:
        expect_list(args, "find_node arguments", exact=2)
        key = expect_bytes(args[1], DHT_KEY_SIZE, "key")
        sender = self._sender(address, args[0])
        token = pack(self.issue_token(address))
        # Frame, the outer array, the token and the flag: the rest is for contacts.
        room = self._reply_budget - FRAME_HEADER_SIZE - 1 - len(token) - 1
        contacts, _size, trimmed = self._contacts_near(key, sender, room)
        return Encoded(array_header(3) + contacts + token + pack(trimmed))

    def _serve_get_providers(self, address: Address, args: list[Any]) -> object:
        expect_list(args, "get_providers arguments", exact=3)
        key = expect_bytes(args[1], DHT_KEY_SIZE, "key")
        limit = expect_int(args[2], 0, 1 << 16, "limit")
        sender = self._sender(address, args[0])
        budget = self._reply_budget
        token = pack(self.issue_token(address))
        contacts, contacts_size, trimmed = self._contacts_near(key, sender, budget // 2)
        records = self.providers.get(key, self.clock())
        total = len(records)
        # Frame, the outer array, two array headers, the total and the flag: under 32.
        room = budget - FRAME_HEADER_SIZE - contacts_size - len(token) - 32
        if len(records) > limit:
            # Different nodes then return different subsets, so a union over a
            # lookup covers more providers than any one reply can carry.
            records = random.sample(records, limit)
        chosen: list[object] = []
        used = 0
        for record in records:
            size = record.wire_size()
            if used + size > room or len(chosen) >= MAX_RECORDS_PER_MESSAGE:
                trimmed = trimmed or budget < DATAGRAM_BUDGET
                break
            chosen.append(record.to_wire())
            used += size
        return Encoded(
            array_header(5) + pack(chosen) + pack(total) + contacts + token + pack(trimmed)
        )

    def _serve_add_providers(self, address: Address, args: list[Any]) -> object:
        expect_list(args, "add_providers arguments", exact=2)
        items = expect_list(args[1], "records", limit=MAX_RECORDS_PER_MESSAGE)
        records = [ProviderRecord.from_wire(item) for item in items]
        self._sender(address, args[0])
        now = self.clock()
        max_ttl = self.config.provider_ttl + CLOCK_SKEW_ALLOWANCE
        accepted: list[bool] = []
        rightful: dict[bytes, bool] = {}
        for record in records:
            if self.providers.holds(record):
                accepted.append(not record.expired(now))
                continue
            if record.key not in rightful:
                rightful[record.key] = self.is_rightful_holder(record.key)
            if not rightful[record.key]:
                # A node keeps records only for keys it is a rightful holder of.
                self.drop(address, f"refused provider record {record!r}: key not near this node")
                accepted.append(False)
                continue
            problem = record.problem(now, max_ttl=max_ttl)
            if problem is not None:
                self.drop(address, f"refused provider record {record!r}: {problem}")
                accepted.append(False)
                continue
            accepted.append(self.providers.add(record, now))
        return accepted

    def is_rightful_holder(self, key: bytes) -> bool:
        """True if this node is among the k closest to ``key`` by its own view, with
        slack: fewer than ``provider_closeness_slack`` * k known contacts are closer.

        A publisher that looked up the k closest nodes, or a holder pushing records
        to a newcomer (section 2.5), sees nearly the same neighbourhood as we do;
        a node far from the key is not where anyone honest would put its records.
        """
        return self.is_among_closest(
            key, max(1, self.config.provider_closeness_slack) * self.config.ksize
        )

    def is_among_closest(self, key: bytes, rank: int) -> bool:
        """True if fewer than ``rank`` contacts of the routing table are closer to
        ``key`` than this node (so also when it knows fewer than ``rank`` at all)."""
        if self.router.size() < rank:
            return True  # asked per record and per chunk: no sort for a small network
        nearest = self.router.closest(key, rank)
        if len(nearest) < rank:
            return True
        return nearest[-1].contact.distance(key) > self.identity.node_id.distance(key)

    def _contacts_near(self, key: bytes, exclude: NodeId, budget: int) -> tuple[bytes, int, bool]:
        """The encoded array of the k contacts closest to ``key`` that fit in
        ``budget`` bytes, its length, and whether some did not fit."""
        peers = self.router.closest(key, self.config.ksize + 1)
        chosen: list[bytes] = []
        used = 3  # the largest array header needed
        trimmed = False
        for peer in peers:
            if peer.id == exclude.digest:
                continue
            if len(chosen) >= min(self.config.ksize, MAX_CONTACTS_PER_REPLY):
                break
            if used + len(peer.packed) > budget:
                trimmed = True
                break
            chosen.append(peer.packed)
            used += len(peer.packed)
        encoded = array_header(len(chosen)) + b"".join(chosen)
        return encoded, len(encoded), trimmed
