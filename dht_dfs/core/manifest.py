"""Manifests: the tree of chunks that describes one file. Pure, no I/O.

A manifest node is itself a chunk (its id is the SHA-256 of its bytes). Its
public part lists child chunk ids and sizes, which is all that checking,
repairing or pinning needs; its private part, sealed with the node's own
convergent key, holds the children's keys and, in the root, the file's
name, size, mode and plaintext SHA-256.

Layout of a stored manifest node (all integers big-endian)::

    offset       size  field
    0            4     magic b"DHTM"
    4            1     format version (2)
    5            1     kind: 0 leaf (entries are data chunks), 1 interior
                       (entries are manifest nodes one level down)
    6            2     flags: bit 0 = root; other bits must be 0
    8            4     n, number of entries (at most MAX_ENTRIES)
    12           r     root only (r = 16, else r = 0): file size (8) |
                       chunk size (4) | fanout (4)
    12+r         36*n  entries: chunk id (32) | stored size (4)
    12+r+36n     4     m, length of the sealed private part
    16+r+36n     m     sealed private part (AEGIS-256, associated data =
                       b"dhtfs/manifest/v2" + bytes 0 .. 12+r+36n)

    private plaintext:
    0            32*n  keys of the entries, in order
    32n          ...   root only: mode (4) | plaintext SHA-256 (32)
                       | name length (2) | name (UTF-8)

A file whose entry list outgrows one node (``fanout`` entries) becomes a
tree: full leaves are sealed and their ids become entries of the level
above, so the builder holds at most ``fanout`` entries per level and the
file size has no limit. Nodes are sealed convergently, so the same file
with the same name and mode always yields the same root.

The tree's shape follows from the root's public file size, chunk size and
fanout (``TreeShape``): ``ceil(size / chunk_size)`` data chunks, each
exactly ``chunk_size`` bytes of plaintext but the last (1 to chunk_size),
under a tree of the least height that holds them, in which every node but
the last of its level is full. Readers check each node against that shape
as they reach it, so a hostile manifest cannot declare more chunks or bytes
than its size (a "manifest bomb" of millions of empty chunks) and is
refused before anything beyond its size is fetched. The size is public
because the public part already gives it away: it is the sum of the listed
chunk sizes minus their tags. Having it there lets ``check`` and ``repair``,
which have no key, bound their walk the same way.

Format 1 (keys derived from the plaintext's SHA-256, no public shape) is
refused with a message saying so; such files must be published again.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from dht_dfs.core.chunker import chunk_count
from dht_dfs.core.crypto import (
    KEY_SIZE,
    TAG_SIZE,
    SealedChunk,
    decrypt_with_key,
    derive_chunk_key,
    encrypt_with_key,
)
from dht_dfs.core.errors import IntegrityError, ManifestError, WrongKeyError
from dht_dfs.core.ids import ChunkId
from dht_dfs.core.refs import ReadReference

MAGIC = b"DHTM"
FORMAT_VERSION = 2
FLAG_ROOT = 0x0001

MAX_ENTRIES = 1 << 16
"""Most entries a node may list; bounds a decoder's work and memory."""
MAX_STORED_SIZE = 64 * 1024 * 1024
"""Largest chunk a manifest may reference."""
MAX_NAME_BYTES = 1024
MAX_DEPTH = 8
"""Tallest tree a reader follows: fanout**8 chunks is far beyond any disk."""
MAX_CHUNK_SIZE = MAX_STORED_SIZE - TAG_SIZE

_HEADER = struct.Struct(">4sBBHI")
_ENTRY = struct.Struct(">32sI")
_LENGTH = struct.Struct(">I")
_ROOT_SHAPE = struct.Struct(">QII")
_ROOT_META = struct.Struct(">I32sH")
_MANIFEST_AD = b"dhtfs/manifest/v2"


class NodeKind(enum.IntEnum):
    LEAF = 0
    INTERIOR = 1


@dataclass(frozen=True, slots=True)
class Entry:
    """One child of a manifest node, as its public part lists it."""

    chunk_id: ChunkId
    stored_size: int
    """Bytes of the stored (encrypted) chunk."""

    @property
    def plain_size(self) -> int:
        """Plaintext bytes of a data chunk."""
        return self.stored_size - TAG_SIZE


@dataclass(frozen=True, slots=True)
class FileMetadata:
    """What the root's private part says about the file."""

    name: str
    """Base name at publish time; may be empty (stdin)."""
    size: int
    mode: int
    """Permission bits (``st_mode & 0o7777``)."""
    chunk_size: int
    plain_sha256: bytes
    """SHA-256 of the whole plaintext file."""

    def __post_init__(self) -> None:
        if len(self.name.encode("utf-8")) > MAX_NAME_BYTES:
            raise ValueError(f"file name is longer than {MAX_NAME_BYTES} bytes")
        if len(self.plain_sha256) != 32:
            raise ValueError("plain_sha256 is 32 bytes")


