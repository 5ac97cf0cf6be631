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

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench.hosts import Hosts, read_until, stop, unavailable
from tests.integration.test_cli import dhtfs_command

pytestmark = pytest.mark.slow

HOSTS = 5
"""Four nodes and one host with only a client."""
PORT = 4000
TIMEOUT = 120


@dataclass
class Cluster:
    hosts: Hosts
    directory: Path
    nodes: dict[int, subprocess.Popen[str]] = field(default_factory=dict)

    @property
    def addresses(self) -> list[str]:
        return self.hosts.addresses

    def run(self, host: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
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

    def start_node(self, host: int, bootstrap: str | None) -> dict[str, Any]:
        """Start ``dhtfs join`` on a host; returns its ready document."""
        command = [*dhtfs_command(), "join", "--port", str(PORT), "--json"]
        command += ["--data-dir", str(self.node_dir(host))]
        if bootstrap:
            command += ["--bootstrap", bootstrap]
        with (self.directory / f"host-{host}.log").open("w") as log:
            process = subprocess.Popen(
                self.hosts.command(host, *command), stdout=subprocess.PIPE, stderr=log, text=True
            )
        self.nodes[host] = process
        assert process.stdout is not None
        document: dict[str, Any] = json.loads(read_until(process.stdout, "", 60)[-1])
        return document


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Cluster]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    cluster = Cluster(Hosts(HOSTS, "test", 77), tmp_path)
    try:
        cluster.hosts.create()
        yield cluster
    finally:
        stop(cluster.nodes.values())
        cluster.hosts.destroy()


def test_nodes_on_separate_hosts_publish_fetch_and_survive_a_lost_host(
    hosts: Cluster, tmp_path: Path
) -> None:
    first = f"{hosts.addresses[0]}:{PORT}"
    ready = [hosts.start_node(0, None)]
    ready += [hosts.start_node(i, first) for i in range(1, HOSTS - 1)]
    # Each node advertises the address its peers reach it at, not 0.0.0.0:
    # a joiner learns it while joining; the first node (listening on 0.0.0.0
    # with nobody to ask) from the nodes that join it.
    assert ready[0]["address"] == f"0.0.0.0:{PORT}"
    assert [doc["address"] for doc in ready[1:]] == [f"{a}:{PORT}" for a in hosts.addresses[1:-1]]
    status = hosts.run(0, "status", "--json", "--data-dir", str(hosts.node_dir(0))).stdout
    assert json.loads(status)["address"] == f"{hosts.addresses[0]}:{PORT}"

    data = os.urandom(6 * 1024 * 1024 + 123)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    published = json.loads(
        hosts.run(0, "publish", str(source), "--json", "--data-dir", str(hosts.node_dir(0))).stdout
    )
    assert published["under_replicated"] == 0

    # The client host runs no node: it joins briefly through host 1 and
    # downloads from the nodes' real addresses.
    client = HOSTS - 1
    out = tmp_path / "out.bin"
    through = f"{hosts.addresses[1]}:{PORT}"
    hosts.run(client, "fetch", published["reference"], "-o", str(out), "--bootstrap", through)
    assert out.read_bytes() == data

    # Every chunk is on 3 of the 4 hosts, so losing one host loses nothing.
    check = hosts.run(2, "check", published["root_hash"], "--json", "--bootstrap", through)
    assert json.loads(check.stdout)["min_copies"] >= 3
    holders = [
        json.loads(hosts.run(i, "status", "--json", "--data-dir", str(hosts.node_dir(i))).stdout)
        for i in range(HOSTS - 1)
    ]
    chunks = published["data_chunks"] + published["manifest_chunks"]
    assert sum(h["store"]["chunks"] for h in holders) == 3 * chunks

    # One host lost: every file still fetches, and repair puts every chunk
    # back on 3 live hosts (all that are left).
    lost = hosts.nodes[3]
    lost.kill()
    lost.wait()
    out.unlink()
    hosts.run(client, "fetch", published["reference"], "-o", str(out), "--bootstrap", through)
    assert out.read_bytes() == data
    node_1 = ["--json", "--data-dir", str(hosts.node_dir(1))]
    repaired = json.loads(hosts.run(1, "repair", published["root_hash"], *node_1).stdout)
    assert repaired["ok"] and repaired["min_copies"] == 3
