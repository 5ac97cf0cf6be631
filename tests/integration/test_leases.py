"""Whole lease cycles on real nodes (127.0.0.1), with a lease TTL of seconds.

Every node runs its own renewal and collection loops (``node.leasing``);
the tests only publish, pin and unpin, and watch the stores. Leases end
with the passing of time, so the waits here poll a store condition under a
deadline: they wait for what a lease's end must cause, never for a node.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from dht_dfs.core.ids import ChunkId
from dht_dfs.core.refs import ReadReference, RootHash
from dht_dfs.node.operations import PinRequest, PublishRequest, UnpinRequest
from dht_dfs.node.results import PublishSummary
from dht_dfs.transfer.network import Network
from dht_dfs.transfer.retrieval import NetworkSource
from dht_dfs.transfer.walk import walk_public
from tests.integration.cluster import TEST_CONFIG, Cluster, cluster

LEASE_TTL = 2.0
"""Renewals every 0.67 s, a grace of 0.67 s: a whole cycle in a few seconds."""
CONFIG = TEST_CONFIG.replace(lease_ttl=LEASE_TTL)
CHUNK = CONFIG.chunk_size
DEADLINE = 30.0


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(tmp_path / "net", 4, CONFIG) as started:
        yield started


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` (a look at the stores) until it holds, for DEADLINE s at most."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE:g} s: {what}")
        await asyncio.sleep(0.05)


def stored_bytes(net: Cluster) -> int:
    return sum(node.store.stats().bytes_used for node in net.live if node.store is not None)


async def chunks_of(network: Network, root: RootHash) -> set[ChunkId]:
    source = NetworkSource(network)
    return {chunk_id async for chunk_id, _, _ in walk_public(source, root, network.executor)}


async def publish_on(net: Cluster, index: int, path: Path) -> PublishSummary:
    """Publish through node ``index`` as ``dhtfs publish --data-dir`` does (so it pins)."""
    result = await net.live[index].handle(PublishRequest(path).check_input(), lambda _: None)
    assert isinstance(result, PublishSummary)
    return result


async def fetch_bytes(net: Cluster, reference: ReadReference, tmp_path: Path) -> bytes:
    target = tmp_path / f"fetched-{os.urandom(4).hex()}"
    async with net.client() as client:
        await client.fetch(reference, output=target)
    return target.read_bytes()


async def test_an_unpinned_file_goes_from_every_holder_and_a_pin_keeps_another(
    net: Cluster, tmp_path: Path
) -> None:
    loose, kept = tmp_path / "loose.bin", tmp_path / "kept.bin"
    loose.write_bytes(os.urandom(6 * CHUNK))
    kept_data = os.urandom(6 * CHUNK)
    kept.write_bytes(kept_data)
    async with net.client() as client:  # a client pins nothing
        loose_ref = (await client.publish(loose)).reference
        kept_ref = (await client.publish(kept)).reference
        loose_chunks = await chunks_of(client, loose_ref.root_hash)
        kept_chunks = await chunks_of(client, kept_ref.root_hash)
    assert all(net.holders(c) for c in loose_chunks | kept_chunks)
    # Another node pins the second file by its root hash alone.
    pinner = net.live[3]
    pin = await pinner.pin(PinRequest(kept_ref.root_hash))
    assert pin.chunks == len(kept_chunks) and pin.unleased == 0
    assert pin.min_holders == CONFIG.replicas and pin.reference is None

    await until(
        lambda: not any(net.holders(c) for c in loose_chunks),
        "every holder dropped the unpinned file's chunks",
    )
    # By now every lease from the publish ran out, grace included: what is
    # left lives on the pin's renewals alone.
    for chunk_id in kept_chunks:
        assert len(net.holders(chunk_id)) == CONFIG.replicas, chunk_id
    assert pinner.leases is not None and pinner.leases.totals.renewals >= 2
    assert await fetch_bytes(net, kept_ref, tmp_path) == kept_data
    # Pinned again with its read reference: the catalogue learns the name.
    again = await pinner.pin(PinRequest(kept_ref.root_hash, kept_ref))
    assert (again.name, again.reference, again.origin) == ("kept.bin", kept_ref, "pinned")
    assert again.pinned_at == pin.pinned_at
    assert [p.root for p in pinner.pin_list().pins] == [kept_ref.root_hash]


async def test_a_shared_chunk_stays_while_either_file_is_pinned_and_unpin_frees_all(
    net: Cluster, tmp_path: Path
) -> None:
    baseline = stored_bytes(net)
    # Chunks are cut at fixed offsets and keyed by their own content, so the
    # second file shares all four chunks of the first.
    first_data = os.urandom(4 * CHUNK)
    second_data = first_data + os.urandom(2 * CHUNK)
    (tmp_path / "first.bin").write_bytes(first_data)
    (tmp_path / "second.bin").write_bytes(second_data)
    first = await publish_on(net, 0, tmp_path / "first.bin")
    second = await publish_on(net, 0, tmp_path / "second.bin")
    owner = net.live[0]
    assert owner.network is not None
    first_chunks = await chunks_of(owner.network, first.root_hash)
    second_chunks = await chunks_of(owner.network, second.root_hash)
    shared = first_chunks & second_chunks
    assert len(shared) == 4
    listed = owner.pin_list().pins
    assert {(p.name, p.origin, p.size) for p in listed} == {
        ("first.bin", "published", len(first_data)),
        ("second.bin", "published", len(second_data)),
    }

    await owner.unpin(UnpinRequest(first.root_hash))
    only_first = first_chunks - shared
    await until(
        lambda: not any(net.holders(c) for c in only_first),
        "the unpinned file's own chunks (its manifest) are gone",
    )
    for chunk_id in second_chunks:
        assert net.holders(chunk_id), f"chunk {chunk_id} of the pinned file went"
    assert await fetch_bytes(net, second.reference, tmp_path) == second_data

    await owner.unpin(UnpinRequest(second.root_hash))
    await until(lambda: stored_bytes(net) == baseline, "the stores are back to their size")
    assert owner.pin_list().pins == ()


async def test_an_interrupted_publish_leaves_nothing_after_its_leases(
    net: Cluster, tmp_path: Path
) -> None:
    baseline = stored_bytes(net)
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(200 * CHUNK))
    placed = asyncio.Event()

    def progress(done: int, total: int) -> None:
        if done >= 20 * CHUNK:
            placed.set()

    async with net.client() as client:
        publishing = asyncio.create_task(client.publish(source, progress=progress))
        waiting = asyncio.create_task(placed.wait())
        await asyncio.wait([publishing, waiting], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        assert not publishing.done(), "the publish finished before it could be interrupted"
        publishing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await publishing
    assert stored_bytes(net) > baseline + 10 * CHUNK, "the interrupted publish stored chunks"
    await until(lambda: stored_bytes(net) == baseline, "the orphan chunks are collected")