@dataclass(frozen=True, slots=True)
class TreeShape:
    """What a file's size says its manifest tree must look like (public, in the root)."""

    size: int
    """Plaintext bytes of the file."""
    chunk_size: int
    fanout: int
    """Most entries per manifest node; every node but the last of its level has this many."""

    @property
    def leaves(self) -> int:
        """How many data chunks the file has."""
        return chunk_count(self.size, self.chunk_size)

    @property
    def height(self) -> int:
        """Levels of manifest nodes: 1 for a root that lists the data chunks itself."""
        height, capacity = 1, self.fanout
        while capacity < self.leaves:
            height += 1
            capacity *= self.fanout
        return height

    def leaves_under(self, height: int) -> int:
        """Most data chunks a node of ``height`` holds (all of them, in a full node)."""
        leaves: int = self.fanout**height
        return leaves

    def entries_of(self, height: int, first_leaf: int) -> int:
        """Entries a node of ``height`` must list when its first data chunk is ``first_leaf``."""
        per_child = self.leaves_under(height - 1)
        covered = min(self.leaves_under(height), self.leaves - first_leaf)
        return -(-covered // per_child)

    def stored_size_of(self, leaf: int) -> int:
        """Stored bytes of data chunk number ``leaf``."""
        if leaf < self.leaves - 1:
            return self.chunk_size + TAG_SIZE
        return self.size - leaf * self.chunk_size + TAG_SIZE


@dataclass(frozen=True, slots=True)
class ManifestNode:
    """The public view of a manifest node: readable without any key."""

    chunk_id: ChunkId
    kind: NodeKind
    is_root: bool
    entries: tuple[Entry, ...]
    public_bytes: bytes
    """Header and entries, bound to the private part as associated data."""
    sealed_private: bytes
    shape: TreeShape | None = None
    """The file's declared shape; present exactly on the root."""

    @property
    def stored_size(self) -> int:
        """Bytes of the stored chunk."""
        return len(self.public_bytes) + _LENGTH.size + len(self.sealed_private)


@dataclass(frozen=True, slots=True)
class OpenedNode:
    """A manifest node with its private part decrypted."""

    node: ManifestNode
    keys: tuple[bytes, ...]
    """Key of each entry, same order as ``node.entries``."""
    metadata: FileMetadata | None
    """File metadata; present exactly on the root."""


# --- encoding -----------------------------------------------------------------------


def _seal_node(
    kind: NodeKind,
    children: list[tuple[Entry, bytes]],
    metadata: FileMetadata | None,
    secret: bytes,
    *,
    fanout: int = 0,
) -> SealedChunk:
    """Seal one node; a root (``metadata`` given) also records ``fanout``."""
    flags = FLAG_ROOT if metadata is not None else 0
    public = bytearray(_HEADER.pack(MAGIC, FORMAT_VERSION, kind, flags, len(children)))
    if metadata is not None:
        public += _ROOT_SHAPE.pack(metadata.size, metadata.chunk_size, fanout)
    private = bytearray()
    for entry, key in children:
        public += _ENTRY.pack(entry.chunk_id.digest, entry.stored_size)
        private += key
    if metadata is not None:
        name = metadata.name.encode("utf-8")
        private += _ROOT_META.pack(metadata.mode, metadata.plain_sha256, len(name))
        private += name
    public_bytes = bytes(public)
    private_bytes = bytes(private)
    key = derive_chunk_key(public_bytes + private_bytes, secret)
    sealed = encrypt_with_key(private_bytes, key, _MANIFEST_AD + public_bytes)
    data = public_bytes + _LENGTH.pack(len(sealed)) + sealed
    return SealedChunk(ChunkId.of(data), key, data, len(private_bytes))


class ManifestBuilder:
    """Builds a file's manifest tree from its data chunks, in order.

    Feed every data chunk to ``add``, store each manifest node it returns,
    then call ``finish``; it returns the remaining nodes (the root last) and
    the read reference. Memory is at most ``fanout`` entries per level.
    """

    def __init__(self, secret: bytes, fanout: int) -> None:
        if not 2 <= fanout <= MAX_ENTRIES:
            raise ValueError(f"manifest fanout must be between 2 and {MAX_ENTRIES}")
        self._secret = secret
        self._fanout = fanout
        self._levels: list[list[tuple[Entry, bytes]]] = [[]]
        self._finished = False
        self._chunks = 0
        self._plain_bytes = 0

    def add(self, chunk: SealedChunk) -> list[SealedChunk]:
        """Record the next data chunk; returns manifest nodes sealed meanwhile."""
        if self._finished:
            raise RuntimeError("manifest already finished")
        sealed: list[SealedChunk] = []
        self._chunks += 1
        self._plain_bytes += chunk.plain_size
        self._add_at(0, Entry(chunk.chunk_id, len(chunk.data)), chunk.key, sealed)
        return sealed

    def _add_at(self, level: int, entry: Entry, key: bytes, sealed: list[SealedChunk]) -> None:
        if level == len(self._levels):
            self._levels.append([])
        children = self._levels[level]
        # Seal a full level only when one more entry arrives, so a file of
        # exactly ``fanout`` chunks gets a single root leaf, not a root with
        # one child.
        if len(children) == self._fanout:
            self._push_up(level, sealed)
        self._levels[level].append((entry, key))

    def _push_up(self, level: int, sealed: list[SealedChunk]) -> None:
        kind = NodeKind.LEAF if level == 0 else NodeKind.INTERIOR
        node = _seal_node(kind, self._levels[level], None, self._secret)
        sealed.append(node)
        self._levels[level] = []
        self._add_at(level + 1, Entry(node.chunk_id, len(node.data)), node.key, sealed)

    def finish(self, metadata: FileMetadata) -> tuple[list[SealedChunk], ReadReference]:
        """Seal what is left; the last node returned is the root."""
        if self._finished:
            raise RuntimeError("manifest already finished")
        # Readers refuse a tree whose chunks disagree with its declared
        # size; refuse to write one rather than publish an unreadable file.
        if self._plain_bytes != metadata.size or self._chunks != chunk_count(
            metadata.size, metadata.chunk_size
        ):
            raise ValueError(
                f"{self._chunks} chunks of {self._plain_bytes} bytes do not make a file of "
                f"{metadata.size} bytes in chunks of {metadata.chunk_size}"
            )
        self._finished = True
        sealed: list[SealedChunk] = []
        level = 0
        while level < len(self._levels) - 1:
            if self._levels[level]:
                self._push_up(level, sealed)
            level += 1
        top = len(self._levels) - 1
        kind = NodeKind.LEAF if top == 0 else NodeKind.INTERIOR
        root = _seal_node(kind, self._levels[top], metadata, self._secret, fanout=self._fanout)
        sealed.append(root)
        return sealed, ReadReference(root.chunk_id, root.key)


# --- decoding ---------------------------------------------------------------------


def decode_node(chunk_id: ChunkId, data: bytes) -> ManifestNode:
    """Check a manifest node against its id and parse its public part."""
    if not chunk_id.matches(data):
        raise IntegrityError(
            f"manifest chunk {chunk_id.hex()} is corrupt: its bytes do not hash to its id",
            chunk_id.hex(),
        )
    where = f"manifest chunk {chunk_id.hex()}"
    if len(data) < _HEADER.size:
        raise ManifestError(f"{where} is truncated: {len(data)} bytes, header needs {_HEADER.size}")
    magic, version, kind, flags, count = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise ManifestError(f"{where} is not a manifest (bad magic {magic!r})")
    if version == 1:
        raise ManifestError(
            f"{where} has format version 1, whose chunk keys follow from a file's SHA-256; "
            f"this dhtfs reads version {FORMAT_VERSION} only: publish the file again"
        )
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{where} has format version {version}; this dhtfs reads version {FORMAT_VERSION}"
        )
    if kind not in (NodeKind.LEAF, NodeKind.INTERIOR):
        raise ManifestError(f"{where} has unknown node kind {kind}")
    if flags & ~FLAG_ROOT:
        raise ManifestError(f"{where} has unknown flags {flags:#06x}")
    if count > MAX_ENTRIES:
        raise ManifestError(f"{where} lists {count} entries, more than {MAX_ENTRIES}")
    is_root = bool(flags & FLAG_ROOT)
    entries_start = _HEADER.size
    shape = None
    if is_root:
        entries_start += _ROOT_SHAPE.size
        if len(data) < entries_start:
            raise ManifestError(f"{where} is truncated inside its root header")
        shape = _check_shape(where, *_ROOT_SHAPE.unpack_from(data, _HEADER.size))
    entries_end = entries_start + count * _ENTRY.size
    if len(data) < entries_end + _LENGTH.size:
        raise ManifestError(f"{where} is truncated inside its entry list")
    entries = []
    minimum = TAG_SIZE if kind == NodeKind.LEAF else _HEADER.size + _LENGTH.size + TAG_SIZE
    for offset in range(entries_start, entries_end, _ENTRY.size):
        digest, size = _ENTRY.unpack_from(data, offset)
        if not minimum <= size <= MAX_STORED_SIZE:
            raise ManifestError(f"{where} lists a chunk of impossible size {size}")
        entries.append(Entry(ChunkId(digest), size))
    (private_len,) = _LENGTH.unpack_from(data, entries_end)
    private_start = entries_end + _LENGTH.size
    if len(data) != private_start + private_len:
        raise ManifestError(
            f"{where} private part is {len(data) - private_start} bytes, header says {private_len}"
        )
    if private_len < TAG_SIZE + KEY_SIZE * count:
        raise ManifestError(f"{where} private part is too short for {count} keys")
    node = ManifestNode(
        chunk_id=chunk_id,
        kind=NodeKind(kind),
        is_root=is_root,
        entries=tuple(entries),
        public_bytes=bytes(data[:entries_end]),
        sealed_private=bytes(data[private_start:]),
        shape=shape,
    )
    if shape is not None:
        check_node_shape(node, shape, shape.height, 0)
    return node


