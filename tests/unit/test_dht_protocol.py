"""The DHT protocol's receive path, argument validation, call whitelist, routing
table and eviction policy, driven without sockets through a fake transport.

Tests parametrized with a ``kademlia-2.2.3`` case run the same check against the
unfixed library, marked xfail(strict): they document the library's bug and fail
loudly if a new release fixes it (then the override can go).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable
from kademlia.storage import ForgetfulStorage

from dht_dfs.core.config import Config
from dht_dfs.core.crypto import Identity
from dht_dfs.core.errors import LocalProtocolError, RemoteProtocolError
from dht_dfs.core.ids import NodeId
from dht_dfs.dht.codec import (
    DATAGRAM_BUDGET,
    KIND_REPLY,
    decode_datagram,
    encode_reply,
    encode_request,
)
from dht_dfs.dht.compat import DhtPeer, DhtRoutingTable
from dht_dfs.dht.protocol import DhtProtocol
from dht_dfs.dht.records import ProviderStore
from dht_dfs.dht.values import Address, Contact, ProviderRecord, check_ping_reply

NOW = 1_700_000_000.0
PEER: Address = ("10.0.0.9", 5000)
SENDER = Identity.generate()
HEADER = [SENDER.node_id.digest, 5001, 0]
CLIENT_HEADER = [SENDER.node_id.digest, 0, 1]
KEY = bytes(range(20))


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Address]] = []

    def sendto(self, data: bytes, address: Address) -> None:
        self.sent.append((data, address))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4000) if name == "sockname" else default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


class RecordingHooks:
    def __init__(self) -> None:
        self.senders: list[tuple[NodeId, int, Address]] = []
        self.answered: list[Contact] = []
        self.full_heads: list[DhtPeer] = []
        self.welcomed: list[Contact] = []
        self.evicted: list[NodeId] = []

    def sender_seen(self, node_id: NodeId, tcp_port: int, address: Address) -> None:
        self.senders.append((node_id, tcp_port, address))

    def contact_answered(self, contact: Contact) -> None:
        self.answered.append(contact)

    def bucket_full(self, head: DhtPeer) -> None:
        self.full_heads.append(head)

    def contact_welcomed(self, contact: Contact) -> None:
        self.welcomed.append(contact)

    def contact_evicted(self, node_id: NodeId) -> None:
        self.evicted.append(node_id)


def make_protocol(**config: Any) -> tuple[DhtProtocol, FakeTransport, RecordingHooks]:
    settings_ = Config(ksize=8, **config)
    hooks = RecordingHooks()
    protocol = DhtProtocol(
        identity=Identity.generate(),
        config=settings_,
        providers=ProviderStore(
            settings_.max_providers_per_key,
            settings_.max_provider_records,
            max_per_provider=settings_.max_provider_records_per_provider,
            max_per_host=settings_.max_provider_records_per_host,
        ),
        hooks=hooks,
        tcp_port=4000,
        clock=lambda: NOW,
    )
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport, hooks


def peer(seed: int | None = None) -> DhtPeer:
    identity = Identity(bytes([seed] * 32)) if seed is not None else Identity.generate()
    return DhtPeer(
        Contact(identity.node_id, "10.1.0.1", 4000 + (seed or 0), 4000), identity.public_key
    )


def send(protocol: DhtProtocol, name: str, args: list[object]) -> bytes:
    message_id = os.urandom(20)
    protocol.datagram_received(encode_request(message_id, name, args), PEER)
    return message_id


def only_reply(transport: FakeTransport, message_id: bytes) -> Any:
    assert len(transport.sent) == 1
    data, address = transport.sent[0]
    assert address == PEER
    assert len(data) <= DATAGRAM_BUDGET
    decoded = decode_datagram(data)
    assert (decoded.kind, decoded.message_id) == (KIND_REPLY, message_id)
    return decoded.body


def signed_record(key: bytes = KEY, ttl: float = 3600.0, now: float = NOW) -> ProviderRecord:
    return ProviderRecord.create(Identity.generate(), key, "10.2.0.1", 4000, ttl, now)


# --- valid requests get valid replies --------------------------------------------------


def test_ping_reply_proves_identity_and_reports_observed_address() -> None:
    protocol, transport, hooks = make_protocol()
    nonce = os.urandom(20)
    own = ("127.0.0.1", 4000)  # FakeTransport's sockname
    reply = only_reply(transport, send(protocol, "ping", [HEADER, nonce, list(own)]))
    proof = check_ping_reply(reply, nonce, own)
    assert proof.contact.node_id == protocol.identity.node_id
    assert proof.contact.tcp_port == 4000
    assert proof.observed == PEER
    assert not proof.client
    assert hooks.senders == [(SENDER.node_id, 5001, PEER)]
    # A different nonce does not verify: the proof is fresh.
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        check_ping_reply(reply, os.urandom(20), own)


def test_ping_proof_covers_the_address_the_challenge_was_sent_to(
    caplog: pytest.LogCaptureFixture,
) -> None:
    protocol, transport, _hooks = make_protocol()
    nonce = os.urandom(20)
    reply = only_reply(transport, send(protocol, "ping", [HEADER, nonce, ["127.0.0.1", 4000]]))
    # Relayed: the proof does not verify for the address the challenger used.
    with pytest.raises(RemoteProtocolError, match="not for this address"):
        check_ping_reply(reply, nonce, ("10.3.0.1", 4000))
    with pytest.raises(RemoteProtocolError, match="not for this address"):
        check_ping_reply(reply, nonce, ("127.0.0.1", 4001))
    # A challenge naming another node's address is not signed at all.
    transport.sent.clear()
    send(protocol, "ping", [HEADER, nonce, ["10.3.0.1", 4000]])
    send(protocol, "ping", [HEADER, nonce, ["127.0.0.1", 4001]])
    assert transport.sent == []
    assert "not this node's address" in caplog.text
    # A liveness ping that names no address gets an answer that proves no address.
    reply = only_reply(transport, send(protocol, "ping", [HEADER, nonce]))
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        check_ping_reply(reply, nonce, ("127.0.0.1", 4000))


def test_client_mode_sender_is_never_reported() -> None:
    protocol, transport, hooks = make_protocol()
    send(protocol, "find_node", [CLIENT_HEADER, KEY])
    assert len(transport.sent) == 1
    assert hooks.senders == []


def test_find_node_returns_closest_contacts_without_the_requester() -> None:
    protocol, transport, _hooks = make_protocol()
    peers = [peer() for _ in range(30)]
    for each in peers:
        protocol.welcome_if_new(each)
    requester = peers[0].contact.node_id
    header = [requester.digest, 5001, 0, protocol.issue_token(PEER)]
    items, token, more = only_reply(transport, send(protocol, "find_node", [header, KEY]))
    assert (token, more) == (protocol.issue_token(PEER), False)
    returned = [Contact.from_wire(item) for item in items]
    present = [p.contact for p in protocol.router.peers() if p.contact.node_id != requester]
    expected = sorted(present, key=lambda c: c.distance(KEY))[:8]
    assert returned == expected


def test_add_then_get_providers() -> None:
    protocol, transport, _hooks = make_protocol()
    good, forged = signed_record(), signed_record()
    forged = ProviderRecord(
        **{**{f: getattr(forged, f) for f in forged.__slots__}, "host": "6.6.6.6"}
    )
    reply = only_reply(
        transport, send(protocol, "add_providers", [HEADER, [good.to_wire(), forged.to_wire()]])
    )
    assert reply == [True, False]
    transport.sent.clear()
    records, total, contacts, _token, more = only_reply(
        transport, send(protocol, "get_providers", [HEADER, KEY, 10])
    )
    assert not more
    assert [ProviderRecord.from_wire(r) for r in records] == [good]
    assert total == 1
    assert contacts == []


def test_get_providers_reply_is_trimmed_to_the_budget() -> None:
    protocol, transport, _hooks = make_protocol(max_providers_per_key=300)
    for _ in range(200):
        assert protocol.providers.add(signed_record(), NOW)
    for _ in range(20):
        protocol.welcome_if_new(peer())
    header = [*HEADER, protocol.issue_token(PEER)]
    records, total, contacts, _token, _more = only_reply(
        transport, send(protocol, "get_providers", [header, KEY, 1000])
    )
    assert total == 200
    assert 10 < len(records) < 200
    assert len(contacts) == 8


# --- every argument of every procedure is validated --------------------------------------

BAD_HEADERS: list[object] = [
    "header",
    [SENDER.node_id.digest, 5001],
    [SENDER.node_id.digest[:19], 5001, 0],
    [SENDER.node_id.hex(), 5001, 0],
    [SENDER.node_id.digest, True, 0],
    [SENDER.node_id.digest, -1, 0],
    [SENDER.node_id.digest, 65536, 0],
    [SENDER.node_id.digest, 0, 0],  # a serving node has a TCP port
    [SENDER.node_id.digest, 5001, 256],
    [SENDER.node_id.digest, 5001, "0"],
]

GOOD_REQUESTS: dict[str, list[object]] = {
    "ping": [HEADER, os.urandom(20)],
    "find_node": [HEADER, KEY],
    "get_providers": [HEADER, KEY, 8],
    "add_providers": [HEADER, [signed_record().to_wire()]],
}

BAD_ARGUMENTS: list[tuple[str, list[object], str]] = [
    *[(name, [], "arguments must have") for name in GOOD_REQUESTS],
    *[
        (name, [*args, None], "arguments must have")
        for name, args in GOOD_REQUESTS.items()
        if name != "ping"
    ],
    ("ping", [HEADER, os.urandom(20), None], "ping target must be a list"),
    ("ping", [HEADER, os.urandom(20), ["127.0.0.1", 4000], None], "more than 3"),
    *[
        (name, [header, *args[1:]], "sender")
        for name, args in GOOD_REQUESTS.items()
        for header in BAD_HEADERS
    ],
    ("ping", [HEADER, os.urandom(15)], "nonce must be 16 to 64 bytes"),
    ("ping", [HEADER, os.urandom(65)], "nonce must be 16 to 64 bytes"),
    ("ping", [HEADER, "n" * 20], "nonce"),
    ("find_node", [HEADER, KEY[:19]], "key must be 20 bytes"),
    ("find_node", [HEADER, KEY + b"x"], "key must be 20 bytes"),
    ("find_node", [HEADER, KEY.hex()], "key must be bytes"),
    ("find_node", [HEADER, 7], "key must be bytes"),
    ("get_providers", [HEADER, KEY[:10], 8], "key must be 20 bytes"),
    ("get_providers", [HEADER, KEY, True], "limit must be an integer"),
    ("get_providers", [HEADER, KEY, -1], "limit must be in"),
    ("get_providers", [HEADER, KEY, 2**16 + 1], "limit must be in"),
    ("get_providers", [HEADER, KEY, 8.0], "limit must be an integer"),
    ("add_providers", [HEADER, {"r": 1}], "records must be a list"),
    ("add_providers", [HEADER, [None] * 65], "records has 65 items, more than 64"),
    ("add_providers", [HEADER, [signed_record().to_wire()[:6]]], "record must have 7 items"),
    ("add_providers", [HEADER, [[*signed_record().to_wire()[:3], "a b", 1, 2, bytes(64)]]], "host"),
]


@pytest.mark.parametrize(("name", "args", "reason"), BAD_ARGUMENTS)
def test_bad_arguments_are_dropped_with_one_log_line(
    name: str, args: list[object], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    protocol, transport, hooks = make_protocol()
    with caplog.at_level(logging.WARNING, logger="dht_dfs.dht.protocol"):
        send(protocol, name, args)
    assert transport.sent == []
    assert hooks.senders == []
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert lines[0].startswith(f"dropped datagram from 10.0.0.9:5000: bad {name} request: ")
    assert reason in lines[0]
    assert protocol.counters.dropped == 1


@pytest.mark.parametrize("name", ["store", "find_value", "stun", "__init__", "", "PING"])
def test_unknown_and_library_procedures_are_not_served(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    protocol, transport, _hooks = make_protocol()
    send(protocol, name, [HEADER, KEY, b"value"])
    assert transport.sent == []
    assert f"unknown procedure {name!r}" in caplog.text


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (["ping"], "request is not [name, args]"),
        ({"ping": []}, "request is not [name, args]"),
        ([b"ping", []], "procedure name is not a string"),
        (["ping", {"a": 1}], "ping arguments are not a list"),
    ],
)
def test_malformed_request_envelopes_are_dropped(
    body: object, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    protocol, transport, _hooks = make_protocol()
    protocol.datagram_received(
        encode_reply(os.urandom(20), body).replace(b"\x01", b"\x00", 1), PEER
    )
    assert transport.sent == []
    assert reason in caplog.text


def test_forged_and_stale_records_are_refused_one_by_one(caplog: pytest.LogCaptureFixture) -> None:
    protocol, transport, _hooks = make_protocol(provider_ttl=3600.0)
    good = signed_record()
    expired = signed_record(ttl=10, now=NOW - 20)
    too_far = signed_record(ttl=3600.0 + 400)
    thief = Identity.generate()
    wrong_id = ProviderRecord.create(thief, KEY, "10.2.0.1", 4000, 3600, NOW)
    wrong_id_wire = wrong_id.to_wire()
    wrong_id_wire[1] = good.node_id.digest
    tampered = good.to_wire()
    tampered[4] = 4001
    batch = [good.to_wire(), expired.to_wire(), too_far.to_wire(), wrong_id_wire, tampered]
    assert only_reply(transport, send(protocol, "add_providers", [HEADER, batch])) == [
        True,
        False,
        False,
        False,
        False,
    ]
    assert protocol.providers.get(KEY, NOW) == [good]
    for reason in ("expired", "beyond", "not the hash", "bad signature"):
        assert reason in caplog.text


def test_reply_from_the_wrong_address_or_unknown_id_is_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        protocol, transport, _hooks = make_protocol(dht_rpc_timeout=5.0)
        call = asyncio.ensure_future(protocol.call(PEER, "ping", [HEADER, os.urandom(20)]))
        await asyncio.sleep(0)  # let the call send its datagram
        ((request, _address),) = transport.sent
        message_id = request[1:21]
        protocol.datagram_received(encode_reply(message_id, "spoofed"), ("10.6.6.6", 5000))
        protocol.datagram_received(encode_reply(os.urandom(20), "stray"), PEER)
        assert not call.done()
        protocol.datagram_received(encode_reply(message_id, "genuine"), PEER)
        assert await call == "genuine"

    asyncio.run(scenario())
    assert "reply from an address the request was not sent to" in caplog.text


def test_oversized_request_is_refused_on_send() -> None:
    async def scenario() -> None:
        protocol, transport, _hooks = make_protocol()
        records = [signed_record().to_wire() for _ in range(60)]
        with pytest.raises(LocalProtocolError, match="exceeds the 6144-byte datagram budget"):
            await protocol.call(PEER, "add_providers", [HEADER, records])
        assert transport.sent == []

    asyncio.run(scenario())


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # what MessagePack can carry
    | st.binary(max_size=70)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=8),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([*sorted(GOOD_REQUESTS), "store", "x"]),
    st.lists(_values, max_size=4),
    st.binary(max_size=64),
)
def test_fuzzed_requests_never_raise_and_replies_fit(
    name: str, args: list[object], junk: bytes
) -> None:
    protocol, transport, _hooks = make_protocol()
    protocol.datagram_received(encode_request(os.urandom(20), name, args), PEER)
    protocol.datagram_received(bytes([0]) + os.urandom(20) + junk, PEER)
    for data, _address in transport.sent:
        assert len(data) <= DATAGRAM_BUDGET


# --- regression tests against the unfixed library ----------------------------------------


def library_protocol() -> Any:
    return KademliaProtocol(Node(bytes(20)), ForgetfulStorage(), 20)


def our_protocol() -> Any:
    return make_protocol()[0]


def upstream(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=f"kademlia 2.2.3 / rpcudp 5.0.1: {reason}")


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param(
            library_protocol,
            id="kademlia-2.2.3",
            marks=upstream("any unknown attribute becomes a remote call"),
        ),
        pytest.param(our_protocol, id="dhtfs"),
    ],
)
def test_misspelt_procedure_is_an_attribute_error(factory: Callable[[], Any]) -> None:
    protocol = factory()
    assert callable(protocol.find_node)
    with pytest.raises(AttributeError):
        protocol.fnid_node  # noqa: B018  # the attribute access itself is the test
    with pytest.raises(AttributeError):
        protocol.store  # noqa: B018


class _PingStub:
    """Stands in for the library table's protocol: its full-bucket ping does nothing."""

    def call_ping(self, node: Any) -> asyncio.Future[None]:
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def library_table(ksize: int, own: Node) -> Any:
    return RoutingTable(_PingStub(), ksize, own)


