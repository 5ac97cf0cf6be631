"""The provider records a node holds for others: a bounded, expiring store.

Pure: no I/O, no clock of its own (``now`` is passed in). Records are
verified before they get here (by ``protocol`` for records sent to us, by
``announce`` for our own); this module only keeps them, within caps per key,
per provider, per host and in all (every resource has an owner and a bound).

Must not import: asyncio, kademlia, or any ``dht`` module but ``values``.
"""

from __future__ import annotations

import heapq

from dht_dfs.core.ids import NodeId
from dht_dfs.dht.values import ProviderRecord


class ProviderStore:
    """The provider records this node holds for others, bounded and expiring.

    Caps: ``max_per_key`` records per key, ``max_total`` in all,
    ``max_per_provider`` per provider (node id) and ``max_per_host`` per
    provider host (the host the record points fetchers at), so that one
    identity, or many identities behind one address, cannot take the store.

    Eviction cannot be won by a long expiry nor by volume: when a cap is
    reached a newcomer may only push out a record of the provider holding the
    most records (among the key's providers for the per-key cap, among all for
    the total), and only if that provider would still hold at least as many
    as the newcomer's provider does after the swap (max-min fairness). A
    provider or host at its own cap is refused: it never evicts anyone.
    Expiry only decides which records are dropped as void. Records are
    verified before they get here; this class only keeps them.
    """

    def __init__(
        self,
        max_per_key: int,
        max_total: int,
        max_per_provider: int | None = None,
        max_per_host: int | None = None,
    ) -> None:
        # No per-provider or per-host cap (None) means only the total one binds.
        max_per_provider = max_total if max_per_provider is None else max_per_provider
        max_per_host = max_total + 1 if max_per_host is None else max_per_host
        if min(max_per_key, max_total, max_per_provider, max_per_host) < 1:
            raise ValueError("provider store limits must be positive")
        self.max_per_key = max_per_key
        self.max_total = max_total
        self.max_per_provider = max_per_provider
        self.max_per_host = max_per_host
        self._by_key: dict[bytes, dict[NodeId, ProviderRecord]] = {}
        self._by_provider: dict[NodeId, set[bytes]] = {}
        self._per_host: dict[str, int] = {}
        # Providers by how many records they hold, and the largest such count:
        # finds the heaviest provider in O(1) (the LFU cache's bucket structure).
        self._providers_by_count: dict[int, set[NodeId]] = {}
        self._max_count = 0
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

    def held_by(self, node_id: NodeId) -> int:
        """How many records of provider ``node_id`` are held."""
        return len(self._by_provider.get(node_id, ()))

    def held_for_host(self, host: str) -> int:
        """How many held records point at ``host``."""
        return self._per_host.get(host, 0)

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
            if held.host != record.host and self.held_for_host(record.host) >= self.max_per_host:
                return False
            # A renewal of the provider's own record: no count changes but the host's.
            self._count_host(held.host, -1)
            self._count_host(record.host, +1)
            per_key[record.node_id] = record
            self._push(record)
            return True
        if self._count >= self.max_total:
            self.expire(now)
        weight = self.held_by(record.node_id) + 1  # the provider's count with this record
        if weight > self.max_per_provider or self.held_for_host(record.host) >= self.max_per_host:
            return False
        if len(per_key) >= self.max_per_key:
            victim = self._victim_for_key(per_key, weight, now)
            if victim is None:
                return False
            self._remove(victim.key, victim.node_id)
        if self._count >= self.max_total:
            victim = self._heaviest_record(weight)
            if victim is None:
                return False
            self._remove(victim.key, victim.node_id)
        self._by_key.setdefault(record.key, {})[record.node_id] = record
        self._by_provider.setdefault(record.node_id, set()).add(record.key)
        self._recount(record.node_id, weight - 1, weight)
        self._count_host(record.host, +1)
        self._count += 1
        self._push(record)
        return True

    def _victim_for_key(
        self, per_key: dict[NodeId, ProviderRecord], weight: int, now: float
    ) -> ProviderRecord | None:
        """The record of a full key that may give way to a newcomer of ``weight``."""
        expired = [r for r in per_key.values() if r.expired(now)]
        if expired:
            return expired[0]
        heaviest = max(per_key.values(), key=lambda r: self.held_by(r.node_id))
        return heaviest if self.held_by(heaviest.node_id) > weight else None

    def _heaviest_record(self, weight: int) -> ProviderRecord | None:
        """A record of the provider holding the most, if it holds more than ``weight``."""
        if self._max_count <= weight:
            return None
        node_id = next(iter(self._providers_by_count[self._max_count]))
        # Any of its records: they are all that provider's own.
        key = next(iter(self._by_provider[node_id]))
        return self._by_key[key][node_id]

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
        record = None if per_key is None else per_key.pop(node_id, None)
        if per_key is None or record is None:
            return False
        self._count -= 1
        self._count_host(record.host, -1)
        if not per_key:
            del self._by_key[key]
        provided = self._by_provider.get(node_id)
        if provided is not None:
            provided.discard(key)
            self._recount(node_id, len(provided) + 1, len(provided))
            if not provided:
                del self._by_provider[node_id]
        return True

    def _count_host(self, host: str, change: int) -> None:
        count = self._per_host.get(host, 0) + change
        if count > 0:
            self._per_host[host] = count
        else:
            self._per_host.pop(host, None)

    def _recount(self, node_id: NodeId, old: int, new: int) -> None:
        """Move a provider from the ``old`` count bucket to the ``new`` one."""
        if old:
            holders = self._providers_by_count[old]
            holders.discard(node_id)
            if not holders:
                del self._providers_by_count[old]
        if new:
            self._providers_by_count.setdefault(new, set()).add(node_id)
        self._max_count = max(self._max_count, new)
        # Bounded by the old maximum: counts move by one record at a time.
        while self._max_count and self._max_count not in self._providers_by_count:
            self._max_count -= 1
