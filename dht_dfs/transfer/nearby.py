"""The nodes closest to a key, from recent lookups: ``Neighbourhoods``.

Publishing a file of n chunks asked the DHT n times for the nodes closest
to each chunk's id, and each iterative lookup costs several UDP round trips
and work on every node it visits. One lookup can answer for many keys.

A lookup for key ``K`` returns the k live nodes closest to ``K``: every node
within ``r`` (the distance of the k-th) of ``K`` is in it. For another key
``K'``, take the ``count`` nodes of that answer closest to ``K'``; let ``r'``
be the distance of the last of them. XOR distance obeys the triangle
inequality (``a ^ c <= (a ^ b) + (b ^ c)``), so any node within ``r'`` of
``K'`` is within ``r' + d(K, K')`` of ``K``. When that is at most ``r``, no
node closer to ``K'`` can have been missed, and the answer is exact without
a lookup. A lookup that found fewer than k nodes saw the whole network:
its answer serves every key. In a network of a few dozen nodes one lookup
serves a whole publish; in a large one, keys near each other share.

Lookups started while nothing is kept yet are waited for before another
starts (a publish starts its first chunks together). Answers are kept for
``ttl`` seconds, so nodes that joined since are seen
soon. A node found unreachable is dropped from every answer at once: the
rest are still every live node of the region. A stale answer can only name
a node that has since gone, which placement and fetch step past anyway.

Must not import: dht (except ``dht.values``), transport, node.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dht_dfs.core.ids import NodeId
from dht_dfs.dht.values import Contact, LookupResult

DEFAULT_TTL = 30.0
"""Seconds a lookup's answer is reused."""
MAX_ANSWERS = 64
"""Answers kept (least recently useful out)."""


class Finder(Protocol):
    """The part of ``ports.Locator`` used here (imported there, so named apart)."""

    @property
    def contact(self) -> Contact: ...

    async def lookup(self, key: bytes) -> LookupResult: ...


@dataclass
class _Answer:
    key: int
    contacts: list[Contact]
    radius: float | int
    """Every live node within this distance of ``key`` is in ``contacts`` (inf: the network)."""
    expires: float


class Neighbourhoods:
    """Closest-node answers for many keys from few lookups (see the module docstring)."""

    def __init__(
        self,
        locator: Finder,
        ksize: int,
        *,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._locator = locator
        self._ksize = ksize
        self._ttl = ttl
        self._clock = clock
        self._answers: OrderedDict[int, _Answer] = OrderedDict()
        self._in_flight: set[asyncio.Future[LookupResult]] = set()
        self.lookups = 0
        """Lookups made (a lookup serves every key its answer covers)."""
        self.served = 0
        """Keys answered from a kept answer."""

    def peek(self, key: bytes, count: int, *, include_self: bool = True) -> list[Contact] | None:
        """The ``count`` live nodes closest to ``key`` if a kept answer proves them, else None."""
        target = int.from_bytes(key, "big")
        now = self._clock()
        for answer_key, answer in list(self._answers.items()):
            if answer.expires <= now:
                del self._answers[answer_key]
                continue
            found = self._from(answer, target, count, include_self)
            if found is not None:
                self._answers.move_to_end(answer_key)
                self.served += 1
                return found
        return None

    async def closest(self, key: bytes, count: int, *, include_self: bool = True) -> list[Contact]:
        """The ``count`` live nodes closest to ``key``, closest first: kept or looked up."""
        found = self.peek(key, count, include_self=include_self)
        if found is not None:
            return found
        if self._in_flight and not self._answers:
            # Nothing kept yet and lookups under way (the first chunks of a
            # publish start together): one of them may answer for this key.
            await asyncio.wait(list(self._in_flight))
            found = self.peek(key, count, include_self=include_self)
            if found is not None:
                return found
        lookup = asyncio.ensure_future(self._locator.lookup(key))
        self._in_flight.add(lookup)
        try:
            result = await lookup
        finally:
            self._in_flight.discard(lookup)
        self.lookups += 1
        self.learn(result)
        contacts = list(result.closest)
        target = int.from_bytes(key, "big")
        own = self._locator.contact
        if include_self and own.node_id not in {c.node_id for c in contacts}:
            contacts.append(own)
        contacts.sort(key=lambda c: c.node_id.as_int ^ target)
        return contacts[:count]

    def learn(self, result: LookupResult) -> None:
        """Keep a lookup's answer, unless it found nobody, a query of it failed or
        its deadline cut it short."""
        closest = result.closest
        if not closest or result.stats.timed_out or result.stats.failed:
            # Partial (a deadline, or nodes that did not answer and may be alive
            # but slow) or empty: true for its own key, not proof for others.
            return
        target = int.from_bytes(result.key, "big")
        radius: float | int = float("inf")
        if len(closest) >= self._ksize:
            radius = closest[self._ksize - 1].node_id.as_int ^ target
        self._answers[target] = _Answer(target, list(closest), radius, self._clock() + self._ttl)
        self._answers.move_to_end(target)
        while len(self._answers) > MAX_ANSWERS:
            self._answers.popitem(last=False)

    def forget(self, node_id: NodeId) -> None:
        """Drop a node found unreachable from every kept answer."""
        for answer in self._answers.values():
            answer.contacts = [c for c in answer.contacts if c.node_id != node_id]

    def _from(
        self, answer: _Answer, target: int, count: int, include_self: bool
    ) -> list[Contact] | None:
        gap = answer.key ^ target
        if gap > answer.radius:
            return None  # reach + gap <= radius cannot hold: no sort needed to know
        own = self._locator.contact
        contacts = [c for c in answer.contacts if c.node_id != own.node_id]
        if include_self:
            contacts.append(own)
        contacts.sort(key=lambda c: c.node_id.as_int ^ target)
        chosen = contacts[:count]
        if len(chosen) < count:
            # Too few for ``count`` is only the whole truth if the answer was the network.
            return chosen if answer.radius == float("inf") else None
        if not chosen:
            return chosen
        reach = chosen[-1].node_id.as_int ^ target
        if reach + gap <= answer.radius:
            return chosen
        return None


__all__ = ["DEFAULT_TTL", "Finder", "Neighbourhoods"]