def our_table(ksize: int, own: Node) -> Any:
    return DhtRoutingTable(None, ksize, own)


TABLES = [
    pytest.param(
        library_table,
        id="kademlia-2.2.3",
        marks=upstream("TableTraverser walks buckets in list order and stops after k"),
    ),
    pytest.param(our_table, id="dhtfs"),
]


@pytest.mark.parametrize("factory", TABLES)
async def test_find_neighbors_returns_the_true_k_closest(
    factory: Callable[[int, Node], Any],
) -> None:
    rng = random.Random(20240601)
    wrong = 0
    for _trial in range(50):
        own = Node(rng.getrandbits(160).to_bytes(20, "big"))
        table = factory(4, own)
        for _ in range(60):
            table.add_contact(Node(rng.getrandbits(160).to_bytes(20, "big"), "10.0.0.1", 1))
        held = [n for bucket in table.buckets for n in bucket.nodes.values()]
        target = Node(rng.getrandbits(160).to_bytes(20, "big"))
        expected = sorted(held, key=lambda n: n.distance_to(target))[:4]
        if [n.id for n in table.find_neighbors(target, 4)] != [n.id for n in expected]:
            wrong += 1
    assert wrong == 0


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param(
            library_table,
            id="kademlia-2.2.3",
            marks=upstream("get_bucket_for compares with < against an inclusive upper bound"),
        ),
        pytest.param(our_table, id="dhtfs"),
    ],
)
async def test_node_on_a_bucket_boundary_goes_to_the_bucket_holding_it(
    factory: Callable[[int, Node], Any],
) -> None:
    table = factory(2, Node(bytes(20)))
    table.split_bucket(0)
    boundary = table.buckets[0].range[1]
    node = Node(boundary.to_bytes(20, "big"))
    assert table.buckets[table.get_bucket_for(node)].has_in_range(node)
    table.add_contact(node)
    assert node.id in table.buckets[0].nodes


