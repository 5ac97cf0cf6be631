"""The on-disk chunk store."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest

from dht_dfs.core.crypto import seal_chunk
from dht_dfs.core.errors import (
    ChunkNotFoundError,
    GuestRefusedError,
    IntegrityError,
    StoreFullError,
)
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.store.chunks import ChunkStore, PutOutcome
from dht_dfs.store.guests import Guest


def chunk(n: int = 1000) -> tuple[ChunkId, bytes]:
    sealed = seal_chunk(os.urandom(n))
    return sealed.chunk_id, sealed.data


def test_put_get_and_layout(tmp_path: Path) -> None:
    with ChunkStore(tmp_path) as store:
        chunk_id, data = chunk()
        assert store.put(chunk_id, data) is PutOutcome.STORED
        assert store.put(chunk_id, data) is PutOutcome.ALREADY_HAD
        assert store.get(chunk_id) == data
        path = store.path_of(chunk_id)
        assert path.parent.name == chunk_id.hex()[:2]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert store.stats().chunks == 1
        assert store.stats().bytes_used == len(data)
        assert store.have_which([chunk_id, chunk()[0]]) == [True, False]


def test_a_fan_out_directory_removed_under_the_store_is_made_again(tmp_path: Path) -> None:
    with ChunkStore(tmp_path) as store:
        first_id, first = chunk()
        store.put(first_id, first)
        fan = store.path_of(first_id).parent
        for _ in range(20_000):  # a chunk of the same fan-out directory
            second_id, second = chunk(64)
            if second_id.hex()[:2] == fan.name:
                break
        store.path_of(first_id).unlink()
        fan.rmdir()
        assert store.put(second_id, second) is PutOutcome.STORED
        assert store.get(second_id) == second


def test_bad_chunk_never_reaches_disk(tmp_path: Path) -> None:
    with ChunkStore(tmp_path) as store:
        chunk_id, data = chunk()
        with pytest.raises(IntegrityError, match="do not hash"):
            store.put(chunk_id, data + b"x")
        assert not store.has(chunk_id)
        assert not store.path_of(chunk_id).exists()
        assert list((tmp_path / "tmp").iterdir()) == []


def test_quota_refuses_with_clear_error_and_keeps_accounting(tmp_path: Path) -> None:
    with ChunkStore(tmp_path, quota=2500) as store:
        first, second, third = chunk(1000), chunk(1000), chunk(1000)
        store.put(*first)
        store.put(*second)
        with pytest.raises(StoreFullError, match="store full: 2064 of 2500 bytes used"):
            store.put(*third)
        assert not store.has(third[0])
        assert store.delete(first[0])
        store.put(*third)
        assert store.stats().bytes_used == 2064


def test_missing_chunk(tmp_path: Path) -> None:
    with ChunkStore(tmp_path) as store, pytest.raises(ChunkNotFoundError):
        store.get(chunk()[0])


def test_corrupt_file_is_caught_on_read_and_by_scrub(tmp_path: Path) -> None:
    with ChunkStore(tmp_path) as store:
        good, bad, gone = chunk(), chunk(), chunk()
        for item in (good, bad, gone):
            store.put(*item)
        damaged = bytearray(bad[1])
        damaged[10] ^= 0x01
        store.path_of(bad[0]).write_bytes(bytes(damaged))
        store.path_of(gone[0]).unlink()
        report = store.scrub(10**9)
        assert report.corrupt == (bad[0],)
        assert report.missing == (gone[0],)
        assert report.checked == 2
        assert not store.has(bad[0])
        assert store.get(good[0]) == good[1]
        # A corrupt copy found by a read is removed too.
        store.path_of(good[0]).write_bytes(b"garbage")
        with pytest.raises(IntegrityError, match=good[0].hex()):
            store.get(good[0])
        assert not store.has(good[0])
        assert store.stats().chunks == 0
        assert store.stats().bytes_used == 0


def test_reopen_cleans_temp_files_and_reconciles_index(tmp_path: Path) -> None:
    with ChunkStore(tmp_path) as store:
        kept, dropped = chunk(), chunk()
        store.put(*kept)
        store.put(*dropped)
        used = store.stats().bytes_used
    # A crash left a half-written temp file, a file the index never saw,
    # and an index row whose file is gone.
    (tmp_path / "tmp" / "abc.partial").write_bytes(b"half a chunk")
    orphan_id, orphan_data = chunk()
    orphan_path = tmp_path / "chunks" / orphan_id.hex()[:2] / orphan_id.hex()
    orphan_path.parent.mkdir(exist_ok=True)
    orphan_path.write_bytes(orphan_data)
    (tmp_path / "chunks" / dropped[0].hex()[:2] / dropped[0].hex()).unlink()
    with ChunkStore(tmp_path) as store:
        assert list((tmp_path / "tmp").iterdir()) == []
        assert store.has(kept[0]) and store.has(orphan_id)
        assert not store.has(dropped[0])
        assert store.stats().bytes_used == used - len(dropped[1]) + len(orphan_data)
        assert sorted(store.ids()) == sorted([kept[0], orphan_id])


def test_concurrent_puts_of_the_same_chunk_count_once(tmp_path: Path) -> None:
    with ChunkStore(tmp_path, quota=10**6) as store:
        chunk_id, data = chunk(5000)
        outcomes: list[PutOutcome] = []
        threads = [
            threading.Thread(target=lambda: outcomes.append(store.put(chunk_id, data)))
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert PutOutcome.STORED in outcomes
        assert store.stats().chunks == 1
        assert store.stats().bytes_used == len(data)


# --- guests: chunks kept for a peer without being a rightful holder ---------------------

ALICE, BOB, CAROL = (NodeId(bytes([n]) * 20) for n in (1, 2, 3))


def test_guests_are_bounded_per_identity_per_address_and_in_all(tmp_path: Path) -> None:
    # Each guest counts at least GUEST_MIN_CHARGE (4096) bytes.
    with ChunkStore(tmp_path, guest_bytes_per_peer=8192, max_guest_bytes=12288) as store:
        for _ in range(2):
            store.put(*chunk(), guest=Guest(ALICE, "10.0.0.1"))
        with pytest.raises(GuestRefusedError, match=f"peer {ALICE}"):
            store.put(*chunk(), guest=Guest(ALICE, "10.0.0.2"))
        with pytest.raises(GuestRefusedError, match=r"address 10\.0\.0\.1"):
            store.put(*chunk(), guest=Guest(BOB, "10.0.0.1"))
        store.put(*chunk(), guest=Guest(BOB, "10.0.0.2"))
        with pytest.raises(GuestRefusedError, match="guest chunks fill their 12288 bytes"):
            store.put(*chunk(), guest=Guest(CAROL, "10.0.0.3"))
        # A chunk this node is rightful for does not touch the guest budget.
        rightful = chunk()
        assert store.put(*rightful) is PutOutcome.STORED
        stats = store.stats()
        assert (stats.chunks, stats.guests, stats.guest_bytes) == (4, 3, 12288)
        assert not store.is_guest(rightful[0])


def test_guest_state_survives_a_reopen(tmp_path: Path) -> None:
    guest, rightful = chunk(), chunk()
    with ChunkStore(tmp_path, guest_bytes_per_peer=8192) as store:
        store.put(*guest, guest=Guest(ALICE, "10.0.0.1"))
        store.put(*rightful)
    with ChunkStore(tmp_path, guest_bytes_per_peer=8192) as store:
        assert store.is_guest(guest[0]) and not store.is_guest(rightful[0])
        assert store.guests_among([guest[0], rightful[0]]) == {guest[0]}
        assert store.stats().guests == 1
        # The budget is charged from the index: one more fits, not two.
        store.put(*chunk(), guest=Guest(ALICE, "10.0.0.1"))
        with pytest.raises(GuestRefusedError):
            store.put(*chunk(), guest=Guest(ALICE, "10.0.0.1"))


def test_a_store_from_before_guests_is_migrated_with_every_chunk_rightful(
    tmp_path: Path,
) -> None:
    old_id, old_data = chunk()
    path = tmp_path / "chunks" / old_id.hex()[:2] / old_id.hex()
    path.parent.mkdir(parents=True)
    path.write_bytes(old_data)
    db = sqlite3.connect(tmp_path / "meta.sqlite")
    db.executescript(
        "CREATE TABLE chunks (id BLOB PRIMARY KEY, size INTEGER NOT NULL, "
        "added REAL NOT NULL, verified REAL NOT NULL) WITHOUT ROWID;"
    )
    db.execute("INSERT INTO chunks VALUES (?, ?, 0, 0)", (old_id.digest, len(old_data)))
    db.commit()
    db.close()
    with ChunkStore(tmp_path) as store:
        assert store.has(old_id) and not store.is_guest(old_id)
        new = chunk()
        store.put(*new, guest=Guest(ALICE, "10.0.0.1"))
        assert store.is_guest(new[0])


def test_promotion_expiry_and_eviction_for_rightful_chunks(tmp_path: Path) -> None:
    with ChunkStore(tmp_path, quota=2500) as store:
        first, second = chunk(), chunk()
        store.put(*first, guest=Guest(ALICE, "10.0.0.1"))
        store.put(*second, guest=Guest(BOB, "10.0.0.2"))
        # A rightful STORE of a guest promotes it.
        assert store.put(*first) is PutOutcome.ALREADY_HAD
        assert not store.is_guest(first[0])
        assert store.stats().guests == 1
        # The quota is full: a rightful chunk evicts the guest...
        rightful = chunk()
        store.put(*rightful)
        assert not store.has(second[0]) and store.has(rightful[0])
        # ...but a guest never evicts anything.
        with pytest.raises(StoreFullError):
            store.put(*chunk(), guest=Guest(BOB, "10.0.0.2"))
        store.delete(rightful[0])
        third = chunk()
        store.put(*third, guest=Guest(BOB, "10.0.0.2"))
        assert store.promote(third[0]) and not store.promote(third[0])
        fourth = chunk()
        store.delete(third[0])
        store.put(*fourth, guest=Guest(BOB, "10.0.0.2"))
        assert store.drop_guests(added_before=0) == 0
        assert store.drop_guests(added_before=time.time() + 1) == 1
        assert not store.has(fourth[0]) and store.has(first[0])
        assert store.stats().guest_bytes == 0


def test_without_a_quota_the_disk_keeps_a_free_floor(tmp_path: Path) -> None:
    # A floor as big as the disk: nothing fits, and the error says why.
    with (
        ChunkStore(tmp_path, min_free_disk=2**62, min_free_disk_fraction=0.999) as store,
        pytest.raises(StoreFullError, match="down to its floor"),
    ):
        store.put(*chunk())
    with ChunkStore(tmp_path, min_free_disk=1024, min_free_disk_fraction=0.999) as store:
        store.put(*chunk())


# --- leases ----------------------------------------------------------------------------


def test_a_lease_only_ever_grows_and_collect_drops_only_what_ran_out(tmp_path: Path) -> None:
    now = time.time()
    with ChunkStore(tmp_path) as store:
        short, long, unheld = chunk(), chunk(), chunk()
        store.put(*short, lease_until=now + 10)
        store.put(*long, lease_until=now + 100)
        # A second STORE with a shorter lease (an old repair, say) does not cut it.
        assert store.put(*long, lease_until=now + 5) is PutOutcome.ALREADY_HAD
        assert store.lease_until(long[0]) == pytest.approx(now + 100)
        # LEASE extends what is held and says which are held.
        assert store.lease([short[0], unheld[0]], now + 50) == [True, False]
        assert store.lease_until(short[0]) == pytest.approx(now + 50)
        assert store.lease([short[0]], now + 20) == [True]
        assert store.lease_until(short[0]) == pytest.approx(now + 50)
        assert not store.has(unheld[0])
        # Nothing has run out yet.
        assert store.collect(now) == (0, 0)
        dropped = store.collect(now + 60)
        assert dropped == (1, len(short[1]))
        assert not store.has(short[0]) and store.has(long[0])
        assert store.stats().chunks == 1 and store.stats().bytes_used == len(long[1])
        assert not store.path_of(short[0]).exists()
        assert store.collect(now + 101) == (1, len(long[1]))
        assert store.stats().bytes_used == 0


def test_a_put_without_a_lease_gets_the_store_ttl_and_guests_are_collected_too(
    tmp_path: Path,
) -> None:
    with ChunkStore(tmp_path, lease_ttl=1000) as store:
        plain, guest = chunk(), chunk()
        before = time.time()
        store.put(*plain)
        store.put(*guest, guest=Guest(ALICE, "10.0.0.1"), lease_until=before + 5)
        until = store.lease_until(plain[0])
        assert until is not None and before + 999 < until < time.time() + 1001
        assert store.collect(before + 10) == (1, len(guest[1]))
        assert store.stats().guests == 0 and store.stats().guest_bytes == 0


def test_a_store_from_before_leases_gives_every_chunk_a_full_lease(tmp_path: Path) -> None:
    old_id, old_data = chunk()
    stray_id, stray_data = chunk()
    db = sqlite3.connect(tmp_path / "meta.sqlite")
    db.executescript(
        "CREATE TABLE chunks (id BLOB PRIMARY KEY, size INTEGER NOT NULL, "
        "added REAL NOT NULL, verified REAL NOT NULL, guest_of BLOB, guest_host TEXT) "
        "WITHOUT ROWID;"
    )
    db.execute("INSERT INTO chunks VALUES (?, ?, 0, 0, NULL, NULL)", (old_id.digest, len(old_data)))
    db.commit()
    db.close()
    for chunk_id, data in ((old_id, old_data), (stray_id, stray_data)):
        path = tmp_path / "chunks" / chunk_id.hex()[:2] / chunk_id.hex()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    opened = time.time()
    with ChunkStore(tmp_path, lease_ttl=500) as store:
        # The indexed chunk and the file the index never knew (a crash) alike:
        # an upgrade or a crash never makes a chunk collectable at once.
        for chunk_id in (old_id, stray_id):
            until = store.lease_until(chunk_id)
            assert until is not None and until >= opened + 499
        assert store.collect(opened + 400) == (0, 0)


def test_scrub_reports_the_lease_of_a_copy_it_removed(tmp_path: Path) -> None:
    with ChunkStore(tmp_path) as store:
        bad, good = chunk(), chunk()
        until = time.time() + 77
        store.put(*bad, lease_until=until)
        store.put(*good)
        path = store.path_of(bad[0])
        path.write_bytes(b"rot" + path.read_bytes()[3:])
        report = store.scrub(10**9)
        assert report.corrupt == (bad[0],)
        assert report.leases == {bad[0]: pytest.approx(until)}
