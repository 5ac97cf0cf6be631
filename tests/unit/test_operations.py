"""Typed requests and results: JSON round trips, bad requests, input checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dht_dfs.core.errors import (
    ChunkNotFoundError,
    ControlError,
    DhtfsError,
    InputError,
    IntegrityError,
    InvalidReferenceError,
    PeerRefusedError,
    RootNotFoundError,
)
from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.core.refs import ReadReference, RootHash
from dht_dfs.node.control import error_event, error_from_event
from dht_dfs.node.operations import (
    CheckRequest,
    FetchRequest,
    PublishRequest,
    RepairRequest,
    Request,
    StatusRequest,
    load_convergence_secret,
    request_from_json,
)
from dht_dfs.node.results import (
    ChunkCopies,
    Contact,
    FetchSummary,
    FileFound,
    HealthReport,
    NodeStatus,
    Progress,
    PublishSummary,
    Result,
    event_from_json,
)

REFERENCE = ReadReference(ChunkId(bytes(range(32))), bytes(range(32, 64)))
NODE = NodeId(bytes(range(20)))


def through_json(document: dict[str, object]) -> dict[str, object]:
    decoded: dict[str, object] = json.loads(json.dumps(document))
    return decoded


@pytest.mark.parametrize(
    "request_",
    [
        PublishRequest(Path("/data/movie.mkv")),
        PublishRequest(Path("/data/x"), name="x.tar", convergence_secret=b"\x01" * 32),
        FetchRequest(REFERENCE),
        FetchRequest(REFERENCE, output=Path("/out"), overwrite=True, verify_hash=False),
        CheckRequest(REFERENCE.root_hash),
        RepairRequest(REFERENCE.root_hash),
        CheckRequest(REFERENCE.root_hash, verify=True),
        RepairRequest(REFERENCE.root_hash, verify=True),
        StatusRequest(),
    ],
)
def test_requests_survive_json(request_: Request) -> None:
    assert request_from_json(through_json(request_.to_json())) == request_


PUBLISHED = PublishSummary(
    reference=REFERENCE,
    size=10_000_000,
    data_chunks=10,
    manifest_chunks=1,
    copies_placed=33,
    under_replicated=0,
    seconds=1.234,
    mb_per_s=8.1,
)
FETCHED = FetchSummary(
    path=Path("/out/movie.mkv"),
    name="movie.mkv",
    size=10_000_000,
    sha256="ab" * 32,
    chunks=10,
    chunks_fetched=7,
    chunks_resumed=3,
    seconds=0.5,
    mb_per_s=None,
)
HEALTH = HealthReport(
    root=REFERENCE.root_hash,
    ok=False,
    replicas_wanted=3,
    chunks=11,
    bytes=10_000_000,
    healthy=10,
    min_copies=0,
    under_replicated=(ChunkCopies(ChunkId(bytes(32)), True, 1, (NODE,)),),
    lost=(ChunkCopies(ChunkId(b"\x01" * 32), False, 0, ()),),
    copies_added=2,
    errors=("peer timed out",),
    seconds=2.0,
    verified=True,
    failed_proofs=1,
    failed_holders=(NODE,),
)
STATUS = NodeStatus(
    version="0.1.0",
    node_id=NODE,
    address="127.0.0.1:4000",
    data_dir=Path("/var/dhtfs"),
    pid=1234,
    uptime_s=12.5,
    replicas=3,
    peers_known=4,
    peers_connected=2,
    contacts=(Contact(NODE, "10.0.0.2:4000"),),
    chunks=5,
    bytes_stored=5_000_000,
    quota=None,
)


@pytest.mark.parametrize("result", [PUBLISHED, FETCHED, HEALTH, STATUS])
def test_results_survive_json(result: Result) -> None:
    assert type(result).from_json(through_json(result.to_json())) == result


def test_documents_keep_every_key_the_cli_printed() -> None:
    assert set(PUBLISHED.to_json()) == {
        "reference",
        "root_hash",
        "root_id",
        "size",
        "data_chunks",
        "manifest_chunks",
        "copies_placed",
        "under_replicated",
        "seconds",
        "mb_per_s",
        "files",
        "directories",
        "symlinks",
        "skipped",
        "skipped_notes",
        "already_held",
    }
    assert PUBLISHED.to_json()["root_id"] == REFERENCE.root.hex()
    assert set(FETCHED.to_json()) == {
        "path",
        "name",
        "kind",
        "files",
        "directories",
        "symlinks",
        "files_kept",
        "size",
        "sha256",
        "chunks",
        "chunks_fetched",
        "chunks_resumed",
        "seconds",
        "mb_per_s",
    }
    status = STATUS.to_json()
    assert set(status) == {
        "version",
        "node_id",
        "address",
        "data_dir",
        "pid",
        "uptime_s",
        "replicas",
        "peers",
        "store",
        "metrics_port",
        "lease_ttl",
        "pins",
    }
    assert status["peers"] == {
        "known": 4,
        "connected": 2,
        "contacts": [{"node_id": NODE.hex(), "address": "10.0.0.2:4000"}],
    }
    assert status["store"] == {
        "chunks": 5,
        "bytes": 5_000_000,
        "quota": None,
        "disk_free": 0,
        "full": False,
    }


def test_events_survive_json() -> None:
    for event in (Progress(5, 10), FileFound("a.bin", 3, Path("/out/a.bin"))):
        assert event_from_json(through_json(event.to_json())) == event
    assert event_from_json({"event": "from-a-newer-node"}) is None


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([1, 2], "a control request is a JSON object"),
        ({"op": "dance"}, "unknown operation 'dance'"),
        ({"op": "fetch"}, "bad request: fetch needs 'reference'"),
        ({"op": "publish", "path": 7}, "bad request: path must be a string"),
        ({"op": "publish", "path": "/x", "convergence_secret": "zz"}, "bad request"),
    ],
)
def test_malformed_requests_are_control_errors(document: object, message: str) -> None:
    with pytest.raises(ControlError, match=message):
        request_from_json(document)


def test_a_bad_reference_in_a_request_is_a_reference_error() -> None:
    with pytest.raises(InvalidReferenceError, match="not a dhtfs reference"):
        request_from_json({"op": "fetch", "reference": "nope"})


def test_publish_input_is_checked_and_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file.bin").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    checked = PublishRequest(Path("file.bin")).check_input()
    assert checked.path == tmp_path / "file.bin"
    with pytest.raises(InputError, match="cannot read missing: No such file"):
        PublishRequest(Path("missing")).check_input()
    # A directory is a tree to publish, made absolute like a file.
    assert PublishRequest(Path(".")).check_input().path == tmp_path
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(InputError, match="not a regular file"):
        # O_NONBLOCK is not used by open(): a FIFO with no writer would block,
        # so give it one.
        writer = os.open(tmp_path / "pipe", os.O_RDWR)
        try:
            PublishRequest(tmp_path / "pipe").check_input()
        finally:
            os.close(writer)


def test_fetch_output_is_checked_before_any_network_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    defaulted = FetchRequest(REFERENCE).check_input()
    assert (defaulted.output, defaulted.directory) == (None, tmp_path)
    assert FetchRequest(REFERENCE, output=Path("new.bin")).check_input().output == (
        tmp_path / "new.bin"
    )
    with pytest.raises(InputError, match="does not exist"):
        FetchRequest(REFERENCE, output=tmp_path / "no" / "x").check_input()
    (tmp_path / "old.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="already exists"):
        FetchRequest(REFERENCE, output=tmp_path / "old.bin").check_input()
    FetchRequest(REFERENCE, output=tmp_path / "old.bin", overwrite=True).check_input()


def test_a_secret_file_that_cannot_be_used_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"passphrase")
    assert len(load_convergence_secret(tmp_path / "secret")) == 32
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(InputError, match="is empty"):
        load_convergence_secret(tmp_path / "empty")
    with pytest.raises(InputError, match="cannot use secret file"):
        load_convergence_secret(tmp_path / "missing")


@pytest.mark.parametrize(
    "error",
    [
        IntegrityError("bad chunk", "ab" * 32),
        RootNotFoundError("no node has root", "cd" * 32),
        ChunkNotFoundError("gone", None),
        PeerRefusedError("store full", code=3),
        InputError("cannot read x"),
    ],
)
def test_error_events_rebuild_the_class_and_its_fields(error: DhtfsError) -> None:
    rebuilt = error_from_event(through_json(error_event(error)))
    assert type(rebuilt) is type(error)
    assert str(rebuilt) == str(error)
    for name in ("chunk_hex", "code"):
        assert getattr(rebuilt, name, None) == getattr(error, name, None)


def test_an_unknown_error_class_becomes_a_plain_error() -> None:
    rebuilt = error_from_event({"event": "error", "type": "FutureError", "message": "m"})
    assert type(rebuilt) is DhtfsError and str(rebuilt) == "m"
    # A name that is not a DhtfsError is never instantiated.
    rebuilt = error_from_event({"event": "error", "type": "annotations", "message": "m"})
    assert type(rebuilt) is DhtfsError


def test_root_hash_requests_accept_the_read_reference_form() -> None:
    document = {"op": "check", "root": str(REFERENCE)}
    assert request_from_json(document) == CheckRequest(RootHash(REFERENCE.root))


def test_verify_is_false_unless_asked_and_must_be_a_boolean() -> None:
    document = {"op": "repair", "root": str(REFERENCE.root_hash)}
    assert request_from_json(document) == RepairRequest(REFERENCE.root_hash, verify=False)
    assert request_from_json({**document, "verify": True}).verify is True  # type: ignore[union-attr]
    with pytest.raises(ControlError, match="verify must be true or false"):
        request_from_json({**document, "verify": "yes"})
