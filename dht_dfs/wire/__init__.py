"""The chunk protocol, sans-IO (h11 style): frames, messages, the handshake, one connection.

Bytes in, events out; no sockets, no clock, no asyncio.

Must not import: asyncio, socket, or any dht_dfs package but core.
"""