def test_full_bucket_asks_its_owner_to_check_the_head() -> None:
    own = Node(bytes(20))
    heads: list[Any] = []
    table = DhtRoutingTable(None, 2, own, heads.append)
    # Ids sharing exactly their first 5 bits (10001): once our own id's bucket
    # splits off, their bucket has depth 5, so section 4.2 forbids splitting it.
    far = [Node(((0b100010 + i) << 154).to_bytes(20, "big"), "10.0.0.1", i + 1) for i in range(2)]
    far.append(Node(((0b100011 << 154) + 1).to_bytes(20, "big"), "10.0.0.1", 3))
    assert [table.add_contact(node) for node in far] == [True, True, False]
    assert [h.id for h in heads] == [far[0].id]  # the owner checks the head; the table sent nothing
    assert far[2].id in table.buckets[-1].replacement_nodes


def _library_pair() -> tuple[Any, Any]:
    protocol = library_protocol()
    node = Node(os.urandom(20), "10.0.0.1", 4000)
    return protocol, node


def _our_pair() -> tuple[Any, Any]:
    protocol = make_protocol(contact_failures_before_eviction=3)[0]
    return protocol, peer()


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param(
            _library_pair, id="kademlia-2.2.3", marks=upstream("one timeout evicts a contact")
        ),
        pytest.param(_our_pair, id="dhtfs"),
    ],
)
def test_one_lost_reply_does_not_evict_a_contact(factory: Callable[[], tuple[Any, Any]]) -> None:
    protocol, node = factory()
    protocol.router.add_contact(node)
    protocol.handle_call_response((False, None), node)
    assert not protocol.router.is_new_node(node)


