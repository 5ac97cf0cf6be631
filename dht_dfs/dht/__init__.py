"""The DHT: locating chunks by content hash over Kademlia (UDP).

Owns the routing table, identity proofs of contacts, provider records,
iterative lookups, announcements and the saved contact list, one module
each, lowest layer first:

* ``codec``: datagram framing, MessagePack, argument checks (pure);
* ``values``: contacts, signed records, identity proofs, lookup results (pure);
* ``records``: the bounded store of records held for others (pure);
* ``contacts``: the saved contact list (a JSON file);
* ``lookup``: the iterative lookup as a state machine, time passed in (pure);
* ``driver``: runs a lookup machine over the protocol (asyncio);
* ``compat``: the only module of dhtfs that imports ``kademlia`` or
  ``rpcudp``; its docstring lists the library's faults it fixes;
* ``protocol``: our RPCs over UDP (serve, call, validate, count);
* ``membership``: identity proofs, who enters the routing table;
* ``announce``: placing records, re-announcement, pushes to newcomers;
* ``node``: ``DhtNode``, the facade the rest of dhtfs uses.

Must not import: store, wire, transport, transfer, node. Imports core.
"""
