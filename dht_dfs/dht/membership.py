"""Who may enter the routing table: identity proofs of contacts.

Owns the challenge ping (a fresh nonce the contact signs with the key its id
is the hash of), the cache of proven contacts, the memory of failed proofs
(so a flood of forged ids cannot make this node ping the same address over
and over), the liveness check of a full bucket's head (paper section 2.2),
and the vote on this node's own address as verified peers observe it.
A node enters a routing table only through ``accept_proof``; client-mode
nodes never do.

Must not import: kademlia (only ``compat`` does), nor ``lookup``,
``announce`` or ``node``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import typing
from collections import OrderedDict
from typing import Any, Final

from dht_dfs.core.errors import RemoteProtocolError
from dht_dfs.core.ids import NodeId
from dht_dfs.dht.compat import DhtPeer
from dht_dfs.dht.protocol import DhtProtocol
from dht_dfs.dht.values import (
    NONCE_SIZE,
    Address,
    Contact,
    IdentityProof,
    NodeCounters,
    canonical_address,
    check_ping_reply,
)

log = logging.getLogger(__name__)

VERIFY_CONCURRENCY: Final = 16
MAX_PENDING_VERIFICATIONS: Final = 512
VERIFIED_CACHE_SIZE: Final = 8192
FAILED_VERIFICATION_MEMORY: Final = 60.0
"""Seconds a failed identity proof is remembered, so a flood of forged ids
cannot make this node ping the same address over and over."""
MAX_HEAD_CHECKS: Final = 64
"""Full-bucket head pings in flight at most."""
MAX_OBSERVED_HOSTS: Final = 16


class MembershipOwner(typing.Protocol):
    """What membership needs from the node that owns it (a DhtNode)."""

    @property
    def protocol(self) -> DhtProtocol:
        """The running protocol (raises if the node is not started)."""

    @property
    def stopping(self) -> bool:
        """True once the node began to stop: start no new work."""

    def spawn_transient(self, coro: typing.Coroutine[Any, Any, None], name: str) -> None:
        """Run a short task the owner owns, cancels on stop and ``settled`` waits for."""


class Membership:
    """Identity proofs and the liveness of routing-table entries, for one node."""

    def __init__(self, own_id: NodeId, counters: NodeCounters, owner: MembershipOwner) -> None:
        self.own_id = own_id
        self.counters = counters
        self._owner = owner
        self._verified: OrderedDict[NodeId, IdentityProof] = OrderedDict()
        self._failed_proofs: OrderedDict[tuple[NodeId, Address], float] = OrderedDict()
        self._challenged: OrderedDict[Address, float] = OrderedDict()
        """When each address was last sent a challenge on a sender's claim (bounded)."""
        self._verifying: set[NodeId] = set()
        self._verify_slots = asyncio.Semaphore(VERIFY_CONCURRENCY)
        self._checking_heads: set[NodeId] = set()
        self._observed_hosts: dict[str, int] = {}
        """How many verified peers saw us at each address (bounded)."""

    def observed_host(self) -> str | None:
        """The address most verified peers saw us at, if any saw us."""
        if not self._observed_hosts:
            return None
        # A majority of proofs, so one lying peer cannot set it.
        return max(self._observed_hosts.items(), key=lambda item: item[1])[0]

    # --- what the protocol reports (DhtNode forwards its hooks here) ------------------

    def sender_seen(self, node_id: NodeId, tcp_port: int, address: Address) -> None:
        protocol = self._owner.protocol
        proof = self._verified.get(node_id)
        contact = Contact(node_id, address[0], address[1], tcp_port)
        if proof is None or proof.contact != contact:
            self._schedule_verification(contact)
            return
        # Proven before, from this very address: only its recency changes.
        self._verified.move_to_end(node_id)
        router = protocol.router
        peer = router.get(node_id)
        if peer is not None and peer.contact == contact:
            router.add_contact(peer)
            protocol.note_success(node_id)
        else:
            protocol.welcome_if_new(DhtPeer(contact, proof.public_key))

    def contact_answered(self, contact: Contact) -> None:
        proof = self._verified.get(contact.node_id)
        if proof is None or proof.contact.udp_address != contact.udp_address:
            self._schedule_verification(contact)
            return
        # Proven before at this address; back into the table if it was evicted.
        protocol = self._owner.protocol
        if protocol.router.get(contact.node_id) is None:
            protocol.welcome_if_new(DhtPeer(proof.contact, proof.public_key))

    def bucket_full(self, head: DhtPeer) -> None:
        node_id = head.contact.node_id
        if (
            self._owner.stopping
            or node_id in self._checking_heads
            or len(self._checking_heads) > MAX_HEAD_CHECKS
        ):
            return
        self._checking_heads.add(node_id)
        self._owner.spawn_transient(self._check_head(head.contact), f"dht-head-{node_id}")

    # --- identity proofs ------------------------------------------------------------------

    async def limited_challenge(self, address: Address) -> IdentityProof | None:
        """``challenge``, at most VERIFY_CONCURRENCY at once."""
        async with self._verify_slots:
            return await self.challenge(address)

    async def challenge(self, address: Address) -> IdentityProof | None:
        """Ping with a fresh nonce; the proof if the answer is signed by its id's key."""
        protocol = self._owner.protocol
        nonce = os.urandom(NONCE_SIZE)
        address = canonical_address(address)
        target = [address[0], address[1]]
        reply = await protocol.call(address, "ping", [protocol.header, nonce, target])
        if reply is None:
            return None
        try:
            return check_ping_reply(reply, nonce, address)
        except RemoteProtocolError as exc:
            protocol.drop(address, f"bad ping reply: {exc}")
            return None

    def accept_proof(self, proof: IdentityProof) -> None:
        """Count a proven contact's vote on our address and let it into the table."""
        self.counters.verified += 1
        if proof.observed is not None:
            host = proof.observed[0]
            if host in self._observed_hosts or len(self._observed_hosts) < MAX_OBSERVED_HOSTS:
                self._observed_hosts[host] = self._observed_hosts.get(host, 0) + 1
        if proof.client or proof.contact.node_id == self.own_id:
            return
        self._verified[proof.contact.node_id] = proof
        self._verified.move_to_end(proof.contact.node_id)
        while len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        self._owner.protocol.welcome_if_new(DhtPeer(proof.contact, proof.public_key))

    def _schedule_verification(self, contact: Contact) -> None:
        node_id = contact.node_id
        if self._owner.stopping or node_id in self._verifying or node_id == self.own_id:
            return
        if not self._owner.protocol.router.has_room_for(node_id):
            # A full bucket that may not split would only keep it as a spare: an
            # identity check (two datagrams, two signatures) for little gain.
            return
        if len(self._verifying) >= MAX_PENDING_VERIFICATIONS:
            log.debug("too many identity checks in flight; not checking %s", contact)
            return
        now = time.monotonic()
        failed_at = self._failed_proofs.get((node_id, contact.udp_address))
        if failed_at is not None and now - failed_at < FAILED_VERIFICATION_MEMORY:
            return
        # At most one challenge per address per interval, whatever ids its requests
        # claim: a spoofed source with made-up ids must not turn this node into a
        # pinger of that address (QUIC, RFC 9000 section 8.1, bounds what an
        # unvalidated address is sent).
        challenged_at = self._challenged.get(contact.udp_address)
        interval = self._owner.protocol.config.dht_challenge_interval
        if challenged_at is not None and now - challenged_at < interval:
            return
        self._challenged[contact.udp_address] = now
        self._challenged.move_to_end(contact.udp_address)
        while len(self._challenged) > VERIFIED_CACHE_SIZE:
            self._challenged.popitem(last=False)
        self._verifying.add(node_id)
        self._owner.spawn_transient(self._verify(contact), f"dht-verify-{node_id}")

    async def _verify(self, contact: Contact) -> None:
        try:
            proof = await self.limited_challenge(contact.udp_address)
            if proof is None or proof.contact.node_id != contact.node_id:
                self.counters.verification_failures += 1
                self._failed_proofs[(contact.node_id, contact.udp_address)] = time.monotonic()
                while len(self._failed_proofs) > VERIFIED_CACHE_SIZE:
                    self._failed_proofs.popitem(last=False)
                log.debug("%s failed its identity check", contact)
                return
            await self.admit(proof)
        finally:
            self._verifying.discard(contact.node_id)

    async def admit(self, proof: IdentityProof) -> bool:
        """``accept_proof``, unless the id is proven at another address that still
        answers; True if accepted.

        A valid proof from a second address (the same key run twice, or a node that
        moved) does not re-point a verified contact while the old address still
        proves the id: only a contact that stopped answering is replaced, so a
        node cannot redirect another's traffic by claiming its id elsewhere.
        """
        node_id = proof.contact.node_id
        held = self._verified.get(node_id)
        if held is not None and held.contact.udp_address != proof.contact.udp_address:
            again = await self.limited_challenge(held.contact.udp_address)
            if again is not None and again.contact.node_id == node_id:
                self.counters.verification_failures += 1
                self._failed_proofs[(node_id, proof.contact.udp_address)] = time.monotonic()
                log.info(
                    "kept %s: it still answers, so its id's claim from %s:%d is refused",
                    held.contact,
                    *proof.contact.udp_address,
                )
                return False
            router = self._owner.protocol.router
            stale = router.get(node_id)
            if stale is not None:
                router.remove_contact(stale)
        self.accept_proof(proof)
        return True

    async def _check_head(self, contact: Contact) -> None:
        # Section 2.2 of the paper: a full bucket keeps its least-recently seen
        # contact if it still answers; call_contact counts a silence toward eviction
        # (which then promotes a contact from the replacement cache).
        protocol = self._owner.protocol
        try:
            await protocol.call_contact(contact, "ping", [protocol.header, os.urandom(NONCE_SIZE)])
        finally:
            self._checking_heads.discard(contact.node_id)
