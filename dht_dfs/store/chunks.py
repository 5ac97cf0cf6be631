"""A node's on-disk chunk store: content-addressed, crash-safe, with a quota.

Layout under the store directory::

    chunks/ab/abcdef…(64 hex)   one file per chunk, holding exactly its
                                stored bytes; fan-out by the first byte
    tmp/                        chunks being written; emptied at open
    meta.sqlite                 index: size, when added, when last verified,
                                until when it is leased, and for a guest
                                chunk who had it kept (identity, address)

The chunk files are the truth; the SQLite index is rebuilt from them where
they disagree (at open). A chunk is hashed before it is kept, written under
a temporary name, fsynced, renamed into place, and its directory fsynced,
so a node killed at any instant holds only whole, verified chunks.

Guest chunks (guests.py: kept for a peer without this node being a
rightful holder) are bounded per peer identity, per peer address and in
all; they are the first to go when a rightful chunk needs room, and the
index remembers them across restarts (stores from before guests existed
hold no guests).

Leases: each chunk has a ``lease_until`` time, the latest expiry any
publisher, pinner or repair gave it (``put``, ``lease``); ``collect`` drops
the chunks whose lease ran out before a given time. Chunks from before
leases existed, and files found without an index row, get a full lease
when the store opens, so an upgrade or a crash never makes them collectable.

Blocking by nature (file I/O, SQLite): async callers run these methods in a
thread. Methods are thread-safe.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dht_dfs.core.config import Config
from dht_dfs.core.errors import (
    ChunkNotFoundError,
    GuestRefusedError,
    IntegrityError,
    StoreError,
    StoreFullError,
)
from dht_dfs.core.ids import CHUNK_ID_SIZE, ChunkId, NodeId
from dht_dfs.store.files import write_durably
from dht_dfs.store.guests import Guest, GuestBudget
from dht_dfs.store.scrub import ScrubReport, scrub

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id BLOB PRIMARY KEY,
    size INTEGER NOT NULL,
    added REAL NOT NULL,
    verified REAL NOT NULL,
    guest_of BLOB,
    guest_host TEXT,
    lease_until REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_verified ON chunks (verified);
"""

_MIGRATIONS = (
    # Stores from before guests: every chunk in them was taken as rightful,
    # which is what NULL says.
    ("guest_of", "ALTER TABLE chunks ADD COLUMN guest_of BLOB"),
    ("guest_host", "ALTER TABLE chunks ADD COLUMN guest_host TEXT"),
    # Stores from before leases: NULL is filled with a full lease at open.
    ("lease_until", "ALTER TABLE chunks ADD COLUMN lease_until REAL"),
)

_INDEXES = (
    "CREATE INDEX IF NOT EXISTS guests_by_added ON chunks (added) WHERE guest_of IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS chunks_by_lease ON chunks (lease_until)",
)

_DEFAULTS = Config()

_COLLECT_BATCH = 256
"""Chunks a collection drops per hold of the lock."""

_HEX = frozenset("0123456789abcdef")


class PutOutcome(enum.Enum):
    STORED = "stored"
    ALREADY_HAD = "already-had"


@dataclass(frozen=True, slots=True)
class StoreStats:
    chunks: int
    bytes_used: int
    quota: int | None
    """None when only the disk limits the store."""
    guests: int = 0
    """Of ``chunks``, those kept as guests."""
    guest_bytes: int = 0
    """Bytes charged to guests (each counts at least ``guests.GUEST_MIN_CHARGE``)."""
    disk_free: int = 0
    """Bytes free for this store's user on the disk under it."""
    full: bool = False
    """A chunk of the default size would be refused (quota or free-disk floor)."""


