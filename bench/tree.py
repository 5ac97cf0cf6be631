"""Publish and fetch of real directory trees on a 5-node devnet, against tar.

The trees are ones nobody here wrote: the standard library of the running
interpreter (without site-packages) and /usr/share/doc (many small files,
symlinks). Each is copied once into the scratch directory with ``cp -a``,
so every mode reads the same bytes from the page cache.

For each tree, rounds alternate (A B A B ...):

    tar      ``tar c -C SRC . | loopback TCP | tar x -C OUT`` and then
             ``sync -f OUT``: the baseline, one durable copy of the tree
    publish  ``dhtfs publish SRC --bootstrap`` as a short-lived client:
             walk, encrypt, inline small files, place 3 copies, announce;
             a fresh ``--secret-file`` each round, so nothing dedups
             against the round before
    fetch    ``dhtfs fetch REF --bootstrap -o OUT`` as a client: plan
             every directory, fetch, verify, decrypt, one syncfs

Every timed step starts after sync(). Times are wall seconds of the whole
command (process start-up included, as a user waits for it). CPU seconds
count the processes of that step: the two tars, or the client and the 5
nodes. After each fetch, ``diff -r --no-dereference`` checks the copy.

Then ``ls -l`` of a directory of 10,000 small files, from a cold client
process each time (``dhtfs ls -l REF --bootstrap``), against ``ls -l`` of
the same directory on disk.

    python -m bench.tree                   # both trees, 3 rounds
    python -m bench.tree --trees doc --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import median, save
from bench.throughput import cpu_of, dhtfs, measured, start_network

TREES = {
    "stdlib": Path(sysconfig.get_paths()["stdlib"]),
    "doc": Path("/usr/share/doc"),
}


def copy_tree(source: Path, target: Path) -> None:
    """``cp -a`` of a tree without its site-packages (another project's files)."""
    target.mkdir(parents=True)
    names = [p.name for p in source.iterdir() if p.name not in ("site-packages", "dist-packages")]
    subprocess.run(["cp", "-a", "--", *names, str(target)], cwd=source, check=True)


def tree_size(root: Path) -> tuple[int, int, int]:
    """(entries, regular-file bytes, symlinks) below ``root``."""
    entries = size = links = 0
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            entries += 1
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if os.path.islink(path):
                links += 1
            elif os.path.isfile(path):
                size += info.st_size
    return entries, size, links


def tar_copy(source: Path, out: Path) -> tuple[float, float]:
    """tar c | loopback TCP | tar x, then syncfs of the output; (seconds, CPU seconds)."""
    out.mkdir()
    listener = socket.create_server(("127.0.0.1", 0))
    started = time.perf_counter()
    sender_socket = socket.create_connection(listener.getsockname())
    receiver_socket, _ = listener.accept()
    receiver = subprocess.Popen(["tar", "x", "-C", str(out)], stdin=receiver_socket.fileno())
    sender = subprocess.Popen(["tar", "c", "-C", str(source), "."], stdout=sender_socket.fileno())
    # The processes hold their own copies of the sockets; ours would keep
    # the receiver from seeing the end of the stream.
    sender_socket.close()
    receiver_socket.close()
    listener.close()
    cpu = 0.0
    for process in (sender, receiver):
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"tar failed with status {status}")
        cpu += usage.ru_utime + usage.ru_stime
    subprocess.run(["sync", "-f", str(out)], check=True)
    return time.perf_counter() - started, cpu


def same_tree(source: Path, out: Path) -> None:
    done = subprocess.run(
        ["diff", "-r", "--no-dereference", str(source), str(out)],
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"fetched tree differs from {source}:\n{done.stdout[:2000]}")


def run_tree(
    label: str, source: Path, scratch: Path, *, bootstrap: str, node_pids: list[int], rounds: int
) -> dict[str, Any]:
    entries, size, links = tree_size(source)
    subprocess.run(["tar", "c", "-C", str(source), "-f", "/dev/null", "."], check=True)
    samples: dict[str, list[dict[str, float]]] = {"tar": [], "publish": [], "fetch": []}
    for round_number in range(rounds):
        secret = scratch / f"secret-{label}-{round_number}"
        secret.write_bytes(os.urandom(32))
        reference = ""
        for mode in ("tar", "publish", "fetch"):
            out = scratch / f"out-{label}-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            nodes_before = sum(cpu_of(pid) for pid in node_pids)
            rss = 0.0
            if mode == "tar":
                seconds, cpu = tar_copy(source, out)
            else:
                if mode == "publish":
                    command = ["publish", str(source), "--secret-file", str(secret)]
                else:
                    command = ["fetch", reference, "-o", str(out)]
                document, seconds, rss, cpu = measured(
                    [*dhtfs(), *command, "--json", "--bootstrap", bootstrap]
                )
                cpu += sum(cpu_of(pid) for pid in node_pids) - nodes_before
                if mode == "publish":
                    reference = document["reference"]
            samples[mode].append(
                {
                    "seconds": seconds,
                    "files_s": entries / seconds,
                    "mb_s": size / 1e6 / seconds,
                    "cpu_s": cpu,
                    "peak_rss_mb": rss,
                }
            )
            if mode == "fetch":
                same_tree(source, out)
            if mode != "tar":
                step = f"{label} round {round_number + 1} {mode}"
                print(f"  {step}: {seconds:.2f} s", file=sys.stderr)
        for mode in ("tar", "fetch"):
            shutil.rmtree(scratch / f"out-{label}-{mode}", ignore_errors=True)
    row: dict[str, Any] = {"tree": label, "entries": entries, "mb": size / 1e6, "symlinks": links}
    for mode, values in samples.items():
        for key in ("seconds", "files_s", "mb_s", "cpu_s"):
            row[f"{mode}_{key}"] = round(median([s[key] for s in values]), 2)
    both = [
        p["seconds"] + f["seconds"]
        for p, f in zip(samples["publish"], samples["fetch"], strict=True)
    ]
    row["ratio"] = round(
        median([b / t["seconds"] for b, t in zip(both, samples["tar"], strict=True)]), 2
    )
    row["samples"] = samples
    return row


