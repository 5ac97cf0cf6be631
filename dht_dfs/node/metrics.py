"""Prometheus metrics of a running node: ``join --metrics-port P``.

The numbers are the running totals the node keeps anyway (store, chunk
service, DHT protocol and node, maintenance), read when Prometheus scrapes:
nothing is counted twice and the data path pays nothing for metrics. The
page is served by aiohttp on the node's own event loop, so every value is
read on the thread that changes it. ``METRICS`` lists every metric with its
type and meaning; docs/operations.md is checked against it by a test.

Must not import: node.node (the node hands itself in as ``Sources``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from dht_dfs.dht.node import DhtNode
from dht_dfs.node.leasing import LeaseKeeper
from dht_dfs.node.maintenance import Maintainer
from dht_dfs.node.service import ChunkService
from dht_dfs.store.chunks import ChunkStore
from dht_dfs.transport.endpoint import Endpoint


class Sources(Protocol):
    """What metrics read of a node (``node.Node`` has these, None before start)."""

    store: ChunkStore | None
    service: ChunkService | None
    dht: DhtNode | None
    endpoint: Endpoint | None
    maintainer: Maintainer | None
    leases: LeaseKeeper | None


METRICS: dict[str, tuple[str, str]] = {
    "dhtfs_store_chunks": ("gauge", "Chunks in this node's store."),
    "dhtfs_store_bytes": ("gauge", "Bytes of chunks in this node's store."),
    "dhtfs_store_quota_bytes": (
        "gauge",
        "The store's quota (absent when only the disk limits it).",
    ),
    "dhtfs_store_guest_chunks": ("gauge", "Chunks kept as guests (not a rightful holder)."),
    "dhtfs_store_disk_free_bytes": ("gauge", "Bytes free on the disk under the store."),
    "dhtfs_store_full": ("gauge", "1 when a chunk of the default size would be refused."),
    "dhtfs_chunk_stores_total": ("counter", "STORE requests answered, by outcome."),
    "dhtfs_chunk_bytes_in_total": ("counter", "Bytes of chunks newly stored for peers."),
    "dhtfs_chunk_gets_total": ("counter", "Chunks sent to peers (GET answered with the bytes)."),
    "dhtfs_chunk_bytes_out_total": ("counter", "Bytes of chunks sent to peers."),
    "dhtfs_chunk_haves_total": ("counter", "HAVE requests answered."),
    "dhtfs_chunk_proofs_total": ("counter", "PROVE requests answered."),
    "dhtfs_peers_connected": ("gauge", "Peers with an open chunk connection."),
    "dhtfs_peers_known": ("gauge", "Contacts in the DHT routing table."),
    "dhtfs_dht_requests_sent_total": ("counter", "DHT RPCs sent."),
    "dhtfs_dht_requests_served_total": ("counter", "DHT RPCs served."),
    "dhtfs_dht_timeouts_total": ("counter", "DHT RPCs that got no answer in time."),
    "dhtfs_dht_dropped_total": ("counter", "Datagrams dropped as malformed or unwanted."),
    "dhtfs_dht_evictions_total": ("counter", "Contacts evicted after repeated failures."),
    "dhtfs_dht_lookup_seconds": ("histogram", "Time of one iterative DHT lookup."),
    "dhtfs_dht_records_held": ("gauge", "Provider records held for others."),
    "dhtfs_repair_passes_total": ("counter", "Repair passes run (not skipped)."),
    "dhtfs_repair_chunks_examined_total": ("counter", "Chunks examined by repair and hand-off."),
    "dhtfs_repair_copies_added_total": ("counter", "Copies repair and hand-off made."),
    "dhtfs_repair_copies_dropped_total": ("counter", "Far surplus copies dropped."),
    "dhtfs_repair_errors_total": ("counter", "Copies repair could not make."),
    "dhtfs_repair_failed_proofs_total": ("counter", "Claimed copies that failed a proof."),
    "dhtfs_scrub_chunks_total": ("counter", "Chunks re-hashed by scrub."),
    "dhtfs_scrub_bytes_total": ("counter", "Bytes re-hashed by scrub."),
    "dhtfs_scrub_replaced_total": ("counter", "Bad copies scrub fetched again."),
    "dhtfs_scrub_lost_total": ("counter", "Bad copies no other node could supply."),
    "dhtfs_chunk_leases_total": ("counter", "LEASE requests answered."),
    "dhtfs_chunk_leased_total": ("counter", "Chunk leases extended for peers (LEASE)."),
    "dhtfs_pins": ("gauge", "Roots this node pins (renews the leases of)."),
    "dhtfs_lease_renewals_total": ("counter", "Pin renewals done (one per pin per round)."),
    "dhtfs_lease_renewal_failures_total": ("counter", "Pin renewals that failed."),
    "dhtfs_lease_chunks_unleased_total": (
        "counter",
        "Chunks of a pin no holder answered for at a renewal.",
    ),
    "dhtfs_gc_chunks_total": ("counter", "Chunks deleted once all their leases ran out."),
    "dhtfs_gc_bytes_total": ("counter", "Bytes deleted once all their leases ran out."),
}
"""Every metric: name -> (type, meaning). Counter names are given with
``_total``, as they appear on the page."""


class NodeCollector(Collector):
    """Reads a node's running totals at each scrape."""

    def __init__(self, node: Sources) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        node = self._node
        store, service, dht = node.store, node.service, node.dht
        endpoint, maintainer = node.endpoint, node.maintainer
        if store is None or service is None or dht is None or endpoint is None:
            return
        stats = store.stats()
        yield _gauge("dhtfs_store_chunks", stats.chunks)
        yield _gauge("dhtfs_store_bytes", stats.bytes_used)
        if stats.quota is not None:
            yield _gauge("dhtfs_store_quota_bytes", stats.quota)
        yield _gauge("dhtfs_store_guest_chunks", stats.guests)
        yield _gauge("dhtfs_store_disk_free_bytes", stats.disk_free)
        yield _gauge("dhtfs_store_full", int(stats.full))
        stores = _counter("dhtfs_chunk_stores_total", labels=["outcome"])
        for outcome, count in service.counts.items():
            stores.add_metric([outcome], count)
        yield stores
        yield _counter("dhtfs_chunk_bytes_in_total", service.bytes_stored)
        yield _counter("dhtfs_chunk_gets_total", service.chunks_served)
        yield _counter("dhtfs_chunk_bytes_out_total", service.bytes_served)
        yield _counter("dhtfs_chunk_haves_total", service.haves)
        yield _counter("dhtfs_chunk_proofs_total", service.proofs)
        yield _counter("dhtfs_chunk_leases_total", service.leases)
        yield _counter("dhtfs_chunk_leased_total", service.chunks_leased)
        yield _gauge("dhtfs_peers_connected", len(endpoint.connected_peers()))
        yield _gauge("dhtfs_peers_known", len(dht.known_contacts()))
        counters = dht.protocol.counters
        yield _counter("dhtfs_dht_requests_sent_total", counters.requests_sent)
        yield _counter("dhtfs_dht_requests_served_total", counters.requests_served)
        yield _counter("dhtfs_dht_timeouts_total", counters.timeouts)
        yield _counter("dhtfs_dht_dropped_total", counters.dropped)
        yield _counter("dhtfs_dht_evictions_total", counters.evictions)
        times = dht.counters.lookup_seconds
        lookups = HistogramMetricFamily(
            "dhtfs_dht_lookup_seconds", METRICS["dhtfs_dht_lookup_seconds"][1]
        )
        lookups.add_metric(
            [], [(_bound(b), count) for b, count in times.cumulative()], sum_value=times.total
        )
        yield lookups
        yield _gauge("dhtfs_dht_records_held", len(dht.providers))
        if maintainer is not None:
            totals = maintainer.totals
            yield _counter("dhtfs_repair_passes_total", maintainer.repair_passes)
            yield _counter("dhtfs_repair_chunks_examined_total", totals.examined)
            yield _counter("dhtfs_repair_copies_added_total", totals.copies_added)
            yield _counter("dhtfs_repair_copies_dropped_total", totals.copies_dropped)
            yield _counter("dhtfs_repair_errors_total", totals.errors)
            yield _counter("dhtfs_repair_failed_proofs_total", totals.failed_proofs)
            scrub = maintainer.scrub
            yield _counter("dhtfs_scrub_chunks_total", scrub.chunks_checked)
            yield _counter("dhtfs_scrub_bytes_total", scrub.bytes_checked)
            yield _counter("dhtfs_scrub_replaced_total", scrub.replaced)
            yield _counter("dhtfs_scrub_lost_total", scrub.lost)
        if node.leases is not None:
            leases = node.leases.totals
            yield _gauge("dhtfs_pins", node.leases.pin_count())
            yield _counter("dhtfs_lease_renewals_total", leases.renewals)
            yield _counter("dhtfs_lease_renewal_failures_total", leases.renewal_failures)
            yield _counter("dhtfs_lease_chunks_unleased_total", leases.chunks_unleased)
            yield _counter("dhtfs_gc_chunks_total", leases.chunks_collected)
            yield _counter("dhtfs_gc_bytes_total", leases.bytes_collected)


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def _gauge(name: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, METRICS[name][1], value=value)


def _counter(
    name: str, value: float | None = None, *, labels: list[str] | None = None
) -> CounterMetricFamily:
    # The family is named without _total; the library adds it to the sample.
    return CounterMetricFamily(
        name.removesuffix("_total"), METRICS[name][1], value=value, labels=labels
    )


async def serve_metrics(node: Sources, host: str, port: int) -> web.AppRunner:
    """Serve ``/metrics`` for ``node`` on ``host:port`` (0: any free port)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    application = web.Application()
    application.router.add_get("/metrics", metrics)
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner


__all__ = ["METRICS", "NodeCollector", "Sources", "serve_metrics"]
