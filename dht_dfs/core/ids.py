"""Identifier types: chunk ids and node ids.

Ids are values of their own type, never loose ``bytes`` or hex strings; hex
appears only at the edges (logs, CLI, JSON). A chunk id is the SHA-256 of a
chunk's stored bytes; a node id is a 160-bit hash of the node's Ed25519
public key. Both live in the same 160-bit XOR metric of the DHT: a chunk's
DHT key is the first 160 bits of its id (a truncated SHA-256 is still a
uniform hash, so closeness is well spread).

Pure: imports only the standard library.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

CHUNK_ID_SIZE = 32
NODE_ID_SIZE = 20
DHT_KEY_SIZE = 20

_NODE_ID_PERSON = b"dhtfs/node-id"


def _from_hex(text: str, size: int, what: str) -> bytes:
    cleaned = text.strip().lower()
    if len(cleaned) != size * 2:
        raise ValueError(f"{what} must be {size * 2} hex digits, got {len(cleaned)}")
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise ValueError(f"{what} is not hexadecimal: {text!r}") from None


@dataclass(frozen=True, slots=True, order=True)
class ChunkId:
    """The SHA-256 of a chunk's stored (ciphertext) bytes."""

    digest: bytes
    """The 32 raw bytes of the hash."""

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != CHUNK_ID_SIZE:
            raise ValueError(f"a chunk id is {CHUNK_ID_SIZE} bytes")

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> ChunkId:
        """The id of these stored bytes."""
        return cls(hashlib.sha256(data).digest())

    @classmethod
    def from_hex(cls, text: str) -> ChunkId:
        return cls(_from_hex(text, CHUNK_ID_SIZE, "a chunk id"))

    def hex(self) -> str:
        return self.digest.hex()

    @property
    def dht_key(self) -> bytes:
        """The 160-bit key under which the DHT locates this chunk."""
        return self.digest[:DHT_KEY_SIZE]

    def matches(self, data: bytes | bytearray | memoryview) -> bool:
        return hashlib.sha256(data).digest() == self.digest

    def __str__(self) -> str:
        return self.digest.hex()[:16]

    def __repr__(self) -> str:
        return f"ChunkId({self.digest.hex()[:16]}…)"


@dataclass(frozen=True, slots=True, order=True)
class NodeId:
    """A node's 160-bit id: a hash of its Ed25519 public key."""

    digest: bytes
    """The 20 raw bytes."""

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != NODE_ID_SIZE:
            raise ValueError(f"a node id is {NODE_ID_SIZE} bytes")

    @classmethod
    def for_public_key(cls, public_key: bytes) -> NodeId:
        """The id a node with this Ed25519 public key must use."""
        return cls(
            hashlib.blake2b(public_key, digest_size=NODE_ID_SIZE, person=_NODE_ID_PERSON).digest()
        )

    @classmethod
    def from_hex(cls, text: str) -> NodeId:
        return cls(_from_hex(text, NODE_ID_SIZE, "a node id"))

    def hex(self) -> str:
        return self.digest.hex()

    @property
    def as_int(self) -> int:
        return int.from_bytes(self.digest, "big")

    def distance(self, key: bytes) -> int:
        """XOR distance to a 160-bit key (Kademlia paper, section 2.1)."""
        return self.as_int ^ int.from_bytes(key, "big")

    def __str__(self) -> str:
        return self.digest.hex()[:12]

    def __repr__(self) -> str:
        return f"NodeId({self.digest.hex()[:12]}…)"


def xor_distance(a: bytes, b: bytes) -> int:
    """XOR distance of two equal-length keys, as an integer."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
