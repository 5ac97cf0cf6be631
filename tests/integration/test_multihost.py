"""Real ``dhtfs`` processes on separate hosts: one network namespace each.

Every host has its own address (10.77.x.y/24) on a bridge that lives in a
namespace of its own, so nothing touches this machine's own network. The
nodes listen on 0.0.0.0 with the same port, as on real machines, so what
is tested is what loopback tests cannot show: that nodes learn and
advertise the addresses their peers can reach, and that a client on a host
with no node fetches from the others.

Needs root and iproute2; skipped (with the reason) where either is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dht_dfs.node.processes import ManagedProcess, Supervisor, join_command
from tests.support.hosts import Hosts, unavailable
from tests.support.processes import dhtfs_command

pytestmark = pytest.mark.slow

HOSTS = 5
"""Four nodes and one host with only a client."""
PORT = 4000
TIMEOUT = 120


@dataclass
class Cluster:
    hosts: Hosts
    directory: Path
    supervisor: Supervisor

    @property
    def addresses(self) -> list[str]:
        return self.hosts.addresses

    async def run(
        self, host: int, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = await asyncio.to_thread(
            subprocess.run,
            self.hosts.command(host, *dhtfs_command(), *args),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"dhtfs {' '.join(args)} on host {host}: {done.stderr}")
        return done

    def node_dir(self, host: int) -> Path:
        return self.directory / f"host-{host}"

    async def start_node(self, host: int, bootstrap: str | None) -> ManagedProcess:
        """Start ``dhtfs join`` on a host (all its addresses, as on a real machine)."""
        return await self.supervisor.start(
            join_command(
                self.node_dir(host),
                port=PORT,
                host=None,
                bootstrap=[bootstrap] if bootstrap else [],
            ),
            name=f"node on host {host}",
            log_path=self.directory / f"host-{host}.log",
            prefix=self.hosts.command(host),
        )


@pytest.fixture
async def hosts(tmp_path: Path) -> AsyncIterator[Cluster]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    async with Supervisor(grace=60) as supervisor:
        cluster = Cluster(Hosts(HOSTS, "test", 77), tmp_path, supervisor)
        try:
            cluster.hosts.create()
            yield cluster
        finally:
            await supervisor.stop()
            cluster.hosts.destroy()


async def test_nodes_on_separate_hosts_publish_fetch_and_survive_a_lost_host(
    hosts: Cluster, tmp_path: Path
) -> None:
    first = f"{hosts.addresses[0]}:{PORT}"
    nodes = [await hosts.start_node(0, None)]
    nodes += [await hosts.start_node(i, first) for i in range(1, HOSTS - 1)]
    ready = [node.ready for node in nodes]
    # Each node advertises the address its peers reach it at, not 0.0.0.0:
    # a joiner learns it while joining; the first node (listening on 0.0.0.0
    # with nobody to ask) from the nodes that join it.
    assert ready[0]["address"] == f"0.0.0.0:{PORT}"
    assert [doc["address"] for doc in ready[1:]] == [f"{a}:{PORT}" for a in hosts.addresses[1:-1]]
    status = (await hosts.run(0, "status", "--json", "--data-dir", str(hosts.node_dir(0)))).stdout
    assert json.loads(status)["address"] == f"{hosts.addresses[0]}:{PORT}"

    data = os.urandom(6 * 1024 * 1024 + 123)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    published = json.loads(
        (
            await hosts.run(
                0, "publish", str(source), "--json", "--data-dir", str(hosts.node_dir(0))
            )
        ).stdout
    )
    assert published["under_replicated"] == 0

    # The client host runs no node: it joins briefly through host 1 and
    # downloads from the nodes' real addresses.
    client = HOSTS - 1
    out = tmp_path / "out.bin"
    through = f"{hosts.addresses[1]}:{PORT}"
    await hosts.run(client, "fetch", published["reference"], "-o", str(out), "--bootstrap", through)
    assert out.read_bytes() == data

    # Every chunk is on 3 of the 4 hosts, so losing one host loses nothing.
    check = await hosts.run(2, "check", published["root_hash"], "--json", "--bootstrap", through)
    assert json.loads(check.stdout)["min_copies"] >= 3
    holders = [
        json.loads(
            (await hosts.run(i, "status", "--json", "--data-dir", str(hosts.node_dir(i)))).stdout
        )
        for i in range(HOSTS - 1)
    ]
    chunks = published["data_chunks"] + published["manifest_chunks"]
    assert sum(h["store"]["chunks"] for h in holders) == 3 * chunks

    # One host lost: every file still fetches, and repair puts every chunk
    # back on 3 live hosts (all that are left).
    lost = nodes[3]
    lost.kill()
    await lost.wait()
    out.unlink()
    await hosts.run(client, "fetch", published["reference"], "-o", str(out), "--bootstrap", through)
    assert out.read_bytes() == data
    node_1 = ["--json", "--data-dir", str(hosts.node_dir(1))]
    repaired = json.loads((await hosts.run(1, "repair", published["root_hash"], *node_1)).stdout)
    assert repaired["ok"] and repaired["min_copies"] == 3
