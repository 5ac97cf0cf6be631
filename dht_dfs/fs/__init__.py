"""The FUSE mount: a published file or tree as a read-only, lazily fetched drive.

``tree`` numbers the entries (metadata from directory and manifest nodes
only), ``files`` reads at any offset with read-ahead, ``chunks`` fetches
each chunk once for all readers through a memory LRU and the on-disk
``store.cache``, ``fuse`` is the pyfuse3 glue (the only module importing
it) and ``mount`` runs it all.

Must not import: node, transport, dht (except ``dht.values``), the CLI.
"""
