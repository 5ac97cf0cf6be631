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
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import MiB, make_file, median, save
from bench.hosts import Hosts, unavailable
from dht_dfs.node.processes import Supervisor, dhtfs_command, join_command

ROOT = Path(__file__).resolve().parent.parent
NODES = 5
PORT = 4000
RAW_PORT = 5001


async def run(command: list[str], *, deadline: float = 600) -> str:
    """Run a command to its end; its stdout (a failure exits the benchmark)."""
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), deadline)
    except BaseException:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[4:7])} failed: {stderr.decode().strip()[-500:]}")
    return stdout.decode()


async def run_json(command: list[str]) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(await run(command))
    return document


async def raw_copy(
    supervisor: Supervisor, hosts: Hosts, sender: int, receivers: list[int], *, source: Path
) -> float:
    """Seconds until the slowest receiver has the whole file fsynced (next to ``source``)."""
    size = source.stat().st_size  # noqa: ASYNC240 (a benchmark's scratch file, in RAM)
    out = source.with_name("raw.bin")
    listening = []
    try:
        for index, host in enumerate(receivers):
            target = out.with_name(f"{out.name}.{index}")
            # Ready once it prints {"listening": port}.
            receiver = await supervisor.start(
                [sys.executable, "-m", "bench.rawcopy", "receive", str(RAW_PORT), str(target)],
                name=f"raw receiver on host {host}",
                prefix=hosts.command(host),
                cwd=ROOT,
            )
            listening.append((receiver, target))
        addresses = [f"{hosts.addresses[h]}:{RAW_PORT}" for h in receivers]
        await run(
            hosts.command(sender, sys.executable, "-m", "bench.rawcopy", "send", str(source))
            + addresses
        )
        seconds = 0.0
        for receiver, _ in listening:
            result = await receiver.read_json(600)  # as long as the send may take
            if result["bytes"] != size:
                raise SystemExit("raw copy lost bytes")
            seconds = max(seconds, float(result["seconds"]))
        return seconds
    finally:
        # Receivers have exited after their result; after a failure, end them.
        await supervisor.stop([receiver for receiver, _ in listening], grace=5)
        for _, target in listening:
            target.unlink(missing_ok=True)


async def measure(args: argparse.Namespace, hosts: Hosts, scratch: Path) -> dict[str, list[float]]:
    client = NODES
    samples: dict[str, list[float]] = {"raw": [], "fetch": [], "raw3": [], "publish": []}
    async with Supervisor() as supervisor:
        first = f"{hosts.addresses[0]}:{PORT}"
        for index in range(NODES):
            await supervisor.start(
                join_command(
                    scratch / f"node-{index}",
                    port=PORT,
                    host=None,
                    bootstrap=[first] if index else [],
                    extra=["--repair-interval", "0"],
                ),
                name=f"node {index}",
                log_path=scratch / f"node-{index}.log",
                prefix=hosts.command(index),
                cwd=ROOT,
            )
        size = args.size * MiB
        dhtfs = dhtfs_command()
        for round_number in range(args.rounds):
            source = make_file(scratch / f"in-{round_number}.bin", size)
            out = scratch / "out.bin"
            sender = 1 + round_number % (NODES - 1)
            samples["raw"].append(
                await raw_copy(supervisor, hosts, sender, [client], source=source)
            )
            samples["raw3"].append(
                await raw_copy(supervisor, hosts, client, [1, 2, 3], source=source)
            )
            published = await run_json(
                hosts.command(
                    client, *dhtfs, "publish", str(source), "--json", "--bootstrap", first
                )
            )
            samples["publish"].append(float(published["seconds"]))
            fetched = await run_json(
                hosts.command(
                    client,
                    *dhtfs,
                    *("fetch", published["reference"], "--json", "-o", str(out)),
                    *("--bootstrap", first),
                )
            )
            if fetched["size"] != size:
                raise SystemExit("fetch returned the wrong size")
            samples["fetch"].append(float(fetched["seconds"]))
            out.unlink()
            source.unlink()
            print(f"round {round_number + 1} done", file=sys.stderr)
    return samples


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
    hosts = Hosts(NODES + 1, "wan", 78)
    scratch = Path(tempfile.mkdtemp(prefix="dhtfs-bench-wan-", dir="/dev/shm"))
    try:
        hosts.create()
        hosts.shape(args.uplink, args.downlink)
        samples = asyncio.run(measure(args, hosts, scratch))
    finally:
        hosts.destroy()
        shutil.rmtree(scratch, ignore_errors=True)

    size = args.size * MiB
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