def run_listing(scratch: Path, bootstrap: str, rounds: int, count: int) -> dict[str, Any]:
    """``ls -l`` of a ``count``-entry directory: dhtfs from a cold client against ls on disk."""
    big = scratch / "big"
    big.mkdir()
    for index in range(count):
        (big / f"file-{index:05d}.txt").write_text(f"entry {index}\n")
    publish = [*dhtfs(), "publish", str(big), "--json", "--bootstrap", bootstrap]
    document, _, _, _ = measured(publish)
    reference = document["reference"]
    dhtfs_seconds: list[float] = []
    ls_seconds: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run(["ls", "-l", str(big)], check=True, stdout=subprocess.DEVNULL)
        ls_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        done = subprocess.run(
            [*dhtfs(), "ls", "-l", reference, "--bootstrap", bootstrap],
            check=True,
            capture_output=True,
            text=True,
        )
        dhtfs_seconds.append(time.perf_counter() - started)
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        if len(lines) < count:
            raise SystemExit(f"dhtfs ls -l listed {len(lines)} of {count} entries")
    shutil.rmtree(big)
    return {
        "entries": count,
        "dhtfs_ls_seconds": round(median(dhtfs_seconds), 3),
        "disk_ls_seconds": round(median(ls_seconds), 3),
        "samples": {"dhtfs": dhtfs_seconds, "disk": ls_seconds},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default="stdlib,doc", help="which trees: stdlib, doc")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--listing", type=int, default=10_000, help="entries to ls (0: skip)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="dhtfs-bench-tree-"))
    scratch.mkdir(parents=True, exist_ok=True)
    loop = asyncio.new_event_loop()
    net = loop.run_until_complete(start_network(scratch / "net", ["--repair-interval", "0"]))
    node_pids = [node.process.pid for node in net.nodes]
    bootstrap = net.nodes[0].address
    rows: list[dict[str, Any]] = []
    listing: dict[str, Any] | None = None
    try:
        for label in args.trees.split(","):
            source = scratch / f"src-{label}"
            copy_tree(TREES[label], source)
            rows.append(
                run_tree(
                    label,
                    source,
                    scratch,
                    bootstrap=bootstrap,
                    node_pids=node_pids,
                    rounds=args.rounds,
                )
            )
            shutil.rmtree(source)
        if args.listing:
            listing = run_listing(scratch, bootstrap, args.rounds, args.listing)
    finally:
        loop.run_until_complete(net.stop(grace=60))
        loop.close()
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"5-node devnet, {args.rounds} rounds alternated, medians; wall seconds per command")
    print(
        f"{'tree':>7} {'entries':>8} {'MB':>6} {'tar s':>6} {'pub s':>6} {'fetch s':>7} "
        f"{'(p+f)/tar':>9} {'tar f/s':>8} {'pub f/s':>8} {'fetch f/s':>9} "
        f"{'pub MB/s':>8} {'fetch MB/s':>10} {'CPU s tar':>9} {'pub':>5} {'fetch':>6}"
    )
    for row in rows:
        print(
            f"{row['tree']:>7} {row['entries']:>8} {row['mb']:>6.0f} {row['tar_seconds']:>6.2f} "
            f"{row['publish_seconds']:>6.2f} {row['fetch_seconds']:>7.2f} {row['ratio']:>9.2f} "
            f"{row['tar_files_s']:>8.0f} {row['publish_files_s']:>8.0f} "
            f"{row['fetch_files_s']:>9.0f} {row['publish_mb_s']:>8.1f} "
            f"{row['fetch_mb_s']:>10.1f} {row['tar_cpu_s']:>9.1f} {row['publish_cpu_s']:>5.1f} "
            f"{row['fetch_cpu_s']:>6.1f}"
        )
    if listing is not None:
        print(
            f"ls -l of {listing['entries']} entries: dhtfs from a cold client "
            f"{listing['dhtfs_ls_seconds']:.2f} s, ls on disk {listing['disk_ls_seconds']:.3f} s"
        )
    print("results:", save("tree", {"args": vars(args), "rows": rows, "listing": listing}))


if __name__ == "__main__":
    main()
