"""The iterative lookup state machine, driven by a simulated network: no
sockets, no event loop, time passed in.

``run`` plays the asyncio driver's part (send what ``next_queries`` asks
for, advance to the first reply or the machine's next timer, feed outcomes
back) against a network of scripted nodes, so every timing is exact.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pytest

from dht_dfs.core.crypto import Identity
from dht_dfs.core.errors import LocalProtocolError
from dht_dfs.core.ids import NodeId
from dht_dfs.dht.lookup import (
    MAX_LOOKUP_CANDIDATES,
    MAX_LOOKUP_QUERIES,
    MAX_LOOKUP_STEPS,
    CandidateState,
    Lookup,
)
from dht_dfs.dht.values import Contact, FindReply, LookupResult, ProviderRecord

KEY = bytes(20)
"""The key looked up: a node's distance to it is its id as an integer."""
NOW = 1_700_000_000.0
"""Unix time records are checked against."""
RPC_TIMEOUT = 0.5
SLOW_AFTER = RPC_TIMEOUT * 0.25
K = 8
ALPHA = 3
TIMEOUT = 10.0
OWN = NodeId((2**160 - 1).to_bytes(20, "big"))
"""The looking node: farthest from the key of all."""

Respond = Callable[[Contact], tuple[float, FindReply | None]]
"""A node's behaviour: (delay, reply), or (delay, None) for a failure at that time."""


def contact(distance: int) -> Contact:
    """A contact at this XOR distance from KEY (its id is the distance)."""
    index = distance % (1 << 24)
    host = f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}"
    return Contact(NodeId(distance.to_bytes(20, "big")), host, 4000, 4000)


def reply(contacts: Iterable[Contact] = (), records: Sequence[ProviderRecord] = ()) -> FindReply:
    return FindReply([c.to_wire() for c in contacts], list(records))


def silent(_contact: Contact) -> tuple[float, FindReply | None]:
    """A node that never answers: its query times out."""
    return RPC_TIMEOUT, None


def make_lookup(
    seeds: Iterable[Contact],
    *,
    want: int | None = None,
    alpha: int = ALPHA,
    known_records: Iterable[ProviderRecord] = (),
    presumed_dead: Callable[[NodeId], bool] | None = None,
) -> Lookup:
    extra = {} if presumed_dead is None else {"presumed_dead": presumed_dead}
    return Lookup(
        KEY,
        own_id=OWN,
        ksize=K,
        alpha=alpha,
        want=want,
        slow_after=SLOW_AFTER,
        timeout=TIMEOUT,
        now=0.0,
        record_time=NOW,
        max_record_ttl=3600.0 + 300.0,
        seeds=seeds,
        known_records=known_records,
        **extra,
    )


@dataclass
class Run:
    result: LookupResult
    queries: list[tuple[float, Contact]]
    """(time sent, contact), in order."""
    problems: list[str]
    ended_at: float

    def asked(self) -> list[Contact]:
        return [c for _t, c in self.queries]


def run(machine: Lookup, respond: Respond) -> Run:
    """Drive ``machine`` to its end as DhtNode._lookup does, in simulated time."""
    now = 0.0
    events: list[tuple[float, int, NodeId, FindReply | None]] = []
    order = itertools.count()
    queries: list[tuple[float, Contact]] = []
    problems: list[str] = []
    for _ in range(MAX_LOOKUP_STEPS):
        for target in machine.next_queries(now):
            queries.append((now, target))
            delay, answer = respond(target)
            heapq.heappush(events, (now + delay, next(order), target.node_id, answer))
        if machine.finished(now):
            return Run(machine.result(now), queries, problems, now)
        next_event = events[0][0] if events else float("inf")
        now = max(now, min(next_event, machine.next_timer()))
        while events and events[0][0] <= now:
            _at, _order, node_id, answer = heapq.heappop(events)
            if answer is None:
                machine.on_failure(node_id, now)
            else:
                problems.extend(machine.on_reply(node_id, answer, now))
    raise AssertionError("the lookup did not finish within MAX_LOOKUP_STEPS")


