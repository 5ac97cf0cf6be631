"""Regression tests for the kademlia 2.2.3 / rpcudp 5.0.1 bugs that dht.py works
around, over real UDP on 127.0.0.1.

Each test runs one scenario through two adapters: the plain library (marked
xfail(strict): the test documents the bug and fails loudly once a release fixes
it) and our DhtNode. The socket-free ones (neighbour selection, bucket
boundaries, eviction, the call whitelist) are in tests/unit/test_dht_protocol.py.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import pickle
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from kademlia.network import Server
from kademlia.node import Node
from kademlia.storage import ForgetfulStorage
from kademlia.utils import digest

from dht_dfs.core.config import Config
from dht_dfs.core.crypto import Identity
from dht_dfs.core.errors import RemoteProtocolError
from dht_dfs.core.ids import NodeId
from dht_dfs.dht.codec import DATAGRAM_BUDGET, decode_datagram
from dht_dfs.dht.compat import DhtPeer
from dht_dfs.dht.contacts import STATE_FORMAT
from dht_dfs.dht.node import DhtNode
from dht_dfs.dht.values import Contact, ProviderRecord
from tests.integration.dht_harness import LOCALHOST, RawPeer, loop_exception_reports, settle

FAST = Config(dht_rpc_timeout=0.3, dht_lookup_timeout=5.0, ksize=20)
LIBRARY_TIMEOUT = 0.3


def upstream(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=f"kademlia 2.2.3 / rpcudp 5.0.1: {reason}")


# --- adapters -------------------------------------------------------------------------


class LibraryNet:
    """Plain kademlia Servers on 127.0.0.1."""

    name = "kademlia"

    def __init__(self) -> None:
        self.servers: list[Server] = []

    async def start(self, *, node_id: bytes | None = None, storage: Any = None) -> Server:
        server = Server(ksize=20, alpha=3, node_id=node_id, storage=storage)
        await server.listen(0, LOCALHOST)
        server.protocol._wait_timeout = LIBRARY_TIMEOUT
        self.servers.append(server)
        return server

    @staticmethod
    def address(server: Server) -> tuple[str, int]:
        return (LOCALHOST, server.transport.get_extra_info("sockname")[1])

    async def join(self, server: Server, via: Server) -> None:
        await server.bootstrap([self.address(via)])

    async def close(self) -> None:
        for server in self.servers:
            server.stop()
        # Yield once so the transports' close callbacks run before the loop ends.
        await asyncio.sleep(0)


class OurNet:
    """DhtNodes on 127.0.0.1."""

    name = "dhtfs"

    def __init__(self) -> None:
        self.nodes: list[DhtNode] = []

    async def start(self, **kwargs: Any) -> DhtNode:
        node = DhtNode(Identity.generate(), kwargs.pop("config", FAST), **kwargs)
        await node.start(LOCALHOST, 0)
        self.nodes.append(node)
        return node

    @staticmethod
    def address(node: DhtNode) -> tuple[str, int]:
        return (LOCALHOST, node.port)

    async def join(self, node: DhtNode, via: DhtNode) -> None:
        await node.bootstrap([self.address(via)])
        await settle(self.nodes)

    async def close(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes))


@asynccontextmanager
async def library_net() -> AsyncIterator[LibraryNet]:
    net = LibraryNet()
    try:
        yield net
    finally:
        await net.close()


@asynccontextmanager
async def our_net() -> AsyncIterator[OurNet]:
    net = OurNet()
    try:
        yield net
    finally:
        await net.close()


def library_or_ours(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        "kind",
        [pytest.param("kademlia", marks=upstream(reason)), pytest.param("dhtfs")],
    )


# --- keys are not hashed again ------------------------------------------------------------


@library_or_ours("set_digest(k) stores under k but get(k) looks up sha1(k)")
async def test_value_stored_under_a_key_is_found_under_that_key(kind: str) -> None:
    key = os.urandom(20)
    if kind == "kademlia":
        async with library_net() as net:
            a, b, c = [await net.start() for _ in range(3)]
            await net.join(b, a)
            await net.join(c, a)
            assert await a.set_digest(key, b"value")
            assert await c.get(key) == b"value"
    else:
        async with our_net() as net:
            a, b, c = [await net.start() for _ in range(3)]
            await net.join(b, a)
            await net.join(c, a)
            assert (await a.announce([key]))[key] >= 1
            assert [r.node_id for r in await c.find_providers(key)] == [a.identity.node_id]


# --- "stored" means somebody confirmed ----------------------------------------------------


@library_or_ours("set returns True when every store request went unanswered")
async def test_store_reports_failure_when_no_node_stored(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = os.urandom(20)
    if kind == "kademlia":
        async with library_net() as net:
            a, b = await net.start(), await net.start()
            await net.join(b, a)
            # b does not serve store (as a full or hostile node might not): no reply.
            monkeypatch.setattr(b.protocol, "rpc_store", None, raising=False)
            assert not await a.set_digest(key, b"value")
    else:
        async with our_net() as ours:
            a, b = await ours.start(), await ours.start()
            await ours.join(b, a)

            def refuse(address: Any, args: list[Any]) -> list[bool]:
                raise RemoteProtocolError("not storing")

            monkeypatch.setitem(b.protocol._handlers, "add_providers", refuse)
            assert await a.announce([key]) == {key: 0}
            monkeypatch.undo()
            assert await a.announce([key]) == {key: 1}


# --- size limits on receipt and on replies ----------------------------------------------------


@library_or_ours("receivers accept datagrams of any size (only senders check 8 KiB)")
async def test_receiver_drops_datagrams_over_the_limit(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    big_value = os.urandom(9000)
    async with AsyncExitStack() as stack:
        raw = await stack.enter_async_context(RawPeer.open())
        if kind == "kademlia":
            net = await stack.enter_async_context(library_net())
            server = await net.start()
            address = net.address(server)
            oversized = raw.send_request(
                address, "store", [os.urandom(20), os.urandom(20), big_value]
            )
            control = raw.send_request(address, "ping", [os.urandom(20)])
        else:
            onet = await stack.enter_async_context(our_net())
            node = await onet.start()
            address = onet.address(node)
            records = [
                ProviderRecord.create(
                    Identity.generate(), os.urandom(20), "10.0.0.1", 1, 60, 0
                ).to_wire()
                for _ in range(64)  # the most one request may carry, ~10 KiB
            ]
            oversized = raw.send_request(address, "add_providers", [raw.header(), records])
            control = raw.send_request(address, "ping", [raw.header(), os.urandom(20)])
        # Datagrams are handled in order, so once the control reply is here, a reply
        # to the oversized request would already have arrived.
        await raw.wait_reply(control)
        assert raw.reply_to(oversized) is None
    if kind == "dhtfs":
        assert "exceeds the 8192-byte limit" in caplog.text


@library_or_ours("replies have no size cap (a large reply is lost on a real network)")
async def test_replies_fit_the_datagram_budget(kind: str) -> None:
    key = os.urandom(20)
    async with AsyncExitStack() as stack:
        raw = await stack.enter_async_context(RawPeer.open())
        if kind == "kademlia":
            net = await stack.enter_async_context(library_net())
            server = await net.start()
            server.storage[key] = os.urandom(9000)  # what an oversized store leaves behind
            message_id = raw.send_request(net.address(server), "find_value", [os.urandom(20), key])
        else:
            onet = await stack.enter_async_context(our_net())
            node = await onet.start(config=FAST.replace(max_providers_per_key=200))
            now = node.clock()
            for _ in range(200):
                record = ProviderRecord.create(Identity.generate(), key, "10.0.0.1", 1, 600, now)
                assert node.providers.add(record, now)
            # Without a token the reply is trimmed to 3x the request; it brings one.
            first = await raw.request(onet.address(node), "get_providers", [raw.header(), key, 500])
            message_id = raw.send_request(
                onet.address(node), "get_providers", [[*raw.header(), first[3]], key, 500]
            )
        reply = await raw.wait_reply(message_id)
        assert len(reply) <= DATAGRAM_BUDGET
        if kind == "dhtfs":
            records, total, _contacts, _token, _more = decode_datagram(reply).body
            assert total == 200 and len(records) > 10


# --- new nodes receive the records they should hold ------------------------------------------


class SignalStorage(ForgetfulStorage):  # type: ignore[misc]  # kademlia is untyped
    """The library's storage, with an event set on every store."""

    def __init__(self) -> None:
        super().__init__()
        self.stored = asyncio.Event()

    def __setitem__(self, key: bytes, value: Any) -> None:
        super().__setitem__(key, value)
        self.stored.set()


