"""The provider records a node holds for others: a bounded, expiring store.

Pure: no I/O, no clock of its own (``now`` is passed in). Records are
verified before they get here (by ``protocol`` for records sent to us, by
``announce`` for our own); this module only keeps them, within the caps of
DESIGN property 14.

Must not import: asyncio, kademlia, or any ``dht`` module but ``values``.
"""

from __future__ import annotations

import heapq

from dht_dfs.core.ids import NodeId
from dht_dfs.dht.values import ProviderRecord


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
        self._by_provider: dict[NodeId, set[bytes]] = {}
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
        self._by_provider.setdefault(record.node_id, set()).add(record.key)
        self._count += 1
        self._push(record)
        return True

    def remove(self, key: bytes, node_id: NodeId) -> bool:
        return self._remove(key, node_id)

    def remove_provider(self, node_id: NodeId) -> int:
        """Drop every record of one provider (it is gone); returns how many."""
        keys = self._by_provider.get(node_id, set()).copy()
        return sum(self._remove(key, node_id) for key in keys)

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
        provided = self._by_provider.get(node_id)
        if provided is not None:
            provided.discard(key)
            if not provided:
                del self._by_provider[node_id]
        return True
