"""Provider records, the provider store, the datagram codec and batching (no sockets)."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dht_dfs.core.crypto import Identity
from dht_dfs.core.errors import RemoteProtocolError
from dht_dfs.core.ids import NodeId
from dht_dfs.dht.codec import (
    DATAGRAM_BUDGET,
    KIND_REPLY,
    KIND_REQUEST,
    MAX_DATAGRAM_SIZE,
    decode_datagram,
    encode_reply,
    encode_request,
)
from dht_dfs.dht.records import ProviderStore
from dht_dfs.dht.values import (
    RECORD_DOMAIN,
    Contact,
    ProviderRecord,
    parse_address,
    split_into_batches,
)

NOW = 1_700_000_000.0
TTL = 3600.0
IDENTITY = Identity(bytes(range(32)))


def record(
    key: bytes | None = None,
    *,
    identity: Identity = IDENTITY,
    ttl: float = TTL,
    now: float = NOW,
    host: str = "10.0.0.7",
    port: int = 4000,
) -> ProviderRecord:
    return ProviderRecord.create(identity, key or bytes(20), host, port, ttl, now)


# --- ProviderRecord ------------------------------------------------------------------


def test_record_created_by_a_key_verifies() -> None:
    made = record(b"k" * 20)
    assert made.node_id == IDENTITY.node_id
    assert made.public_key == IDENTITY.public_key
    assert made.expiry == int(NOW + TTL)
    assert made.problem(NOW, max_ttl=TTL) is None
    assert made.verify(NOW)
    assert made.tcp_address == ("10.0.0.7", 4000)


def test_signed_message_is_domain_separated_and_unambiguous() -> None:
    message = ProviderRecord.signed_message(bytes(20), IDENTITY.node_id, "h", 1, 2)
    assert message.startswith(RECORD_DOMAIN)
    # The host carries its length, so moving bytes between host and port changes it.
    other = ProviderRecord.signed_message(bytes(20), IDENTITY.node_id, "h\x00", 1, 2)
    assert message != other


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"key": b"x" * 20}, "bad signature"),
        ({"host": "10.0.0.8"}, "bad signature"),
        ({"tcp_port": 4001}, "bad signature"),
        ({"expiry": int(NOW + TTL) - 1}, "bad signature"),
        ({"signature": bytes(64)}, "bad signature"),
        ({"public_key": Identity.generate().public_key}, "node id is not the hash"),
        ({"node_id": Identity.generate().node_id}, "node id is not the hash"),
    ],
)
def test_tampered_record_is_refused(change: dict[str, object], reason: str) -> None:
    forged = dataclasses.replace(record(), **change)  # type: ignore[arg-type]
    assert forged.problem(NOW) is not None
    assert reason in (forged.problem(NOW) or "")
    assert not forged.verify(NOW)


def test_record_signed_by_another_key_for_this_id_is_refused() -> None:
    thief = Identity.generate()
    genuine = record()
    signature = thief.sign(
        ProviderRecord.signed_message(genuine.key, genuine.node_id, "6.6.6.6", 4000, genuine.expiry)
    )
    forged = dataclasses.replace(
        genuine, host="6.6.6.6", public_key=thief.public_key, signature=signature
    )
    assert forged.problem(NOW) == "node id is not the hash of the public key"


def test_expiry_must_be_in_the_future_and_not_too_far() -> None:
    made = record(ttl=TTL)
    assert made.problem(NOW + TTL + 1) == "expired"
    assert made.problem(made.expiry) == "expired"
    assert "beyond" in (made.problem(NOW, max_ttl=TTL / 2) or "")
    assert made.expired(made.expiry)
    assert not made.expired(made.expiry - 1)


def test_create_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="20 bytes"):
        record(b"short")
    with pytest.raises(ValueError, match="at least one second"):
        record(ttl=0.5)
    with pytest.raises(ValueError, match="host"):
        record(host="bad host!")
    with pytest.raises(ValueError, match="TCP port"):
        record(port=0)


def test_record_size_bound_holds_for_the_widest_record() -> None:
    widest = record(host="h" * 253, port=65535, ttl=3 * 10**9)
    assert widest.expiry >= 2**32
    assert len(widest.to_bytes()) == widest.wire_size()


def test_record_bytes_round_trip() -> None:
    made = record(os.urandom(20))
    data = made.to_bytes()
    assert ProviderRecord.from_bytes(data) == made
    assert len(data) <= made.wire_size() < 256


@pytest.mark.parametrize(
    "data",
    [b"", b"\x90", b"\xc1", b"\x97" + b"\xc0" * 7, b"x" * 600],
)
def test_record_from_bytes_refuses_garbage(data: bytes) -> None:
    with pytest.raises(ValueError):
        ProviderRecord.from_bytes(data)


def test_record_from_bytes_refuses_trailing_bytes() -> None:
    with pytest.raises(ValueError, match="trailing"):
        ProviderRecord.from_bytes(record().to_bytes() + b"\x00")


@pytest.mark.parametrize(
    ("index", "value", "message"),
    [
        (0, b"k" * 19, "record key must be 20 bytes"),
        (0, "k" * 20, "record key must be bytes"),
        (1, b"n" * 21, "record node id must be 20 bytes"),
        (2, b"p" * 31, "record public key must be 32 bytes"),
        (3, "", "record host is not a host"),
        (3, "a" * 254, "record host is not a host"),
        (3, "evil\nhost", "record host is not a host"),
        (3, 7, "record host must be a string"),
        (4, 0, "record TCP port must be in"),
        (4, 65536, "record TCP port must be in"),
        (4, True, "record TCP port must be an integer"),
        (5, -1, "record expiry must be in"),
        (5, 1.5, "record expiry must be an integer"),
        (6, b"s" * 63, "record signature must be 64 bytes"),
    ],
)
def test_record_from_wire_checks_every_field(index: int, value: object, message: str) -> None:
    wire = record().to_wire()
    wire[index] = value
    with pytest.raises(RemoteProtocolError, match=message):
        ProviderRecord.from_wire(wire)


def test_record_from_wire_checks_shape() -> None:
    with pytest.raises(RemoteProtocolError, match="record must have 7 items"):
        ProviderRecord.from_wire(record().to_wire()[:6])
    with pytest.raises(RemoteProtocolError, match="record must be a list"):
        ProviderRecord.from_wire({"key": b""})


_wire_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.binary(max_size=40) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=8),
    max_leaves=30,
)


@given(_wire_values)
def test_record_from_wire_parses_or_raises_remote_error(value: object) -> None:
    with contextlib.suppress(RemoteProtocolError):
        ProviderRecord.from_wire(value)


# --- Contact -----------------------------------------------------------------------------


def test_contact_wire_round_trip_and_host_names_refused() -> None:
    contact = Contact(IDENTITY.node_id, "::1", 4000, 4001)
    assert Contact.from_wire(contact.to_wire()) == contact
    assert contact.udp_address == ("::1", 4000)
    assert contact.tcp_address == ("::1", 4001)
    with pytest.raises(RemoteProtocolError, match="not an IP address"):
        # A host name would make sendto block in DNS resolution.
        Contact.from_wire([IDENTITY.node_id.digest, "example.com", 1, 1])


# --- ProviderStore -------------------------------------------------------------------------


def test_store_keeps_one_record_per_provider_and_longest_lived() -> None:
    store = ProviderStore(max_per_key=4, max_total=100)
    key = bytes(20)
    older, newer = record(key, ttl=100), record(key, ttl=200)
    assert store.add(older, NOW)
    assert store.add(newer, NOW)
    assert store.get(key, NOW) == [newer]
    assert store.add(older, NOW)  # confirmed: a longer-lived copy is held
    assert store.get(key, NOW) == [newer]
    assert store.holds(newer) and not store.holds(older)
    assert len(store) == 1


def test_store_refuses_expired_and_expires_records() -> None:
    store = ProviderStore(4, 100)
    assert not store.add(record(ttl=10), NOW + 11)
    store.add(record(bytes(20), ttl=10), NOW)
    store.add(record(b"\x01" * 20, ttl=100), NOW)
    assert store.get(bytes(20), NOW + 10) == []
    assert store.expire(NOW + 10) == 1
    assert store.keys() == [b"\x01" * 20]
    assert len(store) == 1


def test_store_per_key_cap_is_not_won_by_a_longer_expiry() -> None:
    store = ProviderStore(max_per_key=3, max_total=100)
    key = bytes(20)
    providers = [Identity.generate() for _ in range(5)]
    for identity, ttl in zip(providers[:3], (300, 100, 200), strict=True):
        assert store.add(record(key, identity=identity, ttl=ttl), NOW)
    # Every holder has one record, as many as the newcomer would: first come, kept,
    # however long the newcomer lives.
    assert not store.add(record(key, identity=providers[3], ttl=7 * 24 * 3600), NOW)
    # A provider holding many records elsewhere gives way to one holding few.
    for index in range(1, 4):
        assert store.add(record(bytes([index]) * 20, identity=providers[1], ttl=100), NOW)
    assert store.add(record(key, identity=providers[4], ttl=50), NOW)
    held = {r.node_id for r in store.get(key, NOW)}
    assert held == {providers[0].node_id, providers[2].node_id, providers[4].node_id}
    # Expired records give way to anyone.
    assert store.add(record(key, identity=providers[3], ttl=500, now=NOW + 250), NOW + 250)
    assert providers[3].node_id in {r.node_id for r in store.get(key, NOW + 250)}


def test_store_total_cap_evicts_the_heaviest_provider_only() -> None:
    store = ProviderStore(max_per_key=10, max_total=3)
    heavy, light, newcomer = (Identity.generate() for _ in range(3))
    store.add(record(b"\x00" * 20, identity=heavy, ttl=500), NOW)
    store.add(record(b"\x01" * 20, identity=heavy, ttl=500), NOW)
    store.add(record(b"\x02" * 20, identity=light, ttl=100), NOW)
    assert store.add(record(b"\x09" * 20, identity=newcomer, ttl=50), NOW)
    assert store.held_by(heavy.node_id) == 1
    assert store.held_by(light.node_id) == 1
    # Now all hold one: a newcomer (or a second record of anyone) is refused.
    assert not store.add(record(b"\x0a" * 20, identity=Identity.generate(), ttl=9000), NOW)
    assert not store.add(record(b"\x0b" * 20, identity=light, ttl=9000), NOW)
    assert len(store) == 3


def test_flooding_identity_cannot_push_out_honest_records() -> None:
    # The attack of the issue: one identity sends long-lived records until the
    # store is full; the honest record stays and new honest records still enter.
    store = ProviderStore(max_per_key=32, max_total=50, max_per_provider=20, max_per_host=30)
    honest = record(b"\x01" * 20, identity=Identity.generate(), ttl=100)
    assert store.add(honest, NOW)
    attacker = Identity.generate()
    flood = [
        record(os.urandom(20), identity=attacker, ttl=7 * 24 * 3600, host="6.6.6.6")
        for _ in range(200)
    ]
    assert sum(store.add(r, NOW) for r in flood) == 20
    # Many identities behind one host fare no better.
    sybils = [
        record(os.urandom(20), identity=Identity.generate(), ttl=7 * 24 * 3600, host="6.6.6.6")
        for _ in range(40)
    ]
    assert sum(store.add(r, NOW) for r in sybils) == 10
    assert store.held_for_host("6.6.6.6") == 30
    assert store.get(honest.key, NOW) == [honest]
    newcomers = [record(os.urandom(20), identity=Identity.generate(), ttl=60) for _ in range(25)]
    assert all(store.add(r, NOW) for r in newcomers)
    assert store.get(honest.key, NOW) == [honest]
    assert len(store) == 50
    assert store.held_by(attacker.node_id) < 20  # it gave way to the newcomers


def test_store_total_cap_first_drops_expired_records() -> None:
    store = ProviderStore(max_per_key=10, max_total=2)
    store.add(record(b"\x01" * 20, ttl=10), NOW)
    store.add(record(b"\x02" * 20, ttl=1000), NOW)
    assert store.add(record(b"\x03" * 20, ttl=5, now=NOW + 20), NOW + 20)
    assert sorted(store.keys()) == [b"\x02" * 20, b"\x03" * 20]


def test_store_stays_consistent_through_many_replacements() -> None:
    store = ProviderStore(max_per_key=2, max_total=5)
    identities = [Identity.generate() for _ in range(4)]
    for step in range(1, 600):
        identity = identities[step % 4]
        store.add(record(bytes([step % 7]) * 20, identity=identity, ttl=step), NOW)
    keys = store.keys()
    assert len(store) == sum(len(store.get(key, NOW)) for key in keys) <= 5
    store.remove(keys[0], store.get(keys[0], NOW)[0].node_id)
    keys = store.keys()
    assert len(store) == sum(len(store.get(key, NOW)) for key in keys)
    assert not store.remove(b"\xee" * 20, NodeId(bytes(20)))


# --- codec ----------------------------------------------------------------------------------


def test_datagram_round_trip() -> None:
    message_id = os.urandom(20)
    request = decode_datagram(encode_request(message_id, "ping", [1, b"x"]))
    assert (request.kind, request.message_id, request.body) == (
        KIND_REQUEST,
        message_id,
        ["ping", [1, b"x"]],
    )
    reply = decode_datagram(encode_reply(message_id, [True]))
    assert (reply.kind, reply.body) == (KIND_REPLY, [True])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00" * (MAX_DATAGRAM_SIZE + 1), "datagram of 8193 bytes exceeds the 8192-byte limit"),
        (b"\x00" * 21, "datagram of 21 bytes is shorter than the 22-byte minimum"),
        (b"\x07" + b"\x00" * 22, "unknown datagram kind 0x07"),
        (b"\x00" + b"\x00" * 20 + b"\xc1", r"body is not MessagePack \(FormatError\)"),
        (b"\x00" + b"\x00" * 20 + b"\x91", r"body is not MessagePack \(truncated\)"),
        (b"\x00" + b"\x00" * 20 + b"\x91" * 4000, r"body is not MessagePack \(nested too deep\)"),
        (b"\x00" + b"\x00" * 20 + b"\xc0\xc0\xc0", "2 trailing byte"),
    ],
)
def test_decode_refuses_with_exact_reason(data: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        decode_datagram(data)


def test_every_truncation_of_a_datagram_raises() -> None:
    whole = encode_request(os.urandom(20), "find_node", [[bytes(20), 1, 0], bytes(20)])
    decode_datagram(whole)
    for end in range(len(whole)):
        with pytest.raises(RemoteProtocolError):
            decode_datagram(whole[:end])


@given(st.binary(max_size=300))
def test_decode_parses_or_raises_remote_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_datagram(data)


def test_batches_fit_the_budget_and_keep_order() -> None:
    records = [record(os.urandom(20), identity=Identity.generate()) for _ in range(100)]
    batches = split_into_batches(records)
    assert [r for batch in batches for r in batch] == records
    assert len(batches) >= 3
    for batch in batches:
        packed = encode_request(
            bytes(20), "add_providers", [[bytes(20), 65535, 0], [r.to_wire() for r in batch]]
        )
        assert len(packed) <= DATAGRAM_BUDGET
    assert split_into_batches([]) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:4000", ("127.0.0.1", 4000)),
        ("[::1]:4000", ("::1", 4000)),
        ("node.example:1", ("node.example", 1)),
        (("10.0.0.1", 9), ("10.0.0.1", 9)),
    ],
)
def test_parse_address(text: str | tuple[str, int], expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", ":4000", "host:0", "host:x", "[::1]4000", "h:70000"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_store_forgets_every_record_of_a_departed_provider() -> None:
    store = ProviderStore(max_per_key=4, max_total=100)
    gone, staying = IDENTITY, Identity(bytes(range(1, 33)))
    keys = [bytes([i]) * 20 for i in range(5)]
    for key in keys:
        assert store.add(record(key, identity=gone), NOW)
        assert store.add(record(key, identity=staying), NOW)
    store.remove(keys[0], gone.node_id)
    assert store.remove_provider(gone.node_id) == 4
    assert store.remove_provider(gone.node_id) == 0
    assert len(store) == 5
    for key in keys:
        assert [r.node_id for r in store.get(key, NOW)] == [staying.node_id]
    # Expiry keeps the per-provider index consistent too.
    assert store.expire(NOW + TTL + 1) == 5
    assert store.remove_provider(staying.node_id) == 0
