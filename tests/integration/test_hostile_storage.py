"""Storage admission on real nodes: a stranger cannot park bytes anywhere and
have repair multiply them onto the chunks' rightful holders."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from dht_dfs.core.addresses import PeerAddress
from dht_dfs.core.config import KiB
from dht_dfs.core.ids import ChunkId
from dht_dfs.node.node import Node
from dht_dfs.wire import StoreStatus

from .cluster import TEST_CONFIG, Cluster, cluster

CHUNK = 64 * KiB
GUESTS = 4
ATTACK_CHUNKS = 10
CONFIG = TEST_CONFIG.replace(
    # Six nodes: with the default slack (2 x 3 = 6) every node would be
    # rightful for everything, as in any network this small.
    store_closeness_slack=1,
    guest_bytes_per_peer=GUESTS * CHUNK,
)


def farthest_chunks(net: Cluster, target: Node, count: int) -> list[tuple[ChunkId, bytes]]:
    """Chunks ``target`` is the farthest node from, and not rightful for by its view."""
    assert target.dht is not None and target.identity is not None
    rank = CONFIG.store_closeness_slack * CONFIG.replicas
    ids = [node.identity.node_id for node in net.live if node.identity is not None]
    found: list[tuple[ChunkId, bytes]] = []
    for _ in range(200 * count):  # 1 in 6 random chunks qualifies
        data = os.urandom(CHUNK)
        chunk_id = ChunkId.of(data)
        key = chunk_id.dht_key
        if max(ids, key=lambda node_id: node_id.distance(key)) == target.identity.node_id and (
            not target.dht.is_rightful_for(key, rank)
        ):
            found.append((chunk_id, data))
            if len(found) == count:
                return found
    raise AssertionError("the target knows too few nodes to be far from anything")


def copies(net: Cluster, chunk_ids: list[ChunkId]) -> int:
    return sum(len(net.holders(chunk_id)) for chunk_id in chunk_ids)


async def test_a_stranger_cannot_amplify_bytes_parked_on_a_far_node(tmp_path: Path) -> None:
    async with cluster(tmp_path / "net", 6, CONFIG) as net:
        target = net.live[-1]
        assert target.store is not None and target.identity is not None
        parked = farthest_chunks(net, target, ATTACK_CHUNKS)
        address = PeerAddress("127.0.0.1", target.port, target.identity.node_id)
        async with net.client() as attacker:
            link = await attacker.dialer.connect(address)
            answers = [(await link.store(c, d, 3600)).status for c, d in parked]
            assert answers == [StoreStatus.STORED] * GUESTS + [StoreStatus.REFUSED] * (
                ATTACK_CHUNKS - GUESTS
            ), "a stranger gets its guest budget, then REFUSED"
            # The same peer's honest STORE of a chunk the target is rightful for.
            assert target.dht is not None
            rank = CONFIG.store_closeness_slack * CONFIG.replicas
            for _ in range(1000):  # about 1 in 2 tries
                data = os.urandom(CHUNK)
                honest = ChunkId.of(data)
                if target.dht.is_rightful_for(honest.dht_key, rank):
                    break
            else:
                raise AssertionError("the target is rightful for nothing")
            assert (await link.store(honest, data, 3600)).status is StoreStatus.STORED
            assert not target.store.is_guest(honest)
        parked_ids = [chunk_id for chunk_id, _ in parked]
        assert target.store.stats().guests == GUESTS
        for _ in range(3):
            await asyncio.gather(
                *(n.maintainer.repair_pass(rate=0, force=True) for n in net.live if n.maintainer)
            )
        # Before admission, 10 parked chunks became 40 copies on 4 nodes.
        assert copies(net, parked_ids) == GUESTS, "repair spread no guest"
        assert net.holders(parked_ids[0]) == [len(net.nodes) - 1]

        # Guest state survives a restart of the node.
        index = len(net.nodes) - 1
        await net.kill(index)
        restarted = await net.restart(index)
        assert restarted.store is not None
        assert restarted.store.guests_among(parked_ids) == set(parked_ids[:GUESTS])
        assert not restarted.store.is_guest(honest)