def _closer(a: bytes, b: bytes, key: bytes) -> bool:
    return bool(Node(a).distance_to(Node(key)) < Node(b).distance_to(Node(key)))


@library_or_ours("welcome_if_new hashes stored keys again, so it pushes the wrong values")
async def test_new_node_receives_records_it_is_among_the_closest_to(kind: str) -> None:
    if kind == "kademlia":
        ids = [os.urandom(20) for _ in range(3)]
        a_id, b_id, c_id = ids
        # A key for which the newcomer b must get the value from a (b is closer than
        # c, a closer than c), while the rule applied to sha1(key) says it must not.
        for _ in range(10_000):
            key = os.urandom(20)
            hashed = digest(key)
            right = _closer(b_id, c_id, key) and _closer(a_id, c_id, key)
            wrong = _closer(b_id, c_id, hashed) and _closer(a_id, c_id, hashed)
            if right and not wrong:
                break
        async with library_net() as net:
            a = await net.start(node_id=a_id)
            c = await net.start(node_id=c_id)
            await net.join(c, a)
            a.storage[key] = b"value"
            storage = SignalStorage()
            b = await net.start(node_id=b_id, storage=storage)
            await net.join(b, a)
            with suppress(TimeoutError):
                await asyncio.wait_for(storage.stored.wait(), 1.0)
            assert storage.get(key) == b"value"
    else:
        key = os.urandom(20)
        async with our_net() as net:
            a, c = await net.start(), await net.start()
            await net.join(c, a)
            record = ProviderRecord.create(Identity.generate(), key, "10.0.0.1", 1, 600, a.clock())
            assert a.providers.add(record, a.clock())
            b = await net.start()
            await net.join(b, a)  # settles: a's push to b is done
            assert b.local_providers(key) == [record]


