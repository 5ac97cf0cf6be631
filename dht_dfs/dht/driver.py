"""The asyncio driver of the lookup state machine: the only part of a lookup
that waits.

Owns the query tasks of one lookup: it sends what ``Lookup.next_queries``
asks for through the protocol, waits for the first reply or the machine's
next timer, feeds each outcome back, and on the way out hands slow queries
to their owner (so a dead contact's timeout still counts toward eviction)
and cancels the rest.

Must not import: kademlia (only ``compat`` does), ``membership``,
``announce`` or ``node``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from dht_dfs.dht.lookup import MAX_LOOKUP_STEPS, CandidateState, Lookup
from dht_dfs.dht.protocol import DhtProtocol
from dht_dfs.dht.values import Contact, FindReply, LookupResult


async def drive_lookup(
    machine: Lookup,
    protocol: DhtProtocol,
    *,
    with_providers: bool,
    limit: int,
    adopt: Callable[[asyncio.Task[Any]], None],
) -> LookupResult:
    """Run ``machine`` to its end over ``protocol``; its result.

    Queries are get_providers (asking for up to ``limit`` records) if
    ``with_providers``, else find_node. ``adopt`` takes ownership of the
    queries still slow when the lookup ends normally.
    """
    loop = asyncio.get_running_loop()
    in_flight: dict[asyncio.Task[FindReply | None], Contact] = {}
    ended = False
    try:
        for _ in range(MAX_LOOKUP_STEPS):
            now = loop.time()
            for contact in machine.next_queries(now):
                query = protocol.query(contact, machine.key, with_providers, limit)
                in_flight[loop.create_task(query)] = contact
            if machine.finished(now):
                break
            done, _pending = await asyncio.wait(
                in_flight,
                timeout=max(0.0, machine.next_timer() - now),
                return_when=asyncio.FIRST_COMPLETED,
            )
            now = loop.time()
            for task in done:
                contact = in_flight.pop(task)
                reply = task.result()
                if reply is None:
                    machine.on_failure(contact.node_id, now)
                    continue
                for problem in machine.on_reply(contact.node_id, reply, now):
                    protocol.drop(contact.udp_address, problem)
        ended = True
    finally:
        # After a normal end, slow queries run on, owned by the node, so that a
        # dead contact's timeout still counts toward its eviction; the others
        # stop here, and all of them if the lookup itself failed or was cancelled.
        cancelled = []
        for task, contact in in_flight.items():
            if ended and machine.state_of(contact.node_id) is CandidateState.SLOW:
                adopt(task)
            else:
                task.cancel()
                cancelled.append(task)
        if cancelled:
            # asyncio.wait never raises the tasks' CancelledError, and a new
            # cancellation of this task still interrupts it.
            await asyncio.wait(cancelled)
    return machine.result(loop.time())
