"""Directory nodes: the sealed, content-addressed listing of one directory. Pure, no I/O.

A directory is a tree of nodes, each a chunk (id = SHA-256 of its stored
bytes) sealed convergently like a manifest node. Leaves (height 0) hold
entries sorted by name (bytewise UTF-8 order); interior nodes hold, per
child node, the first name below it. Layout (integers big-endian)::

    offset     size  field
    0          4     magic b"DHTD" (a file's root manifest starts b"DHTM")
    4          1     format version (1)
    5          1     height: 0 leaf, h > 0 interior over nodes of height h-1
    6          2     flags: bit 0 = root; other bits must be 0
    8          4     n, children that are chunks (at most MAX_NODE_ENTRIES)
    12         36*n  public part: chunk id (32) | stored size (4, 0 = unknown)
    12+36n     4     m, length of the sealed private part
    16+36n     m     sealed private part (AEGIS-256 under the node's own
                     convergent key, associated data b"dhtfs/dir/v1" + bytes
                     0 .. 12+36n); the whole node is at most MAX_NODE_SIZE

    private plaintext, root only first: entries in the directory (8) |
    total size (8), then
    leaf:      count (4), then per entry: kind (1) | mode (2) | mtime ns
               (8, signed) | size (8) | name length (1) | name | body
               kind 0 file and 2 directory: body = key (32) of the next
               public child; 1 inlined file: body = its `size` bytes;
               3 symlink: body = its target, `size` bytes
    interior:  per public child: key (32) | first name length (1) | first name

Why the split: ``check``, ``repair`` and ``pin`` walk a tree with the root
hash alone, so the public part lists exactly what they need, the chunk ids
(and stored sizes) of child roots and child nodes. Everything that says
what the directory *is* is sealed: names (property 2 counts them as
plaintext), keys (they grant reading), symlink targets and inlined bytes
(file content), kinds, modes, mtimes and sizes (private metadata that no
walk needs). The public part still leaks, to anyone holding the root hash:
the tree's shape, how many children of each node are chunks (files and
subdirectories; symlinks and inlined files are not counted), their ids, and
through the sealed part's length roughly how many bytes of names, targets
and inlined files there are. Fetching a child reveals whether it is a file
or a directory (its magic), and a file's manifest its size: the same as
for a lone file. Convergence makes equal directories equal bytes, with the
"confirmation of a file" weakness of crypto.py, answered the same way (a
private convergence secret).

Entries and names a decoder refuses, all with DirectoryError (a
ManifestError); only bytes that do not hash to their id or do not
authenticate raise IntegrityError (WrongKeyError on a root): empty, "." or
"..", containing "/" or NUL, over MAX_NAME_BYTES, not UTF-8, duplicate or
unsorted; an unknown kind; a mode with bits outside 0o777 (setuid, setgid,
sticky, file type): refused rather than stripped, since no honest builder
writes them and a publisher who does is not to be half-trusted; a symlink
target empty, with NUL or over MAX_TARGET_BYTES; inlined bytes over
MAX_INLINE_SIZE; any count or length past the end, and trailing bytes.
Names may hold control characters, as POSIX allows: escaping them on a
terminal is the printer's job.

Splitting a large directory into nodes is dirbuilder.py's job; this module
checks, as a reader descends, what any split must satisfy (``check_child``):
a child begins exactly at its first name and ends before the next sibling's,
its height is one less than its parent's, and it is no root.
"""

from __future__ import annotations

import bisect
import enum
import struct
from dataclasses import dataclass

from dht_dfs.core.crypto import (
    KEY_SIZE,
    TAG_SIZE,
    SealedChunk,
    decrypt_with_key,
    derive_chunk_key,
    encrypt_with_key,
)
from dht_dfs.core.direntry import (
    MAX_INLINE_SIZE,
    MAX_NAME_BYTES,
    MAX_TARGET_BYTES,
    DirEntry,
    DirTotals,
    EntryKind,
    name_problem,
)
from dht_dfs.core.errors import DirectoryError, IntegrityError, ManifestError, WrongKeyError
from dht_dfs.core.ids import ChunkId
from dht_dfs.core.manifest import MAGIC as MANIFEST_MAGIC
from dht_dfs.core.manifest import MAX_STORED_SIZE, ManifestNode, decode_node
from dht_dfs.core.refs import ReadReference

MAGIC = b"DHTD"
FORMAT_VERSION = 1
FLAG_ROOT = 0x0001

