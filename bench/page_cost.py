"""What writing a file costs the kernel here: after an idle pause, and right after.

Throughput runs that write big files to this machine's disk swing widely
(a 1 GiB fetch to disk: 0.27 to 0.55 of the raw copy in two runs), and
strace put the fetch's time in pwrite. This measures why: on this VM's
ext4 disk, writing a file after a few idle seconds costs an order of
magnitude more kernel CPU than writing it again right after deleting the
previous one (tmpfs shows no such gap). Any timed step that writes a big
file may land on either, so the throughput figures should be read with it:

    python -m bench.page_cost              # 1 GiB to a temp dir (disk)
    python -m bench.page_cost --dir /dev/shm

Each round writes SIZE MiB with pwrite in 1 MiB pieces, fsyncs, deletes
the file, and reports the kernel CPU time of the writes; rounds after an
idle pause see cold pages, rounds right after the previous delete see
recycled ones.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.common import MiB, median, save


def write_once(path: Path, size_mib: int, block: bytes) -> tuple[float, float]:
    """Write, fsync and delete a file; returns (kernel CPU s of the writes, wall s)."""
    started, before = time.perf_counter(), os.times()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for index in range(size_mib):
            os.pwrite(fd, block, index * MiB)
        after = os.times()
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return after.system - before.system, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--size", type=int, default=1024, help="MiB per write")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of pause for 'cold'")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="dhtfs-page-cost-", dir=args.dir))
    block = os.urandom(MiB)
    samples: dict[str, list[float]] = {"cold": [], "recycled": []}
    try:
        for _ in range(args.rounds):
            time.sleep(args.idle)  # let the freed pages go back to the host
            kernel, _ = write_once(directory / "f", args.size, block)
            samples["cold"].append(kernel)
            kernel, _ = write_once(directory / "f", args.size, block)
            samples["recycled"].append(kernel)
    finally:
        directory.rmdir()
    per_gib = {k: round(median(v) * 1024 / args.size, 2) for k, v in samples.items()}
    where = directory.parent
    print(f"kernel CPU seconds per GiB written ({args.rounds} rounds, medians, in {where}):")
    for kind, value in per_gib.items():
        print(f"  {kind:9} {value:5.2f}   samples {[round(s, 2) for s in samples[kind]]}")
    path = save("page-cost", {"args": vars(args), "kernel_s_per_gib": per_gib, "samples": samples})
    print("results:", path)


if __name__ == "__main__":
    main()
