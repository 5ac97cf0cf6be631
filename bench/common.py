"""Shared helpers for the benchmark scripts: test files, RSS, CPU, results."""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1024 * 1024


def make_file(path: Path, size: int, *, block: int = 16 * MiB) -> Path:
    """A file of ``size`` random bytes, no two chunks alike, written in blocks."""
    generator = random.Random(os.urandom(16))
    with open(path, "wb") as handle:
        written = 0
        while written < size:
            piece = generator.randbytes(min(block, size - written))
            handle.write(piece)
            written += len(piece)
    return path


def read_through(path: Path) -> None:
    """Read a file once so it starts from the page cache, as the baseline does."""
    with open(path, "rb") as handle:
        while handle.read(16 * MiB):
            pass


def peak_rss_of_children_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def machine_cpu_seconds() -> float:
    """CPU seconds used by every process on the machine so far (from /proc/stat)."""
    with open("/proc/stat") as handle:
        fields = handle.readline().split()[1:]
    ticks = sum(int(f) for f in fields[:3]) + sum(int(f) for f in fields[5:8])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuWindow:
    wall: float = 0.0
    machine_cpu: float = 0.0


@contextmanager
def cpu_window() -> Iterator[CpuWindow]:
    window = CpuWindow()
    start_wall, start_cpu = time.perf_counter(), machine_cpu_seconds()
    yield window
    window.wall = time.perf_counter() - start_wall
    window.machine_cpu = machine_cpu_seconds() - start_cpu


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def save(name: str, payload: dict[str, object]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
