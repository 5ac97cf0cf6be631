"""The mount's on-disk chunk cache: bounded, least recently used out, checked on read."""

from __future__ import annotations

import os
import time
from pathlib import Path

from dht_dfs.core.crypto import seal_chunk
from dht_dfs.core.ids import ChunkId
from dht_dfs.store.cache import ChunkCache


def chunk(size: int = 1000) -> tuple[ChunkId, bytes]:
    sealed = seal_chunk(os.urandom(size))
    return sealed.chunk_id, sealed.data


def test_the_least_recently_used_go_first_and_the_bound_holds(tmp_path: Path) -> None:
    one, two, three = chunk(), chunk(), chunk()
    cache = ChunkCache(tmp_path, max_bytes=2 * len(one[1]) + 10).open()
    cache.put(*one)
    cache.put(*two)
    assert cache.get(one[0]) == one[1]  # one is now the most recent
    cache.put(*three)
    assert cache.get(two[0]) is None, "the least recently used went"
    assert cache.get(one[0]) == one[1] and cache.get(three[0]) == three[1]
    assert cache.used <= cache.max_bytes
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        [one[0].hex(), three[0].hex()]
    )


def test_the_cache_and_its_order_survive_a_reopen(tmp_path: Path) -> None:
    old, new = chunk(), chunk()
    cache = ChunkCache(tmp_path, max_bytes=10**6).open()
    cache.put(*old)
    cache.put(*new)
    past = time.time() - 3600
    path = tmp_path / old[0].hex()[:2] / old[0].hex()
    os.utime(path, (past, past))  # read an hour ago
    reopened = ChunkCache(tmp_path, max_bytes=len(new[1]) + 10).open()
    assert len(reopened) == 1
    assert reopened.get(new[0]) == new[1] and reopened.get(old[0]) is None


def test_a_rotten_or_planted_file_is_dropped_never_served(tmp_path: Path) -> None:
    good, bad = chunk(), chunk()
    cache = ChunkCache(tmp_path, max_bytes=10**6).open()
    cache.put(*good)
    cache.put(*bad)
    path = tmp_path / bad[0].hex()[:2] / bad[0].hex()
    path.write_bytes(b"not the chunk")
    assert cache.get(bad[0]) is None
    assert not path.exists()
    # A file under another chunk's name (planted) is refused the same way.
    planted = tmp_path / good[0].hex()[:2] / good[0].hex()
    planted.write_bytes(bad[1])
    assert cache.get(good[0]) is None
    assert cache.used == 0


def test_a_chunk_larger_than_the_cache_is_not_kept(tmp_path: Path) -> None:
    big = chunk(5000)
    cache = ChunkCache(tmp_path, max_bytes=1000).open()
    cache.put(*big)
    assert cache.get(big[0]) is None and cache.used == 0
