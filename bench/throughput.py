"""Publish and fetch throughput on a 5-node devnet, against a raw TCP copy.

For each file size, rounds alternate (A B A B ...):

    raw      a loopback TCP copy of the same file: sendfile on one side,
             recv_into + write + fsync on the other (a durable copy, as a
             fetch is); the baseline for fetch
    raw3     the same, to three receivers at once, writing next to the
             nodes' stores: the baseline for publish, which lands three
             copies
    publish  ``dhtfs publish FILE --bootstrap`` as a short-lived client
             process: encrypt, place 3 copies on the devnet, announce
    fetch    ``dhtfs fetch ROOT --bootstrap -o OUT`` as a client process:
             find, download from several nodes, verify, decrypt, fsync

Every timed step starts after a sync(), so none pays for the writeback
of the previous one. MB/s comes from each command's own timing (``--json`` "seconds"); the wall
time including process start-up is kept too. Peak RSS of the publish and
fetch processes comes from wait4(). CPU seconds per GiB count our processes
only (client + the 5 nodes); "others" is what the rest of the machine used
meanwhile. Prints a table, writes bench/results/throughput.json and .png.

    python -m bench.throughput                      # 10 MiB, 100 MiB, 1 GiB
    python -m bench.throughput --sizes 10,100 --rounds 5
    python -m bench.throughput --out-dir /dev/shm      # copies to tmpfs, not disk
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, MiB, machine_cpu_seconds, make_file, median, read_through, save


def cpu_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dhtfs() -> list[str]:
    script = Path(sys.executable).parent / "dhtfs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dhtfs_cli.main"]


def measured(command: list[str]) -> tuple[dict[str, Any], float, float, float]:
    """Run a command; return (its JSON stdout, wall seconds, peak RSS MB, CPU seconds)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed ({process.returncode}): {stderr}")
    return json.loads(stdout), wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def raw_copy(source: Path, targets: list[Path]) -> float:
    """Copy a file over loopback TCP to each target file at once; returns seconds.

    One target is the baseline for fetch (one durable copy). Three targets
    on the nodes' file system are the baseline for publish, which also
    lands the same bytes three times: without them, publish would be
    compared with a third of its work.
    """
    size = source.stat().st_size
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in targets]
    received = [0] * len(targets)

    def receive(index: int) -> None:
        connection, _ = listeners[index].accept()
        buffer = bytearray(MiB)
        view = memoryview(buffer)
        with connection, open(targets[index], "wb") as handle:
            while True:
                n = connection.recv_into(view)
                if not n:
                    break
                handle.write(view[:n])
                received[index] += n
            handle.flush()
            os.fsync(handle.fileno())

    def send(index: int) -> None:
        port = listeners[index].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as sender, open(source, "rb") as f:
            sender.sendfile(f)

    receivers = [threading.Thread(target=receive, args=(i,)) for i in range(len(targets))]
    for thread in receivers:
        thread.start()
    started = time.perf_counter()
    senders = [threading.Thread(target=send, args=(i,)) for i in range(len(targets))]
    for thread in senders:
        thread.start()
    for thread in senders + receivers:
        thread.join()
    seconds = time.perf_counter() - started
    for listener in listeners:
        listener.close()
    for target in targets:
        target.unlink(missing_ok=True)
    if received != [size] * len(targets):
        raise SystemExit("raw copy lost bytes")
    return seconds


