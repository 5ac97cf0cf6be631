"""A publish sends no chunk its rightful holders prove they have (``transfer.held``).

Over the in-memory network. The rule under attack: a holder's word is not a
copy. A holder that says it has a chunk but cannot prove it gets the chunk.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor
from pathlib import Path

from tests.support.memnet import MemNet


def stores(net: MemNet) -> int:
    return sum(node.stores for node in net.nodes.values())


async def test_republishing_sends_nothing_and_renews_the_leases(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(6)
    network = net.join(net.client(), executor).network
    source = tmp_path / "file.bin"
    source.write_bytes(os.urandom(20 * net.config.chunk_size))
    first = await network.publish(source)
    assert first.already_held == 0
    sent, leased = stores(net), sum(n.lease_requests for n in net.nodes.values())
    again = await network.publish(source)
    assert again.reference == first.reference
    chunks = again.data_chunks + again.manifest_chunks
    assert again.already_held == chunks and again.under_replicated == 0
    assert stores(net) == sent, "a chunk the network proved it has was sent again"
    assert sum(n.lease_requests for n in net.nodes.values()) >= leased + chunks * 3


async def test_a_holder_that_claims_a_chunk_but_cannot_prove_it_gets_it_sent(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(6)
    network = net.join(net.client(), executor).network
    source = tmp_path / "one.bin"
    source.write_bytes(os.urandom(net.config.chunk_size - 100))  # one data chunk
    first = await network.publish(source)
    data_holders = [n for n in net.nodes.values() if n.chunks]
    liar = data_holders[0]
    liar.chunks.clear()
    liar.lie = True  # says HAVE to everything, proves nothing
    before = stores(net)
    again = await network.publish(source)
    assert again.reference == first.reference
    assert again.already_held < again.data_chunks + again.manifest_chunks
    assert stores(net) > before, "the unproven chunk was not sent"


async def test_a_publish_that_stopped_half_way_resumes_without_resending(
    net: MemNet, executor: Executor, tmp_path: Path
) -> None:
    net.add(6)
    network = net.join(net.client(), executor).network
    size = net.config.chunk_size
    head = os.urandom(30 * size)
    (tmp_path / "part.bin").write_bytes(head)
    (tmp_path / "whole.bin").write_bytes(head + os.urandom(30 * size))
    await network.publish(tmp_path / "part.bin")  # what got placed before the stop
    before = stores(net)
    whole = await network.publish(tmp_path / "whole.bin")
    # The 30 chunks placed before are proven and skipped; the rest is sent.
    assert whole.already_held >= 30
    assert stores(net) - before <= 3 * (whole.data_chunks + whole.manifest_chunks - 30)
