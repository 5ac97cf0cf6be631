"""``dhtfs pin``, ``unpin`` and ``pins`` as a user runs them, on a devnet whose
leases last seconds (``devnet --lease-ttl``)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from dht_dfs.core.ids import ChunkId
from dht_dfs.core.refs import RootHash
from tests.integration.test_cli import assert_one_line_error
from tests.support.devnet import Devnet, running_devnet
from tests.support.processes import dhtfs_command

LEASE_TTL = "3"
DEADLINE = 60.0


def stored_chunks(devnet: Devnet, nodes: int) -> int:
    total = 0
    for index in range(nodes):
        status = json.loads(
            devnet.run("status", "--json", "--data-dir", str(devnet.node_dir(index))).stdout
        )
        total += status["store"]["chunks"]
    return total


def test_pins_list_what_was_published_and_unpin_lets_the_stores_shrink(tmp_path: Path) -> None:
    nodes = 3
    with running_devnet(tmp_path / "net", nodes, "--lease-ttl", LEASE_TTL) as devnet:
        home, other = str(devnet.node_dir(0)), str(devnet.node_dir(1))
        (tmp_path / "report.pdf").write_bytes(os.urandom(2_500_000))
        file_ref = devnet.run("publish", str(tmp_path / "report.pdf"), "-d", home)
        file_ref_text = file_ref.stdout.strip()
        streamed = subprocess.run(
            [*dhtfs_command(), "publish", "-", "--name", "notes.tar", "-d", home],
            input=os.urandom(300_000), capture_output=True, env=devnet.env,
            timeout=120, check=True,
        )  # fmt: skip
        stream_ref = streamed.stdout.decode().strip()

        listed = json.loads(devnet.run("pins", "--json", "-d", home).stdout)
        assert listed["lease_ttl"] == 3.0 and listed["renewal_interval"] == 1.0
        by_name = {pin["name"]: pin for pin in listed["pins"]}
        assert set(by_name) == {"report.pdf", "notes.tar"}
        assert by_name["report.pdf"]["reference"] == file_ref_text
        assert by_name["report.pdf"]["size"] == 2_500_000
        assert by_name["notes.tar"]["reference"] == stream_ref
        assert {pin["origin"] for pin in listed["pins"]} == {"published"}
        human = devnet.run("pins", "-d", home).stdout
        assert "report.pdf" in human and file_ref_text in human

        # Another node pins the file by its root hash, then lets it go again.
        root = json.loads(devnet.run("pin", file_ref_text, "--json", "-d", other).stdout)["root"]
        pinned = json.loads(devnet.run("pins", "--json", "-d", other).stdout)["pins"]
        assert [(p["root"], p["origin"], p["leased"]) for p in pinned] == [
            (root, "pinned", pinned[0]["chunks"])
        ]
        assert devnet.run("unpin", root, "-d", other).stdout.strip() == root

        # Bad input: one line, a usage exit, and nothing pinned.
        assert_one_line_error(devnet.run("pin", "nonsense", "-d", home, check=False), 2, "not")
        unknown = str(RootHash(ChunkId(os.urandom(32))))
        assert_one_line_error(
            devnet.run("pin", unknown, "-d", home, check=False), 1, "no node has root"
        )
        assert_one_line_error(
            devnet.run("unpin", root, "-d", other, check=False), 2, "is not pinned"
        )
        assert len(json.loads(devnet.run("pins", "--json", "-d", home).stdout)["pins"]) == 2

        assert stored_chunks(devnet, nodes) > 0
        for reference in (file_ref_text, stream_ref):
            devnet.run("unpin", reference, "-d", home)
        deadline = time.monotonic() + DEADLINE
        while stored_chunks(devnet, nodes):  # leases end with time: poll the stores
            assert time.monotonic() < deadline, "unpinned chunks were not collected"
        assert json.loads(devnet.run("pins", "--json", "-d", home).stdout)["pins"] == []


def test_a_lease_ttl_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    env = {**os.environ, "DHTFS_DATA_DIR": str(tmp_path / "home")}
    for command in (["join", "--lease-ttl", "0"], ["devnet", "--lease-ttl", "-5"]):
        done = subprocess.run(
            [*dhtfs_command(), *command], capture_output=True, text=True, env=env,
            timeout=60, check=False,
        )  # fmt: skip
        assert_one_line_error(done, 2, "lease TTL must be between")
