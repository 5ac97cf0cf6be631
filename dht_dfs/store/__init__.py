"""The on-disk chunk store: chunk files written by fsync and rename, their SQLite index.

Must not import: asyncio, the network packages (wire, transport, dht,
transfer) or node. Imports only dht_dfs.core.
"""
