"""Publish and fetch between hosts with capped links, against raw TCP copies.

Loopback has no bandwidth limit, so it cannot show what matters on real
links: a fetch pulls from several holders at once, a publish pushes three
copies through one uplink. Here every host is a network namespace on a
bridge (in a namespace of its own; this machine's network is untouched),
and ``tc tbf`` caps each host's uplink (its egress) and downlink (the
bridge port's egress). Five hosts run a node; a sixth runs only the
short-lived ``dhtfs publish``/``dhtfs fetch --bootstrap`` clients.

Per round (A/B alternated, medians reported), with a fresh file:

    raw      one node host sends the file to the client host with sendfile;
             the client writes and fsyncs it: the baseline for fetch
    fetch    ``dhtfs fetch`` on the client host, from whichever nodes hold
             the chunks
    raw3     the client host sends the file to three node hosts at once:
             the baseline for publish, which places three copies
    publish  ``dhtfs publish`` on the client host

    sudo python -m bench.wan                      # 100 Mbit/s up, 1000 down, 64 MiB
    sudo python -m bench.wan --uplink 50 --downlink 500 --size 32

Needs root and iproute2 (ip, tc). Writes bench/results/wan.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import MiB, make_file, median, save
from bench.hosts import Hosts, read_until, stop, unavailable

ROOT = Path(__file__).resolve().parent.parent
NODES = 5
PORT = 4000
RAW_PORT = 5001


def dhtfs(*args: str) -> list[str]:
    return [sys.executable, "-m", "dhtfs_cli.main", *args]


def read_json_line(process: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    assert process.stdout is not None
    document: dict[str, Any] = json.loads(read_until(process.stdout, "", timeout)[-1])
    return document


def run_json(command: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[4:7])} failed: {done.stderr.strip()[-500:]}")
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def raw_copy(hosts: Hosts, sender: int, receivers: list[int], source: Path, out: Path) -> float:
    """Seconds until the slowest receiver has the whole file fsynced."""
    listening: list[tuple[subprocess.Popen[str], Path]] = []
    try:
        for index, host in enumerate(receivers):
            target = out.with_name(f"{out.name}.{index}")
            process = subprocess.Popen(
                hosts.command(
                    host,
                    sys.executable,
                    "-m",
                    "bench.rawcopy",
                    "receive",
                    str(RAW_PORT),
                    str(target),
                ),
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            listening.append((process, target))
            read_json_line(process)  # {"listening": port}
        addresses = [f"{hosts.addresses[h]}:{RAW_PORT}" for h in receivers]
        subprocess.run(
            hosts.command(sender, sys.executable, "-m", "bench.rawcopy", "send", str(source))
            + addresses,
            check=True,
            timeout=600,
            cwd=ROOT,
        )
        seconds = 0.0
        for process, _ in listening:
            result = read_json_line(process, 600)  # as long as the send may take
            if result["bytes"] != source.stat().st_size:
                raise SystemExit("raw copy lost bytes")
            seconds = max(seconds, float(result["seconds"]))
        return seconds
    finally:
        # Receivers have exited after their result; after a failure, end them.
        stop((process for process, _ in listening), grace=5)
        for _, target in listening:
            target.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="file size in MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uplink", type=float, default=100.0, help="Mbit/s each host sends")
    parser.add_argument("--downlink", type=float, default=1000.0, help="Mbit/s each host gets")
    args = parser.parse_args()
    reason = unavailable() or (None if shutil.which("tc") else "tc is not installed")
    if reason is not None:
        raise SystemExit(f"bench.wan: {reason}")
    client = NODES
    hosts = Hosts(NODES + 1, "wan", 78)
    scratch = Path(tempfile.mkdtemp(prefix="dhtfs-bench-wan-", dir="/dev/shm"))
    nodes: list[subprocess.Popen[str]] = []
    samples: dict[str, list[float]] = {"raw": [], "fetch": [], "raw3": [], "publish": []}
    try:
        hosts.create()
        hosts.shape(args.uplink, args.downlink)
        first = f"{hosts.addresses[0]}:{PORT}"
        for index in range(NODES):
            command = dhtfs("join", "--port", str(PORT), "--json", "--repair-interval", "0")
            command += ["--data-dir", str(scratch / f"node-{index}")]
            if index:
                command += ["--bootstrap", first]
            log = (scratch / f"node-{index}.log").open("w")
            process = subprocess.Popen(
                hosts.command(index, *command), stdout=subprocess.PIPE, stderr=log, text=True
            )
            log.close()
            nodes.append(process)
            read_json_line(process)
        size = args.size * MiB
        for round_number in range(args.rounds):
            source = make_file(scratch / f"in-{round_number}.bin", size)
            out = scratch / "out.bin"
            seconds = raw_copy(hosts, 1 + round_number % (NODES - 1), [client], source, out)
            samples["raw"].append(seconds)
            seconds = raw_copy(hosts, client, [1, 2, 3], source, out)
            samples["raw3"].append(seconds)
            published = run_json(
                hosts.command(
                    client, *dhtfs("publish", str(source), "--json", "--bootstrap", first)
                )
            )
            samples["publish"].append(float(published["seconds"]))
            fetched = run_json(
                hosts.command(
                    client,
                    *dhtfs("fetch", published["reference"], "--json", "-o", str(out)),
                    *("--bootstrap", first),
                )
            )
            if fetched["size"] != size:
                raise SystemExit("fetch returned the wrong size")
            samples["fetch"].append(float(fetched["seconds"]))
            out.unlink()
            source.unlink()
            print(f"round {round_number + 1} done", file=sys.stderr)
    finally:
        stop(nodes)
        hosts.destroy()
        shutil.rmtree(scratch, ignore_errors=True)

    rates = {mode: round(size / 1e6 / median(values), 1) for mode, values in samples.items()}
    link = f"{args.uplink:g} Mbit/s up, {args.downlink:g} Mbit/s down per host"
    print(f"{NODES} nodes + 1 client host, {link}; {args.size} MiB, {args.rounds} rounds, medians")
    print(f"  uplink alone carries {args.uplink / 8:.1f} MB/s")
    print(f"  {'raw copy from one node':28} {rates['raw']:8.1f} MB/s")
    print(
        f"  {'dhtfs fetch':28} {rates['fetch']:8.1f} MB/s  "
        f"{rates['fetch'] / rates['raw']:.2f} x raw"
    )
    print(f"  {'raw copy to three nodes':28} {rates['raw3']:8.1f} MB/s")
    print(
        f"  {'dhtfs publish (3 copies)':28} {rates['publish']:8.1f} MB/s  "
        f"{rates['publish'] / rates['raw3']:.2f} x raw3"
    )
    path = save("wan", {"args": vars(args), "mb_s": rates, "seconds": samples})
    print("results:", path)


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
