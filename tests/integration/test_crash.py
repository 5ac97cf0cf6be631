"""Real node processes SIGKILLed while receiving chunks, then restarted."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
from dhtfs_cli.devnet import Devnet, find_free_ports, start_devnet

from dht_dfs.node.operations import FetchRequest, PublishRequest, StatusRequest
from dht_dfs.node.results import Event, Progress, PublishSummary

pytestmark = pytest.mark.slow

NODES = 5


def chunk_files_are_whole(data_dir: Path) -> int:
    """Count chunk files, asserting each holds exactly the bytes its name promises."""
    count = 0
    for path in (data_dir / "store" / "chunks").rglob("*"):
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, path
            count += 1
    return count


async def publish_killing(
    net: Devnet, path: Path, victim: int, at_fraction: float
) -> PublishSummary:
    """Publish through node 0; SIGKILL ``victim`` once that much has been sent."""
    killed = asyncio.Event()

    def on_event(event: Event) -> None:
        if not isinstance(event, Progress) or killed.is_set():
            return
        if event.done >= at_fraction * event.total:
            net.nodes[victim].process.kill()
            killed.set()

    result = await asyncio.wait_for(
        net.nodes[0].session.run(PublishRequest(path), on_event),
        180,
    )
    assert killed.is_set()
    await net.nodes[victim].process.wait()
    return result


async def test_sigkill_while_receiving_never_leaves_partial_chunks(tmp_path: Path) -> None:
    base = find_free_ports(NODES)
    net = await start_devnet(NODES, base, tmp_path / "net")
    checked_files = 0
    try:
        for round_number, (victim, fraction) in enumerate([(3, 0.2), (1, 0.5), (4, 0.8)]):
            data = os.urandom(24 * 1024 * 1024)
            source = tmp_path / f"in-{round_number}.bin"
            source.write_bytes(data)
            published = await publish_killing(net, source, victim, fraction)

            node = net.nodes[victim]
            assert node.process.returncode == -9
            # Whatever the kill interrupted, the store on disk holds only whole chunks...
            chunk_files_are_whole(node.data_dir)
            # Restarted as a supervisor would, without --bootstrap: it rejoins
            # through the contacts it saved when it joined.
            restarted = await net.start_node(victim, node.port, None)
            assert net.nodes[victim] is restarted
            status = await restarted.session.run(StatusRequest())
            assert status.peers_known >= 1
            # ...the restart cleared unfinished temp files...
            assert list((node.data_dir / "store" / "tmp").iterdir()) == []
            checked_files += chunk_files_are_whole(node.data_dir)
            # ...and the node serves again: fetch through it, byte-identical.
            out = tmp_path / f"out-{round_number}.bin"
            await asyncio.wait_for(
                restarted.session.run(FetchRequest(published.reference, output=out)), 120
            )
            assert out.read_bytes() == data
        # (A victim may have received nothing before its kill; over three
        # rounds some chunk files must have been checked.)
        assert checked_files > 0
    finally:
        await net.stop(grace=30)
