"""The chunk protocol over asyncio TCP: the endpoint, its connection pool, buffers, limits.

Drives ``dht_dfs.wire`` state machines over sockets; knows nothing of the
DHT, the store or files beyond the descriptors a request handler gives it.

Must not import: dht, store, transfer, node. Imports core and wire.
"""
