"""The chunk service's admission rule: rightful chunks, guests within budget, REFUSED."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.node.service import ChunkService, RefusalLog
from dht_dfs.store.chunks import ChunkStore
from dht_dfs.wire import StoreStatus


async def test_a_stranger_fills_only_its_guest_budget_and_rightful_stores_still_go_in(
    tmp_path: Path,
) -> None:
    # Two chunks of a stranger's fit (each counts at least 4096 bytes).
    with ChunkStore(tmp_path, guest_bytes_per_peer=8192) as store:
        far: set[ChunkId] = set()
        service = ChunkService(store, rightful=lambda chunk_id: chunk_id not in far)
        stranger, other = NodeId(b"\x01" * 20), NodeId(b"\x02" * 20)
        answers = []
        for _ in range(3):
            data = os.urandom(3000)
            far.add(ChunkId.of(data))
            answers.append(
                (
                    await service.handle_store(
                        stranger, ChunkId.of(data), data, host="10.0.0.9", lease=3600
                    )
                )[0]
            )
        assert answers == [StoreStatus.STORED, StoreStatus.STORED, StoreStatus.REFUSED]
        # Another identity on the same address shares that address's budget.
        data = os.urandom(3000)
        far.add(ChunkId.of(data))
        status, _ = await service.handle_store(
            other, ChunkId.of(data), data, host="10.0.0.9", lease=3600
        )
        assert status is StoreStatus.REFUSED
        # The honest STORE of a chunk this node is rightful for is accepted.
        data = os.urandom(3000)
        status, _ = await service.handle_store(
            stranger, ChunkId.of(data), data, host="10.0.0.9", lease=3600
        )
        assert status is StoreStatus.STORED and not store.is_guest(ChunkId.of(data))
        assert service.chunks_refused == 2
        assert store.stats().guests == 2


async def test_a_full_node_logs_one_line_per_minute_not_one_per_refused_chunk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    with ChunkStore(tmp_path, quota=1000) as store:
        service = ChunkService(store)
        service._refusals = RefusalLog(clock=lambda: now[0])
        peer = NodeId(b"\x03" * 20)
        with caplog.at_level(logging.INFO, logger="dht_dfs.node.service"):
            for _ in range(50):
                data = os.urandom(2000)
                status, _ = await service.handle_store(
                    peer, ChunkId.of(data), data, host="h", lease=3600
                )
                assert status is StoreStatus.FULL
            assert len(caplog.records) == 1
            now[0] = 61.0
            data = os.urandom(2000)
            await service.handle_store(peer, ChunkId.of(data), data, host="h", lease=3600)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[1].endswith("(and 49 more like it since the last such line)")


async def test_a_peer_cannot_lease_a_chunk_beyond_the_node_ceiling(tmp_path: Path) -> None:
    """A STORE or LEASE asking for 136 years gets ``max_lease``; a short one cuts nothing."""
    with ChunkStore(tmp_path) as store:
        service = ChunkService(store, max_lease=1000.0)
        peer = NodeId(b"\x04" * 20)
        data = os.urandom(3000)
        chunk_id = ChunkId.of(data)
        asked = time.time()
        status, _ = await service.handle_store(peer, chunk_id, data, host="h", lease=0xFFFFFFFF)
        assert status is StoreStatus.STORED
        until = store.lease_until(chunk_id)
        assert until is not None and asked + 999 <= until <= time.time() + 1000
        # A STORE or LEASE of 0 s (a hostile or stale peer) does not shorten it.
        await service.handle_store(peer, chunk_id, data, host="h", lease=0)
        assert await service.handle_lease(peer, 0, (chunk_id, ChunkId(bytes(32)))) == [
            True,
            False,
        ]
        assert store.lease_until(chunk_id) == until
        assert await service.handle_lease(peer, 0xFFFFFFFF, (chunk_id,)) == [True]
        renewed = store.lease_until(chunk_id)
        assert renewed is not None and renewed <= time.time() + 1000
        assert service.leases == 2 and service.chunks_leased == 2