MAX_NODE_SIZE = 1 << 20
"""Largest stored directory node a reader accepts; bounds every allocation."""
MAX_NODE_ENTRIES = 1 << 16
MAX_HEIGHT = 16
"""Tallest tree (interior levels above the leaves) a reader follows."""

_HEADER = struct.Struct(">4sBBHI")
_REF = struct.Struct(">32sI")
_LENGTH = struct.Struct(">I")
_TOTALS = struct.Struct(">QQ")
_COUNT = struct.Struct(">I")
_ENTRY = struct.Struct(">BHqQB")
_NAME_LENGTH = struct.Struct(">B")
_DIR_AD = b"dhtfs/dir/v1"
_MIN_NODE_SIZE = _HEADER.size + _LENGTH.size + TAG_SIZE


class _Wire(enum.IntEnum):
    """Kind byte of an entry: an inlined file is a file stored another way."""

    FILE = 0
    INLINE_FILE = 1
    DIRECTORY = 2
    SYMLINK = 3


@dataclass(frozen=True, slots=True)
class EncodedItem:
    """One entry (in a leaf) or one child node (in an interior node), encoded."""

    first_name: bytes
    """The entry's name, or the first name below the child node."""
    public: bytes
    """Its part of the public child list: one chunk id and size, or nothing."""
    private: bytes

    @property
    def size(self) -> int:
        """Bytes it adds to a node's stored size."""
        return len(self.public) + len(self.private)


def encode_entry(entry: DirEntry) -> EncodedItem:
    """A leaf entry's bytes (the entry was checked when it was made)."""
    public = b""
    if entry.reference is not None:
        wire = _Wire.FILE if entry.kind is EntryKind.FILE else _Wire.DIRECTORY
        public = _REF.pack(entry.reference.root.digest, entry.stored_size)
        body = entry.reference.key
    elif entry.inline is not None:
        wire, body = _Wire.INLINE_FILE, entry.inline
    else:
        assert entry.target is not None  # _entry_problem leaves a symlink only
        wire, body = _Wire.SYMLINK, entry.target.encode("utf-8")
    name = entry.name.encode("utf-8")
    head = _ENTRY.pack(wire, entry.mode, entry.mtime_ns, entry.size, len(name))
    return EncodedItem(name, public, head + name + body)


def encode_branch(child: SealedChunk, first_name: bytes) -> EncodedItem:
    """An interior node's record of a child node whose first name is ``first_name``."""
    return EncodedItem(
        first_name,
        _REF.pack(child.chunk_id.digest, len(child.data)),
        child.key + _NAME_LENGTH.pack(len(first_name)) + first_name,
    )


def largest_entry_size(inline_limit: int) -> int:
    """Most bytes one entry can add to a node, with inlined files up to ``inline_limit``."""
    return _ENTRY.size + MAX_NAME_BYTES + max(_REF.size + KEY_SIZE, MAX_TARGET_BYTES, inline_limit)


NODE_OVERHEAD = _HEADER.size + _LENGTH.size + TAG_SIZE + _TOTALS.size + _COUNT.size
"""Most bytes a node has besides its items (a root leaf's)."""


def seal_node(
    height: int, items: list[EncodedItem], totals: DirTotals | None, secret: bytes
) -> SealedChunk:
    """Seal one node of ``height`` over its items; a root (``totals`` given) records them."""
    refs = b"".join(item.public for item in items)
    private = b"" if totals is None else _TOTALS.pack(totals.entry_count, totals.total_size)
    if height == 0:
        private += _COUNT.pack(len(items))
    private += b"".join(item.private for item in items)
    return _seal(height, FLAG_ROOT if totals is not None else 0, refs, private, secret)


