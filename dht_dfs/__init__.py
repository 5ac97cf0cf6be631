"""dhtfs: a peer-to-peer file store.

Files are split into chunks, each chunk is encrypted convergently and named
by the SHA-256 of its ciphertext, copied to the nodes closest to its id, and
located through a Kademlia DHT. See README.md and docs/ for the design.
"""

__version__ = "0.1.0"
