"""The on-disk chunk store."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from dht_dfs.core.crypto import seal_chunk
from dht_dfs.core.errors import ChunkNotFoundError, IntegrityError, StoreFullError
from dht_dfs.core.ids import ChunkId
from dht_dfs.store.chunks import ChunkStore, PutOutcome


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