def test_contact_is_evicted_after_consecutive_failures_only() -> None:
    protocol, node = _our_pair()
    protocol.welcome_if_new(node)
    for _ in range(5):
        protocol.handle_call_response((False, None), node)
        protocol.handle_call_response((False, None), node)
        protocol.handle_call_response((True, "pong"), node)  # a success resets the count
    assert not protocol.router.is_new_node(node)
    for _ in range(3):
        protocol.handle_call_response((False, None), node)
    assert protocol.router.is_new_node(node)
    assert protocol.counters.evictions == 1
    # The owner hears of it, so it can forget the records that node signed.
    assert protocol.hooks.evicted == [node.contact.node_id]


# --- hostile peers: records only where this node is a rightful holder ---------------------


def test_records_for_keys_far_from_this_node_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    protocol, transport, _hooks = make_protocol()
    own = protocol.identity.node_id.as_int
    for _ in range(40):
        protocol.welcome_if_new(peer())
    far_key = (own ^ (2**160 - 1)).to_bytes(20, "big")  # every contact is closer
    near_key = protocol.identity.node_id.digest
    assert len(protocol.router.closest(far_key, 16)) == 16  # the premise: 2k known
    batch = [signed_record(far_key).to_wire(), signed_record(near_key).to_wire()]
    assert only_reply(transport, send(protocol, "add_providers", [HEADER, batch])) == [False, True]
    assert protocol.providers.keys() == [near_key]
    assert "key not near this node" in caplog.text


