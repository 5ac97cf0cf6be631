"""Typed results and progress events of the operations, with their JSON documents.

Each is a frozen dataclass with ``to_json``/``from_json``; the documents are
what ``dhtfs ... --json`` prints and what the control socket carries, so a
node's own operation and a short-lived client's produce the very same ones.

Must not import: node.py, control.py, session.py, the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dht_dfs.core.ids import ChunkId, NodeId
from dht_dfs.core.refs import ReadReference, RootHash, parse_read_reference, parse_root_hash
from dht_dfs.node.pins import Pin, PinList, Unpinned
from dht_dfs.transfer.fetch import FetchResult
from dht_dfs.transfer.network import CheckReport
from dht_dfs.transfer.publish import PublishResult
from dht_dfs.transfer.treefetch import TreeFetchResult

Document = dict[str, Any]

_PROGRESS_INTERVAL = 0.1
"""Seconds between progress events: a terminal bar needs no more."""


def _rate(size: int, seconds: float) -> float | None:
    return round(size / 1e6 / seconds, 1) if seconds else None


# --- events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    """Work done so far on a long operation."""

    done: int
    """Bytes (publish, fetch) or chunks (check, repair) done."""
    total: int
    """The same unit in all; 0 while unknown."""

    def to_json(self) -> Document:
        return {"event": "progress", "done": self.done, "total": self.total}


@dataclass(frozen=True, slots=True)
class FileFound:
    """A fetch opened the root: what it is about to write, and where."""

    name: str
    """The name the publisher recorded."""
    size: int
    """Plaintext bytes."""
    path: Path
    """The file the fetch writes."""

    def to_json(self) -> Document:
        return {"event": "meta", "name": self.name, "size": self.size, "path": str(self.path)}


Event = Progress | FileFound
OnEvent = Callable[[Event], None]


def event_from_json(document: Mapping[str, Any]) -> Event | None:
    """The event a control line carries; None for a kind this version does not know."""
    kind = document.get("event")
    if kind == "progress":
        return Progress(int(document["done"]), int(document["total"]))
    if kind == "meta":
        return FileFound(str(document["name"]), int(document["size"]), Path(document["path"]))
    return None


class ThrottledProgress:
    """Forward progress at most every ``_PROGRESS_INTERVAL`` seconds (and at the end)."""

    def __init__(self, on_event: OnEvent) -> None:
        self._on_event = on_event
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last >= _PROGRESS_INTERVAL or (total and done >= total):
            self._last = now
            self._on_event(Progress(done, total))


# --- results -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublishSummary:
    """What a publish stored."""

    reference: ReadReference
    size: int
    data_chunks: int
    manifest_chunks: int
    copies_placed: int
    under_replicated: int
    """Chunks that got fewer copies than wanted (too few live nodes)."""
    seconds: float
    mb_per_s: float | None
    files: int = 1
    directories: int = 0
    """0 for a file; a tree counts its root too."""
    symlinks: int = 0
    skipped: int = 0
    """Tree entries left out, each with a warning in the log."""
    skipped_notes: tuple[str, ...] = ()
    """"path: why" for the first skipped entries (the node's log has them all)."""
    already_held: int = 0
    """Chunks not sent: their holders proved they had them already."""

    @property
    def root_hash(self) -> RootHash:
        return self.reference.root_hash

    @property
    def is_tree(self) -> bool:
        return self.directories > 0

    @classmethod
    def of(cls, result: PublishResult) -> PublishSummary:
        return cls(
            reference=result.reference,
            size=result.size,
            data_chunks=result.data_chunks,
            manifest_chunks=result.manifest_chunks,
            copies_placed=result.copies,
            under_replicated=result.under_replicated,
            seconds=round(result.seconds, 3),
            mb_per_s=_rate(result.size, result.seconds),
            files=result.files,
            directories=result.directories,
            symlinks=result.symlinks,
            skipped=result.skipped,
            skipped_notes=result.skipped_notes,
            already_held=result.already_held,
        )

    def to_json(self) -> Document:
        return {
            "reference": str(self.reference),
            "root_hash": str(self.root_hash),
            "root_id": self.reference.root.hex(),
            "size": self.size,
            "data_chunks": self.data_chunks,
            "manifest_chunks": self.manifest_chunks,
            "copies_placed": self.copies_placed,
            "under_replicated": self.under_replicated,
            "seconds": self.seconds,
            "mb_per_s": self.mb_per_s,
            "files": self.files,
            "directories": self.directories,
            "symlinks": self.symlinks,
            "skipped": self.skipped,
            "skipped_notes": list(self.skipped_notes),
            "already_held": self.already_held,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> PublishSummary:
        return cls(
            reference=parse_read_reference(str(document["reference"])),
            size=int(document["size"]),
            data_chunks=int(document["data_chunks"]),
            manifest_chunks=int(document["manifest_chunks"]),
            copies_placed=int(document["copies_placed"]),
            under_replicated=int(document["under_replicated"]),
            seconds=float(document["seconds"]),
            mb_per_s=_optional_float(document["mb_per_s"]),
            files=int(document.get("files", 1)),
            directories=int(document.get("directories", 0)),
            symlinks=int(document.get("symlinks", 0)),
            skipped=int(document.get("skipped", 0)),
            skipped_notes=tuple(str(note) for note in document.get("skipped_notes", ())),
            already_held=int(document.get("already_held", 0)),
        )


@dataclass(frozen=True, slots=True)
class FetchSummary:
    """What a fetch wrote: a file, or a tree (or one link or small file of a tree)."""

    path: Path
    name: str
    size: int
    sha256: str | None
    """Hex SHA-256 of a file's plaintext, as its manifest records it; None for a tree."""
    chunks: int
    chunks_fetched: int
    chunks_resumed: int
    """Chunks already intact in a part file from an interrupted fetch."""
    seconds: float
    mb_per_s: float | None
    kind: str = "file"
    """"file", "directory" or "symlink"."""
    files: int = 1
    directories: int = 0
    symlinks: int = 0
    files_kept: int = 0
    """A tree: files already there, complete and verified (an interrupted fetch's)."""

    @classmethod
    def of(cls, result: FetchResult | TreeFetchResult) -> FetchSummary:
        if isinstance(result, TreeFetchResult):
            return cls(
                path=result.path,
                name=result.path.name,
                size=result.size,
                sha256=None,
                chunks=result.chunks,
                chunks_fetched=result.chunks_fetched,
                chunks_resumed=result.chunks_resumed,
                seconds=round(result.seconds, 3),
                mb_per_s=_rate(result.size, result.seconds),
                kind=result.kind.value,
                files=result.files,
                directories=result.directories,
                symlinks=result.symlinks,
                files_kept=result.files_kept,
            )
        return cls(
            path=result.path,
            name=result.metadata.name,
            size=result.size,
            sha256=result.metadata.plain_sha256.hex(),
            chunks=result.chunks,
            chunks_fetched=result.chunks_fetched,
            chunks_resumed=result.chunks_resumed,
            seconds=round(result.seconds, 3),
            mb_per_s=_rate(result.size, result.seconds),
        )

    def to_json(self) -> Document:
        return {
            "path": str(self.path),
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "sha256": self.sha256,
            "chunks": self.chunks,
            "chunks_fetched": self.chunks_fetched,
            "chunks_resumed": self.chunks_resumed,
            "files": self.files,
            "directories": self.directories,
            "symlinks": self.symlinks,
            "files_kept": self.files_kept,
            "seconds": self.seconds,
            "mb_per_s": self.mb_per_s,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> FetchSummary:
        sha256 = document.get("sha256")
        return cls(
            path=Path(str(document["path"])),
            name=str(document["name"]),
            size=int(document["size"]),
            sha256=None if sha256 is None else str(sha256),
            chunks=int(document["chunks"]),
            chunks_fetched=int(document["chunks_fetched"]),
            chunks_resumed=int(document["chunks_resumed"]),
            seconds=float(document["seconds"]),
            mb_per_s=_optional_float(document["mb_per_s"]),
            kind=str(document.get("kind", "file")),
            files=int(document.get("files", 1)),
            directories=int(document.get("directories", 0)),
            symlinks=int(document.get("symlinks", 0)),
            files_kept=int(document.get("files_kept", 0)),
        )


@dataclass(frozen=True, slots=True)
class ChunkCopies:
    """One chunk that a check found short of copies."""

    chunk: ChunkId
    manifest: bool
    """A manifest chunk, not file data."""
    copies: int
    holders: tuple[NodeId, ...]
    failed_proof: tuple[NodeId, ...] = ()
    """Nodes that claimed the chunk but failed to prove it (``--verify``)."""

    def to_json(self) -> Document:
        return {
            "chunk": self.chunk.hex(),
            "manifest": self.manifest,
            "copies": self.copies,
            "holders": [holder.hex() for holder in self.holders],
            "failed_proof": [node.hex() for node in self.failed_proof],
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> ChunkCopies:
        return cls(
            chunk=ChunkId.from_hex(str(document["chunk"])),
            manifest=bool(document["manifest"]),
            copies=int(document["copies"]),
            holders=tuple(NodeId.from_hex(str(h)) for h in document["holders"]),
            failed_proof=tuple(NodeId.from_hex(str(n)) for n in document.get("failed_proof", ())),
        )


@dataclass(frozen=True, slots=True)
class HealthReport:
    """What check or repair found (and did): ``CheckReport.to_json`` as a value.

    Lists are capped as ``CheckReport.to_json`` caps them.
    """

    root: RootHash
    ok: bool
    replicas_wanted: int
    chunks: int
    bytes: int
    healthy: int
    min_copies: int | None
    under_replicated: tuple[ChunkCopies, ...]
    lost: tuple[ChunkCopies, ...]
    copies_added: int
    errors: tuple[str, ...]
    seconds: float
    verified: bool = False
    """Holders proved their copies (``--verify``); otherwise they claimed them (HAVE)."""
    failed_proofs: int = 0
    """Claims of a copy that a proof refuted (``--verify`` only)."""
    failed_holders: tuple[NodeId, ...] = ()
    under_replicated_count: int = 0
    """All under-replicated chunks (the list stops at 1,000)."""
    lost_count: int = 0
    """All lost chunks (the list stops at 1,000)."""

    @classmethod
    def of(cls, report: CheckReport) -> HealthReport:
        return cls.from_json(report.to_json())

    def to_json(self) -> Document:
        return {
            "root": str(self.root),
            "ok": self.ok,
            "replicas_wanted": self.replicas_wanted,
            "verified": self.verified,
            "holders_are": "proven" if self.verified else "claimed",
            "chunks": self.chunks,
            "bytes": self.bytes,
            "healthy": self.healthy,
            "min_copies": self.min_copies,
            "under_replicated": [item.to_json() for item in self.under_replicated],
            "under_replicated_count": self.under_replicated_count,
            "lost": [item.to_json() for item in self.lost],
            "lost_count": self.lost_count,
            "copies_added": self.copies_added,
            "failed_proofs": self.failed_proofs,
            "failed_holders": [n.hex() for n in self.failed_holders],
            "errors": list(self.errors),
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> HealthReport:
        min_copies = document["min_copies"]
        return cls(
            root=parse_root_hash(str(document["root"])),
            ok=bool(document["ok"]),
            replicas_wanted=int(document["replicas_wanted"]),
            verified=bool(document.get("verified", False)),
            chunks=int(document["chunks"]),
            bytes=int(document["bytes"]),
            healthy=int(document["healthy"]),
            min_copies=None if min_copies is None else int(min_copies),
            under_replicated=tuple(ChunkCopies.from_json(i) for i in document["under_replicated"]),
            lost=tuple(ChunkCopies.from_json(i) for i in document["lost"]),
            under_replicated_count=int(
                document.get("under_replicated_count", len(document["under_replicated"]))
            ),
            lost_count=int(document.get("lost_count", len(document["lost"]))),
            copies_added=int(document["copies_added"]),
            failed_proofs=int(document.get("failed_proofs", 0)),
            failed_holders=tuple(
                NodeId.from_hex(str(n)) for n in document.get("failed_holders", ())
            ),
            errors=tuple(str(e) for e in document["errors"]),
            seconds=float(document["seconds"]),
        )


@dataclass(frozen=True, slots=True)
class Contact:
    """A peer a node knows."""

    node_id: NodeId
    address: str
    """HOST:PORT of its chunk transport."""

    def to_json(self) -> Document:
        return {"node_id": self.node_id.hex(), "address": self.address}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Contact:
        return cls(NodeId.from_hex(str(document["node_id"])), str(document["address"]))


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A running node: who it is, whom it knows, what it stores."""

    version: str
    node_id: NodeId
    address: str
    data_dir: Path
    pid: int
    uptime_s: float
    replicas: int
    peers_known: int
    peers_connected: int
    contacts: tuple[Contact, ...]
    """At most 50 of the known peers."""
    chunks: int
    bytes_stored: int
    quota: int | None
    disk_free: int = 0
    """Bytes free on the disk under the store."""
    full: bool = False
    """The store would refuse a chunk of the default size (quota or free-disk floor)."""
    metrics_port: int | None = None
    lease_ttl: float | None = None
    """The lease this node gives what it publishes and pins (``--lease-ttl``)."""
    pins: int = 0

    def to_json(self) -> Document:
        return {
            "version": self.version,
            "node_id": self.node_id.hex(),
            "address": self.address,
            "data_dir": str(self.data_dir),
            "pid": self.pid,
            "uptime_s": self.uptime_s,
            "replicas": self.replicas,
            "peers": {
                "known": self.peers_known,
                "connected": self.peers_connected,
                "contacts": [contact.to_json() for contact in self.contacts],
            },
            "store": {
                "chunks": self.chunks,
                "bytes": self.bytes_stored,
                "quota": self.quota,
                "disk_free": self.disk_free,
                "full": self.full,
            },
            "metrics_port": self.metrics_port,
            "lease_ttl": self.lease_ttl,
            "pins": self.pins,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> NodeStatus:
        peers, store = document["peers"], document["store"]
        quota = store["quota"]
        return cls(
            version=str(document["version"]),
            node_id=NodeId.from_hex(str(document["node_id"])),
            address=str(document["address"]),
            data_dir=Path(str(document["data_dir"])),
            pid=int(document["pid"]),
            uptime_s=float(document["uptime_s"]),
            replicas=int(document["replicas"]),
            peers_known=int(peers["known"]),
            peers_connected=int(peers["connected"]),
            contacts=tuple(Contact.from_json(c) for c in peers["contacts"]),
            chunks=int(store["chunks"]),
            bytes_stored=int(store["bytes"]),
            quota=None if quota is None else int(quota),
            disk_free=int(store.get("disk_free", 0)),
            full=bool(store.get("full", False)),
            metrics_port=None
            if document.get("metrics_port") is None
            else int(document["metrics_port"]),
            lease_ttl=_optional_float(document.get("lease_ttl")),
            pins=int(document.get("pins", 0)),
        )


Result = PublishSummary | FetchSummary | HealthReport | NodeStatus | Pin | PinList | Unpinned


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