async def start_network(directory: Path, extra: list[str]) -> Any:
    from dhtfs_cli.devnet import find_free_ports, start_devnet

    base = find_free_ports(5)
    return await start_devnet(5, base, directory, extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1024", help="file sizes in MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument(
        "--out-dir",
        default=None,
        help="where raw and fetch write their copy (default: the scratch dir; "
        "/dev/shm takes the disk out of the comparison)",
    )
    parser.add_argument(
        "--repair-interval",
        type=float,
        default=60.0,
        help="the nodes' repair interval (0: no background repair)",
    )
    args = parser.parse_args()
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="dhtfs-bench-throughput-"))
    scratch.mkdir(parents=True, exist_ok=True)
    out_dir = Path(tempfile.mkdtemp(prefix="dhtfs-bench-out-", dir=args.out_dir or scratch))
    loop = asyncio.new_event_loop()
    extra = ["--repair-interval", str(args.repair_interval)]
    net = loop.run_until_complete(start_network(scratch / "net", extra))
    node_pids = [node.process.pid for node in net.nodes]
    bootstrap = net.nodes[0].address
    rows: list[dict[str, Any]] = []
    try:
        for size_mib in (int(s) for s in args.sizes.split(",")):
            size = size_mib * MiB
            samples: dict[str, list[dict[str, float]]] = {
                "raw": [],
                "raw3": [],
                "publish": [],
                "fetch": [],
            }
            for round_number in range(args.rounds):
                # A fresh file each round: publishing the same bytes twice
                # would dedup to nothing.
                source = make_file(scratch / f"in-{size_mib}-{round_number}.bin", size)
                read_through(source)
                for mode in ("raw", "raw3", "publish", "fetch"):
                    out = out_dir / f"out-{mode}.bin"
                    out.unlink(missing_ok=True)
                    # Each step starts with no dirty pages left by the one before
                    # (a publish writes 3 copies), so no step pays another's writeback.
                    os.sync()
                    ours_before = sum(cpu_of(pid) for pid in node_pids)
                    machine_before = machine_cpu_seconds()
                    rss = client_cpu = 0.0
                    if mode == "raw":
                        started = time.perf_counter()
                        seconds = raw_copy(source, [out])
                        wall = time.perf_counter() - started
                    elif mode == "raw3":
                        started = time.perf_counter()
                        seconds = raw_copy(source, [scratch / f"raw3-{i}.bin" for i in range(3)])
                        wall = time.perf_counter() - started
                    elif mode == "publish":
                        document, wall, rss, client_cpu = measured(
                            [*dhtfs(), "publish", str(source), "--json", "--bootstrap", bootstrap]
                        )
                        seconds = float(document["seconds"])
                        reference = document["reference"]
                    else:
                        document, wall, rss, client_cpu = measured(
                            [
                                *dhtfs(),
                                "fetch",
                                reference,
                                "-o",
                                str(out),
                                "--json",
                                "--bootstrap",
                                bootstrap,
                            ]
                        )
                        seconds = float(document["seconds"])
                        if document["size"] != size:
                            raise SystemExit("fetch returned the wrong size")
                    nodes_cpu = sum(cpu_of(pid) for pid in node_pids) - ours_before
                    ours = nodes_cpu + client_cpu
                    others = max(0.0, machine_cpu_seconds() - machine_before - ours)
                    samples[mode].append(
                        {
                            "seconds": seconds,
                            "wall_seconds": wall,
                            "mb_s": size / 1e6 / seconds,
                            "peak_rss_mb": rss,
                            "cpu_s_per_gib": ours * (1 << 30) / size,
                            "client_cpu_s": client_cpu,
                            "nodes_cpu_s": nodes_cpu,
                            "others_cpu_s": others,
                        }
                    )
                    out.unlink(missing_ok=True)
                source.unlink()
            row: dict[str, Any] = {"size_mib": size_mib}
            for mode in ("raw", "raw3"):
                row[f"{mode}_mb_s"] = round(median([s["mb_s"] for s in samples[mode]]), 1)
            for mode, baseline in (("publish", "raw3"), ("fetch", "raw")):
                rate = median([s["mb_s"] for s in samples[mode]])
                row[f"{mode}_mb_s"] = round(rate, 1)
                row[f"{mode}_ratio"] = round(rate / row[f"{baseline}_mb_s"], 3)
                row[f"{mode}_peak_rss_mb"] = round(max(s["peak_rss_mb"] for s in samples[mode]), 1)
                row[f"{mode}_cpu_s_per_gib"] = round(
                    median([s["cpu_s_per_gib"] for s in samples[mode]]), 2
                )
                row[f"{mode}_wall_s"] = round(median([s["wall_seconds"] for s in samples[mode]]), 2)
            row["others_cpu_s"] = round(
                sum(s["others_cpu_s"] for v in samples.values() for s in v), 1
            )
            row["samples"] = samples
            rows.append(row)
            print(f"{size_mib} MiB done", file=sys.stderr)
    finally:
        loop.run_until_complete(net.stop(grace=60))
        loop.close()
        shutil.rmtree(out_dir, ignore_errors=True)
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)

    where = f"copies written to {args.out_dir}" if args.out_dir else "copies written to disk"
    print(
        f"5-node devnet ({where}), {args.rounds} rounds, medians; "
        "publish against a raw 3-copy, fetch against a raw 1-copy loopback TCP copy (MB/s)"
    )
    print(
        f"{'size':>9} {'raw3':>6} {'publish':>8} {'ratio':>6} {'raw':>6} {'fetch':>6} "
        f"{'ratio':>6} {'pub RSS':>8} {'fetch RSS':>9} {'CPU s/GiB pub':>14} "
        f"{'fetch':>6} {'others CPU s':>13}"
    )
    for row in rows:
        print(
            f"{row['size_mib']:>5} MiB {row['raw3_mb_s']:>6.0f} {row['publish_mb_s']:>8.0f} "
            f"{row['publish_ratio']:>6.2f} {row['raw_mb_s']:>6.0f} {row['fetch_mb_s']:>6.0f} "
            f"{row['fetch_ratio']:>6.2f} {row['publish_peak_rss_mb']:>5.0f} MB "
            f"{row['fetch_peak_rss_mb']:>6.0f} MB {row['publish_cpu_s_per_gib']:>14.2f} "
            f"{row['fetch_cpu_s_per_gib']:>6.2f} {row['others_cpu_s']:>13.1f}"
        )
    name = "throughput-tmpfs" if args.out_dir else "throughput"
    path = save(name, {"args": vars(args), "rows": rows})
    print("results:", path)
    plot(rows, name)


def plot(rows: list[dict[str, Any]], name: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'); no plot", file=sys.stderr)
        return
    labels = [f"{r['size_mib']} MiB" for r in rows]
    positions = range(len(rows))
    width = 0.2
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for offset, key, label in (
        (-1.5 * width, "raw3_mb_s", "raw TCP copy to 3"),
        (-0.5 * width, "publish_mb_s", "dhtfs publish (3 copies)"),
        (0.5 * width, "raw_mb_s", "raw TCP copy"),
        (1.5 * width, "fetch_mb_s", "dhtfs fetch"),
    ):
        speed.bar([p + offset for p in positions], [r[key] for r in rows], width, label=label)
    speed.set_xticks(list(positions), labels)
    speed.set_ylabel("MB/s (median)")
    speed.set_title("Throughput on a 5-node loopback devnet")
    speed.legend()
    for offset, key, label in (
        (-width / 2, "publish_peak_rss_mb", "publish"),
        (width / 2, "fetch_peak_rss_mb", "fetch"),
    ):
        memory.bar([p + offset for p in positions], [r[key] for r in rows], width, label=label)
    memory.set_xticks(list(positions), labels)
    memory.set_ylabel("peak RSS of the client process (MB)")
    memory.set_title("Memory does not grow with file size")
    memory.legend()
    figure.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    figure.savefig(RESULTS / f"{name}.png", dpi=110)
    print("plot:", RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