def test_a_node_that_knows_few_contacts_accepts_any_key() -> None:
    protocol, transport, _hooks = make_protocol()
    for _ in range(5):
        protocol.welcome_if_new(peer())
    far_key = (protocol.identity.node_id.as_int ^ (2**160 - 1)).to_bytes(20, "big")
    reply = only_reply(
        transport, send(protocol, "add_providers", [HEADER, [signed_record(far_key).to_wire()]])
    )
    assert reply == [True]


def test_a_flooding_identity_cannot_push_out_an_honest_record() -> None:
    protocol, transport, _hooks = make_protocol(
        max_provider_records=40, max_provider_records_per_provider=10
    )
    honest = signed_record()
    assert only_reply(transport, send(protocol, "add_providers", [HEADER, [honest.to_wire()]]))
    attacker = Identity.generate()
    for _ in range(5):
        transport.sent.clear()
        flood = [
            ProviderRecord.create(attacker, os.urandom(20), "6.6.6.6", 1, 3600, NOW).to_wire()
            for _ in range(20)
        ]
        send(protocol, "add_providers", [HEADER, flood])
    assert protocol.providers.held_by(attacker.node_id) == 10
    assert protocol.providers.get(KEY, NOW) == [honest]
    transport.sent.clear()
    newcomers = [signed_record(os.urandom(20)).to_wire() for _ in range(29)]
    reply = only_reply(transport, send(protocol, "add_providers", [HEADER, newcomers]))
    assert reply == [True] * 29