def _check_shape(where: str, size: int, chunk_size: int, fanout: int) -> TreeShape:
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ManifestError(f"{where} declares an impossible chunk size {chunk_size}")
    if not 2 <= fanout <= MAX_ENTRIES:
        raise ManifestError(f"{where} declares an impossible fanout {fanout}")
    shape = TreeShape(size, chunk_size, fanout)
    if shape.height > MAX_DEPTH:
        raise ManifestError(
            f"{where} declares {size} bytes, a tree of {shape.height} levels "
            f"under fanout {fanout}; readers follow at most {MAX_DEPTH}"
        )
    return shape


def check_node_shape(node: ManifestNode, shape: TreeShape, height: int, first_leaf: int) -> None:
    """Check that a node is what the file's shape says belongs at its place.

    ``height`` is the node's level counted from the data chunks (1: it lists
    them) and ``first_leaf`` the index of the first data chunk below it.
    Raises ManifestError naming the node; called on each node as it is
    read, before any of its children is fetched.
    """
    where = f"manifest chunk {node.chunk_id.hex()}"
    kind = NodeKind.LEAF if height == 1 else NodeKind.INTERIOR
    if node.kind != kind:
        raise ManifestError(
            f"{where} is a {node.kind.name.lower()} node where the file's size "
            f"({shape.size} bytes) puts a {kind.name.lower()} node"
        )
    expected = shape.entries_of(height, first_leaf)
    if len(node.entries) != expected:
        raise ManifestError(
            f"{where} lists {len(node.entries)} entries where the file's size "
            f"({shape.size} bytes) allows exactly {expected}"
        )
    if kind == NodeKind.LEAF:
        for index, entry in enumerate(node.entries, first_leaf):
            if entry.stored_size != shape.stored_size_of(index):
                raise ManifestError(
                    f"{where} lists chunk {index} as {entry.plain_size} bytes; a file of "
                    f"{shape.size} bytes in chunks of {shape.chunk_size} makes it "
                    f"{shape.stored_size_of(index) - TAG_SIZE}"
                )


