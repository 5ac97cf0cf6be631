"""The transfer engines: publish, fetch, manifest walks, placement, retrieval, health.

They work over protocols (``ports.Locator`` finds nodes and providers,
``ports.Dialer`` reaches peers), never over the DHT or the TCP endpoint
directly, so they run the same on an in-memory network in unit tests.

Must not import: dht (except its pure values), transport (except pure
values), node. Imports core, store and wire's pure values.
"""