def _seal(height: int, flags: int, refs: bytes, private: bytes, secret: bytes) -> SealedChunk:
    """Seal a node from raw parts; the tests seal hostile nodes with it."""
    public = _HEADER.pack(MAGIC, FORMAT_VERSION, height, flags, len(refs) // _REF.size) + refs
    key = derive_chunk_key(public + private, secret)
    sealed = encrypt_with_key(private, key, _DIR_AD + public)
    data = public + _LENGTH.pack(len(sealed)) + sealed
    return SealedChunk(ChunkId.of(data), key, data, len(private))


# --- decoding ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChildRef:
    """A child chunk as the public part lists it: enough to check, repair, pin."""

    chunk_id: ChunkId
    stored_size: int
    """Bytes of the stored child, 0 when the publisher did not know."""


@dataclass(frozen=True, slots=True)
class DirNode:
    """The public view of a directory node: readable without any key."""

    chunk_id: ChunkId
    height: int
    """0 for a leaf (entries), else the height of an interior node (child nodes)."""
    is_root: bool
    children: tuple[ChildRef, ...]
    """Leaf: the roots of its files and subdirectories, in entry order. Interior: child nodes."""
    public_bytes: bytes
    """Header and children, bound to the sealed part as associated data."""
    sealed_private: bytes

    @property
    def is_leaf(self) -> bool:
        return self.height == 0

    @property
    def stored_size(self) -> int:
        return len(self.public_bytes) + _LENGTH.size + len(self.sealed_private)


@dataclass(frozen=True, slots=True)
class Branch:
    """One child of an interior node, opened: where to descend for a name."""

    index: int
    first_name: str
    """The first name below this child."""
    upper_name: str | None
    """The next sibling's first name (every name below is before it); None for the last."""
    reference: ReadReference
    stored_size: int


@dataclass(frozen=True, slots=True)
class OpenedDirNode:
    """A directory node with its sealed part opened."""

    node: DirNode
    entries: tuple[DirEntry, ...]
    """A leaf's entries, sorted; empty for an interior node."""
    branches: tuple[Branch, ...]
    """An interior node's children; empty for a leaf."""
    totals: DirTotals | None
    """Present exactly on the root."""

    @property
    def name_range(self) -> tuple[str, str] | None:
        """First and last name in this node, None for an empty directory."""
        names = [e.name for e in self.entries] or [b.first_name for b in self.branches]
        return (names[0], names[-1]) if names else None


def decode_dir_node(chunk_id: ChunkId, data: bytes) -> DirNode:
    """Check a directory node against its id and parse its public part."""
    where = f"directory node {chunk_id.hex()}"
    if len(data) > MAX_NODE_SIZE:
        raise DirectoryError(f"{where} is {len(data)} bytes, more than {MAX_NODE_SIZE}")
    if not chunk_id.matches(data):
        raise IntegrityError(
            f"{where} is corrupt: its bytes do not hash to its id", chunk_id.hex()
        )  # fmt: skip
    if len(data) < _HEADER.size:
        raise DirectoryError(
            f"{where} is truncated: {len(data)} bytes, header needs {_HEADER.size}"
        )
    magic, version, height, flags, count = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise DirectoryError(f"{where} is not a directory node (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise DirectoryError(
            f"{where} has format version {version}; this dhtfs reads version {FORMAT_VERSION}"
        )
    if flags & ~FLAG_ROOT:
        raise DirectoryError(f"{where} has unknown flags {flags:#06x}")
    if height > MAX_HEIGHT:
        raise DirectoryError(f"{where} has height {height}; readers follow at most {MAX_HEIGHT}")
    if count > MAX_NODE_ENTRIES:
        raise DirectoryError(f"{where} lists {count} children, more than {MAX_NODE_ENTRIES}")
    refs_end = _HEADER.size + count * _REF.size
    if len(data) < refs_end + _LENGTH.size:
        raise DirectoryError(f"{where} is truncated inside its child list")
    if height and not count:
        raise DirectoryError(f"{where} is an interior node with no children")
    children = []
    for offset in range(_HEADER.size, refs_end, _REF.size):
        digest, size = _REF.unpack_from(data, offset)
        # A child node's size is always known to its builder; a leaf's
        # children may have been referenced by token alone (size 0).
        if height:
            possible = _MIN_NODE_SIZE <= size <= MAX_NODE_SIZE
        else:
            possible = size == 0 or _MIN_NODE_SIZE <= size <= MAX_STORED_SIZE
        if not possible:
            raise DirectoryError(f"{where} lists a child of impossible stored size {size}")
        children.append(ChildRef(ChunkId(digest), size))
    (private_len,) = _LENGTH.unpack_from(data, refs_end)
    private_start = refs_end + _LENGTH.size
    if len(data) != private_start + private_len:
        raise DirectoryError(
            f"{where} sealed part is {len(data) - private_start} bytes, header says {private_len}"
        )
    if private_len < TAG_SIZE:
        raise DirectoryError(f"{where} sealed part is shorter than its tag")
    return DirNode(
        chunk_id, height, bool(flags & FLAG_ROOT), tuple(children),
        bytes(data[:refs_end]), bytes(data[private_start:]),
    )  # fmt: skip


class _Reader:
    """A cursor over a sealed plaintext; running past its end is a DirectoryError."""

    __slots__ = ("data", "offset", "where")

    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.offset, self.where = data, 0, where

    def take(self, length: int, what: str) -> bytes:
        if length > len(self.data) - self.offset:
            raise DirectoryError(f"{self.where} is truncated inside {what}")
        self.offset += length
        return self.data[self.offset - length : self.offset]

    def unpack(self, layout: struct.Struct, what: str) -> tuple[int, ...]:
        values: tuple[int, ...] = layout.unpack(self.take(layout.size, what))
        return values

    def name(self, length: int, what: str) -> str:
        raw = self.take(length, what)
        problem = name_problem(raw)
        if problem is not None:
            raise DirectoryError(f"{self.where} has a {what} {raw[:64]!r} that {problem}")
        return raw.decode("utf-8")


def open_dir_node(node: DirNode, key: bytes) -> OpenedDirNode:
    """Decrypt a node's sealed part with the key its parent (or reference) gave."""
    where = f"directory node {node.chunk_id.hex()}"
    try:
        plain = decrypt_with_key(
            node.sealed_private, key, node.chunk_id, _DIR_AD + node.public_bytes
        )
    except IntegrityError:
        if node.is_root:
            raise WrongKeyError(
                f"the read key does not open directory {node.chunk_id.hex()}: "
                "the reference's key part is wrong",
                node.chunk_id.hex(),
            ) from None
        raise
    reader = _Reader(plain, where)
    totals = None
    if node.is_root:
        totals = DirTotals(*reader.unpack(_TOTALS, "its totals"))
    entries: tuple[DirEntry, ...] = ()
    branches: tuple[Branch, ...] = ()
    if node.is_leaf:
        entries = _read_entries(node, reader, where)
        if totals is not None and (
            totals.entry_count != len(entries) or totals.total_size != sum(e.size for e in entries)
        ):
            raise DirectoryError(
                f"{where} declares {totals.entry_count} entries of {totals.total_size} bytes "
                f"but holds {len(entries)} of {sum(e.size for e in entries)}"
            )
    else:
        branches = _read_branches(node, reader)
    if reader.offset != len(plain):
        raise DirectoryError(f"{where} has {len(plain) - reader.offset} trailing sealed bytes")
    return OpenedDirNode(node, entries, branches, totals)


def _read_entries(node: DirNode, reader: _Reader, where: str) -> tuple[DirEntry, ...]:
    (count,) = reader.unpack(_COUNT, "its entry count")
    if count > MAX_NODE_ENTRIES:
        raise DirectoryError(f"{where} holds {count} entries, more than {MAX_NODE_ENTRIES}")
    if not count and not node.is_root:
        raise DirectoryError(f"{where} is a leaf with no entries below a root")
    entries: list[DirEntry] = []
    children = iter(node.children)
    previous = ""
    for _ in range(count):
        wire, mode, mtime_ns, size, name_len = reader.unpack(_ENTRY, "an entry")
        name = reader.name(name_len, "name")
        if entries and name <= previous:
            order = "duplicate" if name == previous else "unsorted"
            raise DirectoryError(f"{where} has a {order} name {name!r} after {previous!r}")
        previous = name
        reference = target = inline = None
        stored_size = 0
        if wire in (_Wire.FILE, _Wire.DIRECTORY):
            key = reader.take(KEY_SIZE, f"the key of {name!r}")
            child = next(children, None)
            if child is None:
                raise DirectoryError(f"{where} has more entries with a child than child ids")
            reference, stored_size = ReadReference(child.chunk_id, key), child.stored_size
        elif wire == _Wire.INLINE_FILE:
            if size > MAX_INLINE_SIZE:
                raise DirectoryError(
                    f"{where} inlines {size} bytes of {name!r}, over {MAX_INLINE_SIZE}"
                )
            inline = reader.take(size, f"the bytes of {name!r}")
        elif wire == _Wire.SYMLINK:
            if size > MAX_TARGET_BYTES:
                raise DirectoryError(
                    f"{where} has a symlink {name!r} of {size} bytes, over {MAX_TARGET_BYTES}"
                )
            raw = reader.take(size, f"the target of {name!r}")
            try:
                target = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DirectoryError(
                    f"{where} has a symlink {name!r} target that is not UTF-8"
                ) from None
        else:
            raise DirectoryError(f"{where} has an entry {name!r} of unknown kind {wire}")
        kind = {
            _Wire.FILE: EntryKind.FILE, _Wire.INLINE_FILE: EntryKind.FILE,
            _Wire.DIRECTORY: EntryKind.DIRECTORY, _Wire.SYMLINK: EntryKind.SYMLINK,
        }[_Wire(wire)]  # fmt: skip
        try:
            entries.append(
                DirEntry(name, kind, size, mode, mtime_ns, reference, stored_size, target, inline)
            )
        except ValueError as error:
            # The builder's own rules (modes, targets...), said of this node.
            raise DirectoryError(f"{where}: {error}") from None
    if next(children, None) is not None:
        raise DirectoryError(f"{where} lists more child ids than entries with a child")
    return tuple(entries)


def _read_branches(node: DirNode, reader: _Reader) -> tuple[Branch, ...]:
    keyed: list[tuple[bytes, str]] = []
    for child in node.children:
        key = reader.take(KEY_SIZE, f"the key of child {child.chunk_id.hex()}")
        (name_len,) = reader.unpack(_NAME_LENGTH, "a child's first name")
        name = reader.name(name_len, "first name")
        if keyed and name <= keyed[-1][1]:
            raise DirectoryError(
                f"{reader.where} has child ranges out of order: {name!r} after {keyed[-1][1]!r}"
            )
        keyed.append((key, name))
    names = [name for _, name in keyed] + [None]
    return tuple(
        Branch(index, name, names[index + 1], ReadReference(child.chunk_id, key), child.stored_size)
        for index, (child, (key, name)) in enumerate(zip(node.children, keyed, strict=True))
    )


# --- walking ------------------------------------------------------------------------


def check_child(parent: OpenedDirNode, branch: Branch, child: OpenedDirNode) -> None:
    """Check that a child node is what its parent's branch says; before reading below it.

    The branch's range and the child's height bound what a hostile tree can
    do: siblings never overlap, names stay sorted across nodes, and depth is
    the root's height. Raises DirectoryError naming the child.
    """
    where = f"directory node {child.node.chunk_id.hex()}"
    if child.node.chunk_id != branch.reference.root:
        raise ValueError("this child is not the node the branch names")
    if child.node.is_root:
        raise DirectoryError(f"{where} is a root inside a directory tree")
    if child.node.height != parent.node.height - 1:
        raise DirectoryError(
            f"{where} has height {child.node.height} below a node of height {parent.node.height}"
        )
    # Valid names compare as str exactly as their UTF-8 bytes do (UTF-8
    # keeps code point order), so str comparison is the format's order.
    first, last = child.name_range or ("", "")
    if first != branch.first_name:
        raise DirectoryError(f"{where} begins at {first!r}; its parent says {branch.first_name!r}")
    if branch.upper_name is not None and last >= branch.upper_name:
        raise DirectoryError(
            f"{where} reaches {last!r}, into its next sibling's range from {branch.upper_name!r}"
        )


def child_for(opened: OpenedDirNode, name: str) -> Branch | None:
    """The child of an interior node whose range holds ``name``; None if before them all."""
    if opened.node.is_leaf:
        raise ValueError("a leaf has no children to descend into; use find_entry")
    index = bisect.bisect_right(opened.branches, name, key=lambda branch: branch.first_name)
    return opened.branches[index - 1] if index else None


def find_entry(opened: OpenedDirNode, name: str) -> DirEntry | None:
    """The entry of a leaf with this name, or None."""
    if not opened.node.is_leaf:
        raise ValueError("an interior node holds no entries; use child_for")
    index = bisect.bisect_left(opened.entries, name, key=lambda entry: entry.name)
    if index < len(opened.entries) and opened.entries[index].name == name:
        return opened.entries[index]
    return None


def is_directory_root(data: bytes) -> bool:
    """Whether stored bytes claim to be a directory's root (decode to be sure)."""
    if len(data) < _HEADER.size or data[:4] != MAGIC:
        return False
    return bool(_HEADER.unpack_from(data, 0)[3] & FLAG_ROOT)


def decode_root(chunk_id: ChunkId, data: bytes) -> ManifestNode | DirNode:
    """Decode what a read reference points at: a file's root manifest or a directory's root."""
    if data[:4] == MAGIC:
        node = decode_dir_node(chunk_id, data)
        if not node.is_root:
            raise DirectoryError(f"directory node {chunk_id.hex()} is not the root of a directory")
        return node
    if data[:4] == MANIFEST_MAGIC:
        manifest = decode_node(chunk_id, data)
        if not manifest.is_root:
            raise ManifestError(f"manifest chunk {chunk_id.hex()} is not the root of a file")
        return manifest
    if not chunk_id.matches(data):
        raise IntegrityError(
            f"chunk {chunk_id.hex()} is corrupt: its bytes do not hash to its id", chunk_id.hex()
        )
    raise ManifestError(f"chunk {chunk_id.hex()} is neither a file manifest nor a directory")
