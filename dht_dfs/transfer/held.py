"""Copies a publish need not send: the rightful holders prove they have them.

Publishing a file the network already stores (again, or after an
interruption) used to send every byte again. Before a chunk goes out,
``HeldCopies.proven`` asks its ``replicas`` rightful holders to prove they
hold it: a fresh nonce each time, answered with a keyed hash of the chunk
(``core.proofs``), checked against the bytes the publisher is holding. A
HAVE answer would only be a claim (property 13); a proof is evidence. If
every one of them proves it, the chunk is not sent, and each gets a LEASE
instead, as the STORE would have given it.

Probing costs a round trip per chunk, wasted on a file the network lacks.
So a sink probes while proofs succeed and stops at the first chunk that is
missing anywhere; it tries again every ``_RETRY_EVERY`` chunks, so a tree
whose first files are new still skips the stored ones further on, and an
interrupted publish resumed skips what it placed before.

Must not import: dht (except ``dht.values``), transport, node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence

from dht_dfs.core.crypto import SealedChunk
from dht_dfs.core.errors import NetworkError
from dht_dfs.core.proofs import PROOF_NONCE_SIZE, proof_tag, tag_matches
from dht_dfs.dht.values import Contact
from dht_dfs.transfer.ports import NetworkView, address_of

log = logging.getLogger(__name__)

_RETRY_EVERY = 64
"""Chunks a sink stores without probing after a miss, before it probes again."""


class HeldCopies:
    """Per publish: which chunks the network provably has already."""

    def __init__(self, network: NetworkView, lease: int) -> None:
        self._network = network
        self._lease = lease
        self._probing = True
        self._since_miss = 0
        self.skipped = 0
        """Chunks not sent: all their rightful holders proved them."""
        self.bytes_skipped = 0

    async def proven(self, chunk: SealedChunk, closest: Sequence[Contact]) -> bool:
        """True if the ``replicas`` closest proved the chunk (and were leased it)."""
        if not self._probing:
            self._since_miss += 1
            if self._since_miss < _RETRY_EVERY:
                return False
            self._since_miss = 0
        network = self._network
        holders = list(closest[: network.config.replicas])
        if len(holders) < network.config.replicas:
            return False
        nonce = os.urandom(PROOF_NONCE_SIZE)
        expected = await network.run(proof_tag, nonce, chunk.chunk_id, chunk.data)
        results = await asyncio.gather(
            *(self._proves(contact, nonce, expected, chunk) for contact in holders)
        )
        if not all(results):
            self._probing = False
            return False
        self._probing = True
        self.skipped += 1
        self.bytes_skipped += len(chunk.data)
        return True

    async def _proves(
        self, contact: Contact, nonce: bytes, expected: bytes, chunk: SealedChunk
    ) -> bool:
        network = self._network
        if contact.node_id == network.node_id:
            if network.store is None:
                return False
            until = time.time() + self._lease
            held = await network.run(network.store.lease, [chunk.chunk_id], until)
            return held[0]
        try:
            link = await network.dialer.connect(address_of(contact))
            tags = await link.prove(nonce, [chunk.chunk_id])
            if not tag_matches(expected, tags[0] if tags else None):
                return False
            # As the STORE it replaces would have: the copy is kept a lease more.
            return (await link.lease(self._lease, [chunk.chunk_id]))[0]
        except (NetworkError, OSError) as error:
            log.debug("%s did not prove chunk %s: %s", contact.node_id, chunk.chunk_id, error)
            return False


__all__ = ["HeldCopies"]
