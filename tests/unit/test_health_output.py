"""What check and repair print for a person, and the exit code they end with."""

from __future__ import annotations

import os

import pytest
from dhtfs_cli import output
from dhtfs_cli.exits import EXIT_DEGRADED, EXIT_LOST, EXIT_OK, health_exit_code

from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.core.refs import RootHash
from dht_dfs.node.results import ChunkCopies, HealthReport

ROOT = RootHash(ChunkId(os.urandom(32)))


def report(
    under: int, lost: int, *, chunks: int = 100, errors: tuple[str, ...] = ()
) -> HealthReport:
    def short(copies: int) -> ChunkCopies:
        holders = tuple(NodeId(os.urandom(20)) for _ in range(copies))
        return ChunkCopies(ChunkId(os.urandom(32)), False, copies, holders)

    return HealthReport(
        root=ROOT,
        ok=under == lost == 0,
        replicas_wanted=3,
        chunks=chunks,
        bytes=chunks * 1024,
        healthy=chunks - under - lost,
        min_copies=0 if lost else (1 if under else 3),
        under_replicated=tuple(short(1) for _ in range(under)),
        lost=tuple(short(0) for _ in range(lost)),
        copies_added=0,
        errors=errors,
        seconds=1.0,
        under_replicated_count=under,
        lost_count=lost,
    )


def printed(capsys: pytest.CaptureFixture[str], op: str, health: HealthReport) -> list[str]:
    output.print_health(op, health, str(ROOT))
    return capsys.readouterr().out.splitlines()


def test_a_long_list_says_how_many_more_and_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    health = report(25, 0)
    lines = printed(capsys, "check", health)
    assert lines[0].startswith("DEGRADED: 75/100 chunks")
    assert sum("under-replicated" in line for line in lines) == output.SHOWN + 1
    assert "  ... and 5 more under-replicated (--json lists them)" in lines
    assert lines[-1] == f"  run 'dhtfs repair {ROOT}' to add the missing copies"
    assert health_exit_code(health) == EXIT_DEGRADED


def test_lost_chunks_exit_4_and_say_repair_cannot_help(capsys: pytest.CaptureFixture[str]) -> None:
    health = report(0, 3)
    lines = printed(capsys, "check", health)
    assert sum(line.startswith("  LOST ") for line in lines) == 3
    assert "restart the nodes that held them" in lines[-1]
    assert health_exit_code(health) == EXIT_LOST
    # Lost beats degraded when both are there.
    assert health_exit_code(report(4, 1)) == EXIT_LOST
    assert health_exit_code(report(0, 0)) == EXIT_OK


def test_repair_says_why_it_could_not_add_copies(capsys: pytest.CaptureFixture[str]) -> None:
    full = "node 3f2a is full"
    lines = printed(capsys, "repair", report(2, 0, errors=(full,)))
    assert f"  could not add a copy: {full}" in lines
    assert "add nodes or free space" in lines[-1]
    assert printed(capsys, "check", report(0, 0))[0].startswith("OK: 100/100 chunks")
