"""What a node keeps alive: its pins, and the local catalogue of what it published.

A pin is a root (a file or a tree) whose chunks' leases this node renews
(``transfer.leases``) every ``Config.lease_renewal_interval``; unpinned,
its chunks go once their leases run out, on every holder. Everything the
node publishes is pinned, so the catalogue is also the list of what was
published here: a lost reference can be found again with ``dhtfs pins``.

The catalogue is ``pins.sqlite`` in the data dir (mode 0600: it holds read
references, which are secrets). Pinning by a root hash alone works too
(the chunks need no key to be renewed); such a pin has no name.

Blocking (SQLite): async callers run these methods in a thread. Thread-safe.

Must not import: node.py, control.py, session.py, the CLI.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dht_dfs.core.errors import StoreError
from dht_dfs.core.ids import ChunkId
from dht_dfs.core.refs import ReadReference, RootHash, parse_read_reference, parse_root_hash

PINS_FILE = "pins.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pins (
    root BLOB PRIMARY KEY,
    reference TEXT,
    name TEXT,
    kind TEXT,
    size INTEGER,
    origin TEXT NOT NULL,
    pinned_at REAL NOT NULL,
    renewed_at REAL,
    chunks INTEGER,
    stored_bytes INTEGER,
    leased INTEGER,
    unleased INTEGER,
    min_holders INTEGER,
    error TEXT
) WITHOUT ROWID;
"""

_COLUMNS = (
    "root, reference, name, kind, size, origin, pinned_at, renewed_at, chunks, "
    "stored_bytes, leased, unleased, min_holders, error"
)


@dataclass(frozen=True, slots=True)
class Pin:
    """One root this node keeps alive, and what its last renewal found."""

    root: RootHash
    reference: ReadReference | None
    """None when pinned by the root hash alone."""
    name: str | None
    kind: str | None
    """"file" or "directory", when known (a read reference tells)."""
    size: int | None
    """Plaintext bytes (a tree: of all its files), when known."""
    origin: str
    """"published" (by this node) or "pinned" (``dhtfs pin``)."""
    pinned_at: float
    renewed_at: float | None = None
    chunks: int | None = None
    stored_bytes: int | None = None
    """Ciphertext bytes of all its chunks, each counted once (from the last renewal)."""
    leased: int | None = None
    """Chunks at least one holder renewed the lease of, at the last renewal."""
    unleased: int | None = None
    """Chunks no holder said it holds, at the last renewal."""
    min_holders: int | None = None
    error: str | None = None
    """Why the last renewal failed, if it did."""

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "reference": None if self.reference is None else str(self.reference),
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "origin": self.origin,
            "pinned_at": self.pinned_at,
            "renewed_at": self.renewed_at,
            "chunks": self.chunks,
            "stored_bytes": self.stored_bytes,
            "leased": self.leased,
            "unleased": self.unleased,
            "min_holders": self.min_holders,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Pin:
        reference = document.get("reference")
        return cls(
            root=parse_root_hash(str(document["root"])),
            reference=None if reference is None else parse_read_reference(str(reference)),
            name=_text_or_none(document.get("name")),
            kind=_text_or_none(document.get("kind")),
            size=_int_or_none(document.get("size")),
            origin=str(document["origin"]),
            pinned_at=float(document["pinned_at"]),
            renewed_at=_float_or_none(document.get("renewed_at")),
            chunks=_int_or_none(document.get("chunks")),
            stored_bytes=_int_or_none(document.get("stored_bytes")),
            leased=_int_or_none(document.get("leased")),
            unleased=_int_or_none(document.get("unleased")),
            min_holders=_int_or_none(document.get("min_holders")),
            error=_text_or_none(document.get("error")),
        )


