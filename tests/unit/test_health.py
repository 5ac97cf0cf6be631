"""check and repair over the in-memory network: claimed copies against proven ones.

Without ``verify`` a holder counts when it says HAVE; with it, one copy of
each chunk is fetched and checked, and every other holder must answer a
fresh challenge with a keyed hash of the chunk.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor
from pathlib import Path

from dht_dfs.core.ids import ChunkId
from dht_dfs.core.refs import RootHash
from tests.support.memnet import FakeNode, MemNet

SIZE = 40_000


async def publish_with_a_liar(
    net: MemNet, executor: Executor, tmp_path: Path
) -> tuple[RootHash, set[ChunkId], FakeNode, set[ChunkId]]:
    net.add(8)
    (tmp_path / "in.bin").write_bytes(os.urandom(SIZE))
    result = await net.join(net.client(), executor).network.publish(tmp_path / "in.bin")
    stored = {c for node in net.nodes.values() for c in node.chunks}
    # The holder of most chunks throws its copies away and keeps saying HAVE.
    liar = max(net.nodes.values(), key=lambda node: len(node.chunks))
    lied = set(liar.chunks)
    liar.chunks.clear()
    liar.lie = True
    return result.reference.root_hash, stored, liar, lied


async def test_check_counts_a_liar_and_check_verify_does_not(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    root, stored, liar, lied = await publish_with_a_liar(net, executor, tmp_path)
    assert lied and all(len(net.holders(c)) == 2 for c in lied)
    checker = net.join(net.client(), executor).network
    claimed = await checker.check(root)
    assert claimed.ok and not claimed.verified, "a HAVE answer is only a claim"
    assert claimed.to_json()["holders_are"] == "claimed"

    proven = await checker.check(root, verify=True)
    assert proven.verified and not proven.ok
    assert proven.to_json()["holders_are"] == "proven"
    assert {h.chunk_id for h in proven.under_replicated} == lied
    for health in proven.under_replicated:
        assert liar.node_id not in health.holders
        assert liar.node_id in health.failed
        assert len(health.holders) == 2
    assert proven.failed_holders == {liar.node_id}
    assert proven.failed_proofs >= len(lied)
    assert proven.chunks == len(stored)
    assert liar.proves > 0 and liar.gets <= len(stored)


async def test_repair_verify_replaces_a_lying_holder_with_real_copies(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    root, stored, liar, lied = await publish_with_a_liar(net, executor, tmp_path)
    repairer = net.join(net.client(), executor).network
    plain = await repairer.repair(root)
    assert plain.copies_added == 0, "the claim hid the missing copies"
    stores_before = liar.stores
    repaired = await repairer.repair(root, verify=True)
    assert repaired.ok, repaired.to_json()
    assert repaired.copies_added == len(lied)
    assert liar.stores == stores_before, "no copy goes to a node that failed a proof"
    assert all(len(net.holders(c)) == 3 for c in stored), "three real copies of every chunk"
    again = await repairer.check(root, verify=True)
    assert again.ok and again.copies_added == 0
