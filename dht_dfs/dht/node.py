"""The DHT node: the facade the node engine uses, wiring the DHT's parts.

Owns the lifecycle (bind, background tasks, stop), bootstrap and joining
(paper section 2.3), and the public API (lookups, provider records,
announcements, contacts). The work itself is in the modules it wires:
``compat`` (kademlia's Server, routing table and protocol base; the list of
library fixes is in its docstring), ``protocol`` (our RPCs), ``lookup`` (the
pure lookup machine) and ``driver`` (its asyncio driver), ``membership``
(identity proofs), ``records`` (records held for others), ``announce``
(placing records), ``contacts`` (the saved contact list), ``values`` and
``codec`` (what crosses the wire).

Joining follows section 2.3 of the paper: a lookup of our own id, then one
per distance level farther than our closest neighbour, so that every holder
of records we should now hold hears of us and pushes them (section 2.5).

Must not import: kademlia or rpcudp (only ``compat`` does); store, wire,
transport, transfer, node packages. It knows nothing of chunk bytes, the
chunk store or TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from dht_dfs.core.config import Config
from dht_dfs.core.crypto import Identity
from dht_dfs.core.errors import LocalProtocolError, NetworkError
from dht_dfs.core.ids import NODE_ID_SIZE, NodeId
from dht_dfs.dht.announce import Announcer, run_pass
from dht_dfs.dht.compat import DhtPeer, DhtServer
from dht_dfs.dht.contacts import MAX_SAVED_CONTACTS, load_contacts, save_contacts
from dht_dfs.dht.driver import drive_lookup
from dht_dfs.dht.lookup import SLOW_REPLY_FRACTION, Lookup
from dht_dfs.dht.membership import Membership
from dht_dfs.dht.protocol import DhtProtocol
from dht_dfs.dht.records import ProviderStore
from dht_dfs.dht.values import (
    CLOCK_SKEW_ALLOWANCE,
    UNSPECIFIED_HOSTS,
    Address,
    Contact,
    LookupResult,
    LookupStats,
    NodeCounters,
    ProviderRecord,
    check_key,
    is_ip_literal,
    leave_message,
    normalize_address,
    parse_address,
)

log = logging.getLogger(__name__)

__all__ = [
    "Address",
    "Contact",
    "DhtNode",
    "LookupResult",
    "LookupStats",
    "NodeCounters",
    "ProviderRecord",
    "parse_address",
]


MAINTENANCE_INTERVAL: Final = 60.0
STATE_SAVE_INTERVAL: Final = 60.0
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
        self._bound_host = "127.0.0.1"
        self._port = 0
        self._server: DhtServer | None = None
        self._protocol: DhtProtocol | None = None
        self._stopping = False
        self.providers = ProviderStore(
            config.max_providers_per_key,
            config.max_provider_records,
            max_per_provider=config.max_provider_records_per_provider,
            max_per_host=config.max_provider_records_per_host,
        )
        self.counters = NodeCounters()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._transient: set[asyncio.Task[Any]] = set()
        """Short tasks (identity checks, head pings) that ``settled`` waits for."""
        self._activity = asyncio.Event()
        self._membership = Membership(identity.node_id, self.counters, self)
        self._announcer = Announcer(
            self,
            own_id=identity.node_id,
            config=config,
            providers=self.providers,
            counters=self.counters,
            activity=self._activity,
            client_mode=client_mode,
            provided_keys=provided_keys,
            clock=clock,
        )
        self._saved_contacts: list[Contact] = []
        self.reannounced = self._announcer.reannounced
        """Set after each re-announcement pass (tests and status wait on it)."""

    # --- lifecycle ------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind the UDP socket (port 0: any free port) and start background work."""
        if self._server is not None:
            raise LocalProtocolError("this DHT node was already started")
        server = DhtServer(self.identity.node_id, self.config, self._make_protocol)
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
        if self._advertise_host:
            self.protocol.own_hosts.add(self._advertise_host)
        self._saved_contacts = load_contacts(self.state_path)
        self._spawn(self._maintenance_loop(), "dht-maintenance")
        if not self.client_mode:
            self._spawn(self._announcer.welcome_loop(), "dht-welcome")
            if self._announcer.reannounces:
                self._spawn(self._announcer.reannounce_loop(), "dht-reannounce")
        log.info("DHT node %s listening on UDP %s:%d", self.identity.node_id, host, self._port)

    async def stop(self, *, goodbye: bool = False) -> None:
        """Cancel every task, save the contact list, close the socket.

        ``goodbye``: first tell every contact this node leaves (a signed
        notice they act on at once, so their lookups stop waiting on it).
        """
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
        if goodbye and not self.client_mode:
            self._say_goodbye(protocol)
        self._server.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(protocol.closed.wait(), timeout=2.0)

    def _say_goodbye(self, protocol: DhtProtocol) -> None:
        """One signed ``leave`` datagram to each contact, not waited for: a contact
        that misses it evicts this node after the usual failed requests."""
        if protocol.transport is None:
            return
        own = self.contact
        timestamp = int(self.clock())
        # The address contacts know this node by: a goodbye names it, so it
        # counts only when it comes from there.
        message = leave_message(own.node_id, (own.host, own.udp_port), timestamp)
        signature = self.identity.sign(message)
        for contact in self.known_contacts():
            protocol.notify(
                (contact.host, contact.udp_port), "leave", [protocol.header, timestamp, signature]
            )

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
    def stopping(self) -> bool:
        """True once ``stop`` began."""
        return self._stopping

    @property
    def port(self) -> int:
        """The bound UDP port."""
        return self._port

    @property
    def advertised_host(self) -> str:
        if self._advertise_host:
            return self._advertise_host
        observed = self._membership.observed_host()
        if observed is not None and self._bound_host in UNSPECIFIED_HOSTS:
            return observed
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

    def spawn_transient(self, coro: typing.Coroutine[Any, Any, None], name: str) -> None:
        """Run a short task this node owns and ``settled`` waits for."""
        self._spawn(coro, name, transient=True)

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
        return bool(self._transient) or self._announcer.busy()

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

    def is_rightful_for(self, key: bytes, rank: int) -> bool:
        """Whether fewer than ``rank`` known contacts are closer to ``key`` than this
        node (or it knows fewer than ``rank``): its own view of being a holder.

        False before the node started: a node that knows nothing takes nothing."""
        if self._protocol is None:
            return False
        return self._protocol.is_among_closest(key, rank)

    # ProtocolHooks: forwarded to the part that owns each concern.

    def sender_seen(self, node_id: NodeId, tcp_port: int, address: Address) -> None:
        self._membership.sender_seen(node_id, tcp_port, address)

    def contact_answered(self, contact: Contact) -> None:
        self._membership.contact_answered(contact)

    def bucket_full(self, head: DhtPeer) -> None:
        self._membership.bucket_full(head)

    def contact_evicted(self, node_id: NodeId) -> None:
        # The node stopped answering: the records it signed point at nothing
        # now. If it comes back it re-announces (a restarted node does so at
        # once), so forgetting them costs nothing but saves every fetcher a
        # dead end.
        dropped = self.providers.remove_provider(node_id)
        if dropped:
            log.info("forgot %d provider record(s) of departed node %s", dropped, node_id)

    def contact_welcomed(self, contact: Contact) -> None:
        self._announcer.welcome(contact)

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
            proofs = await asyncio.gather(
                *(self._membership.limited_challenge(a) for a in resolved)
            )
            answered = [p for p in proofs if p is not None]
            for proof in answered:
                await self._membership.admit(proof)
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

    def _save_state(self) -> None:
        if self._protocol is None:
            return
        contacts = self.known_contacts()[:MAX_SAVED_CONTACTS]
        save_contacts(self.state_path, self.identity.node_id, contacts)

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
        """A ``lookup.Lookup`` machine (its docstring has the rules), driven over UDP."""
        protocol = self.protocol
        loop = asyncio.get_running_loop()
        started = loop.time()
        k = self.config.ksize
        record_time = self.clock()
        limit = want if want is not None else self.config.max_providers_per_key
        self.counters.lookups += 1
        machine = Lookup(
            key,
            own_id=self.identity.node_id,
            ksize=k,
            alpha=self.config.alpha,
            want=want,
            slow_after=self.config.dht_rpc_timeout * SLOW_REPLY_FRACTION,
            timeout=self.config.dht_lookup_timeout,
            now=started,
            record_time=record_time,
            max_record_ttl=self.config.provider_ttl + CLOCK_SKEW_ALLOWANCE,
            seeds=[peer.contact for peer in protocol.router.closest(key, k)],
            known_records=self.providers.get(key, record_time) if with_providers else (),
            presumed_dead=protocol.presumed_dead,
        )
        result = await drive_lookup(
            machine, protocol, with_providers=with_providers, limit=limit, adopt=self._adopt
        )
        self.counters.lookup_seconds.observe(loop.time() - started)
        return result

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

    def hold_own_record(self, record: ProviderRecord) -> None:
        """Keep this node's own fresh record where it would keep anyone's (among the
        key's k closest): a publisher then need not send a storer its own receipt."""
        if record.node_id == self.identity.node_id and self.protocol.is_rightful_holder(record.key):
            self.providers.add(record, self.clock())

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
        return await self._announcer.announce(keys)

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
        return await self._announcer.put_records(records, closest)

    async def reannounce(self) -> int:
        """Announce every key ``provided_keys`` yields again; returns how many.

        The keys are read in a worker thread, a batch at a time, so a large
        store never stalls the event loop.
        """
        return await self._announcer.reannounce()

    # --- background work ------------------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        # Runs for the node's lifetime (stop() cancels it).
        last_save = time.monotonic()
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            await run_pass("maintenance", self._maintain)
            if time.monotonic() - last_save >= STATE_SAVE_INTERVAL:
                self._save_state()
                last_save = time.monotonic()

    async def _maintain(self) -> None:
        expired = self.providers.expire(self.clock())
        if expired:
            log.debug("expired %d provider records", expired)
        # Section 2.3: refresh buckets that saw no lookup for an hour.
        for key in self.protocol.router.refresh_ids():
            await self._lookup(key, want=None, with_providers=False)
