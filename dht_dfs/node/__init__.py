"""A running node and the ways to drive one.

Wires store, transport, DHT and transfer engines into a node; owns its
maintenance passes, the chunk service answering peers, the local control
socket, typed operations and sessions (the local node or a short-lived
client).

Must not import: the CLI. Everything below it, as it needs.
"""
