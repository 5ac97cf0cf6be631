"""Pure values and codecs: ids, errors, crypto, chunking, manifests, references, config.

Owns everything that can be computed without I/O: a chunk's id, its
encryption, the manifest, directory node and reference byte formats, the settings.

Must not import: asyncio, sockets, files (beyond reading a secret handed in
as bytes), or any other dht_dfs package. Everything else imports this.
"""