def open_node(node: ManifestNode, key: bytes) -> OpenedNode:
    """Decrypt a node's private part with the key its parent (or token) gave."""
    try:
        plain = decrypt_with_key(
            node.sealed_private, key, node.chunk_id, _MANIFEST_AD + node.public_bytes
        )
    except IntegrityError:
        if node.is_root:
            raise WrongKeyError(
                f"the read key does not open root {node.chunk_id.hex()}: "
                "the reference's key part is wrong",
                node.chunk_id.hex(),
            ) from None
        raise
    count = len(node.entries)
    keys_end = KEY_SIZE * count
    keys = tuple(plain[i : i + KEY_SIZE] for i in range(0, keys_end, KEY_SIZE))
    rest = plain[keys_end:]
    where = f"manifest chunk {node.chunk_id.hex()}"
    if not node.is_root:
        if rest:
            raise ManifestError(f"{where} has {len(rest)} unexpected private bytes")
        return OpenedNode(node, keys, None)
    if len(rest) < _ROOT_META.size:
        raise ManifestError(f"{where} root metadata is truncated")
    assert node.shape is not None  # decode_node gives every root its shape
    mode, plain_sha256, name_len = _ROOT_META.unpack_from(rest, 0)
    name_bytes = rest[_ROOT_META.size :]
    if len(name_bytes) != name_len or name_len > MAX_NAME_BYTES:
        raise ManifestError(f"{where} file name length is inconsistent")
    try:
        name = name_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"{where} file name is not UTF-8") from None
    metadata = FileMetadata(
        name, node.shape.size, mode & 0o7777, node.shape.chunk_size, plain_sha256
    )
    return OpenedNode(node, keys, metadata)
