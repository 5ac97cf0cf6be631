"""The network works: publish on one node, fetch anywhere, survive failures."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import pytest

from dht_dfs.core.errors import RootNotFoundError
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.core.refs import ReadReference
from dht_dfs.dht.values import Contact, LookupResult, ProviderRecord
from dht_dfs.transfer.fetch import PART_SUFFIX
from dht_dfs.transfer.network import Network
from dht_dfs.transfer.ports import Locator

from .cluster import TEST_CONFIG, Cluster, cluster

NODES = 6


class CountingLocator:
    """A Locator that counts the DHT lookups asked of it (each call is one)."""

    def __init__(self, inner: Locator) -> None:
        self._inner = inner
        self.lookups = 0

    @property
    def contact(self) -> Contact:
        return self._inner.contact

    async def lookup(self, key: bytes) -> LookupResult:
        self.lookups += 1
        return await self._inner.lookup(key)

    async def find_providers(self, key: bytes) -> list[ProviderRecord]:
        self.lookups += 1
        return await self._inner.find_providers(key)

    async def closest_live_nodes(
        self, key: bytes, count: int, *, include_self: bool = True
    ) -> list[Contact]:
        self.lookups += 1
        return await self._inner.closest_live_nodes(key, count, include_self=include_self)

    async def put_records(
        self, records: Sequence[ProviderRecord], closest: Mapping[bytes, Sequence[Contact]]
    ) -> dict[bytes, int]:
        return await self._inner.put_records(records, closest)

    def sign_record(self, key: bytes) -> ProviderRecord:
        return self._inner.sign_record(key)

    def forget_provider(self, key: bytes, node_id: NodeId) -> None:
        self._inner.forget_provider(key, node_id)

    def known_contacts(self) -> list[Contact]:
        return self._inner.known_contacts()


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(tmp_path / "net", NODES) as started:
        yield started


def make_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


async def publish(
    net: Cluster, tmp_path: Path, size: int, name: str = "in.bin"
) -> tuple[ReadReference, bytes]:
    data = make_file(tmp_path / name, size)
    node = net.live[0]
    assert node.network is not None
    result = await node.network.publish(tmp_path / name)
    return result.reference, data


async def test_publish_then_fetch_from_every_node_and_a_client(
    net: Cluster, tmp_path: Path
) -> None:
    reference, data = await publish(net, tmp_path, 1_500_000)
    for index, node in enumerate(net.live[1:], start=1):
        assert node.network is not None
        out = tmp_path / f"out-{index}.bin"
        result = await node.network.fetch(reference, output=out)
        assert out.read_bytes() == data, f"node {index} fetched different bytes"
        assert result.metadata.name == "in.bin"
    async with net.client() as client:
        result = await client.fetch(reference, output=tmp_path / "client.bin")
    assert (tmp_path / "client.bin").read_bytes() == data
    assert result.chunks == -(-1_500_000 // TEST_CONFIG.chunk_size)


async def test_every_chunk_is_on_exactly_replicas_nodes(net: Cluster, tmp_path: Path) -> None:
    await publish(net, tmp_path, 2_000_000)
    chunks = net.stored_chunks()
    assert len(chunks) >= 31
    copies = {chunk_id: len(net.holders(chunk_id)) for chunk_id in chunks}
    assert set(copies.values()) == {TEST_CONFIG.replicas}
    # Placement is by XOR distance: each copy is on one of the closest nodes.
    ids = {index: node.identity.node_id for index, node in enumerate(net.nodes) if node}
    for chunk_id in list(chunks)[:10]:
        by_distance = sorted(ids, key=lambda i: ids[i].distance(chunk_id.dht_key))
        assert sorted(net.holders(chunk_id)) == sorted(by_distance[: TEST_CONFIG.replicas])


async def test_publishing_twice_stores_nothing_new(net: Cluster, tmp_path: Path) -> None:
    reference, _ = await publish(net, tmp_path, 500_000)

    def stored() -> dict[int, tuple[int, int]]:
        # Chunks and bytes: free disk moves as the index renews the leases.
        return {
            i: (n.store.stats().chunks, n.store.stats().bytes_used)
            for i, n in enumerate(net.live)
            if n.store
        }

    def stores_answered() -> int:
        return sum(sum(n.service.counts.values()) for n in net.live if n.service)

    before, answered = stored(), stores_answered()
    node = net.live[3]
    assert node.network is not None
    again = await node.network.publish(tmp_path / "in.bin")
    assert again.reference == reference
    assert stored() == before
    # Every chunk was proven by its holders, so none was sent again.
    assert again.already_held == again.data_chunks + again.manifest_chunks
    assert stores_answered() == answered


@pytest.mark.slow
async def test_any_replicas_minus_one_nodes_can_die(net: Cluster, tmp_path: Path) -> None:
    reference, data = await publish(net, tmp_path, 800_000)
    assert TEST_CONFIG.replicas - 1 == 2
    for dead in itertools.combinations(range(NODES), 2):
        for index in dead:
            await net.kill(index)
        survivor = net.live[0]
        assert survivor.network is not None
        out = tmp_path / f"out-{dead[0]}-{dead[1]}.bin"
        await asyncio.wait_for(survivor.network.fetch(reference, output=out), 60)
        assert out.read_bytes() == data, f"fetch failed with nodes {dead} dead"
        for index in dead:
            restarted = await net.restart(index)
            await asyncio.wait_for(restarted.announced.wait(), 30)


async def test_corrupt_replicas_are_skipped(
    net: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reference, data = await publish(net, tmp_path, 1_000_000)
    fetcher_index = 5
    damaged = 0
    chunks = net.stored_chunks()
    for chunk_id in chunks:
        holders = [i for i in net.holders(chunk_id) if i != fetcher_index]
        # Damage every copy but one (never the fetcher's own, which it reads first).
        for index in holders[:-1]:
            node = net.nodes[index]
            assert node is not None and node.store is not None
            path = node.store.path_of(chunk_id)
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            path.write_bytes(bytes(raw))
            damaged += 1
    # Each chunk has 3 copies, at most one of them the fetcher's: every
    # chunk has at least one bad copy somewhere else.
    assert damaged >= len(chunks) >= 17
    fetcher = net.nodes[fetcher_index]
    assert fetcher is not None and fetcher.network is not None
    with caplog.at_level(logging.WARNING, logger="dht_dfs.transfer.retrieval"):
        await fetcher.network.fetch(reference, output=tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data
    assert any("served a corrupt copy" in r.getMessage() for r in caplog.records)


async def test_unknown_root_fails_cleanly_and_quickly(net: Cluster, tmp_path: Path) -> None:
    unknown = ReadReference(ChunkId(os.urandom(32)), os.urandom(32))
    node = net.live[2]
    assert node.network is not None
    with pytest.raises(RootNotFoundError, match="no node has root"):
        await asyncio.wait_for(node.network.fetch(unknown, output=tmp_path / "x"), 15)
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / ("x" + PART_SUFFIX)).exists()


async def test_interrupted_fetch_resumes_without_refetching(net: Cluster, tmp_path: Path) -> None:
    reference, data = await publish(net, tmp_path, 3_000_000)
    fetcher = net.nodes[4]
    assert fetcher is not None and fetcher.network is not None
    out = tmp_path / "out.bin"
    half = asyncio.Event()

    def progress(done: int, total: int) -> None:
        if done >= total // 2:
            half.set()

    fetch = asyncio.create_task(fetcher.network.fetch(reference, output=out, progress=progress))
    await asyncio.wait_for(half.wait(), 30)
    fetch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fetch
    assert not out.exists()
    assert (tmp_path / ("out.bin" + PART_SUFFIX)).exists()

    served_before = sum(n.service.chunks_served for n in net.live if n.service)
    result = await fetcher.network.fetch(reference, output=out)
    served = sum(n.service.chunks_served for n in net.live if n.service) - served_before
    assert out.read_bytes() == data
    total = result.chunks
    assert result.chunks_resumed >= total // 2 - TEST_CONFIG.transfer_window
    assert result.chunks_fetched == total - result.chunks_resumed
    # Only the missing chunks crossed the network (plus the manifest nodes).
    own = fetcher.store
    assert own is not None
    assert served <= result.chunks_fetched + 10
    assert hashlib.sha256(out.read_bytes()).digest() == result.metadata.plain_sha256


async def test_private_convergence_secret_gives_other_chunks(net: Cluster, tmp_path: Path) -> None:
    from dht_dfs.core.crypto import secret_from_file_content

    public, data = await publish(net, tmp_path, 300_000)
    node = net.live[1]
    assert node.network is not None
    secret = secret_from_file_content(b"our team passphrase")
    private = await node.network.publish(tmp_path / "in.bin", convergence_secret=secret)
    assert private.reference.root != public.root
    # Someone without the secret who knows the file computes only the public
    # chunk ids, which the private publish did not create.
    before = net.stored_chunks()
    assert len(before) >= 2 * 5
    fetcher = net.live[4]
    assert fetcher.network is not None
    await fetcher.network.fetch(private.reference, output=tmp_path / "private.bin")
    assert (tmp_path / "private.bin").read_bytes() == data


async def test_repeated_chunks_are_fetched_without_a_lookup_each(
    net: Cluster, tmp_path: Path
) -> None:
    """A file that repeats one chunk many times (zero blocks, disk images) is
    served from the holders found for its first occurrence: no DHT lookup per
    repetition."""
    block = os.urandom(TEST_CONFIG.chunk_size)
    data = block * 40 + os.urandom(1000)
    (tmp_path / "repeats.bin").write_bytes(data)
    node = net.live[0]
    assert node.network is not None
    result = await node.network.publish(tmp_path / "repeats.bin")
    # 2 distinct data chunks and 3 manifest nodes (two leaves are equal too).
    assert len(net.stored_chunks()) <= 6, "40 equal chunks are stored once"
    async with net.client() as client:
        counting = CountingLocator(client.locator)
        counted = Network(client.config, counting, client.dialer, client.executor)
        await counted.fetch(result.reference, output=tmp_path / "out.bin")
        lookups = counting.lookups
    assert (tmp_path / "out.bin").read_bytes() == data
    assert lookups <= 5, f"{lookups} DHT lookups for a file of 2 distinct chunks"


async def test_a_tree_costs_a_few_lookups_not_one_per_chunk(net: Cluster, tmp_path: Path) -> None:
    """In a network smaller than k one lookup answers for every key: placing a
    tree of 40 files (80 chunks and more) and fetching it back needs a few."""
    tree = tmp_path / "tree"
    for index in range(40):
        folder = tree / f"d{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        make_file(folder / f"f{index}.bin", 5000 + index)  # over the 4 KiB inline limit
    async with net.client() as client:
        counting = CountingLocator(client.locator)
        counted = Network(client.config, counting, client.dialer, client.executor)
        result = await counted.publish(tree)
        publish_lookups = counting.lookups
    assert result.under_replicated == 0
    assert result.data_chunks == 40 and result.manifest_chunks >= 40
    assert publish_lookups <= 2, f"{publish_lookups} lookups to place {result.data_chunks} files"
    for chunk_id in net.stored_chunks():
        holders = net.holders(chunk_id)
        assert len(holders) == TEST_CONFIG.replicas
        for index in holders:
            node = net.nodes[index]
            assert node is not None and node.dht is not None
            held = {record.node_id for record in node.dht.local_providers(chunk_id.dht_key)}
            # A storer keeps its own record (the publisher does not send it
            # back), and the records of the other copies.
            assert node.dht.identity.node_id in held
            assert len(held) == TEST_CONFIG.replicas
    async with net.client() as client:
        counting = CountingLocator(client.locator)
        counted = Network(client.config, counting, client.dialer, client.executor)
        await counted.fetch(result.reference, output=tmp_path / "out")
        fetch_lookups = counting.lookups
    files = sorted(p.relative_to(tree) for p in tree.rglob("*.bin"))
    assert sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*")) == sorted(
        files + [Path(f"d{i}") for i in range(4)]
    )
    for relative in files:
        assert (tmp_path / "out" / relative).read_bytes() == (tree / relative).read_bytes()
    assert fetch_lookups <= 2, f"{fetch_lookups} lookups to fetch {result.data_chunks} files"