# --- lookups do not wait for a silent peer ------------------------------------------------------


@library_or_ours("each lookup round waits for all alpha replies, so a silent peer stalls it")
async def test_found_value_is_returned_without_waiting_for_a_silent_peer(kind: str) -> None:
    key = os.urandom(20)
    async with AsyncExitStack() as stack:
        silent = await stack.enter_async_context(RawPeer.open())  # never answers
        if kind == "kademlia":
            net = await stack.enter_async_context(library_net())
            holder, asker = await net.start(), await net.start()
            holder.storage[digest(key)] = b"value"
            asker.protocol._wait_timeout = 3.0
            asker.protocol.router.add_contact(Node(os.urandom(20), LOCALHOST, silent.port))
            asker.protocol.router.add_contact(
                Node(holder.node.id, LOCALHOST, net.address(holder)[1])
            )
            assert await asyncio.wait_for(asker.get(key), 1.0) == b"value"
        else:
            onet = await stack.enter_async_context(our_net())
            holder = await onet.start()
            asker = await onet.start(config=FAST.replace(dht_rpc_timeout=3.0))
            record = ProviderRecord.create(
                Identity.generate(), key, "10.0.0.1", 1, 600, holder.clock()
            )
            holder.providers.add(record, holder.clock())
            ghost = Contact(NodeId(os.urandom(20)), LOCALHOST, silent.port, silent.port)
            asker.protocol.welcome_if_new(DhtPeer(ghost))
            asker.protocol.welcome_if_new(DhtPeer(holder.contact))
            found = await asyncio.wait_for(asker.find_providers(key, want=1), 1.0)
            assert found == [record]


# --- hostile datagrams leave no failed task behind ----------------------------------------------


