"""Kademlia's iterative node lookup (paper section 2.3) as a pure state machine.

Owns which contact to ask next, when a query counts as slow, when the lookup
is over, and what it found: the contacts and provider records the replies
carry, validated. It sends nothing and reads no clock: the caller passes
``now`` (any monotonic clock, in seconds) to every method, sends the queries
``next_queries`` returns, and feeds back each outcome with ``on_reply`` or
``on_failure``; between events it waits until ``next_timer()`` at most
(aioquic's ``handle_timer(now)`` style). ``DhtNode._lookup`` is that glue.

The rules, without rounds:

* at most ``alpha`` queries are in flight, not counting slow ones; each reply
  or failure immediately frees a slot for the closest candidate not yet asked;
* a query unanswered for ``slow_after`` seconds is SLOW: it frees its slot
  and leaves the window of the k closest candidates, but its reply is still
  used if it comes (section 2.3, "nodes that fail to respond quickly are
  removed from consideration until and unless they do respond");
* the lookup is finished when the k closest candidates neither failed nor
  slow have all answered (with fewer than k, once no slow query is pending
  either), when ``want`` providers are known, when nothing is in flight
  (every candidate asked, or the MAX_LOOKUP_QUERIES budget spent), or at the
  deadline;
* contacts the owner presumes dead are never candidates, at most
  MAX_LOOKUP_CANDIDATES are kept, and every provider record is checked
  (key, signature, expiry) before it counts.

Must not import: asyncio, socket, kademlia, or ``dht`` modules that do I/O
(protocol, membership, announce, node).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from dht_dfs.core.errors import LocalProtocolError, RemoteProtocolError
from dht_dfs.core.ids import NodeId
from dht_dfs.dht.values import Contact, FindReply, LookupResult, LookupStats, ProviderRecord

MAX_LOOKUP_QUERIES: Final = 256
"""Queries one lookup may send at most, whatever the network answers."""
MAX_LOOKUP_CANDIDATES: Final = 1024
"""Contacts one lookup keeps track of at most; later ones are ignored."""
SLOW_REPLY_FRACTION: Final = 0.25
"""A query unanswered after this fraction of dht_rpc_timeout stops holding one
of the alpha slots (paper section 2.3: "nodes that fail to respond quickly are
removed from consideration until and unless they do respond")."""
MAX_LOOKUP_STEPS: Final = 3 * MAX_LOOKUP_QUERIES + 2
"""Bound on a driver's loop: each step sends, completes or slows at least one
query, or the lookup is finished."""


class CandidateState(enum.Enum):
    """Where one contact stands in a lookup."""

    NEW = "new"
    """Met, not asked yet."""
    ASKED = "asked"
    """A query is in flight and holds one of the alpha slots."""
    SLOW = "slow"
    """A query is in flight but took too long: it holds no slot."""
    ANSWERED = "answered"
    FAILED = "failed"
    """No reply in time, or a malformed one."""


@dataclass(slots=True)
class Candidate:
    """One contact a lookup met (mutable: its state moves on)."""

    contact: Contact
    distance: int
    """XOR distance from the contact's id to the key."""
    hops: int
    """1 for contacts from the routing table, one more than the replier's otherwise."""
    state: CandidateState = CandidateState.NEW
    asked_at: float = 0.0
    """``now`` when the query was sent."""


def _never_dead(_node_id: NodeId) -> bool:
    return False


class Lookup:
    """One iterative lookup of ``key``; see the module docstring for the rules."""

    def __init__(
        self,
        key: bytes,
        *,
        own_id: NodeId,
        ksize: int,
        alpha: int,
        want: int | None,
        slow_after: float,
        timeout: float,
        now: float,
        record_time: float,
        max_record_ttl: float,
        seeds: Iterable[Contact] = (),
        known_records: Iterable[ProviderRecord] = (),
        presumed_dead: Callable[[NodeId], bool] = _never_dead,
    ) -> None:
        """Start at ``now``.

        ``seeds`` are the routing table's closest contacts (hop 1);
        ``known_records`` the caller's own, already verified, records for the key;
        ``record_time`` the unix time records from replies are checked against
        (with ``max_record_ttl`` as the longest remaining lifetime accepted);
        ``presumed_dead`` says which contacts to leave out.
        """
        self.key = key
        self.own_id = own_id
        self.ksize = ksize
        self.alpha = max(1, alpha)
        self.want = want
        self.slow_after = slow_after
        self.started = now
        self.deadline = now + timeout
        self.record_time = record_time
        self.max_record_ttl = max_record_ttl
        self._presumed_dead = presumed_dead
        self._target = int.from_bytes(key, "big")
        self._candidates: dict[NodeId, Candidate] = {}
        self._in_flight: dict[NodeId, Candidate] = {}
        """Candidates ASKED or SLOW: sent, neither answered nor failed yet."""
        self._seen: set[bytes] = {own_id.digest}
        """Node ids met so far, as bytes, to skip contacts a reply repeats unparsed."""
        self._found: dict[NodeId, ProviderRecord] = {}
        self.messages = 0
        self.answered = 0
        self.failed = 0
        self.hops = 0
        self.timed_out = False
        """True once ``finished`` ended the lookup at its deadline."""
        for contact in seeds:
            self._consider(contact, 1)
        for record in known_records:
            self._found[record.node_id] = record

    # --- the driver's interface -----------------------------------------------------

    def next_queries(self, now: float) -> list[Contact]:
        """The contacts to query now (each is then in flight until fed back)."""
        if self._want_met():
            return []
        self.handle_timer(now)
        active = sum(1 for c in self._in_flight.values() if c.state is CandidateState.ASKED)
        queries: list[Contact] = []
        for candidate in self._window():
            if active >= self.alpha or self.messages >= MAX_LOOKUP_QUERIES:
                break
            if candidate.state is CandidateState.NEW:
                candidate.state, candidate.asked_at = CandidateState.ASKED, now
                self._in_flight[candidate.contact.node_id] = candidate
                self.messages += 1
                active += 1
                queries.append(candidate.contact)
        return queries

    def on_reply(self, node_id: NodeId, reply: FindReply, now: float) -> list[str]:
        """Merge a (shape-checked) reply; returns why parts of it were refused.

        A SLOW query's reply is used like any other: its contact is ANSWERED and
        back in the window. The reasons are for the caller to log against the
        replier (``DhtProtocol.drop``).
        """
        candidate = self._complete(node_id)
        candidate.state = CandidateState.ANSWERED
        self.answered += 1
        self.hops = max(self.hops, candidate.hops)
        return self._absorb(candidate, reply)

    def on_failure(self, node_id: NodeId, now: float) -> None:
        """The query to ``node_id`` timed out or its reply was malformed.

        ``now`` is taken for symmetry with ``on_reply``; neither rule depends on it.
        """
        self._complete(node_id).state = CandidateState.FAILED
        self.failed += 1

    def handle_timer(self, now: float) -> None:
        """Mark queries unanswered for ``slow_after`` seconds as SLOW."""
        for candidate in self._in_flight.values():
            # The very sum next_timer returns: with ``now - asked_at`` instead,
            # rounding could leave a query ASKED at its own timer, and a driver
            # with exact time (a simulation) would spin.
            if (
                candidate.state is CandidateState.ASKED
                and now >= candidate.asked_at + self.slow_after
            ):
                candidate.state = CandidateState.SLOW

    def next_timer(self) -> float:
        """When something changes without a reply: a query turns slow, or the deadline."""
        next_slow = min(
            (
                c.asked_at + self.slow_after
                for c in self._in_flight.values()
                if c.state is CandidateState.ASKED
            ),
            default=self.deadline,
        )
        return min(self.deadline, next_slow)

    def finished(self, now: float) -> bool:
        """True when the lookup should stop (call after sending ``next_queries``)."""
        if self._want_met():
            return True
        self.handle_timer(now)
        window = self._window()
        slow_pending = any(c.state is CandidateState.SLOW for c in self._in_flight.values())
        if all(c.state is CandidateState.ANSWERED for c in window) and (
            len(window) >= self.ksize or not slow_pending
        ):
            return True
        if not self._in_flight:
            return True
        if now >= self.deadline:
            self.timed_out = True
            return True
        return False

    def state_of(self, node_id: NodeId) -> CandidateState | None:
        """The candidate's state, or None if it is not one."""
        candidate = self._candidates.get(node_id)
        return None if candidate is None else candidate.state

    def in_flight(self) -> list[Contact]:
        """Contacts queried and not yet fed back (ASKED or SLOW)."""
        return [c.contact for c in self._in_flight.values()]

    def result(self, now: float) -> LookupResult:
        """What the lookup found: answered contacts and records, closest first."""
        closest = sorted(
            (c for c in self._candidates.values() if c.state is CandidateState.ANSWERED),
            key=lambda c: c.distance,
        )
        providers = sorted(self._found.values(), key=lambda r: r.node_id.as_int ^ self._target)
        stats = LookupStats(
            hops=self.hops,
            messages=self.messages,
            answered=self.answered,
            failed=self.failed,
            seconds=now - self.started,
            timed_out=self.timed_out,
        )
        return LookupResult(self.key, tuple(providers), tuple(c.contact for c in closest), stats)

    # --- internals -----------------------------------------------------------------------

    def _want_met(self) -> bool:
        return self.want is not None and len(self._found) >= self.want

    def _window(self) -> list[Candidate]:
        """The k closest candidates that neither failed nor are slow."""
        return sorted(
            (
                c
                for c in self._candidates.values()
                if c.state not in (CandidateState.FAILED, CandidateState.SLOW)
            ),
            key=lambda c: c.distance,
        )[: self.ksize]

    def _complete(self, node_id: NodeId) -> Candidate:
        candidate = self._in_flight.pop(node_id, None)
        if candidate is None:
            raise LocalProtocolError(f"no query to {node_id} is in flight")
        return candidate

    def _consider(self, contact: Contact, hops: int) -> None:
        node_id = contact.node_id
        self._seen.add(node_id.digest)
        if node_id == self.own_id or node_id in self._candidates:
            return
        if self._presumed_dead(node_id):
            return
        if len(self._candidates) < MAX_LOOKUP_CANDIDATES:
            self._candidates[node_id] = Candidate(contact, node_id.as_int ^ self._target, hops)

    def _absorb(self, candidate: Candidate, reply: FindReply) -> list[str]:
        problems: list[str] = []
        for item in reply.contact_items:
            # Most of a reply is contacts already met: skip those before parsing.
            # The id must be bytes before it is looked up: a list is unhashable.
            if (
                isinstance(item, list)
                and item
                and isinstance(item[0], bytes)
                and item[0] in self._seen
            ):
                continue
            try:
                contact = Contact.from_wire(item)
            except RemoteProtocolError as exc:
                problems.append(f"bad contact in reply: {exc}")
                continue
            self._consider(contact, candidate.hops + 1)
        for record in reply.records:
            held = self._found.get(record.node_id)
            if record.key != self.key or (held is not None and held.expiry >= record.expiry):
                continue
            problem = record.problem(self.record_time, max_ttl=self.max_record_ttl)
            if problem is None:
                self._found[record.node_id] = record
            else:
                problems.append(f"bad record in reply: {problem}")
        return problems