class Network:
    """Scripted nodes by id; a contact nobody scripted never answers."""

    def __init__(self) -> None:
        self.nodes: dict[NodeId, Respond] = {}

    def add(self, node: Contact, respond: Respond) -> None:
        self.nodes[node.node_id] = respond

    def __call__(self, target: Contact) -> tuple[float, FindReply | None]:
        return self.nodes.get(target.node_id, silent)(target)


def ranked_network(
    count: int, seed: int, *, dead: float = 0.0
) -> tuple[Network, list[Contact], set[NodeId]]:
    """``count`` honest nodes by rank (0 is closest to KEY), and the dead ones.

    A node of rank r knows the 8 ranks around r // 2, so each hop halves the
    rank, as Kademlia's buckets do: a lookup from far away takes several hops.
    """
    rng = random.Random(seed)
    distances = sorted({rng.randrange(2**150, 2**159) for _ in range(count)})
    ranked = [contact(d) for d in distances]
    dead_ids = {c.node_id for c in ranked[K:] if rng.random() < dead}
    network = Network()
    for rank, node in enumerate(ranked):
        low = max(0, rank // 2 - 4)
        known = [c for c in ranked[low : low + K + 1] if c != node][:K]
        delay = 0.01 + (rank % 5) * 0.004
        if node.node_id in dead_ids:
            network.add(node, silent)
        else:
            network.add(node, lambda _c, known=known, delay=delay: (delay, reply(known)))
    return network, ranked, dead_ids


def signed(identity: Identity, ttl: float = 3600.0) -> ProviderRecord:
    return ProviderRecord.create(identity, KEY, "10.9.0.1", 4000, ttl, NOW)


# --- convergence -----------------------------------------------------------------------


def test_lookup_from_far_away_finds_the_k_closest_over_several_hops() -> None:
    network, ranked, _dead = ranked_network(300, seed=1)
    outcome = run(make_lookup(ranked[200:208]), network)
    assert list(outcome.result.closest[:K]) == ranked[:K]
    assert outcome.result.stats.hops >= 4
    assert not outcome.result.stats.timed_out
    assert outcome.result.stats.failed == 0


def test_nodes_that_never_answer_are_left_out_and_the_closest_live_ones_found() -> None:
    network, ranked, dead = ranked_network(300, seed=2, dead=0.3)
    outcome = run(make_lookup(ranked[200:208]), network)
    live = [c for c in ranked if c.node_id not in dead]
    assert dead & {c.node_id for c in outcome.asked()}  # some were on the way
    assert dead & {c.node_id for c in outcome.result.closest} == set()
    assert list(outcome.result.closest[:K]) == live[:K]
    assert not outcome.result.stats.timed_out


# --- slow and lost replies ------------------------------------------------------------------


def test_slow_node_frees_its_slot_and_its_late_reply_is_still_merged() -> None:
    closest, slow, fast = contact(1), contact(10), contact(20)
    network = Network()
    network.add(slow, lambda _c: (0.3, reply([closest])))  # slow, but well before the timeout
    network.add(fast, lambda _c: (0.01, reply()))
    network.add(closest, lambda _c: (0.01, reply()))
    outcome = run(make_lookup([slow, fast], alpha=1), network)
    # With one slot, the fast node is asked the moment the slow one turns slow,
    # not when it answers; the contact only the slow node knew is asked on its reply.
    assert outcome.queries == [(0.0, slow), (SLOW_AFTER, fast), (0.3, closest)]
    assert list(outcome.result.closest) == [closest, slow, fast]


def test_lookup_waits_for_a_slow_node_while_it_has_fewer_than_k_answers() -> None:
    slow, fast = contact(10), contact(20)
    network = Network()
    network.add(slow, lambda _c: (0.4, reply()))
    network.add(fast, lambda _c: (0.01, reply()))
    outcome = run(make_lookup([slow, fast]), network)
    assert outcome.ended_at == pytest.approx(0.4)
    assert list(outcome.result.closest) == [slow, fast]


def test_a_failed_query_hands_its_slot_to_the_next_candidate_at_once() -> None:
    broken, next_one = contact(10), contact(20)
    network = Network()
    network.add(broken, lambda _c: (0.01, None))  # e.g. a malformed reply
    network.add(next_one, lambda _c: (0.01, reply()))
    outcome = run(make_lookup([broken, next_one], alpha=1), network)
    assert outcome.queries == [(0.0, broken), (0.01, next_one)]
    assert list(outcome.result.closest) == [next_one]
    assert outcome.result.stats.failed == 1


def test_a_lost_reply_first_turns_slow_then_fails_and_the_contact_is_left_out() -> None:
    lost, other = contact(10), contact(20)
    network = Network()
    network.add(lost, silent)
    network.add(other, lambda _c: (0.01, reply()))
    machine = make_lookup([lost, other], alpha=1)
    assert machine.next_queries(0.0) == [lost]
    assert machine.next_timer() == SLOW_AFTER
    machine.handle_timer(SLOW_AFTER)
    assert machine.state_of(lost.node_id) is CandidateState.SLOW
    assert machine.next_queries(SLOW_AFTER) == [other]
    machine.on_reply(other.node_id, reply(), SLOW_AFTER + 0.01)
    assert not machine.finished(SLOW_AFTER + 0.01)  # fewer than k, a slow query pending
    machine.on_failure(lost.node_id, RPC_TIMEOUT)
    assert machine.finished(RPC_TIMEOUT)
    assert list(machine.result(RPC_TIMEOUT).closest) == [other]


def test_feeding_back_a_query_that_is_not_in_flight_is_our_bug() -> None:
    machine = make_lookup([contact(10)])
    with pytest.raises(LocalProtocolError):
        machine.on_failure(contact(10).node_id, 0.0)


# --- lying nodes and bounds ---------------------------------------------------------------


def test_fabricated_close_contacts_that_never_answer_do_not_hide_the_true_closest() -> None:
    network, ranked, _dead = ranked_network(300, seed=3)
    liar = ranked[200]
    rng = random.Random(4)
    fabricated = [contact(rng.randrange(1, 2**140)) for _ in range(60)]  # closer than all
    network.add(liar, lambda _c: (0.01, reply(fabricated)))
    outcome = run(make_lookup(ranked[200:208]), network)
    assert list(outcome.result.closest[:K]) == ranked[:K]
    assert not {c.node_id for c in fabricated} & {c.node_id for c in outcome.result.closest}
    assert outcome.result.stats.messages <= MAX_LOOKUP_QUERIES
    assert not outcome.result.stats.timed_out


def test_an_endless_chain_of_ever_closer_sybils_is_cut_by_the_query_budget() -> None:
    network, ranked, _dead = ranked_network(50, seed=5)
    rng = random.Random(6)
    sybils: set[NodeId] = set()
    frontier = [2**150]  # honest nodes are all farther

    def sybil(_c: Contact) -> tuple[float, FindReply | None]:
        # Every answer names fresh nodes, each closer than anything named before
        # (few enough that MAX_LOOKUP_CANDIDATES is not what stops them).
        low = frontier[0] * 15 // 16
        fresh = [contact(rng.randrange(low, frontier[0])) for _ in range(3)]
        frontier[0] = low
        for node in fresh:
            sybils.add(node.node_id)
            network.add(node, sybil)
        return 0.01, reply(fresh)

    network.add(ranked[40], sybil)
    outcome = run(make_lookup(ranked[40:48]), network)
    assert outcome.result.stats.messages == MAX_LOOKUP_QUERIES
    assert len({c.node_id for c in outcome.asked()}) == MAX_LOOKUP_QUERIES
    assert len(sybils) > MAX_LOOKUP_QUERIES  # it would have gone on


def test_candidates_are_capped() -> None:
    many = [contact(d) for d in range(1, MAX_LOOKUP_CANDIDATES + 200)]
    machine = make_lookup(many)
    tracked = [c for c in many if machine.state_of(c.node_id) is not None]
    assert len(tracked) == MAX_LOOKUP_CANDIDATES


def test_contacts_presumed_dead_and_this_node_itself_are_never_asked() -> None:
    dead, alive = contact(5), contact(10)
    network = Network()
    network.add(alive, lambda _c: (0.01, reply([dead, contact(OWN.as_int)])))
    machine = make_lookup([dead, alive], presumed_dead=lambda node_id: node_id == dead.node_id)
    outcome = run(machine, network)
    assert outcome.asked() == [alive]


def test_a_malformed_contact_is_refused_with_a_reason_and_the_rest_used() -> None:
    good, replier = contact(3), contact(10)
    network = Network()
    bad_items: list[object] = [
        [b"short", "10.0.0.1", 1, 1],
        [[1], "10.0.0.1", 1, 1],  # an unhashable id
        "not a contact",
    ]
    network.add(replier, lambda _c: (0.01, FindReply([*bad_items, good.to_wire()], [])))
    network.add(good, lambda _c: (0.01, reply()))
    outcome = run(make_lookup([replier]), network)
    assert outcome.asked() == [replier, good]
    assert len(outcome.problems) == len(bad_items)
    assert all(p.startswith("bad contact in reply: ") for p in outcome.problems)


# --- providers ----------------------------------------------------------------------------


def provider_network(providers: int) -> tuple[Network, list[Contact], list[ProviderRecord]]:
    """A ranked network whose ``providers`` closest nodes each hold one record."""
    network, ranked, _dead = ranked_network(300, seed=7)
    records = [signed(Identity.generate()) for _ in range(providers)]
    for rank, record in enumerate(records):
        low = max(0, rank // 2 - 4)
        known = [c for c in ranked[low : low + K + 1] if c != ranked[rank]][:K]
        network.add(
            ranked[rank], lambda _c, known=known, record=record: (0.01, reply(known, [record]))
        )
    return network, ranked, records


def test_lookup_stops_once_want_providers_are_known() -> None:
    network, ranked, records = provider_network(8)
    full = run(make_lookup(ranked[200:208]), network)
    early = run(make_lookup(ranked[200:208], want=2), network)
    assert {r.node_id for r in full.result.providers} == {r.node_id for r in records}
    assert len(early.result.providers) >= 2
    assert early.result.stats.messages < full.result.stats.messages
    assert not early.result.stats.timed_out


def test_records_already_held_can_end_the_lookup_before_any_query() -> None:
    held = signed(Identity.generate())
    outcome = run(make_lookup([contact(10)], want=1, known_records=[held]), Network())
    assert outcome.queries == []
    assert outcome.result.providers == (held,)


def test_forged_records_do_not_count_toward_want() -> None:
    network, ranked, _records = provider_network(3)
    genuine = signed(Identity.generate())
    forged = dataclasses.replace(genuine, tcp_port=genuine.tcp_port + 1)  # signature now wrong
    expired = signed(Identity.generate(), ttl=1.0)
    wrong_key = dataclasses.replace(signed(Identity.generate()), key=bytes([1]) * 20)
    first = ranked[200]
    network.add(first, lambda _c: (0.001, reply(ranked[96:104], [forged, expired, wrong_key])))
    early = run(make_lookup(ranked[200:208], want=1), network)
    assert len(early.result.providers) >= 1
    assert all(r.verify(NOW) and r.key == KEY for r in early.result.providers)
    assert early.result.stats.messages > 1  # the forged reply did not end it
    assert "bad record in reply: bad signature" in early.problems


def test_expired_record_is_refused() -> None:
    replier = contact(10)
    stale = ProviderRecord.create(Identity.generate(), KEY, "10.9.0.1", 4000, 10.0, NOW - 20.0)
    network = Network()
    network.add(replier, lambda _c: (0.01, reply([], [stale])))
    outcome = run(make_lookup([replier], want=1), network)
    assert outcome.result.providers == ()
    assert outcome.problems == ["bad record in reply: expired"]


# --- the deadline -----------------------------------------------------------------------------


def test_deadline_ends_a_lookup_whose_nodes_all_crawl() -> None:
    network, ranked, _dead = ranked_network(300, seed=8)
    crawling = Network()
    for node_id, respond in network.nodes.items():
        crawling.nodes[node_id] = lambda c, respond=respond: (TIMEOUT * 3, respond(c)[1])
    outcome = run(make_lookup(ranked[:K]), crawling)
    assert outcome.result.stats.timed_out
    assert outcome.ended_at == TIMEOUT
    assert outcome.result.stats.seconds == TIMEOUT
    assert outcome.result.closest == ()
