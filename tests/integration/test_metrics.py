"""A node's Prometheus metrics, scraped over HTTP and parsed with the reference parser."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from dht_dfs.node.metrics import METRICS

from .cluster import TEST_CONFIG, cluster

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


async def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    (found,) = [v for got, v in samples[name] if all(got.get(k) == w for k, w in labels.items())]
    return found


async def test_metrics_count_what_the_node_did(tmp_path: Path) -> None:
    async with cluster(tmp_path / "net", 3) as net:
        watched = await net.add(TEST_CONFIG.replace(max_storage=10**9), metrics=("127.0.0.1", 0))
        assert watched.metrics_port is not None and watched.store is not None
        before = await scrape(watched.metrics_port)
        assert value(before, "dhtfs_chunk_stores_total", outcome="stored") == 0
        source = tmp_path / "data.bin"
        source.write_bytes(os.urandom(20 * TEST_CONFIG.chunk_size))
        publisher = net.live[0]
        assert publisher.network is not None
        await publisher.network.publish(source)
        after = await scrape(watched.metrics_port)
    stats = watched.store.stats()
    assert stats.chunks > 0, "the watched node got copies (4 nodes, 3 replicas)"
    assert value(after, "dhtfs_store_chunks") == stats.chunks
    assert value(after, "dhtfs_store_bytes") == stats.bytes_used
    assert value(after, "dhtfs_store_quota_bytes") == 10**9
    assert value(after, "dhtfs_store_full") == 0
    assert value(after, "dhtfs_chunk_stores_total", outcome="stored") == stats.chunks
    assert value(after, "dhtfs_chunk_bytes_in_total") == stats.bytes_used
    assert value(after, "dhtfs_peers_known") >= 3
    assert value(after, "dhtfs_dht_requests_served_total") > value(
        before, "dhtfs_dht_requests_served_total"
    )
    lookups = value(after, "dhtfs_dht_lookup_seconds_count")
    assert lookups >= 1, "joining looked itself up"
    assert value(after, "dhtfs_dht_lookup_seconds_bucket", le="+Inf") == lookups
    # Every metric the page shows is one the documentation lists, and back.
    shown = {
        name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for name in after
    }
    shown = {name.removesuffix("_created") for name in shown}
    assert shown == set(METRICS)


def test_operations_md_lists_every_metric() -> None:
    text = OPERATIONS.read_text()
    missing = [name for name in METRICS if f"`{name}`" not in text]
    assert not missing, f"docs/operations.md does not list {missing}"
