"""Provider lookups in networks of N DHT nodes in one process on 127.0.0.1.

For each N, every lookup is: a random node announces a fresh key, then a random
other node looks it up. Measured for our DhtNode, both as find_providers (the
union over the whole lookup, ``want=None``) and as a fetch uses it (stop at the
first provider, ``want=1``), and for the plain kademlia 2.2.3 Server (``set``
then ``get`` of a string key, which hashes both ways so the library finds its
own values) as the baseline. Lookups run one at a time, so each latency is one
lookup's, and "messages" counts the requests that lookup sent (for kademlia,
the requests all nodes received meanwhile).

    python -m bench.dht                                # 100, 300, 1000 nodes
    python -m bench.dht --sizes 100,300 --lookups 100
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import resource
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from kademlia.network import Server
from kademlia.protocol import KademliaProtocol

from bench.common import save
from dht_dfs.core.config import Config
from dht_dfs.core.crypto import Identity
from dht_dfs.dht.node import DhtNode

LOCALHOST = "127.0.0.1"
JOIN_BATCH = 20
"""Nodes bootstrapping at once while a network is built."""


@dataclass
class Row:
    implementation: str
    nodes: int
    lookups: int
    success_rate: float
    hops_mean: float | None
    hops_p95: float | None
    messages_mean: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_max_ms: float
    build_seconds: float


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summarize(
    name: str,
    nodes: int,
    *,
    found: list[bool],
    seconds: list[float],
    messages: list[int],
    hops: list[int] | None,
    build_seconds: float,
) -> Row:
    return Row(
        implementation=name,
        nodes=nodes,
        lookups=len(found),
        success_rate=sum(found) / len(found),
        hops_mean=statistics.mean(hops) if hops else None,
        hops_p95=percentile([float(h) for h in hops], 0.95) if hops else None,
        messages_mean=statistics.mean(messages),
        latency_p50_ms=percentile(seconds, 0.5) * 1000,
        latency_p95_ms=percentile(seconds, 0.95) * 1000,
        latency_max_ms=max(seconds) * 1000,
        build_seconds=build_seconds,
    )


async def join_all(joiners: list[Any], join: Callable[[Any, Any], Awaitable[object]]) -> None:
    """Bootstrap each node through a random node that joined before it."""
    rng = random.Random(1)
    for first in range(1, len(joiners), JOIN_BATCH):
        batch = joiners[first : first + JOIN_BATCH]
        await asyncio.gather(*(join(node, joiners[rng.randrange(first)]) for node in batch))


# --- ours ---------------------------------------------------------------------------------


async def measure_ours(count: int, lookups: int, seed: int) -> list[Row]:
    config = Config()
    rng = random.Random(seed)
    nodes = [DhtNode(Identity.generate(), config) for _ in range(count)]
    try:
        started = time.perf_counter()
        for node in nodes:
            await node.start(LOCALHOST, 0)

        async def join(node: DhtNode, via: DhtNode) -> None:
            await node.bootstrap([(LOCALHOST, via.port)])

        await join_all(nodes, join)
        for _ in range(10):  # identity checks started by the joins, bounded
            if not any(n.busy() for n in nodes):
                break
            await asyncio.gather(*(n.settled(30.0) for n in nodes))
        build = time.perf_counter() - started

        rows = []
        for want, name in ((None, "dhtfs find_providers"), (1, "dhtfs want=1")):
            found: list[bool] = []
            seconds: list[float] = []
            messages: list[int] = []
            hops: list[int] = []
            for _ in range(lookups):
                provider, asker = rng.sample(nodes, 2)
                key = os.urandom(20)
                await provider.announce([key])
                began = time.perf_counter()
                result = await asker.lookup(key, want=want)
                seconds.append(time.perf_counter() - began)
                found.append(provider.identity.node_id in {r.node_id for r in result.providers})
                messages.append(result.stats.messages)
                hops.append(result.stats.hops)
            rows.append(
                summarize(
                    name,
                    count,
                    found=found,
                    seconds=seconds,
                    messages=messages,
                    hops=hops,
                    build_seconds=build,
                )
            )
        return rows
    finally:
        await asyncio.gather(*(node.stop() for node in nodes))


# --- the plain library ------------------------------------------------------------------------

requests_received = 0


class CountingProtocol(KademliaProtocol):  # type: ignore[misc]  # kademlia is untyped
    def datagram_received(self, data: bytes, addr: Any) -> None:
        global requests_received  # noqa: PLW0603  # one counter for every node of the run
        if data[:1] == b"\x00":
            requests_received += 1
        super().datagram_received(data, addr)


class CountingServer(Server):  # type: ignore[misc]  # kademlia is untyped
    protocol_class = CountingProtocol


async def measure_library(count: int, lookups: int, seed: int) -> Row:
    rng = random.Random(seed)
    servers = [CountingServer(ksize=20, alpha=3) for _ in range(count)]
    try:
        started = time.perf_counter()
        for server in servers:
            await server.listen(0, LOCALHOST)

        async def join(server: Server, via: Server) -> None:
            await server.bootstrap([(LOCALHOST, via.transport.get_extra_info("sockname")[1])])

        await join_all(servers, join)
        build = time.perf_counter() - started
        found: list[bool] = []
        seconds: list[float] = []
        messages: list[int] = []
        for _ in range(lookups):
            provider, asker = rng.sample(servers, 2)
            key, value = os.urandom(16).hex(), os.urandom(16).hex()
            await provider.set(key, value)
            before = requests_received
            began = time.perf_counter()
            got = await asker.get(key)
            seconds.append(time.perf_counter() - began)
            messages.append(requests_received - before)
            found.append(got == value)
        return summarize(
            "kademlia get",
            count,
            found=found,
            seconds=seconds,
            messages=messages,
            hops=None,
            build_seconds=build,
        )
    finally:
        for server in servers:
            server.stop()
            # rpcudp keeps a timeout timer per request that outlives a cancelled
            # request and then fails on it (InvalidStateError); disarm them.
            for _future, timer in server.protocol._outstanding.values():
                timer.cancel()
        # The library leaves unowned tasks behind (pings of full buckets, stores to
        # newcomers) that fail once the sockets are closed; reap them here, or they
        # end as "Task exception was never retrieved" when the loop closes.
        leftovers = asyncio.all_tasks() - {asyncio.current_task()}
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)


# --- main ---------------------------------------------------------------------------------------


def raise_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def show(rows: list[Row]) -> None:
    header = (
        f"{'implementation':22} {'N':>5} {'lookups':>7} {'success':>8} {'hops':>5} "
        f"{'hops95':>6} {'msgs':>6} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7} {'build s':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        hops = f"{row.hops_mean:5.2f}" if row.hops_mean is not None else "  n/a"
        hops95 = f"{row.hops_p95:6.0f}" if row.hops_p95 is not None else "   n/a"
        print(
            f"{row.implementation:22} {row.nodes:5d} {row.lookups:7d} "
            f"{row.success_rate:8.1%} {hops} {hops95} {row.messages_mean:6.1f} "
            f"{row.latency_p50_ms:7.1f} {row.latency_p95_ms:7.1f} {row.latency_max_ms:7.1f} "
            f"{row.build_seconds:7.1f}"
        )


async def run(sizes: list[int], lookups: int) -> list[Row]:
    rows: list[Row] = []
    for count in sizes:
        raise_file_limit(2 * count + 256)
        rows.extend(await measure_ours(count, lookups, seed=count))
        rows.append(await measure_library(count, lookups, seed=count))
        show(rows[-3:])
        print()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="100,300,1000", help="network sizes")
    parser.add_argument("--lookups", type=int, default=200, help="lookups per size and mode")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    logging.basicConfig(level=logging.ERROR)
    # The library logs every timeout and routine step; only our errors matter here.
    for name in ("kademlia", "rpcudp"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    started = time.perf_counter()
    rows = asyncio.run(run(sizes, args.lookups))
    print(f"all sizes ({time.perf_counter() - started:.0f} s):")
    show(rows)
    path = save(
        "dht",
        {
            "command": f"python -m bench.dht --sizes {args.sizes} --lookups {args.lookups}",
            "config": {
                k: v
                for k, v in asdict(Config()).items()
                if k.startswith(("ksize", "alpha", "dht_"))
            },
            "rows": [asdict(row) for row in rows],
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
