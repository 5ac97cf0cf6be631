"""Proofs of possession: a fresh nonce answered with a keyed hash of a chunk.

A HAVE answer is a claim; a proof tag can only be made by whoever has the
chunk's bytes (or asks someone who has them, in real time, for that nonce:
possession is proven, not where it sits). The verifier needs the bytes too:
the node that drops a copy has its own, ``check --verify`` fetches one copy
first and checks it against the chunk id.

    tag = BLAKE2b-256(key = nonce, person = PROOF_PERSON, data = chunk id || chunk bytes)

The chunk id is hashed in so a tag is bound to the chunk it was asked for;
the personalisation keeps tags apart from any other keyed BLAKE2b use.

Imports nothing of ours but ids; pure.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from dht_dfs.core.ids import ChunkId

PROOF_NONCE_SIZE: Final = 32
PROOF_TAG_SIZE: Final = 32
PROOF_PERSON: Final = b"dhtfs-prove-v1"


def proof_tag(nonce: bytes, chunk_id: ChunkId, data: bytes | bytearray | memoryview) -> bytes:
    """The tag a holder of ``data`` answers a PROVE of ``chunk_id`` with.

    hashlib releases the GIL on large buffers: call it in a worker thread.
    """
    if len(nonce) != PROOF_NONCE_SIZE:
        raise ValueError(f"a proof nonce is {PROOF_NONCE_SIZE} bytes")
    digest = hashlib.blake2b(key=nonce, digest_size=PROOF_TAG_SIZE, person=PROOF_PERSON)
    digest.update(chunk_id.digest)
    digest.update(data)
    return digest.digest()


def tag_matches(expected: bytes, answered: bytes | None) -> bool:
    """Constant-time comparison; a missing tag (the peer says it lacks the chunk) fails."""
    return answered is not None and hmac.compare_digest(expected, answered)


__all__ = ["PROOF_NONCE_SIZE", "PROOF_TAG_SIZE", "proof_tag", "tag_matches"]
