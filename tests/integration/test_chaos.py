"""Self-healing: nodes die, bytes rot, disks fill; every file stays available.

Repair and scrub passes are run by the tests themselves (the cluster's
background loops are off), so each scenario is a fixed sequence of events.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from dht_dfs.core.ids import ChunkId
from dht_dfs.core.refs import ReadReference
from dht_dfs.node.node import Node

from .cluster import TEST_CONFIG, Cluster, cluster

pytestmark = pytest.mark.slow


async def publish_files(
    net: Cluster, tmp_path: Path, sizes: list[int]
) -> list[tuple[ReadReference, bytes]]:
    files = []
    for index, size in enumerate(sizes):
        data = os.urandom(size)
        path = tmp_path / f"file-{index}.bin"
        path.write_bytes(data)
        node = net.live[index % len(net.live)]
        assert node.network is not None
        result = await node.network.publish(path)
        files.append((result.reference, data))
    return files


async def repair_everywhere(net: Cluster, rounds: int = 3) -> None:
    """Repair passes on every live node until one round changes nothing."""
    for _ in range(rounds):
        results = await asyncio.gather(
            *(node.maintainer.repair_pass(rate=0) for node in net.live if node.maintainer)
        )
        if not any(r.copies_added or r.copies_dropped for r in results):
            return


async def assert_all_healthy(
    net: Cluster, files: list[tuple[ReadReference, bytes]], tmp_path: Path, tag: str
) -> None:
    checker = net.live[-1]
    assert checker.network is not None
    for index, (reference, data) in enumerate(files):
        report = await checker.network.check(reference.root_hash)
        assert report.ok, f"{tag}: file {index} under-replicated: {report.to_json()}"
        out = tmp_path / f"{tag}-{index}.out"
        await checker.network.fetch(reference, output=out)
        assert out.read_bytes() == data, f"{tag}: file {index} differs"


def assert_store_sound(node: Node) -> None:
    """Every chunk file holds exactly the bytes its name promises."""
    assert node.store is not None
    for chunk_id in node.store.ids():
        assert chunk_id.matches(node.store.path_of(chunk_id).read_bytes())


async def test_half_the_nodes_die_one_by_one(tmp_path: Path) -> None:
    chooser = random.Random(7)
    async with cluster(tmp_path / "net", 10) as net:
        files = await publish_files(net, tmp_path, [900_000, 1_400_000, 300_000])
        while len(net.live) > 5:
            victim = chooser.choice([i for i, n in enumerate(net.nodes) if n is not None])
            await net.kill(victim)
            await repair_everywhere(net)
            checker = net.live[0]
            assert checker.network is not None
            for reference, _ in files:
                report = await checker.network.check(reference.root_hash)
                assert report.ok, f"after killing node {victim}: {report.to_json()}"
        await assert_all_healthy(net, files, tmp_path, "end")


async def test_rotten_copies_are_scrubbed_and_replaced(tmp_path: Path) -> None:
    chooser = random.Random(11)
    async with cluster(tmp_path / "net", 8) as net:
        files = await publish_files(net, tmp_path, [1_000_000, 600_000])
        damaged: set[tuple[int, ChunkId]] = set()
        copies_damaged: dict[ChunkId, int] = {}

        # Node ids are random, so how many chunks each holds varies: damage
        # the four nodes holding the most.
        def held(index: int) -> int:
            node = net.nodes[index]
            assert node is not None and node.store is not None
            return node.store.stats().chunks

        for index in sorted(range(8), key=held, reverse=True)[:4]:
            node = net.nodes[index]
            assert node is not None and node.store is not None
            # At most replicas - 1 bad copies of any chunk: one good copy must remain.
            spared = [
                c
                for c in sorted(node.store.ids())
                if copies_damaged.get(c, 0) < TEST_CONFIG.replicas - 1
            ]
            for chunk_id in chooser.sample(spared, min(4, len(spared))):
                copies_damaged[chunk_id] = copies_damaged.get(chunk_id, 0) + 1
                path = node.store.path_of(chunk_id)
                raw = bytearray(path.read_bytes())
                raw[chooser.randrange(len(raw))] ^= 1 << chooser.randrange(8)
                path.write_bytes(bytes(raw))
                damaged.add((index, chunk_id))
        assert len(damaged) >= 10
        # Fetches stay correct before anything is repaired. (The fetcher is an
        # undamaged node: one that reads its own rotten copy repairs it at
        # once, see test_reading_a_rotten_local_copy_repairs_it.)
        fetcher = next(
            n for i, n in enumerate(net.nodes) if n is not None and i not in {d[0] for d in damaged}
        )
        assert fetcher.network is not None
        for number, (reference, data) in enumerate(files):
            out = tmp_path / f"before-{number}.out"
            await fetcher.network.fetch(reference, output=out)
            assert out.read_bytes() == data
        # A full scrub on every node finds exactly the damaged copies and
        # replaces each from another holder.
        found: set[tuple[int, ChunkId]] = set()
        for index, node in enumerate(net.nodes):
            assert node is not None and node.maintainer is not None
            result = await node.maintainer.scrub_step(10**9)
            found.update((index, chunk_id) for chunk_id in result.report.corrupt)
            assert set(result.refetched) == set(result.report.corrupt)
            assert not result.lost
        assert found == damaged
        for node in net.live:
            assert_store_sound(node)
        await assert_all_healthy(net, files, tmp_path, "after")


async def test_full_node_is_skipped_and_replication_stays_full(tmp_path: Path) -> None:
    quota = 150_000
    tiny = TEST_CONFIG.replace(max_storage=quota)
    async with cluster(tmp_path / "net", 6, configs=[TEST_CONFIG, TEST_CONFIG, tiny]) as net:
        files = await publish_files(net, tmp_path, [2_000_000, 1_000_000])
        small = net.nodes[2]
        assert small is not None and small.store is not None
        assert small.store.stats().bytes_used <= quota
        assert small.store.stats().bytes_used > quota // 2, "the tiny node took what it could"
        await assert_all_healthy(net, files, tmp_path, "quota")


async def test_graceful_leave_hands_off_and_a_new_node_takes_over(tmp_path: Path) -> None:
    async with cluster(tmp_path / "net", 6) as net:
        files = await publish_files(net, tmp_path, [1_200_000])
        leaving = net.nodes[3]
        assert leaving is not None and leaving.store is not None
        assert leaving.store.stats().chunks > 0
        net.nodes[3] = None
        await asyncio.wait_for(leaving.stop(leave=True), TEST_CONFIG.leave_timeout + 5)
        # No repair pass ran: the hand-off alone kept every chunk at 3 copies.
        await assert_all_healthy(net, files, tmp_path, "left")
        # A node that joins closer to some chunks gets them handed over.
        newcomer = await net.add()
        await repair_everywhere(net)
        assert newcomer.store is not None
        key_of = {c: c.dht_key for c in net.stored_chunks()}
        ids = {i: n.identity.node_id for i, n in enumerate(net.nodes) if n and n.identity}
        newcomer_index = len(net.nodes) - 1
        owed = [
            c
            for c, key in key_of.items()
            if newcomer_index in sorted(ids, key=lambda i: ids[i].distance(key))[:3]
        ]
        assert owed, "with 6 nodes the newcomer is rightful for some chunks"
        assert all(newcomer.store.has(c) for c in owed)
        await assert_all_healthy(net, files, tmp_path, "joined")


async def test_restarted_node_rejoins_without_bootstrap(tmp_path: Path) -> None:
    async with cluster(tmp_path / "net", 5) as net:
        files = await publish_files(net, tmp_path, [500_000])
        await net.kill(1)
        net.nodes[1] = None
        node = Node(
            net.data_dir(1),
            TEST_CONFIG,
            host="127.0.0.1",
            port=net.ports[1],
            bootstrap=(),
            control=False,
        )
        await node.start()
        net.nodes[1] = node
        assert node.dht is not None
        await asyncio.wait_for(node.announced.wait(), 30)
        assert len(node.dht.known_contacts()) >= 3, "contacts come from the saved table"
        await assert_all_healthy(net, files, tmp_path, "rejoined")


async def test_repair_passes_are_skipped_until_membership_changes(tmp_path: Path) -> None:
    async with cluster(tmp_path / "net", 6) as net:
        await publish_files(net, tmp_path, [600_000])
        node = max(net.live, key=lambda n: n.store.stats().chunks if n.store else 0)
        assert node.maintainer is not None
        first = await node.maintainer.repair_pass(rate=0)
        assert not first.skipped and first.examined > 0
        second = await node.maintainer.repair_pass(rate=0)
        assert second.skipped and second.examined == 0, "nothing changed: no lookups"
        await net.kill(next(i for i, n in enumerate(net.nodes) if n is not None and n is not node))
        third = await node.maintainer.repair_pass(rate=0)
        assert not third.skipped, "a node stopped answering: a full pass"
        forced = await node.maintainer.repair_pass(rate=0, force=True)
        assert not forced.skipped


async def test_too_few_nodes_is_reported_and_repaired_when_nodes_join(tmp_path: Path) -> None:
    async with cluster(tmp_path / "net", 2) as net:
        data = os.urandom(400_000)
        (tmp_path / "in.bin").write_bytes(data)
        publisher = net.live[0]
        assert publisher.network is not None
        result = await publisher.network.publish(tmp_path / "in.bin")
        chunks = result.data_chunks + result.manifest_chunks
        assert result.under_replicated == chunks, "2 nodes cannot hold 3 copies"
        assert result.copies == 2 * chunks
        report = await publisher.network.check(result.reference.root_hash)
        assert not report.ok and report.min_copies == 2
        await net.add()
        await repair_everywhere(net)
        report = await publisher.network.check(result.reference.root_hash)
        assert report.ok, report.to_json()
        stored = net.stored_chunks()
        assert len(stored) == chunks
        assert all(len(net.holders(c)) == 3 for c in stored)


async def test_reading_a_rotten_local_copy_repairs_it(tmp_path: Path) -> None:
    async with cluster(tmp_path / "net", 5) as net:
        files = await publish_files(net, tmp_path, [700_000])
        reader = net.nodes[2]
        assert reader is not None and reader.store is not None and reader.network is not None
        own = sorted(reader.store.ids())
        assert own
        for chunk_id in own:
            path = reader.store.path_of(chunk_id)
            raw = bytearray(path.read_bytes())
            raw[-1] ^= 0x80
            path.write_bytes(bytes(raw))
        reference, data = files[0]
        await reader.network.fetch(reference, output=tmp_path / "out.bin")
        assert (tmp_path / "out.bin").read_bytes() == data
        # Every rotten copy the fetch read was replaced by a good one at once.
        assert sorted(reader.store.ids()) == own
        assert_store_sound(reader)