@dataclass(frozen=True, slots=True)
class PinList:
    """``dhtfs pins``: every pin of the node, newest first, and its lease schedule."""

    pins: tuple[Pin, ...]
    lease_ttl: float
    renewal_interval: float

    def to_json(self) -> dict[str, Any]:
        return {
            "pins": [pin.to_json() for pin in self.pins],
            "lease_ttl": self.lease_ttl,
            "renewal_interval": self.renewal_interval,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> PinList:
        return cls(
            tuple(Pin.from_json(pin) for pin in document["pins"]),
            float(document["lease_ttl"]),
            float(document["renewal_interval"]),
        )


@dataclass(frozen=True, slots=True)
class Unpinned:
    """``dhtfs unpin``: the pin removed, and when its chunks may go at the latest."""

    pin: Pin
    expires_by: float
    """Its chunks' leases from this node run out by then (plus the holders' grace)."""

    def to_json(self) -> dict[str, Any]:
        return {"unpinned": self.pin.to_json(), "expires_by": self.expires_by}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Unpinned:
        return cls(Pin.from_json(document["unpinned"]), float(document["expires_by"]))


class PinCatalogue:
    """The pins of one node, in ``pins.sqlite`` in its data dir."""

    def __init__(self, data_dir: Path) -> None:
        path = Path(data_dir) / PINS_FILE
        # Created 0600 before SQLite opens it: it holds read references.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, pin: Pin) -> Pin:
        """Pin a root; a root pinned already keeps its date and gains what ``pin`` knows
        more (a read reference, a name). Returns the pin as kept."""
        with self._lock:
            old = self._get_locked(pin.root)
            if old is not None:
                pin = replace(
                    old,
                    origin="published" if "published" in (old.origin, pin.origin) else old.origin,
                    reference=old.reference or pin.reference,
                    name=old.name or pin.name,
                    kind=old.kind or pin.kind,
                    size=old.size if old.size is not None else pin.size,
                )
            self._db.execute(
                f"INSERT OR REPLACE INTO pins ({_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _row(pin),
            )
        return pin

    def remove(self, root: RootHash) -> Pin | None:
        """Unpin; the pin removed, or None if the root was not pinned."""
        with self._lock:
            pin = self._get_locked(root)
            if pin is not None:
                self._db.execute("DELETE FROM pins WHERE root = ?", (root.root.digest,))
        return pin

    def get(self, root: RootHash) -> Pin | None:
        with self._lock:
            return self._get_locked(root)

    def all(self) -> list[Pin]:
        """Every pin, newest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM pins ORDER BY pinned_at DESC"
            ).fetchall()
        return [_pin(row) for row in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM pins").fetchone()[0])

    def renewed(self, root: RootHash, **found: Any) -> None:
        """Record a renewal's outcome (``renewed_at``, ``chunks``, ``error``...)."""
        with self._lock:
            pin = self._get_locked(root)
            if pin is None:
                return  # unpinned while it was being renewed
            self._db.execute(
                f"INSERT OR REPLACE INTO pins ({_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _row(replace(pin, **found)),
            )

    def _get_locked(self, root: RootHash) -> Pin | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM pins WHERE root = ?", (root.root.digest,)
        ).fetchone()
        return None if row is None else _pin(row)


def _row(pin: Pin) -> tuple[Any, ...]:
    return (
        pin.root.root.digest,
        None if pin.reference is None else str(pin.reference),
        pin.name,
        pin.kind,
        pin.size,
        pin.origin,
        pin.pinned_at,
        pin.renewed_at,
        pin.chunks,
        pin.stored_bytes,
        pin.leased,
        pin.unleased,
        pin.min_holders,
        pin.error,
    )


def _pin(row: tuple[Any, ...]) -> Pin:
    try:
        root = RootHash(ChunkId(bytes(row[0])))
        reference = None if row[1] is None else parse_read_reference(str(row[1]))
    except ValueError as error:
        raise StoreError(f"the pin catalogue holds a bad entry: {error}") from None
    name, kind, size, origin, pinned_at, renewed_at, chunks, stored, leased, unleased = row[2:12]
    return Pin(
        root,
        reference,
        name,
        kind,
        size,
        origin,
        float(pinned_at),
        renewed_at,
        chunks,
        stored,
        leased,
        unleased,
        row[12],
        row[13],
    )


def new_pin(
    root: RootHash,
    *,
    reference: ReadReference | None,
    origin: str,
    name: str | None = None,
    kind: str | None = None,
    size: int | None = None,
) -> Pin:
    return Pin(root, reference, name, kind, size, origin, time.time())


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


__all__ = ["PINS_FILE", "Pin", "PinCatalogue", "PinList", "Unpinned", "new_pin"]
