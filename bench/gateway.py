"""Downloads through ``dhtfs gateway`` with curl, against ``dhtfs cat`` of the same file.

A 5-node devnet; one file published once; a gateway process joined as a
client through node 0 (as ``dhtfs cat --bootstrap`` is). Rounds alternate
(A B A B ...):

    cat      ``dhtfs cat REF --bootstrap B > /dev/null`` (process start-up,
             joining and the download: what a user waits for)
    curl     ``curl -o /dev/null http://127.0.0.1:P/REF`` against the
             running gateway (already joined)
    range    ``curl -r`` of 64 KiB at a random offset, 20 times: the time of
             one small read from the middle of the file

Every step starts after sync(). Reports MB/s (median), the gateway's peak
RSS (VmHWM, to show memory does not grow with the file) and each download's
SHA-256 against the file's.

    python -m bench.gateway                 # 256 MiB, 3 rounds
    python -m bench.gateway --size 1024     # 1 GiB
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import MiB, make_file, median, save
from bench.throughput import dhtfs, start_network


def sha256_of_output(command: list[str]) -> tuple[str, float]:
    """Run a command that writes the file to stdout; (SHA-256 of it, seconds)."""
    digest = hashlib.sha256()
    started = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as process:
        assert process.stdout is not None
        while block := process.stdout.read(MiB):
            digest.update(block)
    if process.returncode != 0:
        raise SystemExit(f"{command[0]} failed with {process.returncode}")
    return digest.hexdigest(), time.perf_counter() - started


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="file size in MiB")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dhtfs-bench-gateway-"))
    loop = asyncio.new_event_loop()
    net = loop.run_until_complete(start_network(scratch / "net", ["--repair-interval", "0"]))
    bootstrap = net.nodes[0].address
    gateway: subprocess.Popen[str] | None = None
    samples: dict[str, list[float]] = {"cat": [], "curl": [], "range_ms": []}
    try:
        size = args.size * MiB
        source = make_file(scratch / "file.bin", size)
        expected = hashlib.sha256(source.read_bytes()).hexdigest()
        published = subprocess.run(
            [*dhtfs(), "publish", str(source), "--bootstrap", bootstrap],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        reference = published.stdout.split()[-1]
        gateway = subprocess.Popen(
            [*dhtfs(), "gateway", "--port", "0", "--bootstrap", bootstrap],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert gateway.stdout is not None
        url = gateway.stdout.readline().strip() + reference
        generator = random.Random(7)
        for _ in range(args.rounds):
            for mode in ("cat", "curl", "range"):
                os.sync()
                if mode == "cat":
                    command = [*dhtfs(), "cat", reference, "--bootstrap", bootstrap]
                    got, seconds = sha256_of_output(command)
                elif mode == "curl":
                    got, seconds = sha256_of_output(["curl", "-sf", url])
                else:
                    times = []
                    for _ in range(20):
                        start = generator.randrange(0, size - 65536)
                        begun = time.perf_counter()
                        wanted = f"{start}-{start + 65535}"
                        subprocess.run(
                            ["curl", "-sf", "-o", "/dev/null", "-r", wanted, url], check=True
                        )
                        times.append(time.perf_counter() - begun)
                    samples["range_ms"].append(1000 * statistics.median(times))
                    continue
                if got != expected:
                    raise SystemExit(f"{mode} returned different bytes")
                samples[mode].append(size / 1e6 / seconds)
                print(f"  {mode}: {size / 1e6 / seconds:.0f} MB/s", file=sys.stderr)
        rss = peak_rss_mb(gateway.pid)
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=60)
        loop.run_until_complete(net.stop(grace=60))
        loop.close()
        shutil.rmtree(scratch, ignore_errors=True)
    row: dict[str, Any] = {
        "size_mib": args.size,
        "cat_mb_s": round(median(samples["cat"]), 1),
        "curl_mb_s": round(median(samples["curl"]), 1),
        "range_64k_ms": round(median(samples["range_ms"]), 1),
        "gateway_peak_rss_mb": round(rss, 1),
        "samples": samples,
    }
    row["curl_vs_cat"] = round(row["curl_mb_s"] / row["cat_mb_s"], 2)
    print(
        f"{args.size} MiB, {args.rounds} rounds, medians: dhtfs cat {row['cat_mb_s']:.0f} MB/s, "
        f"curl via gateway {row['curl_mb_s']:.0f} MB/s ({row['curl_vs_cat']:.2f} of cat), "
        f"64 KiB range {row['range_64k_ms']:.0f} ms; gateway peak RSS "
        f"{row['gateway_peak_rss_mb']:.0f} MB"
    )
    print("results:", save("gateway", {"args": vars(args), "row": row}))


if __name__ == "__main__":
    main()
