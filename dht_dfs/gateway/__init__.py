"""Read-only HTTP access to the network: ``dhtfs gateway`` (see ``gateway.http``).

Must not import: dht (except ``dht.values``), transport, store.
"""