# --- hostile peers: no amplification toward unproven addresses ----------------------------


def test_reply_to_an_unproven_address_is_at_most_3x_the_request() -> None:
    # The issue's case: an 89-byte get_providers drew 5,360 bytes to a spoofed source.
    protocol, transport, _hooks = make_protocol(max_providers_per_key=300)
    for _ in range(60):
        assert protocol.providers.add(signed_record(), NOW)
    for _ in range(20):
        protocol.welcome_if_new(peer())
    for name, args in (("get_providers", [KEY, 1000]), ("find_node", [KEY])):
        transport.sent.clear()
        request = encode_request(os.urandom(20), name, [CLIENT_HEADER, *args])
        protocol.datagram_received(request, PEER)
        ((reply, _address),) = transport.sent
        assert len(reply) <= 3 * len(request), name
        body = decode_datagram(reply).body
        token, more = body[-2], body[-1]
        assert more is True
        # Echoing the token proves the address receives: the whole reply comes.
        transport.sent.clear()
        protocol.datagram_received(
            encode_request(os.urandom(20), name, [[*CLIENT_HEADER, token], *args]), PEER
        )
        ((full, _address),) = transport.sent
        assert len(full) > 3 * len(request)
        assert decode_datagram(full).body[-1] is False or name == "get_providers"
        # A token is bound to the address it was given to.
        transport.sent.clear()
        protocol.datagram_received(
            encode_request(os.urandom(20), name, [[*CLIENT_HEADER, token], *args]),
            ("10.0.0.10", 5000),
        )
        ((other, _address),) = transport.sent
        assert len(other) <= 3 * len(request) + 40


def test_a_padded_request_without_token_gets_a_whole_lookup_reply() -> None:
    async def scenario() -> None:
        server, server_transport, _hooks = make_protocol()
        for _ in range(20):
            server.welcome_if_new(peer())
        client, client_transport, _hooks = make_protocol()
        target = Contact(server.identity.node_id, *PEER, 5000)
        query = asyncio.ensure_future(client.query(target, KEY, False, 8))
        await asyncio.sleep(0)
        ((request, _address),) = client_transport.sent
        server.datagram_received(request, ("10.0.0.77", 5000))
        ((reply, _address),) = server_transport.sent
        assert len(reply) <= 3 * len(request)
        client.datagram_received(reply, PEER)
        result = await query
        assert result is not None and len(result.contact_items) == 8 and not result.more
        assert client.token_for(PEER) == result.token

    asyncio.run(scenario())
