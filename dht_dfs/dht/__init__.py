"""The DHT: locating chunks by content hash over Kademlia (UDP).

Owns the routing table, identity proofs of contacts, provider records,
iterative lookups, announcements and the saved contact list. ``compat`` is
the only module of dhtfs that imports ``kademlia`` or ``rpcudp``.

Must not import: store, wire, transport, transfer, node. Imports core.
"""
