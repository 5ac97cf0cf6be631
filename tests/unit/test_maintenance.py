"""The rules of the repair pass and the hand-off, over the in-memory network.

Ranks are by XOR distance to the chunk's id: ``ranked[0]`` is the closest
node. With ``replicas = 3`` the rightful holders are ``ranked[:3]``, and a
copy beyond ``ranked[:6]`` is far surplus.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Executor
from pathlib import Path

import pytest

from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.node.maintenance import Maintainer
from dht_dfs.store.guests import Guest
from dht_dfs.transfer.ports import get_verified
from dht_dfs.transfer.retrieval import NetworkSource
from dht_dfs.wire import StoreStatus
from tests.support.memnet import FakeNode, Joined, MemNet


def give(chunk_id: ChunkId, data: bytes, *holders: FakeNode) -> None:
    for node in holders:
        node.keep(chunk_id, data)


def maintainer(net: MemNet, me: FakeNode, executor: Executor) -> tuple[Maintainer, Joined]:
    joined = net.join(me, executor)
    assert me.store is not None
    return Maintainer(joined.network, me.store, net.config), joined


def ids(*nodes: FakeNode) -> set[NodeId]:
    return {node.node_id for node in nodes}


def a_chunk_ranked(net: MemNet) -> tuple[ChunkId, bytes, list[FakeNode]]:
    data = os.urandom(3000)
    chunk_id = ChunkId.of(data)
    return chunk_id, data, net.by_distance(chunk_id.dht_key)


async def test_only_the_closest_holder_copies(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(6, stores=tmp_path)
    chunk_id, data, ranked = a_chunk_ranked(net)
    give(chunk_id, data, ranked[0], ranked[1])
    second, _ = maintainer(net, ranked[1], executor)
    stats = await second.repair_pass(rate=0)
    assert stats.examined == 1 and stats.copies_added == 0
    assert net.holders(chunk_id) == ids(ranked[0], ranked[1]), "a closer holder is responsible"
    first, _ = maintainer(net, ranked[0], executor)
    stats = await first.repair_pass(rate=0)
    assert stats.copies_added == 1
    assert net.holders(chunk_id) == ids(*ranked[:3])


async def test_a_node_outside_the_rightful_set_copies_only_when_none_of_it_has_it(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(6, stores=tmp_path)
    outside_rank = 4
    # A rightful node has the chunk: the outsider leaves it to that node.
    kept, kept_data, ranked = a_chunk_ranked(net)
    give(kept, kept_data, ranked[0], ranked[outside_rank])
    outsider, _ = maintainer(net, ranked[outside_rank], executor)
    stats = await outsider.repair_pass(rate=0)
    assert stats.copies_added == 0
    assert net.holders(kept) == ids(ranked[0], ranked[outside_rank])
    # No rightful node has it (they joined closer to it): the outsider copies.
    for node in ranked:
        node.drop(kept)
    moved, moved_data, ranked = a_chunk_ranked(net)
    give(moved, moved_data, ranked[outside_rank])
    outsider, _ = maintainer(net, ranked[outside_rank], executor)
    stats = await outsider.repair_pass(rate=0, force=True)
    assert stats.copies_added == 3
    assert net.holders(moved) == ids(*ranked[:3], ranked[outside_rank])


async def test_a_far_surplus_copy_is_dropped_only_when_the_rightful_set_is_complete(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(8, stores=tmp_path)
    far_rank = 7
    incomplete, incomplete_data, ranked = a_chunk_ranked(net)
    give(incomplete, incomplete_data, ranked[0], ranked[1], ranked[far_rank])
    far, _ = maintainer(net, ranked[far_rank], executor)
    stats = await far.repair_pass(rate=0)
    assert stats.copies_dropped == 0
    assert ranked[far_rank].has(incomplete), "kept while a rightful copy is missing"
    ranked[far_rank].drop(incomplete)

    complete, complete_data, ranked = a_chunk_ranked(net)
    give(complete, complete_data, *ranked[:3], ranked[far_rank])
    far, _ = maintainer(net, ranked[far_rank], executor)
    stats = await far.repair_pass(rate=0, force=True)
    assert stats.copies_dropped == 1
    assert net.holders(complete) == ids(*ranked[:3])


async def test_a_near_surplus_copy_is_kept(net: MemNet, executor: Executor, tmp_path: Path) -> None:
    net.add(8, stores=tmp_path)
    chunk_id, data, ranked = a_chunk_ranked(net)
    give(chunk_id, data, *ranked[:3], ranked[5])
    near, _ = maintainer(net, ranked[5], executor)
    stats = await near.repair_pass(rate=0)
    assert stats.copies_dropped == 0
    assert net.holders(chunk_id) == ids(*ranked[:3], ranked[5])


async def test_hand_off_copies_what_would_be_short(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(6, stores=tmp_path)
    leaving_rank = 0
    short, short_data, ranked = a_chunk_ranked(net)
    give(short, short_data, ranked[leaving_rank], ranked[1])
    leaving, _ = maintainer(net, ranked[leaving_rank], executor)
    stats = await leaving.hand_off(within=5)
    # Without the leaving node its rightful holders are ranked[1:4].
    assert stats.copies_added == 2
    assert net.holders(short) == ids(*ranked[:4])


async def test_hand_off_leaves_a_fully_replicated_chunk_alone(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(6, stores=tmp_path)
    chunk_id, data, ranked = a_chunk_ranked(net)
    give(chunk_id, data, *ranked[:4])
    leaving, _ = maintainer(net, ranked[0], executor)
    stats = await leaving.hand_off(within=5)
    assert stats.examined == 1 and stats.copies_added == 0
    assert net.holders(chunk_id) == ids(*ranked[:4])


async def test_a_pass_is_skipped_while_membership_is_unchanged(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(6, stores=tmp_path)
    chunk_id, data, ranked = a_chunk_ranked(net)
    give(chunk_id, data, *ranked[:3])
    repairer, joined = maintainer(net, ranked[0], executor)
    first = await repairer.repair_pass(rate=0)
    assert not first.skipped and first.examined == 1
    lookups = len(joined.locator.calls)
    assert lookups > 0
    second = await repairer.repair_pass(rate=0)
    assert second.skipped and second.examined == 0
    assert len(joined.locator.calls) == lookups, "a skipped pass makes no lookup"
    ranked[5].dead = True
    third = await repairer.repair_pass(rate=0)
    assert not third.skipped, "a node stopped answering: a full pass"
    forced = await repairer.repair_pass(rate=0, force=True)
    assert not forced.skipped and forced.examined == 1


def grind_closer(net: MemNet, key: bytes, than: list[FakeNode], count: int) -> list[FakeNode]:
    """New lying nodes with ids closer to ``key`` than every node of ``than`` (a Sybil grind)."""
    bound = min(node.node_id.distance(key) for node in than)
    sybils: list[FakeNode] = []
    while len(sybils) < count:
        (node,) = net.add(1)
        if node.node_id.distance(key) < bound:
            node.lie = True
            sybils.append(node)
        else:
            del net.nodes[node.node_id]
    return sybils


async def test_sybils_claiming_a_chunk_they_do_not_store_cannot_get_it_dropped(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    honest = net.add(3, stores=tmp_path)
    data = os.urandom(3000)
    chunk_id = ChunkId.of(data)
    give(chunk_id, data, *honest)
    for node in honest:
        net.announce(node, chunk_id)
    # Six identities closer to the chunk than its three holders: they are
    # now its rightful set, answer HAVE yes and store nothing, which makes
    # every honest copy look like far surplus (ranks 6 to 8).
    grind_closer(net, chunk_id.dht_key, honest, 6)
    assert net.by_distance(chunk_id.dht_key)[6:] == sorted(
        honest, key=lambda n: n.node_id.distance(chunk_id.dht_key)
    )
    for _ in range(2):
        for node in honest:
            repairer, _ = maintainer(net, node, executor)
            stats = await repairer.repair_pass(rate=0, force=True)
            assert stats.copies_dropped == 0
            assert stats.failed_proofs == 3, "each rightful liar failed its proof"
    assert net.holders(chunk_id) == ids(*honest), "every honest copy is still there"
    client = net.join(net.client(), executor)
    assert await get_verified(NetworkSource(client.network), chunk_id) == data


async def test_a_surplus_copy_is_dropped_only_on_proofs_not_on_have(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(8, stores=tmp_path)
    far_rank = 7
    chunk_id, data, ranked = a_chunk_ranked(net)
    give(chunk_id, data, *ranked[:3], ranked[far_rank])
    ranked[1].corrupt = True  # a rotten copy answers HAVE yes, but its proof fails
    far, _ = maintainer(net, ranked[far_rank], executor)
    stats = await far.repair_pass(rate=0)
    assert stats.copies_dropped == 0 and stats.failed_proofs == 1
    assert ranked[far_rank].has(chunk_id)
    assert sum(node.proves for node in ranked[:3]) == 3, "every rightful holder was challenged"
    ranked[1].corrupt = False
    stats = await far.repair_pass(rate=0, force=True)
    assert stats.copies_dropped == 1


async def test_hand_off_does_not_trust_have(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(6, stores=tmp_path)
    chunk_id, data, ranked = a_chunk_ranked(net)
    give(chunk_id, data, ranked[0])
    for node in ranked[1:4]:
        node.lie = True  # all say HAVE yes; none keeps anything
    leaving, _ = maintainer(net, ranked[0], executor)
    stats = await leaving.hand_off(within=5)
    assert stats.failed_proofs == 3
    assert stats.copies_added == 2, "the two honest nodes left took a copy"
    assert net.holders(chunk_id) == ids(ranked[0], ranked[4], ranked[5])


# --- guests: chunks a node keeps without being a rightful holder --------------------------


async def test_repair_never_copies_a_guest_outward(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(10, stores=tmp_path)
    chunk_id, data, ranked = a_chunk_ranked(net)
    attacker = net.client()
    link = await net.join(attacker, executor).dialer.connect(ranked[-1].address)
    assert (await link.store(chunk_id, data, 3600)).status is StoreStatus.STORED
    assert ranked[-1].is_guest(chunk_id), "the farthest node is no rightful holder"
    far, _ = maintainer(net, ranked[-1], executor)
    stats = await far.repair_pass(rate=0, force=True)
    assert stats.guests_kept == 1 and stats.copies_added == 0
    assert net.holders(chunk_id) == ids(ranked[-1]), "no copy went to the rightful nodes"
    stats = await far.hand_off(within=5)
    assert stats.examined == 0 and stats.copies_added == 0, "nor is a guest handed off"


async def test_a_guest_that_becomes_rightful_is_promoted_and_replicated(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(10, stores=tmp_path)
    chunk_id, data, ranked = a_chunk_ranked(net)
    guest_host = ranked[7]
    guest_host.keep(chunk_id, data, guest=Guest(net.client().node_id, "10.0.0.9"))
    repairer, _ = maintainer(net, guest_host, executor)
    assert (await repairer.repair_pass(rate=0, force=True)).guests_kept == 1
    for node in ranked[:6]:
        node.dead = True  # guest_host is now among the closest live nodes
    stats = await repairer.repair_pass(rate=0, force=True)
    assert stats.guests_promoted == 1 and stats.copies_added == 2
    assert not guest_host.is_guest(chunk_id)
    assert net.holders(chunk_id) == ids(*ranked[6:9])


async def test_a_closer_newcomer_accepts_the_hand_over_as_rightful(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(10, stores=tmp_path)
    chunk_id, data, ranked = a_chunk_ranked(net)
    give(chunk_id, data, *ranked[1:4])
    # ranked[0] "joins": it holds nothing; the closest holder hands it a copy.
    stats = await maintainer(net, ranked[1], executor)[0].repair_pass(rate=0)
    assert stats.copies_added == 1
    assert ranked[0].has(chunk_id) and not ranked[0].is_guest(chunk_id)


async def test_guests_expire_after_their_ttl(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(10, stores=tmp_path)
    chunk_id, data, ranked = a_chunk_ranked(net)
    ranked[-1].keep(chunk_id, data, guest=Guest(net.client().node_id, "10.0.0.9"))
    joined = net.join(ranked[-1], executor, net.config.replace(guest_ttl=0.0))
    assert ranked[-1].store is not None
    expiring = Maintainer(joined.network, ranked[-1].store, joined.network.config)
    stats = await expiring.repair_pass(rate=0)
    assert stats.guests_dropped == 1 and not ranked[-1].has(chunk_id)


async def test_copies_that_fail_are_logged_once_per_pass_with_a_count(
    net: MemNet, executor: Executor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nodes = net.add(6, stores=tmp_path)
    me = nodes[0]
    for node in nodes[1:]:
        node.full = True  # every copy this pass tries is refused
    for _ in range(30):
        data = os.urandom(3000)
        me.keep(ChunkId.of(data), data)
    repairer, _ = maintainer(net, me, executor)
    with caplog.at_level(logging.INFO, logger="dht_dfs.node.maintenance"):
        stats = await repairer.repair_pass(rate=0)
    assert stats.errors == 30 and stats.under_replicated == 30
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("repair: could not copy 30 chunk(s) (first: chunk ")
    assert "full" in warnings[0]
