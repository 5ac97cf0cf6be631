"""What a store keeps for peers without being a rightful holder: guest budgets.

A *guest* is a chunk kept for a peer although this node is not one of its
rightful holders (the caller decides which, by its view of the DHT). This
module owns the accounting: bytes charged per peer identity, per peer
address and in all, and the budgets they are checked against. The store
(chunks.py) holds the lock and the index; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from dht_dfs.core.ids import ChunkId, NodeId

GUEST_MIN_CHARGE = 4096
"""Bytes a guest chunk counts for at least: a file system block and an index
row, so a budget filled with one-byte chunks is not a million files."""

_Key = TypeVar("_Key")


@dataclass(frozen=True, slots=True)
class Guest:
    """Who had this node keep a chunk it is not a rightful holder of."""

    peer: NodeId
    """The identity proven on the connection that sent the chunk."""
    host: str
    """That connection's IP address (many identities can share one)."""


def charge(size: int) -> int:
    """Bytes a guest chunk of ``size`` bytes counts for."""
    return max(size, GUEST_MIN_CHARGE)


@dataclass(slots=True)
class GuestBudget:
    """Bytes charged to guests, in all, per peer identity and per peer address."""

    per_peer: int
    """Bytes one identity, and one address, may have charged at most."""
    total_limit: int
    """Bytes all guests together may have charged at most."""
    total: int = 0
    count: int = 0
    by_peer: dict[bytes, int] = field(default_factory=dict)
    by_host: dict[str, int] = field(default_factory=dict)

    def add(self, guest: Guest, size: int, *, count: int = 0) -> None:
        """Charge a guest chunk of ``size`` bytes (``count``: once it is in the index)."""
        self._change(guest, charge(size), count)

    def refund(self, guest: Guest, size: int, *, count: int = 0) -> None:
        """Undo ``add``: the chunk is gone, promoted, or was never written."""
        self._change(guest, -charge(size), -count)

    def _change(self, guest: Guest, amount: int, count: int) -> None:
        self.total += amount
        self.count += count
        _add_to(self.by_peer, guest.peer.digest, amount)
        _add_to(self.by_host, guest.host, amount)

    def refusal(self, guest: Guest, chunk_id: ChunkId, size: int) -> str | None:
        """Why one more guest chunk of ``size`` bytes does not fit; None if it does."""
        amount = charge(size)
        if self.by_peer.get(guest.peer.digest, 0) + amount > self.per_peer:
            problem = f"peer {guest.peer} already has {self.per_peer} bytes of guest chunks here"
        elif self.by_host.get(guest.host, 0) + amount > self.per_peer:
            problem = f"address {guest.host} already has {self.per_peer} bytes of guest chunks here"
        elif self.total + amount > self.total_limit:
            problem = f"guest chunks fill their {self.total_limit} bytes here"
        else:
            return None
        return f"not a rightful holder of chunk {chunk_id} and no room for guests: {problem}"

    def over(self, guest: Guest | None = None) -> bool:
        """Over a budget: in all, or that guest's peer's or address's (any, without one)."""
        if self.total > self.total_limit:
            return True
        if guest is None:
            return any(v > self.per_peer for v in (*self.by_peer.values(), *self.by_host.values()))
        return (
            self.by_peer.get(guest.peer.digest, 0) > self.per_peer
            or self.by_host.get(guest.host, 0) > self.per_peer
        )


def _add_to(table: dict[_Key, int], key: _Key, amount: int) -> None:
    left = table.get(key, 0) + amount
    if left > 0:
        table[key] = left
    else:
        table.pop(key, None)


__all__ = ["GUEST_MIN_CHARGE", "Guest", "GuestBudget", "charge"]
