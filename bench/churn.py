"""File availability and time to full replication while nodes fail.

A network of N nodes (one process, 127.0.0.1, background repair on a short
interval) stores F files. Then one node is killed (no hand-off, as a crash)
every ``--interval`` seconds until half the nodes are gone. Every half
second the script samples the ground truth from the live nodes' stores:

    available    fraction of files whose every chunk has >= 1 live copy
    replicated   fraction of chunks with >= replicas live copies

and records, for each kill, how long until every chunk was back at
``replicas`` copies. At the end every file is fetched and checked through
the network. Several failure rates run one after another (fresh network
each); the table, JSON and a PNG plot go to bench/results/.

    python -m bench.churn                          # intervals 20, 10, 5 s
    python -m bench.churn --intervals 8,4 --nodes 12 --files 6
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, save

KiB = 1024


async def run_rate(
    root: Path,
    *,
    nodes: int,
    files: int,
    file_size: int,
    interval: float,
    repair_interval: float,
    seed: int,
) -> dict[str, Any]:
    from dht_dfs.core.config import Config
    from dht_dfs.core.ids import ChunkId
    from dht_dfs.node.node import Node

    config = Config(
        chunk_size=64 * KiB,
        repair_interval=repair_interval,
        repair_rate=2000,
        scrub_interval=0,
        dht_rpc_timeout=0.5,
        request_timeout=5,
        transfer_window=8,
        workers=2,
        fsync=False,
    )
    chooser = random.Random(seed)
    live: list[Node] = []
    first = await Node(root / "node-0", config, host="127.0.0.1", control=False).start()
    live.append(first)
    for index in range(1, nodes):
        node = Node(
            root / f"node-{index}",
            config,
            host="127.0.0.1",
            bootstrap=[f"127.0.0.1:{first.port}"],
            control=False,
        )
        live.append(await node.start())

    references = []
    for index in range(files):
        path = root / f"file-{index}.bin"
        path.write_bytes(os.urandom(file_size))
        publisher = live[index % len(live)]
        assert publisher.network is not None
        references.append((await publisher.network.publish(path)).reference)
    chunks_of: list[set[ChunkId]] = []
    everything: set[ChunkId] = set()
    for node in live:
        assert node.store is not None
        everything.update(node.store.ids())
    # Attribute chunks to files through the public manifest walk.
    from dht_dfs.transfer.retrieval import NetworkSource
    from dht_dfs.transfer.walk import walk_public

    assert first.network is not None
    for reference in references:
        ids = {
            chunk_id
            async for chunk_id, _, _ in walk_public(
                NetworkSource(first.network), reference.root_hash, first.network.executor
            )
        }
        chunks_of.append(ids)

    def sample() -> tuple[float, float]:
        copies: dict[ChunkId, int] = dict.fromkeys(everything, 0)
        for node in live:
            assert node.store is not None
            for chunk_id, here in zip(
                everything, node.store.have_which(list(everything)), strict=True
            ):
                if here:
                    copies[chunk_id] += 1
        available = sum(all(copies[c] > 0 for c in ids) for ids in chunks_of) / len(chunks_of)
        replicated = sum(n >= config.replicas for n in copies.values()) / len(copies)
        return available, replicated

    timeline: list[dict[str, float]] = []
    kills: list[dict[str, float]] = []
    started = time.monotonic()
    next_kill = started + interval
    pending_kill: dict[str, float] | None = None
    min_available = 1.0
    deadline = started + interval * (nodes // 2) + 120
    while time.monotonic() < deadline:
        now = time.monotonic()
        if len(live) > nodes - nodes // 2 and now >= next_kill:
            victim = live.pop(chooser.randrange(len(live)))
            await victim.stop(leave=False)
            pending_kill = {"t": now - started, "nodes_left": len(live)}
            kills.append(pending_kill)
            next_kill = now + interval
        available, replicated = sample()
        min_available = min(min_available, available)
        timeline.append({"t": now - started, "available": available, "replicated": replicated})
        if pending_kill is not None and replicated >= 1.0 and "repaired_after" not in pending_kill:
            pending_kill["repaired_after"] = now - started - pending_kill["t"]
        if len(live) <= nodes - nodes // 2 and replicated >= 1.0:
            break
        await asyncio.sleep(0.5)

    # Through the network: every file fetches and checks out.
    checker = live[0]
    assert checker.network is not None
    fetched = checked = 0
    for index, reference in enumerate(references):
        out = root / f"out-{index}.bin"
        await checker.network.fetch(reference, output=out)
        fetched += out.read_bytes() == (root / f"file-{index}.bin").read_bytes()
        checked += (await checker.network.check(reference.root_hash)).ok
    for node in live:
        await node.stop(leave=False)
    repair_times = [k["repaired_after"] for k in kills if "repaired_after" in k]
    return {
        "interval_s": interval,
        "nodes": nodes,
        "files": files,
        "chunks": len(everything),
        "kills": kills,
        "min_available": min_available,
        "time_to_full_replication_mean_s": (
            round(sum(repair_times) / len(repair_times), 2) if repair_times else None
        ),
        "time_to_full_replication_max_s": round(max(repair_times), 2) if repair_times else None,
        "kills_never_repaired": len(kills) - len(repair_times),
        "files_fetched": fetched,
        "files_check_ok": checked,
        "timeline": timeline,
    }


def plot(runs: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'); no plot", file=sys.stderr)
        return
    figure, axes = plt.subplots(len(runs), 1, figsize=(9, 2.6 * len(runs)), squeeze=False)
    for axis, run in zip(axes[:, 0], runs, strict=True):
        times = [p["t"] for p in run["timeline"]]
        axis.plot(
            times, [p["replicated"] for p in run["timeline"]], label="chunks at full replication"
        )
        axis.plot(times, [p["available"] for p in run["timeline"]], label="files available")
        for kill in run["kills"]:
            axis.axvline(kill["t"], color="red", alpha=0.3)
        axis.set_ylim(0, 1.05)
        axis.set_ylabel("fraction")
        axis.set_title(
            f"one node killed every {run['interval_s']:g} s "
            f"({run['nodes']} nodes, red lines = kills)"
        )
        axis.legend(loc="lower left")
    axes[-1, 0].set_xlabel("seconds")
    figure.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    figure.savefig(RESULTS / "churn.png", dpi=110)
    print("plot:", RESULTS / "churn.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", default="20,10,5", help="seconds between kills")
    parser.add_argument("--nodes", type=int, default=12)
    parser.add_argument("--files", type=int, default=5)
    parser.add_argument("--file-kib", type=int, default=2048)
    parser.add_argument("--repair-interval", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    runs = []
    for interval in (float(x) for x in args.intervals.split(",")):
        root = Path(tempfile.mkdtemp(prefix="dhtfs-bench-churn-"))
        try:
            runs.append(
                asyncio.run(
                    run_rate(
                        root,
                        nodes=args.nodes,
                        files=args.files,
                        file_size=args.file_kib * KiB,
                        interval=interval,
                        repair_interval=args.repair_interval,
                        seed=args.seed,
                    )
                )
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"interval {interval:g} s done", file=sys.stderr)
    print(
        f"{args.nodes} nodes, {args.files} files of {args.file_kib} KiB, replicas 3, "
        f"repair every {args.repair_interval:g} s; half the nodes killed one by one"
    )
    print(
        f"{'kill every':>10} {'chunks':>7} {'min avail':>10} {'repl. mean':>11} "
        f"{'repl. max':>10} {'unrepaired':>11} {'fetched':>8} {'check ok':>9}"
    )
    for run in runs:
        print(
            f"{run['interval_s']:>8.0f} s {run['chunks']:>7} {run['min_available']:>10.2f} "
            f"{run['time_to_full_replication_mean_s'] or float('nan'):>9.1f} s "
            f"{run['time_to_full_replication_max_s'] or float('nan'):>8.1f} s "
            f"{run['kills_never_repaired']:>11} {run['files_fetched']:>5}/{run['files']} "
            f"{run['files_check_ok']:>6}/{run['files']}"
        )
    print("results:", save("churn", {"args": vars(args), "runs": runs}))
    plot(runs)


if __name__ == "__main__":
    main()