def _garbage(header: list[object]) -> list[bytes]:
    message_id = os.urandom(20)
    return [
        b"\x00" * 5,
        b"\x00" + message_id + b"\xc1",
        b"\x00" + message_id + b"\x91" * 3000,
        b"\x00" + message_id + pickle.dumps(["ping", []])[:40],
        b"\x00" + message_id + b"\x92\xa4ping\x90",  # ["ping", []]: wrong arity
        b"\x00" + message_id + b"\x92\xa4ping\x94\x01\x02\x03\x04",
        b"\x00" + message_id + b"\x81\xa1a\x01",  # a map, not [name, args]
        b"\x01" + message_id + b"\xc0",  # a reply nobody asked for
    ]


@library_or_ours("bad datagrams raise inside fire-and-forget tasks (never retrieved)")
async def test_malformed_datagrams_leave_no_unhandled_exception(kind: str) -> None:
    async with AsyncExitStack() as stack:
        raw = await stack.enter_async_context(RawPeer.open())
        reports = stack.enter_context(loop_exception_reports())
        if kind == "kademlia":
            net = await stack.enter_async_context(library_net())
            address = net.address(await net.start())
            ping_args: list[object] = [os.urandom(20)]
        else:
            onet = await stack.enter_async_context(our_net())
            address = onet.address(await onet.start())
            ping_args = [raw.header(), os.urandom(20)]
        for data in _garbage(raw.header()):
            raw.send(data, address)
        await raw.request(address, "ping", ping_args)  # still answers, after the garbage
        gc.collect()  # a finished task's unretrieved exception is reported when collected
        assert reports == []


# --- ids must be proven --------------------------------------------------------------------------


@library_or_ours("node ids are trusted as sent")
async def test_claimed_id_without_its_key_never_enters_the_routing_table(kind: str) -> None:
    claimed = os.urandom(20)
    async with AsyncExitStack() as stack:
        raw = await stack.enter_async_context(RawPeer.open())
        if kind == "kademlia":
            net = await stack.enter_async_context(library_net())
            server = await net.start()
            await raw.request(net.address(server), "ping", [claimed])
            assert server.protocol.router.is_new_node(Node(claimed))
        else:
            onet = await stack.enter_async_context(our_net())
            node = await onet.start()
            header = raw.header(client=False, node_id=NodeId(claimed))
            await raw.request(onet.address(node), "find_node", [header, os.urandom(20)])
            await node.settled()  # its challenge ping to the raw peer has timed out
            assert node.known_contacts() == []
            assert node.counters.verification_failures == 1
            honest = await onet.start()
            await onet.join(honest, node)
            assert [c.node_id for c in node.known_contacts()] == [honest.identity.node_id]


# --- no pickle -----------------------------------------------------------------------------------

EXECUTED: list[str] = []


def _mark_executed() -> None:
    EXECUTED.append("pickle payload ran")


class _Payload:
    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return (_mark_executed, ())


@library_or_ours("load_state unpickles the state file (a file that runs code)")
async def test_loading_state_never_runs_code_from_the_file(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_bytes(pickle.dumps(_Payload()))
    EXECUTED.clear()
    if kind == "kademlia":
        with suppress(Exception):
            server = await Server.load_state(str(path), 0, LOCALHOST)
            server.stop()
    else:
        async with our_net() as net:
            node = await net.start(state_path=path)
            assert node.known_contacts() == []
    assert EXECUTED == []


async def test_saved_state_is_json(tmp_path: Path) -> None:
    path = tmp_path / "dht-contacts.json"
    async with our_net() as net:
        a = await net.start(state_path=path)
        b = await net.start()
        await net.join(b, a)
    document = json.loads(path.read_text())
    assert document["format"] == STATE_FORMAT
    assert [c["node_id"] for c in document["contacts"]] == [b.identity.node_id.hex()]


# --- every task has an owner ---------------------------------------------------------------------


def _other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


@library_or_ours("listen() starts the table refresh as an unowned task that stop() leaves running")
async def test_stop_leaves_no_task_running(kind: str) -> None:
    before = _other_tasks()
    if kind == "kademlia":
        server = Server()
        await server.listen(0, LOCALHOST)
        server.stop()
    else:
        node = DhtNode(Identity.generate(), FAST, provided_keys=list)
        await node.start(LOCALHOST, 0)
        await node.stop()
    leaked = _other_tasks() - before
    try:
        assert leaked == set()
    finally:
        await asyncio.gather(*leaked, return_exceptions=True)
