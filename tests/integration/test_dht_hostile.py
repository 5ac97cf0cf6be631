"""Hostile input against a live network of DhtNodes on 127.0.0.1: malformed and
oversized datagrams, forged provider records sent to holders, forged records
served in lookup replies. Nothing may raise an unhandled exception (the loop's
exception handler must stay silent), every node keeps answering, and lookups
return only authentic records."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import typing
from typing import Any

import pytest

from dht_dfs.core.config import Config
from dht_dfs.core.crypto import Identity
from dht_dfs.core.ids import NodeId
from dht_dfs.dht.codec import MAX_DATAGRAM_SIZE, encode_request
from dht_dfs.dht.node import DhtNode
from dht_dfs.dht.protocol import DROP_LOG_BURST
from dht_dfs.dht.values import Address, ProviderRecord
from tests.integration.dht_harness import (
    LOCALHOST,
    RawPeer,
    dht_network,
    loop_exception_reports,
    settle,
)

CONFIG = Config(ksize=8, alpha=3, dht_rpc_timeout=0.5, provider_ttl=3600.0)


def hostile_datagrams(header: list[object]) -> list[bytes]:
    rng = random.Random(3)
    message_id = os.urandom(20)
    good_record = ProviderRecord.create(Identity.generate(), bytes(20), "10.0.0.1", 1, 60, 0)
    requests: list[tuple[str, list[object]]] = [
        ("ping", []),
        ("ping", [header]),
        ("ping", [header, b"short"]),
        ("find_node", [header, "not bytes"]),
        ("find_node", [header, bytes(20), bytes(20)]),
        ("get_providers", [header, bytes(20), -5]),
        ("get_providers", [header, bytes(20), True]),
        ("add_providers", [header, "records"]),
        ("add_providers", [header, [good_record.to_wire()[:-1]]]),
        ("add_providers", [header, [[None] * 7]]),
        ("add_providers", [[b"x", 1, 0], []]),
        ("store", [header, bytes(20), b"value"]),
        ("find_value", [header, bytes(20)]),
        ("stun", []),
        ("__class__", []),
    ]
    datagrams = [
        b"\x00" + message_id + b"\x00" * (MAX_DATAGRAM_SIZE + 1),
        b"\x00" + message_id + os.urandom(60_000),
    ]
    datagrams += [encode_request(os.urandom(20), name, args) for name, args in requests]
    datagrams += [
        b"",
        b"\x00",
        b"\x00" * 21,
        b"\x02" + message_id + b"\xc0",
        b"\x00" + message_id + b"\xc1",
        b"\x00" + message_id + b"\x91" * 5000,  # nesting deep enough to hit the recursion limit
        b"\x00" + message_id + b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion items
        b"\x00" + message_id + b"\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
        b"\x00" + message_id + b"\xd7\xff" + b"\xff" * 8,  # a timestamp out of range
        b"\x00" + message_id + b"\x92\xa4ping\x90\x00",  # trailing byte
        b"\x01" + message_id + b"\x90",  # a reply nobody asked for
    ]
    datagrams += [
        bytes([rng.choice((0, 1))]) + rng.randbytes(rng.randint(0, 300)) for _ in range(150)
    ]
    return datagrams


async def test_malformed_and_oversized_datagrams_are_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with dht_network(30, CONFIG) as nodes, RawPeer.open() as raw:
        key = os.urandom(20)
        provider = nodes[9]
        await provider.announce([key])
        target = nodes[4]
        address = (LOCALHOST, target.port)
        with (
            loop_exception_reports() as reports,
            caplog.at_level(logging.WARNING, "dht_dfs.dht.protocol"),
        ):
            datagrams = hostile_datagrams(raw.header())
            for start in range(0, len(datagrams), 10):
                for data in datagrams[start : start + 10]:
                    raw.send(data, address)
                # Still answering, after each bad datagram (they are handled in order).
                # Pacing on the replies also keeps the socket's receive buffer from
                # overflowing, which would drop datagrams before the node sees them.
                reply = await raw.ping_ours(address)
                assert reply[0] == target.identity.node_id.digest
        assert reports == []
        # Rate-limited: one line per dropped datagram up to the burst, not one per datagram.
        drops = [
            r
            for r in caplog.records
            if f"dropped datagram from {LOCALHOST}:{raw.port}" in r.getMessage()
        ]
        assert 10 <= len(drops) <= DROP_LOG_BURST
        assert target.protocol.counters.dropped >= len(datagrams) - 5
        assert any("exceeds the 8192-byte limit" in r.getMessage() for r in drops)
        # Only the well-formed, answerable datagrams got a reply: the pings.
        pings = -(-len(datagrams) // 10)
        assert len([d for d, _a in raw.received if d[:1] == b"\x01"]) == pings
        # The network still works, through the node that was attacked too.
        assert [r.node_id for r in await target.find_providers(key)] == [provider.identity.node_id]
        assert [r.node_id for r in await nodes[20].find_providers(key)] == [
            provider.identity.node_id
        ]


async def test_forged_records_sent_to_holders_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    async with dht_network(30, CONFIG) as nodes, RawPeer.open() as raw:
        key = os.urandom(20)
        provider = nodes[2]
        await provider.announce([key])
        (genuine,) = provider.local_providers(key) or await nodes[10].find_providers(key)
        now = provider.clock()
        attacker = Identity.generate()
        stolen_id = ProviderRecord.create(attacker, key, "6.6.6.6", 4000, 600, now)
        forgeries = [
            dataclasses.replace(genuine, host="6.6.6.6"),  # redirect the provider's traffic
            dataclasses.replace(genuine, expiry=genuine.expiry + 100_000),  # extend its life
            dataclasses.replace(stolen_id, node_id=provider.identity.node_id),  # claim its id
            ProviderRecord.create(attacker, key, "6.6.6.6", 4000, 30 * 24 * 3600, now),  # too long
            ProviderRecord.create(attacker, key, "6.6.6.6", 4000, 10, now - 60),  # expired
        ]
        holders = [n for n in nodes if n.local_providers(key)]
        assert len(holders) >= CONFIG.ksize - 1
        with loop_exception_reports() as reports:
            for holder in holders:
                reply = await raw.request(
                    (LOCALHOST, holder.port),
                    "add_providers",
                    [raw.header(), [r.to_wire() for r in forgeries]],
                )
                assert reply == [False] * len(forgeries)
        assert reports == []
        assert "refused provider record" in caplog.text
        for node in nodes:
            records = await node.find_providers(key)
            assert records == [genuine], f"from {node.contact}"


async def test_lookups_drop_forged_records_served_by_a_malicious_node(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with dht_network(30, CONFIG) as nodes:
        liar = nodes[7]
        key = liar.identity.node_id.digest  # every lookup of this key visits the liar
        provider = nodes[15]
        await provider.announce([key])
        (genuine,) = liar.local_providers(key)
        now = liar.clock()
        forged = [
            dataclasses.replace(genuine, host="6.6.6.6"),
            ProviderRecord.create(Identity.generate(), key, "6.6.6.6", 1, 30 * 24 * 3600, now),
        ]
        for record in forged:
            # Straight into its store: the liar skips the checks an honest node makes.
            liar.providers.remove(key, record.node_id)
            assert liar.providers.add(record, now)
        await settle(nodes)
        with loop_exception_reports() as reports:
            for node in nodes:
                if node is liar:
                    continue
                result = await node.lookup(key)
                assert [r.host for r in result.providers] == [genuine.host], f"from {node.contact}"
                assert liar.contact in result.closest
        assert reports == []
        assert "bad record in reply" in caplog.text


class Relay(asyncio.DatagramProtocol):
    """A node that relays every datagram from ``victim`` to ``target`` and back:
    it answers the victim's challenges with the target's own proofs."""

    def __init__(self, victim: Address, target: Address) -> None:
        self.victim, self.target = victim, target
        self.transport: asyncio.DatagramTransport | None = None
        self.relayed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        source = (addr[0], addr[1])
        if source == self.victim:
            self.relayed += 1
            self.transport.sendto(data, self.target)
        elif source == self.target:
            self.transport.sendto(data, self.victim)


async def test_a_relayed_identity_proof_does_not_re_point_a_verified_contact() -> None:
    async with dht_network(6, CONFIG) as nodes:
        victim, target = nodes[1], nodes[2]
        victim_address = (LOCALHOST, victim.port)
        target_address = (LOCALHOST, target.port)
        assert victim.protocol.router.get(target.identity.node_id) is not None
        loop = asyncio.get_running_loop()
        transport, relay = await loop.create_datagram_endpoint(
            lambda: Relay(victim_address, target_address), local_addr=(LOCALHOST, 0)
        )
        try:
            relay_address = (LOCALHOST, int(transport.get_extra_info("sockname")[1]))
            # The relay claims the target's id from its own address; the victim
            # challenges the relay, which passes the challenge to the real target.
            claim = [target.identity.node_id.digest, target.port, 0]
            transport.sendto(
                encode_request(os.urandom(20), "find_node", [claim, bytes(20)]), victim_address
            )
            proof = await victim._membership.limited_challenge(relay_address)
            await settle(nodes)
            assert relay.relayed >= 1  # the challenge did go through the relay
            assert proof is None
            entry = victim.protocol.router.get(target.identity.node_id)
            assert entry is not None and entry.contact.udp_address == target_address
        finally:
            transport.close()


async def test_a_verified_contact_is_replaced_only_once_its_address_stops_answering() -> None:
    async with dht_network(4, CONFIG) as nodes:
        victim, original = nodes[1], nodes[2]
        original_address = (LOCALHOST, original.port)
        # The same key, run at a second address: its proofs there are valid.
        twin = DhtNode(original.identity, CONFIG)
        await twin.start(LOCALHOST, 0)
        try:
            await twin.protocol.call(
                (LOCALHOST, victim.port), "find_node", [twin.protocol.header, bytes(20)]
            )
            await settle([*nodes, twin])
            entry = victim.protocol.router.get(original.identity.node_id)
            assert entry is not None and entry.contact.udp_address == original_address
            # Once the first address is silent, the claim from the second one wins.
            await original.stop()
            proof = await victim._membership.limited_challenge((LOCALHOST, twin.port))
            assert proof is not None
            assert await victim._membership.admit(proof)
            entry = victim.protocol.router.get(original.identity.node_id)
            assert entry is not None and entry.contact.udp_address == (LOCALHOST, twin.port)
        finally:
            await twin.stop()


async def test_requests_under_made_up_ids_draw_one_ping_per_address() -> None:
    async with dht_network(3, CONFIG) as nodes, RawPeer.open() as raw:
        node = nodes[1]
        for _ in range(10):
            # Not client mode, a fresh id each time: each one is a claim to check.
            header = raw.header(client=False, node_id=NodeId(os.urandom(20)))
            await raw.request((LOCALHOST, node.port), "find_node", [header, os.urandom(20)])
        await node.settled()
        pings = [d for d, _a in raw.received if d[:1] == b"\x00"]
        assert len(pings) == 1
