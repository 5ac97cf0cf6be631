"""Networks of 20-50 DhtNodes in one process on 127.0.0.1: provider lookups from
every node, expiry, late joiners, killed nodes, re-announcement, bootstrap and
restart, client mode."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dht_dfs.core.config import Config
from dht_dfs.core.crypto import Identity
from dht_dfs.core.errors import LocalProtocolError, NetworkError
from dht_dfs.core.ids import NodeId
from dht_dfs.dht.compat import DhtPeer
from dht_dfs.dht.node import DhtNode
from dht_dfs.dht.values import Contact
from tests.integration.dht_harness import (
    LOCALHOST,
    WAIT,
    FakeClock,
    RawPeer,
    dht_network,
    settle,
    start_node,
)

CONFIG = Config(ksize=8, alpha=3, dht_rpc_timeout=0.5, dht_lookup_timeout=10.0)


def ids(nodes: list[DhtNode]) -> set[NodeId]:
    return {node.identity.node_id for node in nodes}


def closest(nodes: list[DhtNode], key: bytes, count: int) -> list[DhtNode]:
    return sorted(nodes, key=lambda n: n.identity.node_id.distance(key))[:count]


async def test_every_provider_is_found_from_every_node() -> None:
    rng = random.Random(7)
    async with dht_network(40, CONFIG) as nodes:
        providers_of: dict[bytes, list[DhtNode]] = {}
        for count in (1, 2, 3, 4, 5):
            key = os.urandom(20)
            providers_of[key] = rng.sample(nodes, count)
            for provider in providers_of[key]:
                assert (await provider.announce([key]))[key] >= CONFIG.ksize - 1
        await settle(nodes)
        for key, providers in providers_of.items():
            results = await asyncio.gather(*(node.find_providers(key) for node in nodes))
            for node, records in zip(nodes, results, strict=True):
                assert {r.node_id for r in records} == ids(providers), f"from {node.contact}"
                assert all(r.verify(node.clock()) for r in records)
                assert {r.tcp_address for r in records} == {
                    p.contact.tcp_address for p in providers
                }


async def test_lookup_with_want_stops_early() -> None:
    async with dht_network(30, CONFIG) as nodes:
        key = os.urandom(20)
        for provider in nodes[1:6]:
            await provider.announce([key])
        asker = next(n for n in nodes[6:] if not n.local_providers(key))
        full = await asker.lookup(key)
        early = await asker.lookup(key, want=1)
        assert len(full.providers) == 5
        assert len(early.providers) >= 1
        assert early.stats.messages < full.stats.messages
        assert early.stats.hops >= 1 and not early.stats.timed_out


async def test_records_expire_with_the_injected_clock() -> None:
    clock = FakeClock()
    config = CONFIG.replace(provider_ttl=600.0)
    provided: list[bytes] = []
    async with dht_network(
        30, config, node_kwargs=lambda i: {"clock": clock, "provided_keys": lambda: provided}
    ) as nodes:
        key = os.urandom(20)
        provider, asker = nodes[3], nodes[17]
        await provider.announce([key])
        provided.append(key)
        assert [r.node_id for r in await asker.find_providers(key)] == [provider.identity.node_id]
        holders = [n for n in nodes if n.local_providers(key)]
        assert len(holders) >= CONFIG.ksize - 1

        clock.advance(599)
        assert len(await asker.find_providers(key)) == 1
        clock.advance(2)
        assert await asker.find_providers(key) == []
        assert all(n.local_providers(key) == [] for n in nodes)
        assert all(n.providers.expire(clock()) <= 1 for n in holders)
        assert all(len(n.providers) == 0 for n in nodes)

        # The provider's next re-announcement brings it back.
        assert await provider.reannounce() == 1
        assert [r.node_id for r in await asker.find_providers(key)] == [provider.identity.node_id]


async def test_late_joiner_receives_records_it_is_now_closest_to() -> None:
    rng = random.Random(11)
    async with dht_network(30, CONFIG) as nodes:
        keys = [os.urandom(20) for _ in range(40)]
        for key in keys:
            await rng.choice(nodes).announce([key])
        await settle(nodes)
        late = await start_node(CONFIG)
        nodes.append(late)  # stopped with the others
        await late.bootstrap([(LOCALHOST, nodes[0].port)])
        await settle(nodes)
        expected = [key for key in keys if late in closest(nodes, key, CONFIG.ksize)]
        assert len(expected) >= 3  # the seed gives ~10; the test needs some to be meaningful
        missing = [key.hex()[:8] for key in expected if not late.local_providers(key)]
        assert missing == []
        # Only records it is close to: not everything.
        assert len(late.providers) < len(keys)


async def test_lookups_succeed_with_a_third_of_the_nodes_killed() -> None:
    rng = random.Random(5)
    async with dht_network(45, CONFIG) as nodes:
        keys = [os.urandom(20) for _ in range(8)]
        providers_of = {key: rng.sample(nodes, 2) for key in keys}
        for key, providers in providers_of.items():
            for provider in providers:
                await provider.announce([key])
        keep = set().union(*map(ids, providers_of.values()))
        victims = rng.sample([n for n in nodes if n.identity.node_id not in keep], 15)
        await asyncio.gather(*(victim.stop() for victim in victims))
        alive = [n for n in nodes if n not in victims]

        askers = rng.sample(alive, 10)
        lookups = [(key, asker) for key in keys for asker in askers]
        results = await asyncio.gather(*(asker.find_providers(key) for key, asker in lookups))
        for (key, asker), records in zip(lookups, results, strict=True):
            assert {r.node_id for r in records} == ids(providers_of[key]), f"from {asker.contact}"

        # Placement sees only live nodes, and the true closest of them.
        for key in keys[:4]:
            asker = rng.choice(alive)
            live = await asker.closest_live_nodes(key, 3)
            assert [c.node_id for c in live] == [n.identity.node_id for n in closest(alive, key, 3)]


async def test_closest_live_nodes_can_leave_this_node_out() -> None:
    async with dht_network(20, CONFIG) as nodes:
        asker = nodes[5]
        key = asker.identity.node_id.digest  # this node is the closest of all
        with_self = await asker.closest_live_nodes(key, 4)
        without = await asker.closest_live_nodes(key, 4, include_self=False)
        assert with_self[0] == asker.contact
        assert asker.contact not in without
        assert [c.node_id for c in without] == [
            n.identity.node_id for n in closest([n for n in nodes if n is not asker], key, 4)
        ]


async def test_reannounce_loop_renews_records_before_they_expire() -> None:
    # Real time here: the loop runs every provider_ttl / 2 seconds.
    config = CONFIG.replace(provider_ttl=4.0)
    key = os.urandom(20)
    async with dht_network(
        20, config, node_kwargs=lambda i: {"provided_keys": lambda: [key]} if i == 1 else {}
    ) as nodes:
        provider, asker = nodes[1], nodes[12]
        await provider.announce([key])
        (first,) = await asker.find_providers(key)
        provider.reannounced.clear()
        await asyncio.wait_for(provider.reannounced.wait(), WAIT)
        (renewed,) = await asker.find_providers(key)
        assert renewed.node_id == provider.identity.node_id
        assert renewed.expiry > first.expiry
        assert provider.counters.reannounce_passes >= 1


async def test_announce_batches_records_per_target(monkeypatch: pytest.MonkeyPatch) -> None:
    async with dht_network(20, CONFIG) as nodes:
        provider = nodes[4]
        calls: list[str] = []
        original = provider.protocol.call

        async def counting(address: Any, name: str, args: list[object]) -> Any:
            calls.append(name)
            return await original(address, name, args)

        monkeypatch.setattr(provider.protocol, "call", counting)
        keys = [os.urandom(20) for _ in range(100)]
        confirmations = await provider.announce(keys)
        assert set(confirmations) == set(keys)
        assert min(confirmations.values()) >= CONFIG.ksize - 1
        records_sent = sum(confirmations.values())
        # ~30 records per datagram: far fewer requests than records.
        assert calls.count("add_providers") < records_sent / 10


async def test_bootstrap_retries_then_raises() -> None:
    config = CONFIG.replace(dht_rpc_timeout=0.2, bootstrap_attempts=2)
    async with RawPeer.open() as silent:
        node = await start_node(config)
        try:
            with pytest.raises(
                NetworkError, match=r"no DHT node answered at 127\.0\.0\.1:\d+ after 2"
            ):
                await node.bootstrap([f"{LOCALHOST}:{silent.port}"])
            assert await node.bootstrap([]) == 0  # the first node of a network
        finally:
            await node.stop()


async def test_client_gives_up_bootstrap_sooner_than_a_node() -> None:
    config = CONFIG.replace(dht_rpc_timeout=0.2, bootstrap_attempts=3, client_bootstrap_attempts=1)
    async with RawPeer.open() as silent:
        client = await start_node(config, client_mode=True)
        try:
            with pytest.raises(NetworkError, match=r"after 1 attempt\b"):
                await client.bootstrap([f"{LOCALHOST}:{silent.port}"])
        finally:
            await client.stop()


@pytest.mark.parametrize(
    ("errno", "reason", "expected"),
    [
        (
            socket.EAI_NONAME,
            "Name or service not known",
            r"cannot resolve bootstrap host no\.such\.host: Name or service not known",
        ),
        (
            socket.EAI_AGAIN,
            "Temporary failure in name resolution",
            r"no DHT node answered at no\.such\.host:4000 after 2 attempts",
        ),
    ],
)
async def test_a_name_that_does_not_exist_fails_at_once_a_lookup_failure_retries(
    monkeypatch: pytest.MonkeyPatch, errno: int, reason: str, expected: str
) -> None:
    asked: list[str] = []

    async def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        raise socket.gaierror(errno, reason)

    config = CONFIG.replace(dht_rpc_timeout=0.2, bootstrap_attempts=2)
    node = await start_node(config)
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    try:
        with pytest.raises(NetworkError, match=expected):
            await node.bootstrap(["no.such.host:4000"])
        # A name that does not exist is not asked again; a failed lookup is.
        assert asked == ["no.such.host"] * (1 if errno == socket.EAI_NONAME else 2)
    finally:
        await node.stop()


async def test_bootstrap_resolves_host_names_and_learns_its_address() -> None:
    async with dht_network(5, CONFIG) as nodes:
        joiner = DhtNode(Identity.generate(), CONFIG)
        await joiner.start("0.0.0.0", 0)
        try:
            assert joiner.contact.host == "0.0.0.0"
            assert await joiner.bootstrap([f"localhost:{nodes[0].port}"]) == 5
            assert joiner.contact.host == LOCALHOST  # as the peers saw it
            assert joiner.sign_record(os.urandom(20)).host == LOCALHOST
        finally:
            await joiner.stop()


async def test_contacts_are_saved_as_soon_as_a_node_joins(tmp_path: Path) -> None:
    # A node killed right after joining (no stop, so no save at stop) must
    # still find its network again when restarted without a bootstrap address.
    path = tmp_path / "dht-contacts.json"
    async with dht_network(5, CONFIG) as nodes:
        joiner = await start_node(CONFIG, state_path=path)
        try:
            assert not path.exists()
            await joiner.bootstrap([f"{LOCALHOST}:{nodes[0].port}"])
            saved = json.loads(path.read_text())["contacts"]
            assert {entry["node_id"] for entry in saved} == {n.hex() for n in ids(nodes)}
        finally:
            await joiner.stop()


async def test_restarted_node_rejoins_from_saved_contacts(tmp_path: Path) -> None:
    path = tmp_path / "dht-contacts.json"
    identity = Identity.generate()
    key = os.urandom(20)
    async with dht_network(12, CONFIG) as nodes:
        seed = nodes[0]
        first = DhtNode(identity, CONFIG, state_path=path)
        await first.start(LOCALHOST, 0)
        try:
            await first.bootstrap([(LOCALHOST, seed.port)])
            await nodes[6].announce([key])
        finally:
            await first.stop()
        assert path.exists()
        await seed.stop()  # the bootstrap node is gone

        again = DhtNode(identity, CONFIG, state_path=path)
        await again.start(LOCALHOST, 0)
        try:
            assert await again.bootstrap([]) >= 5
            assert seed.identity.node_id not in {c.node_id for c in again.known_contacts()}
            records = await again.find_providers(key)
            assert [r.node_id for r in records] == [nodes[6].identity.node_id]
        finally:
            await again.stop()


async def test_client_mode_node_is_never_added_nor_sent_records() -> None:
    async with dht_network(20, CONFIG) as nodes:
        client = DhtNode(Identity.generate(), CONFIG, client_mode=True)
        await client.start(LOCALHOST, 0)
        try:
            assert await client.bootstrap([(LOCALHOST, nodes[0].port)]) > 0
            key = client.identity.node_id.digest  # the client would be the closest holder
            await nodes[3].announce([key])
            assert [r.node_id for r in await client.find_providers(key)] == [
                nodes[3].identity.node_id
            ]
            live = await client.closest_live_nodes(key, 3)
            assert client.contact not in live and len(live) == 3
            with pytest.raises(LocalProtocolError):
                client.sign_record(key)
            await settle([*nodes, client])
            assert all(client.identity.node_id not in ids_known(n) for n in nodes)
            assert len(client.providers) == 0
        finally:
            await client.stop()


def ids_known(node: DhtNode) -> set[NodeId]:
    return {c.node_id for c in node.known_contacts()}


async def test_records_of_a_provider_that_is_gone_are_forgotten() -> None:
    config = CONFIG.replace(dht_rpc_timeout=0.2)
    async with dht_network(4, config) as nodes:
        provider, holder = nodes[0], nodes[1]
        key = os.urandom(20)
        assert (await provider.announce([key]))[key] >= 1
        assert provider.identity.node_id in {r.node_id for r in holder.local_providers(key)}
        contact = provider.contact
        await provider.stop()
        # The holder meets the silence a few times in a row (as lookups would)...
        for _ in range(config.contact_failures_before_eviction):
            reply = await holder.protocol.call_contact(
                contact, "ping", [holder.protocol.header, os.urandom(20)]
            )
            assert reply is None
        # ...evicts the contact, and with it the records that pointed at it.
        assert provider.identity.node_id not in {c.node_id for c in holder.known_contacts()}
        assert holder.local_providers(key) == []


async def test_reannouncement_reads_provided_keys_off_the_event_loop() -> None:
    # provided_keys walks the chunk store's SQLite index: on the event loop, a
    # large store would stall every reply this node owes its peers.
    keys = [os.urandom(20) for _ in range(3)]
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def provided_keys() -> Iterator[bytes]:
        for key in keys:
            threads.append(threading.get_ident())
            yield key

    node = await start_node(CONFIG, provided_keys=provided_keys)
    try:
        assert await node.reannounce() == len(keys)
        assert len(threads) == len(keys)
        assert loop_thread not in threads
        # Alone in its network, the node is the closest to every key: it holds them.
        assert all(node.local_providers(key) for key in keys)
    finally:
        await node.stop()


async def test_cancelled_reannouncement_waits_for_the_key_read_in_progress() -> None:
    # The owner closes the store the keys come from right after stop(): a read
    # still running in a worker thread must end before the cancellation does.
    entered, release = threading.Event(), threading.Event()
    read_done: list[bool] = []

    def provided_keys() -> Iterator[bytes]:
        entered.set()
        release.wait(WAIT)
        yield os.urandom(20)
        read_done.append(True)

    node = await start_node(CONFIG, provided_keys=provided_keys)
    try:
        task = asyncio.create_task(node.reannounce())
        assert await asyncio.to_thread(entered.wait, WAIT)
        task.cancel()
        finished, _running = await asyncio.wait([task], timeout=0.2)
        assert finished == set()  # still waiting for the thread
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
        assert read_done == [True]
    finally:
        release.set()
        await node.stop()


async def test_cancelled_lookup_raises_and_leaves_no_query_running() -> None:
    node = await start_node(CONFIG)
    try:
        async with RawPeer.open() as silent:
            contact = Contact(silent.identity.node_id, LOCALHOST, silent.port, silent.port)
            node.protocol.welcome_if_new(DhtPeer(contact))
            before = set(asyncio.all_tasks())
            lookup = asyncio.create_task(node.lookup(os.urandom(20)))
            await silent.wait_datagram()  # the query is in flight
            lookup.cancel()
            with pytest.raises(asyncio.CancelledError):
                await lookup
            leftover = set(asyncio.all_tasks()) - before - {lookup}
            assert leftover == set()
    finally:
        await node.stop()


async def test_a_node_that_leaves_is_evicted_at_once_and_a_crash_is_not() -> None:
    async with dht_network(5, CONFIG) as nodes:
        leaving, crashing, *staying = nodes
        evicted: dict[NodeId, asyncio.Event] = {}
        for node in staying:
            event = evicted[node.identity.node_id] = asyncio.Event()
            seen = node.contact_evicted

            def note(node_id: NodeId, seen: Any = seen, event: asyncio.Event = event) -> None:
                seen(node_id)
                if node_id == leaving.identity.node_id:
                    event.set()

            node.contact_evicted = note  # type: ignore[method-assign]
        gone = leaving.identity.node_id
        await leaving.stop(goodbye=True)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in evicted.values())), WAIT)
        for node in staying:
            assert node.protocol.router.get(gone) is None
            assert node.protocol.presumed_dead(gone), "lookups will not ask it"
        # A crash says nothing: the others keep the contact until it fails them.
        await crashing.stop()
        assert all(n.protocol.router.get(crashing.identity.node_id) for n in staying)
        # Lookups no longer wait on the node that left.
        result = await staying[0].lookup(os.urandom(20))
        assert gone not in {c.node_id for c in result.closest}


async def test_a_goodbye_counts_only_signed_recent_and_from_the_node_itself() -> None:
    from dht_dfs.core.errors import RemoteProtocolError
    from dht_dfs.dht.values import LEAVE_WINDOW, leave_message

    async with dht_network(3, CONFIG) as nodes:
        target, witness, _ = nodes
        protocol = witness.protocol
        peer = protocol.router.get(target.identity.node_id)
        assert peer is not None and peer.public_key is not None
        address = (peer.contact.host, peer.contact.udp_port)
        header = target.protocol.header
        now = int(protocol.clock())

        def goodbye(when: int, signer: Identity = target.identity) -> list[Any]:
            signed = signer.sign(leave_message(target.identity.node_id, address, when))
            return [header, when, signed]

        # From another address (anyone can send a datagram naming the node).
        assert protocol._serve_leave((LOCALHOST, 9), goodbye(now)) == [False]
        # Too old: a goodbye kept and replayed later.
        stale = now - int(LEAVE_WINDOW) - 5
        assert protocol._serve_leave(address, goodbye(stale)) == [False]
        # Signed by another key.
        with pytest.raises(RemoteProtocolError, match="does not verify"):
            protocol._serve_leave(address, goodbye(now, Identity.generate()))
        assert protocol.router.get(target.identity.node_id) is not None
        assert protocol._serve_leave(address, goodbye(now)) == [True]
        assert protocol.router.get(target.identity.node_id) is None