class ChunkStore:
    """Content-addressed chunk files with an SQLite index."""

    def __init__(
        self,
        root: Path,
        *,
        quota: int | None = None,
        fsync: bool = True,
        guest_bytes_per_peer: int = _DEFAULTS.guest_bytes_per_peer,
        max_guest_bytes: int = _DEFAULTS.max_guest_bytes,
        min_free_disk: int = _DEFAULTS.min_free_disk,
        min_free_disk_fraction: float = _DEFAULTS.min_free_disk_fraction,
        lease_ttl: float = _DEFAULTS.lease_ttl,
    ) -> None:
        """``lease_ttl``: the lease of a chunk put without one, or found unleased at open."""
        self.root = Path(root)
        self.lease_ttl = lease_ttl
        self.quota = quota
        self._min_free_disk = min_free_disk
        self._min_free_disk_fraction = min_free_disk_fraction
        self._free_floor = 0
        self._guests = GuestBudget(guest_bytes_per_peer, max_guest_bytes)
        self._fsync = fsync
        self._chunks_dir = self.root / "chunks"
        self._fans: set[Path] = set()
        """Fan-out directories known to exist (made once, never removed)."""
        self._tmp_dir = self.root / "tmp"
        self._lock = threading.Lock()
        self._reserved = 0
        self._used = 0
        self._count = 0
        self._tmp_counter = 0
        self._db: sqlite3.Connection | None = None

    # --- lifecycle -------------------------------------------------------------------

    def open(self) -> ChunkStore:
        """Create or reopen the store; clean leftovers; reconcile the index."""
        for directory in (self.root, self._chunks_dir, self._tmp_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        removed = 0
        for leftover in self._tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.info("store: removed %d unfinished chunk file(s) left by a crash", removed)
        db = sqlite3.connect(
            self.root / "meta.sqlite", check_same_thread=False, isolation_level=None
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(chunks)")}
        for column, statement in _MIGRATIONS:
            if column not in columns:
                db.execute(statement)
        for statement in _INDEXES:
            db.execute(statement)
        self._db = db
        disk = os.statvfs(self.root)
        self._free_floor = min(
            self._min_free_disk,
            int(self._min_free_disk_fraction * disk.f_blocks * disk.f_frsize),
        )
        self._reconcile()
        self._load_guest_usage()
        return self

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> ChunkStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("chunk store is not open")
        return self._db

    def _reconcile(self) -> None:
        on_disk: dict[bytes, int] = {}
        for fan in self._chunks_dir.iterdir():
            if not fan.is_dir():
                continue
            for path in fan.iterdir():
                name = path.name
                if len(name) != CHUNK_ID_SIZE * 2 or not set(name) <= _HEX or name[:2] != fan.name:
                    log.warning("store: ignoring stray file %s", path)
                    continue
                on_disk[bytes.fromhex(name)] = path.stat().st_size
        with self._lock:
            indexed = {row[0]: row[1] for row in self.db.execute("SELECT id, size FROM chunks")}
            gone = [key for key in indexed if key not in on_disk]
            new = [(key, size) for key, size in on_disk.items() if indexed.get(key) != size]
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM chunks WHERE id = ?", [(key,) for key in gone])
            # Files the index did not know (a crash between rename and insert)
            # get verified = 0, so the scrub looks at them first. A row whose
            # size is wrong keeps whether it is a guest.
            now = time.time()
            self.db.executemany(
                "INSERT INTO chunks (id, size, added, verified, lease_until) "
                "VALUES (?, ?, ?, 0, ?) "
                "ON CONFLICT (id) DO UPDATE SET size = excluded.size, verified = 0",
                [(key, size, now, now + self.lease_ttl) for key, size in new],
            )
            self.db.execute(
                "UPDATE chunks SET lease_until = ? WHERE lease_until IS NULL",
                (now + self.lease_ttl,),
            )
            self.db.execute("COMMIT")
            self._count = len(on_disk)
            self._used = sum(on_disk.values())
        if gone or new:
            log.info("store: index reconciled (%d dropped, %d added)", len(gone), len(new))

    def _load_guest_usage(self) -> None:
        with self._lock:
            rows = self.db.execute(
                "SELECT guest_of, guest_host, size FROM chunks WHERE guest_of IS NOT NULL"
            ).fetchall()
            self._guests = GuestBudget(self._guests.per_peer, self._guests.total_limit)
            for peer, host, size in rows:
                self._guests.add(Guest(NodeId(peer), host or ""), size, count=1)

    # --- paths ------------------------------------------------------------------------

    def path_of(self, chunk_id: ChunkId) -> Path:
        name = chunk_id.hex()
        return self._chunks_dir / name[:2] / name

    # --- queries ----------------------------------------------------------------------

    def has(self, chunk_id: ChunkId) -> bool:
        return self._row(chunk_id, "1") is not None

    def __contains__(self, chunk_id: object) -> bool:
        return isinstance(chunk_id, ChunkId) and self.has(chunk_id)

    def _select_locked(self, chunk_ids: list[ChunkId], where: str = "") -> set[bytes]:
        """Those of ``chunk_ids`` in the index (and matching ``where AND``), as digests."""
        found: set[bytes] = set()
        for start in range(0, len(chunk_ids), 500):
            batch = [c.digest for c in chunk_ids[start : start + 500]]
            marks = ",".join("?" * len(batch))
            query = f"SELECT id FROM chunks WHERE {where}id IN ({marks})"
            found.update(row[0] for row in self.db.execute(query, batch))
        return found

    def have_which(self, chunk_ids: list[ChunkId]) -> list[bool]:
        """For each id, whether this store holds it (one index query)."""
        with self._lock:
            held = self._select_locked(chunk_ids)
        return [c.digest in held for c in chunk_ids]

    def stats(self) -> StoreStats:
        disk = os.statvfs(self.root)
        with self._lock:
            return StoreStats(
                self._count,
                self._used,
                self.quota,
                self._guests.count,
                self._guests.total,
                disk_free=disk.f_bavail * disk.f_frsize,
                full=self._shortfall_locked(_DEFAULTS.chunk_size) > 0,
            )

    def is_guest(self, chunk_id: ChunkId) -> bool:
        row = self._row(chunk_id, "guest_of")
        return row is not None and row[0] is not None

    def guests_among(self, chunk_ids: list[ChunkId]) -> set[ChunkId]:
        """Those of ``chunk_ids`` this store keeps as guests (one index query)."""
        if not chunk_ids or not self._guests.count:
            return set()
        with self._lock:
            guests = self._select_locked(chunk_ids, "guest_of IS NOT NULL AND ")
        return {c for c in chunk_ids if c.digest in guests}

    def ids(self, batch: int = 1000) -> Iterator[ChunkId]:
        """Every chunk id, in id order, read in batches (the store may change meanwhile)."""
        last = b""
        while True:
            with self._lock:
                rows = self.db.execute(
                    "SELECT id FROM chunks WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
                ).fetchall()
            if not rows:
                return
            for (raw,) in rows:
                yield ChunkId(raw)
            last = rows[-1][0]

    def _row(self, chunk_id: ChunkId, columns: str) -> tuple[Any, ...] | None:
        with self._lock:
            row: tuple[Any, ...] | None = self.db.execute(
                f"SELECT {columns} FROM chunks WHERE id = ?", (chunk_id.digest,)
            ).fetchone()
        return row

    def size_of(self, chunk_id: ChunkId) -> int | None:
        row = self._row(chunk_id, "size")
        return None if row is None else int(row[0])

    # --- writing ----------------------------------------------------------------------

    def put(
        self,
        chunk_id: ChunkId,
        data: bytes | bytearray | memoryview,
        *,
        guest: Guest | None = None,
        lease_until: float | None = None,
    ) -> PutOutcome:
        """Keep a chunk. Verifies it first; a bad chunk never reaches disk.

        ``lease_until``: keep it until then at least [now + ``lease_ttl``]; a
        chunk already here keeps the later of its lease and this one.

        ``guest``: kept for that peer although this node is not a rightful
        holder; raises GuestRefusedError beyond the guest budgets. Without
        it, a chunk held as a guest is promoted, and guests are evicted
        (oldest first) when the quota or the free-disk floor leaves no room.
        """
        if not chunk_id.matches(data):
            raise IntegrityError(
                f"refusing chunk {chunk_id.hex()}: its bytes do not hash to its id",
                chunk_id.hex(),
            )
        size = len(data)
        until = time.time() + self.lease_ttl if lease_until is None else lease_until
        with self._lock:
            exists = self.db.execute(
                "SELECT guest_of FROM chunks WHERE id = ?", (chunk_id.digest,)
            ).fetchone()
            if exists:
                if guest is None and exists[0] is not None:
                    self._promote_locked(chunk_id)
                self._extend_locked([chunk_id.digest], until)
                return PutOutcome.ALREADY_HAD
            refusal = None if guest is None else self._guests.refusal(guest, chunk_id, size)
            if refusal is not None:
                raise GuestRefusedError(refusal)
            shortfall = self._shortfall_locked(size)
            if shortfall and guest is None:
                self._evict_guests_locked(shortfall)
                shortfall = self._shortfall_locked(size)
            if shortfall:
                raise StoreFullError(self._full_message(chunk_id, size))
            self._reserved += size
            if guest is not None:
                self._guests.add(guest, size)
            self._tmp_counter += 1
            tmp = self._tmp_dir / f"{chunk_id.hex()}.{os.getpid()}.{self._tmp_counter}"
        try:
            self._write_durably(tmp, self.path_of(chunk_id), data)
        except BaseException:
            with self._lock:
                self._reserved -= size
                if guest is not None:
                    self._guests.refund(guest, size)
            tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            self._reserved -= size
            cursor = self.db.execute(
                "INSERT OR IGNORE INTO chunks "
                "(id, size, added, verified, guest_of, guest_host, lease_until) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    chunk_id.digest,
                    size,
                    time.time(),
                    time.time(),
                    None if guest is None else guest.peer.digest,
                    None if guest is None else guest.host,
                    until,
                ),
            )
            if cursor.rowcount:
                self._used += size
                self._count += 1
                if guest is not None:
                    self._guests.count += 1
            else:
                if guest is not None:
                    self._guests.refund(guest, size)  # a concurrent put of the chunk won
                self._extend_locked([chunk_id.digest], until)
        return PutOutcome.STORED

    # --- leases -----------------------------------------------------------------------

    def _extend_locked(self, digests: list[bytes], until: float) -> None:
        marks = ",".join("?" * len(digests))
        self.db.execute(
            f"UPDATE chunks SET lease_until = ? WHERE id IN ({marks}) "
            "AND (lease_until IS NULL OR lease_until < ?)",
            [until, *digests, until],
        )

    def lease(self, chunk_ids: list[ChunkId], until: float) -> list[bool]:
        """Keep the held ones of ``chunk_ids`` until ``until`` at least; which are held.

        Checked and extended under one lock: a collection cannot drop a chunk
        between the answer "held" and its new lease.
        """
        with self._lock:
            held = list(self._select_locked(chunk_ids))
            for start in range(0, len(held), 500):
                self._extend_locked(held[start : start + 500], until)
        found = set(held)
        return [c.digest in found for c in chunk_ids]

    def lease_until(self, chunk_id: ChunkId) -> float | None:
        """Until when the chunk is leased; None if it is not here."""
        row = self._row(chunk_id, "lease_until")
        return None if row is None else float(row[0] or 0.0)

    def collect(self, expired_before: float, *, limit: int = 100_000) -> tuple[int, int]:
        """Drop up to ``limit`` chunks whose lease ran out before ``expired_before``.

        In batches: the lock is held for one batch at a time (rows and files
        together, so a put of the same chunk never races the unlink), and
        serving goes on between them.
        Returns how many chunks and bytes were dropped.
        """
        dropped = freed = 0
        while dropped < limit:
            with self._lock:
                rows = self.db.execute(
                    "SELECT id FROM chunks WHERE lease_until < ? LIMIT ?",
                    (expired_before, min(_COLLECT_BATCH, limit - dropped)),
                ).fetchall()
                for (raw,) in rows:
                    size = self._remove_locked(ChunkId(raw))
                    if size is not None:
                        dropped += 1
                        freed += size
            if len(rows) < _COLLECT_BATCH:
                break
        if dropped:
            log.info("store: dropped %d chunk(s) (%d bytes) whose leases ran out", dropped, freed)
        return dropped, freed

    def _shortfall_locked(self, size: int) -> int:
        """Bytes missing for ``size`` more under the quota and the free-disk floor."""
        needed = self._used + self._reserved + size
        shortfall = needed - self.quota if self.quota is not None else 0
        if self._free_floor:
            disk = os.statvfs(self.root)
            free = disk.f_bavail * disk.f_frsize
            shortfall = max(shortfall, self._free_floor + self._reserved + size - free)
        return max(0, shortfall)

    def _full_message(self, chunk_id: ChunkId, size: int) -> str:
        if self.quota is not None and self._used + self._reserved + size > self.quota:
            return (
                f"store full: {self._used + self._reserved} of {self.quota} bytes used, "
                f"chunk {chunk_id} needs {size}"
            )
        return (
            f"store full: the disk under {self.root} is down to its floor of "
            f"{self._free_floor} free bytes, chunk {chunk_id} needs {size}"
        )

    def _evict_guests_locked(self, wanted: int) -> int:
        """Drop the oldest guests until ``wanted`` bytes are freed; returns bytes freed."""
        freed = 0
        while freed < wanted and self._guests.count:
            rows = self.db.execute(
                "SELECT id FROM chunks WHERE guest_of IS NOT NULL ORDER BY added LIMIT 64"
            ).fetchall()
            if not rows:
                break
            for (raw,) in rows:
                freed += self._remove_locked(ChunkId(raw)) or 0
                if freed >= wanted:
                    break
        if freed:
            log.info("store: evicted %d bytes of guest chunks for rightful ones", freed)
        return freed

    def _remove_locked(self, chunk_id: ChunkId) -> int | None:
        """Drop a chunk's row and file and its accounting; its size, or None if absent."""
        row = self.db.execute(
            "SELECT size, guest_of, guest_host FROM chunks WHERE id = ?", (chunk_id.digest,)
        ).fetchone()
        if row is None:
            return None
        size, peer, host = int(row[0]), row[1], row[2]
        self.db.execute("DELETE FROM chunks WHERE id = ?", (chunk_id.digest,))
        self._used -= size
        self._count -= 1
        if peer is not None:
            self._guests.refund(Guest(NodeId(peer), host or ""), size, count=1)
        self.path_of(chunk_id).unlink(missing_ok=True)
        return size

    def _promote_locked(self, chunk_id: ChunkId) -> bool:
        row = self.db.execute(
            "SELECT size, guest_of, guest_host FROM chunks WHERE id = ?", (chunk_id.digest,)
        ).fetchone()
        if row is None or row[1] is None:
            return False
        self.db.execute(
            "UPDATE chunks SET guest_of = NULL, guest_host = NULL WHERE id = ?",
            (chunk_id.digest,),
        )
        self._guests.refund(Guest(NodeId(row[1]), row[2] or ""), int(row[0]), count=1)
        return True

    def promote(self, chunk_id: ChunkId) -> bool:
        """This node became a rightful holder of a guest chunk; True if it was one."""
        with self._lock:
            return self._promote_locked(chunk_id)

    def drop_guests(self, *, added_before: float) -> int:
        """Drop guests older than ``added_before``, and the oldest of any peer,
        address or total over its budget (budgets may have shrunk since they
        came). Returns how many were dropped."""
        dropped = 0
        with self._lock:
            expired = self.db.execute(
                "SELECT id FROM chunks WHERE guest_of IS NOT NULL AND added < ?",
                (added_before,),
            ).fetchall()
            for (raw,) in expired:
                self._remove_locked(ChunkId(raw))
                dropped += 1
            if self._guests.over():
                rows = self.db.execute(
                    "SELECT id, guest_of, guest_host FROM chunks "
                    "WHERE guest_of IS NOT NULL ORDER BY added"
                ).fetchall()
                for raw, peer, host in rows:
                    if self._guests.over(Guest(NodeId(peer), host or "")):
                        self._remove_locked(ChunkId(raw))
                        dropped += 1
        if dropped:
            log.info("store: dropped %d guest chunk(s), expired or over budget", dropped)
        return dropped

    def _write_durably(self, tmp: Path, final: Path, data: bytes | bytearray | memoryview) -> None:
        if final.parent not in self._fans:
            final.parent.mkdir(mode=0o700, exist_ok=True)
            self._fans.add(final.parent)
        try:
            write_durably(tmp, final, data, fsync=self._fsync)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFullError(f"disk full while storing a chunk in {self.root}") from exc
            raise StoreError(f"cannot write chunk file {final.name}: {exc.strerror}") from exc

    def delete(self, chunk_id: ChunkId) -> bool:
        """Remove a chunk; False if it was not here."""
        with self._lock:
            return self._remove_locked(chunk_id) is not None

    # --- reading ----------------------------------------------------------------------

    def get(self, chunk_id: ChunkId, *, verify: bool = True) -> bytes:
        """The chunk's bytes. With verify, a corrupt copy is removed and reported."""
        try:
            data = self.path_of(chunk_id).read_bytes()
        except FileNotFoundError:
            if self.has(chunk_id):
                self.forget(chunk_id)
            raise ChunkNotFoundError(
                f"chunk {chunk_id.hex()} is not in this store", chunk_id.hex()
            ) from None
        if verify and not chunk_id.matches(data):
            self.delete(chunk_id)
            log.warning("store: chunk %s was corrupt on disk; removed it", chunk_id.hex())
            raise IntegrityError(
                f"stored chunk {chunk_id.hex()} is corrupt (removed from the store)",
                chunk_id.hex(),
            )
        return data

    def open_for_sending(self, chunk_id: ChunkId) -> tuple[int, int] | None:
        """An open file descriptor and size for sendfile, or None if absent.

        The caller closes the descriptor. Because chunk files are only ever
        replaced whole (rename), an open descriptor always sees whole bytes.
        """
        try:
            fd = os.open(self.path_of(chunk_id), os.O_RDONLY)
        except FileNotFoundError:
            return None
        return fd, os.fstat(fd).st_size

    def forget(self, chunk_id: ChunkId) -> None:
        """Drop a chunk's row (and file, if any): its file was found gone."""
        with self._lock:
            self._remove_locked(chunk_id)

    # --- scrub (scrub.py) ---------------------------------------------------------------

    def least_verified(
        self, before: float, limit: int = 10_000
    ) -> list[tuple[ChunkId, int, bool, float]]:
        """Chunks last verified before ``before``, least recently first:
        (id, size, is a guest, lease expiry)."""
        with self._lock:
            rows = self.db.execute(
                "SELECT id, size, guest_of IS NOT NULL, lease_until FROM chunks "
                "WHERE verified < ? ORDER BY verified LIMIT ?",
                (before, limit),
            ).fetchall()
        return [
            (ChunkId(raw), int(size), bool(guest), float(until or 0))
            for raw, size, guest, until in rows
        ]

    def mark_verified(self, chunk_id: ChunkId) -> None:
        with self._lock:
            self.db.execute(
                "UPDATE chunks SET verified = ? WHERE id = ?", (time.time(), chunk_id.digest)
            )

    def scrub(self, max_bytes: int, *, older_than: float | None = None) -> ScrubReport:
        """Re-hash the least recently verified chunks, up to ``max_bytes`` (``scrub.scrub``)."""
        return scrub(self, max_bytes, older_than=older_than)
