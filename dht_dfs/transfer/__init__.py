"""The transfer engines: publish, fetch, manifest walks, placement, retrieval, health.

They work over protocols (``ports.Locator`` finds nodes and providers,
``ports.Dialer`` reaches peers), never over the DHT or the TCP endpoint
directly, so they run the same on an in-memory network in unit tests.

Modules, from the bottom up: ``ports`` (the protocols), ``pipeline``
(ordered map in threads, in-order hasher), ``publish``, ``walk`` (manifest
trees), ``fetch``, ``local`` (a chunk store as sink and source),
``placement`` (where copies go), ``retrieval`` (where copies come from),
``health`` (check and repair), ``network`` (the ``Network`` facade).

Must not import: dht (except its pure values), transport (except pure
values), node. Imports core, store and wire's pure values.
"""
