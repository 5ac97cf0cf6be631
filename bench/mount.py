"""Reading through ``dhtfs mount`` against ``dhtfs fetch`` of the same file, same run.

A 5-node devnet; one file and the CPython standard library (without
site-packages, copied with ``cp -a``) published once. Every mount and fetch
joins as a client through node 0 (``--bootstrap``). Rounds alternate
(A B A B ...), each step after sync():

    fetch    ``dhtfs fetch REF -o FILE`` (process start-up, joining, the
             download, fsync: what a user waits for before reading)
    mount    a fresh ``dhtfs mount`` with no disk cache; time to first byte
             (open and read one byte), then the whole file read in 1 MiB
             reads, as ``cat`` would (the kernel asks in its own sizes)
    random   200 reads of 4 KiB at random offsets on a fresh mount with an
             empty disk cache (cold: each read fetches its chunk), then the
             same offsets on another fresh mount over that cache (warm:
             from disk, no network)
    ls -lR   of the stdlib tree through a fresh mount (directory nodes only)
             against ``ls -lR`` of the local copy

Reports medians, the mount's sequential MB/s as a fraction of fetch's, and
checks the bytes read through the mount against the file's SHA-256.

    python -m bench.mount                   # 1 GiB, 2 rounds
    python -m bench.mount --size 256 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import MiB, make_file, median, save
from bench.throughput import dhtfs, start_network
from bench.tree import copy_tree

READ = MiB
RANDOM_READS = 200


@contextmanager
def mounted(reference: str, mountpoint: Path, bootstrap: str, cache: Path | None) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    command = [*dhtfs(), "mount", reference, str(mountpoint), "--bootstrap", bootstrap, "--json"]
    if cache is None:
        command += ["--cache-size", "0"]
    else:
        command += ["--cache-size", "4G", "--data-dir", str(cache)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert process.stdout is not None
    try:
        line = process.stdout.readline()
        if '"mounted"' not in line:
            raise SystemExit(f"mount failed: {line!r}")
        yield mountpoint
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def read_whole(path: Path, *, digest: bool) -> tuple[float, float, str]:
    """(seconds to the first byte, seconds for the whole file, SHA-256 or "")."""
    hasher = hashlib.sha256()
    buffer = bytearray(READ)
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        first = os.pread(fd, 1, 0)
        first_byte = time.perf_counter() - started
        if digest:
            hasher.update(first)
        os.lseek(fd, len(first), os.SEEK_SET)
        view = memoryview(buffer)
        while count := os.readv(fd, [view]):
            if digest:
                hasher.update(view[:count])
    finally:
        os.close(fd)
    return first_byte, time.perf_counter() - started, hasher.hexdigest() if digest else ""


def random_reads(path: Path, offsets: list[int]) -> list[float]:
    fd = os.open(path, os.O_RDONLY)
    try:
        times = []
        for offset in offsets:
            begun = time.perf_counter()
            os.pread(fd, 4096, offset)
            times.append(time.perf_counter() - begun)
        return times
    finally:
        os.close(fd)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def timed_ls(root: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["ls", "-lR", str(root)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="file size in MiB")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dhtfs-bench-mount-"))
    loop = asyncio.new_event_loop()
    net = loop.run_until_complete(start_network(scratch / "net", ["--repair-interval", "0"]))
    bootstrap = net.nodes[0].address
    samples: dict[str, list[float]] = {
        key: []
        for key in (
            "fetch_mb_s", "mount_mb_s", "first_byte_ms", "cold_p50_ms", "cold_p99_ms",
            "warm_p50_ms", "warm_p99_ms", "ls_mount_s", "ls_local_s",
        )
    }  # fmt: skip
    try:
        size = args.size * MiB
        source = make_file(scratch / "file.bin", size)
        expected = hashlib.sha256(source.read_bytes()).hexdigest()

        def publish(path: Path) -> str:
            done = subprocess.run(
                [*dhtfs(), "publish", str(path), "--bootstrap", bootstrap],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            return done.stdout.split()[-1]

        reference = publish(source)
        stdlib = scratch / "stdlib"
        copy_tree(Path(sysconfig.get_paths()["stdlib"]), stdlib)
        tree_reference = publish(stdlib)
        generator = random.Random(7)
        for round_number in range(args.rounds):
            os.sync()
            out = scratch / "fetched.bin"
            begun = time.perf_counter()
            subprocess.run(
                [*dhtfs(), "fetch", reference, "-o", str(out), "--bootstrap", bootstrap],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
            )  # fmt: skip
            samples["fetch_mb_s"].append(size / 1e6 / (time.perf_counter() - begun))
            out.unlink()
            os.sync()
            with mounted(reference, scratch / "mnt", bootstrap, None) as mount:
                first, seconds, got = read_whole(mount / "file.bin", digest=round_number == 0)
            if round_number == 0 and got != expected:
                raise SystemExit("the mount returned different bytes")
            samples["mount_mb_s"].append(size / 1e6 / seconds)
            samples["first_byte_ms"].append(1000 * first)
            offsets = [generator.randrange(0, size - 4096) for _ in range(RANDOM_READS)]
            cache = scratch / f"cache-{round_number}"
            for kind in ("cold", "warm"):
                with mounted(reference, scratch / "mnt", bootstrap, cache) as mount:
                    times = random_reads(mount / "file.bin", offsets)
                samples[f"{kind}_p50_ms"].append(1000 * statistics.median(times))
                samples[f"{kind}_p99_ms"].append(1000 * percentile(times, 0.99))
            shutil.rmtree(cache, ignore_errors=True)
            with mounted(tree_reference, scratch / "mnt", bootstrap, None) as mount:
                samples["ls_mount_s"].append(timed_ls(mount))
            samples["ls_local_s"].append(timed_ls(stdlib))
            print(
                "  round", round_number + 1,
                json.dumps({key: round(values[-1], 2) for key, values in samples.items()}),
                file=sys.stderr,
            )  # fmt: skip
    finally:
        loop.run_until_complete(net.stop(grace=60))
        loop.close()
        shutil.rmtree(scratch, ignore_errors=True)
    row: dict[str, Any] = {key: round(median(values), 3) for key, values in samples.items()}
    row["mount_vs_fetch"] = round(row["mount_mb_s"] / row["fetch_mb_s"], 2)
    row["size_mib"] = args.size
    print(
        f"{args.size} MiB, {args.rounds} rounds, medians: fetch {row['fetch_mb_s']:.0f} MB/s, "
        f"mount sequential {row['mount_mb_s']:.0f} MB/s ({row['mount_vs_fetch']:.2f} of fetch), "
        f"first byte {row['first_byte_ms']:.0f} ms; random 4 KiB cold p50 "
        f"{row['cold_p50_ms']:.1f} / p99 {row['cold_p99_ms']:.1f} ms, warm p50 "
        f"{row['warm_p50_ms']:.2f} / p99 {row['warm_p99_ms']:.2f} ms; ls -lR stdlib "
        f"{row['ls_mount_s']:.2f} s through the mount, {row['ls_local_s']:.2f} s local"
    )
    print("results:", save("mount", {"args": vars(args), "row": row, "samples": samples}))


if __name__ == "__main__":
    main()
