"""Leases over the in-memory network: renewal reaches every holder, and no
maintenance pass (repair, hand-off, scrub) makes a chunk outlive its leases.

The attack these rules stop: a chunk nobody pins any more must go from every
holder. If repair copied it with a fresh lease, each copy would renew the
next, and an unpinned chunk would live for ever.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Executor
from pathlib import Path

import pytest

from dht_dfs.core.errors import RootNotFoundError
from dht_dfs.core.ids import ChunkId
from dht_dfs.core.refs import RootHash
from dht_dfs.node.maintenance import Maintainer
from dht_dfs.store.chunks import ChunkStore
from dht_dfs.transfer.leases import renew
from dht_dfs.transfer.ports import get_verified
from dht_dfs.transfer.retrieval import NetworkSource
from dht_dfs.transfer.walk import walk_public
from tests.support.memnet import FakeNode, MemNet


def store_of(node: FakeNode) -> ChunkStore:
    assert node.store is not None
    return node.store


def a_chunk(net: MemNet) -> tuple[ChunkId, bytes, list[FakeNode]]:
    data = os.urandom(3000)
    chunk_id = ChunkId.of(data)
    return chunk_id, data, net.by_distance(chunk_id.dht_key)


async def test_repair_copies_a_chunk_with_the_lease_it_has_left_not_a_fresh_one(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(6, stores=tmp_path)
    chunk_id, data, ranked = a_chunk(net)
    until = time.time() + 120
    store_of(ranked[0]).put(chunk_id, data, lease_until=until)
    joined = net.join(ranked[0], executor)
    stats = await Maintainer(joined.network, store_of(ranked[0]), net.config).repair_pass(rate=0)
    assert stats.copies_added == 2
    for node in ranked[1:3]:
        copied = store_of(node).lease_until(chunk_id)
        # The copy carries what was left (rounded up to whole seconds), not the
        # 30 days a fresh lease would give.
        assert copied is not None and until - 1 <= copied <= until + 2


async def test_repair_and_hand_off_never_copy_a_chunk_whose_leases_ran_out(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(6, stores=tmp_path)
    chunk_id, data, ranked = a_chunk(net)
    store_of(ranked[0]).put(chunk_id, data, lease_until=time.time() - 1)
    joined = net.join(ranked[0], executor)
    maintainer = Maintainer(joined.network, store_of(ranked[0]), net.config)
    stats = await maintainer.repair_pass(rate=0, force=True)
    assert stats.copies_added == 0
    stats = await maintainer.hand_off(within=5)
    assert stats.copies_added == 0
    assert net.holders(chunk_id) == {ranked[0].node_id}, "nobody pins it: it is not spread"


async def test_scrub_fetches_a_rotten_copy_again_under_its_old_lease_only(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(4, stores=tmp_path)
    leased_id, leased, ranked = a_chunk(net)
    lapsed_id, lapsed, _ = a_chunk(net)
    until = time.time() + 300
    me, other = ranked[0], ranked[1]
    store_of(me).put(leased_id, leased, lease_until=until)
    store_of(me).put(lapsed_id, lapsed, lease_until=time.time() - 1)
    for chunk_id, data in ((leased_id, leased), (lapsed_id, lapsed)):
        other.keep(chunk_id, data)
        net.announce(other, chunk_id)
        path = store_of(me).path_of(chunk_id)
        path.write_bytes(b"rot" + path.read_bytes()[3:])
    joined = net.join(me, executor)
    result = await Maintainer(joined.network, store_of(me), net.config).scrub_step(10**9)
    assert result.refetched == (leased_id,)
    assert store_of(me).lease_until(leased_id) == pytest.approx(until)
    # The lapsed one is not fetched back to life.
    assert not store_of(me).has(lapsed_id)


async def test_renewal_reaches_every_holder_and_counts_what_none_holds(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(8, stores=tmp_path)
    publisher = net.client()
    joined = net.join(publisher, executor)
    source = tmp_path / "file.bin"
    source.write_bytes(os.urandom(10 * net.config.chunk_size))
    published = await joined.network.publish(source)
    root = published.reference.root_hash
    chunk_ids = [c for node in net.nodes.values() for c in store_of(node).ids()]
    assert chunk_ids
    start = time.time()
    report = await renew(joined.network, root, 10_000)
    assert report.chunks == published.data_chunks + published.manifest_chunks
    assert report.leased == report.chunks and report.unleased_count == 0
    assert report.min_holders == net.config.replicas
    for node in net.nodes.values():
        for chunk_id in store_of(node).ids():
            until = store_of(node).lease_until(chunk_id)
            assert until is not None and until >= start + 10_000
    # A data chunk no node holds any more is counted, and named.
    walked = [item async for item in walk_public(NetworkSource(joined.network), root, executor)]
    gone = next(chunk_id for chunk_id, _, is_node in walked if not is_node)
    for node in net.nodes.values():
        node.drop(gone)
    report = await renew(joined.network, root, 10_000)
    assert report.unleased_count == 1 and report.unleased == [gone]
    assert not report.ok


async def test_renewal_of_an_unknown_root_fails_cleanly(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(4, stores=tmp_path)
    joined = net.join(net.client(), executor)
    with pytest.raises(RootNotFoundError, match="no node has root"):
        await renew(joined.network, RootHash(ChunkId(os.urandom(32))), 60)


async def test_renewal_goes_on_past_a_lost_file_of_a_tree(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(6, stores=tmp_path / "stores")
    joined = net.join(net.client(), executor)
    tree = tmp_path / "tree"
    tree.mkdir()
    for index in range(4):
        (tree / f"file-{index}.bin").write_bytes(os.urandom(3 * net.config.chunk_size))
    root = (await joined.network.publish(tree)).reference.root_hash
    walked = [item async for item in walk_public(NetworkSource(joined.network), root, executor)]
    # Lose the root of one file (a manifest node below the tree's root) everywhere.
    file_roots = [c for c, _, is_node in walked if is_node and c != root.root]
    lost = file_roots[0]
    for node in net.nodes.values():
        node.drop(lost)
    report = await renew(joined.network, root, 10_000)
    assert report.unleased_count == 1 and report.unleased == [lost]
    # Everything else the walk could reach was renewed, later files included.
    assert report.leased == report.chunks - 1 >= len(walked) - 4


async def test_read_repair_puts_a_copy_back_under_its_old_lease(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(4, stores=tmp_path)
    chunk_id, data, ranked = a_chunk(net)
    me, other = ranked[0], ranked[1]
    until = time.time() + 40
    store_of(me).put(chunk_id, data, lease_until=until)
    other.keep(chunk_id, data)
    net.announce(other, chunk_id)
    path = store_of(me).path_of(chunk_id)
    path.write_bytes(b"rot" + path.read_bytes()[3:])
    joined = net.join(me, executor)
    assert bytes(await get_verified(NetworkSource(joined.network), chunk_id)) == data
    # Put back, but not with a fresh 30-day lease: a read does not revive a chunk.
    assert store_of(me).has(chunk_id)
    assert store_of(me).lease_until(chunk_id) == pytest.approx(until)
