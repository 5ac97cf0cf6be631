"""Directory nodes: round trips, splitting, dedup, and every hostile node refused.

Hostile nodes are sealed by hand (``seal_raw``) from bytes written after
the layout in dirnode.py's docstring, so these tests also check that the
documented layout is the real one.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dht_dfs.core.crypto import SealedChunk
from dht_dfs.core.dirbuilder import DEFAULT_MAX_NODE_BYTES, DirectoryBuilder
from dht_dfs.core.direntry import (
    MAX_INLINE_SIZE,
    MAX_NAME_BYTES,
    MAX_TARGET_BYTES,
    BuiltDirectory,
    DirEntry,
    EntryKind,
)
from dht_dfs.core.dirnode import (
    MAX_HEIGHT,
    MAX_NODE_SIZE,
    OpenedDirNode,
    _seal,
    check_child,
    child_for,
    decode_dir_node,
    decode_root,
    find_entry,
    is_directory_root,
    open_dir_node,
)
from dht_dfs.core.errors import DirectoryError, IntegrityError, ManifestError, WrongKeyError
from dht_dfs.core.ids import ChunkId
from dht_dfs.core.manifest import FileMetadata, ManifestBuilder, ManifestNode
from dht_dfs.core.refs import ReadReference

FILE_REF = ReadReference(ChunkId(bytes(range(32))), bytes(range(32, 64)))
"""A file root that need not exist: the codec never follows references."""


# --- helpers ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tree:
    store: dict[ChunkId, bytes]
    built: BuiltDirectory
    nodes: int
    """Nodes sealed, counting repeats (equal nodes are stored once)."""
    returned_by_finish: int


def build(entries: list[DirEntry], **options: int) -> Tree:
    builder = DirectoryBuilder(b"", **options)
    store: dict[ChunkId, bytes] = {}
    sealed = 0
    for entry in entries:
        for chunk in builder.add(entry):
            store[chunk.chunk_id] = chunk.data
            sealed += 1
    tail, built = builder.finish()
    for chunk in tail:
        store[chunk.chunk_id] = chunk.data
    assert tail[-1].chunk_id == built.reference.root
    return Tree(store, built, sealed + len(tail), len(tail))


def open_stored(store: dict[ChunkId, bytes], reference: ReadReference) -> OpenedDirNode:
    return open_dir_node(decode_dir_node(reference.root, store[reference.root]), reference.key)


def lookup(tree: Tree, name: str) -> tuple[DirEntry | None, int]:
    """Find a name the way a reader will; returns the entry and the nodes read."""
    node = open_stored(tree.store, tree.built.reference)
    reads = 1
    while not node.node.is_leaf:
        branch = child_for(node, name)
        if branch is None:
            return None, reads
        child = open_stored(tree.store, branch.reference)
        reads += 1
        check_child(node, branch, child)
        node = child
    return find_entry(node, name), reads


def walk(tree: Tree) -> Iterator[DirEntry]:
    """Every entry in order, checking every branch on the way."""

    def below(node: OpenedDirNode) -> Iterator[DirEntry]:
        yield from node.entries
        for branch in node.branches:
            child = open_stored(tree.store, branch.reference)
            check_child(node, branch, child)
            yield from below(child)

    yield from below(open_stored(tree.store, tree.built.reference))


def file_entries(count: int, *, mtime_ns: int = 0) -> list[DirEntry]:
    return [
        DirEntry.file(f"file-{i:06d}.txt", FILE_REF, i, 100, mtime_ns=mtime_ns)
        for i in range(count)
    ]


ENTRY = struct.Struct(">BHqQB")


def raw_entry(
    kind: int, name: bytes, body: bytes, *, size: int | None = None, mode: int = 0o644
) -> bytes:
    """One leaf entry in the documented layout; ``size`` defaults to the body's length."""
    declared = len(body) if size is None else size
    return ENTRY.pack(kind, mode, 0, declared, len(name)) + name + body


def seal_raw(
    private: bytes,
    *,
    refs: list[tuple[ChunkId, int]] | None = None,
    height: int = 0,
    flags: int = 1,
) -> SealedChunk:
    packed = b"".join(chunk_id.digest + size.to_bytes(4, "big") for chunk_id, size in refs or [])
    return _seal(height, flags, packed, private, b"")


def root_leaf(entries: list[bytes]) -> bytes:
    """A root leaf's private plaintext, with the totals its entries make."""
    total = sum(ENTRY.unpack_from(entry)[3] for entry in entries)
    return struct.pack(">QQI", len(entries), total, len(entries)) + b"".join(entries)


def open_raw(chunk: SealedChunk) -> OpenedDirNode:
    return open_dir_node(decode_dir_node(chunk.chunk_id, chunk.data), chunk.key)


KEY = bytes(32)
CHILD = (ChunkId(bytes(32)), 100)


# --- round trips ------------------------------------------------------------------


def test_every_kind_of_entry_round_trips_in_one_node() -> None:
    sub = build([DirEntry.inline_file("a", b"x")]).built
    entries = [
        DirEntry.file("big.bin", FILE_REF, 10_000_000, 1234, mode=0o600, mtime_ns=-5),
        DirEntry.directory("photos", sub, mode=0o750, mtime_ns=1_700_000_000_123_456_789),
        DirEntry.inline_file("résumé.txt", b"hello\n", mode=0o640, mtime_ns=7),
        DirEntry.symlink("up", "../elsewhere/../x"),
    ]
    tree = build(entries)
    assert tree.nodes == 1
    root = open_stored(tree.store, tree.built.reference)
    assert root.entries == tuple(entries)
    assert root.totals == tree.built.totals
    assert tree.built.totals.entry_count == 4
    assert tree.built.totals.total_size == 10_000_000 + 1 + 6 + len("../elsewhere/../x")
    assert [c.chunk_id for c in root.node.children] == [FILE_REF.root, sub.reference.root]
    assert [c.stored_size for c in root.node.children] == [1234, sub.stored_size]
    assert tree.built.stored_size == len(tree.store[tree.built.reference.root])


def test_an_empty_directory_is_one_root_leaf() -> None:
    tree = build([])
    root = open_stored(tree.store, tree.built.reference)
    assert root.node.is_root and root.node.is_leaf
    assert root.entries == () and root.node.children == ()
    assert root.name_range is None
    assert find_entry(root, "x") is None


@pytest.fixture(scope="module")
def deep_tree() -> Tree:
    """100k entries under small nodes, for a tree several levels tall."""
    return build(file_entries(100_000), max_node_entries=64)


@pytest.fixture(scope="module")
def default_tree() -> Tree:
    return build(file_entries(100_000))


@pytest.mark.parametrize("tree_name", ["deep_tree", "default_tree"])
def test_100k_entries_stream_into_bounded_nodes(
    tree_name: str, request: pytest.FixtureRequest
) -> None:
    tree: Tree = request.getfixturevalue(tree_name)
    limit = 64 if tree_name == "deep_tree" else 2048
    root = open_stored(tree.store, tree.built.reference)
    height = root.node.height
    assert len(tree.store) == tree.nodes  # 100k distinct names: no two nodes alike
    for chunk_id, data in tree.store.items():
        node = decode_dir_node(chunk_id, data)
        assert len(data) <= DEFAULT_MAX_NODE_BYTES
        assert len(node.children) <= limit
    # Streaming: finish had only the open node of each level left to seal
    # (closing one may close a full one above it: two per level at most).
    assert tree.returned_by_finish <= 2 * height + 1
    assert [e.name for e in walk(tree)] == [f"file-{i:06d}.txt" for i in range(100_000)]
    if tree_name == "deep_tree":
        assert height >= 3


@pytest.mark.parametrize("tree_name", ["deep_tree", "default_tree"])
def test_lookup_reads_one_node_per_level(tree_name: str, request: pytest.FixtureRequest) -> None:
    tree: Tree = request.getfixturevalue(tree_name)
    height = open_stored(tree.store, tree.built.reference).node.height
    rng = random.Random(7)
    for index in rng.sample(range(100_000), 200):
        entry, reads = lookup(tree, f"file-{index:06d}.txt")
        assert entry is not None and entry.size == index
        assert reads == height + 1
    for missing in ["a", "file-050000.txu", "file-999999.txt", "zzz"]:
        entry, reads = lookup(tree, missing)
        assert entry is None and reads <= height + 1


def test_the_same_entries_give_the_same_root() -> None:
    entries = file_entries(3000)
    first = build(entries, max_node_entries=64)
    again = build(list(entries), max_node_entries=64)
    assert again.built == first.built
    assert build(entries, max_node_entries=64).store.keys() == first.store.keys()


def test_a_private_secret_gives_another_root() -> None:
    entries = file_entries(10)
    public = build(entries).built.reference.root
    builder = DirectoryBuilder(os.urandom(32))
    for entry in entries:
        builder.add(entry)
    assert builder.finish()[1].reference.root != public


def changed_nodes(before: Tree, after: Tree) -> int:
    return len(after.store.keys() - before.store.keys())


def test_one_changed_entry_changes_only_its_path(deep_tree: Tree) -> None:
    height = open_stored(deep_tree.store, deep_tree.built.reference).node.height
    entries = file_entries(100_000)
    entries[54_321] = DirEntry.file("file-054321.txt", FILE_REF, 54_321, 100, mtime_ns=1)
    changed = build(entries, max_node_entries=64)
    assert changed_nodes(deep_tree, changed) == height + 1


@pytest.mark.parametrize("edit", ["insert", "delete"])
def test_an_inserted_or_deleted_name_changes_few_nodes(deep_tree: Tree, edit: str) -> None:
    # Content-defined boundaries: nodes after the edit keep their bytes.
    height = open_stored(deep_tree.store, deep_tree.built.reference).node.height
    entries = file_entries(100_000)
    if edit == "insert":
        entries.insert(50_001, DirEntry.file("file-050000a.txt", FILE_REF, 1, 100))
    else:
        del entries[50_000]
    edited = build(entries, max_node_entries=64)
    assert changed_nodes(deep_tree, edited) <= 2 * (height + 1)


def test_node_bytes_bound_splits_nodes_of_large_entries() -> None:
    # 300 inlined files of 4 KiB cannot share one 512 KiB node.
    entries = [DirEntry.inline_file(f"n{i:04d}", os.urandom(4096)) for i in range(300)]
    tree = build(entries)
    assert len(tree.store) > 2
    assert all(len(data) <= DEFAULT_MAX_NODE_BYTES for data in tree.store.values())
    assert [e.inline for e in walk(tree)] == [e.inline for e in entries]


def test_inline_threshold_is_the_builders() -> None:
    builder = DirectoryBuilder(b"", inline_limit=4096)
    builder.add(DirEntry.inline_file("a", bytes(4096)))
    with pytest.raises(ValueError, match="more than this builder's inline_limit of 4096"):
        builder.add(DirEntry.inline_file("b", bytes(4097)))
    with pytest.raises(ValueError, match=f"more than {MAX_INLINE_SIZE}"):
        DirEntry.inline_file("c", bytes(MAX_INLINE_SIZE + 1))
    with pytest.raises(ValueError, match="inline_limit must be"):
        DirectoryBuilder(inline_limit=MAX_INLINE_SIZE + 1)


def test_the_stored_bytes_hold_no_name_key_target_or_inlined_byte() -> None:
    secret_names = [f"secret-{i:04d}-{os.urandom(6).hex()}" for i in range(2000)]
    keys = [os.urandom(32) for _ in secret_names]
    entries = [
        DirEntry.file(name, ReadReference(ChunkId(os.urandom(32)), key), 1, 100)
        for name, key in zip(sorted(secret_names), keys, strict=True)
    ]
    entries.append(DirEntry.symlink("zz-link", "target-" + os.urandom(8).hex()))
    entries.append(DirEntry.inline_file("zz-small", b"inline-" + os.urandom(8)))
    tree = build(entries, max_node_entries=64)
    assert len(tree.store) > 10
    stored = b"|".join(tree.store.values())
    for entry in entries:
        assert entry.name.encode() not in stored
    assert not any(key in stored for key in keys)
    assert entries[-2].target is not None and entries[-2].target.encode() not in stored
    assert entries[-1].inline is not None and entries[-1].inline not in stored
    # The public part alone lists every file's root, for check and repair.
    listed = set()
    for chunk_id, data in tree.store.items():
        node = decode_dir_node(chunk_id, data)
        if node.is_leaf:
            listed.update(child.chunk_id for child in node.children)
    assert listed == {e.reference.root for e in entries if e.reference is not None}


# --- references: a directory root or a file root -------------------------------------


def test_a_reference_tells_a_directory_from_a_file_by_its_first_bytes() -> None:
    manifest = ManifestBuilder(b"", 4)
    (file_root,), _ = manifest.finish(FileMetadata("f", 0, 0o644, 4096, bytes(32)))
    tree = build(file_entries(200), max_node_entries=8)
    dir_root = tree.store[tree.built.reference.root]
    assert is_directory_root(dir_root) and not is_directory_root(file_root.data)
    assert isinstance(decode_root(file_root.chunk_id, file_root.data), ManifestNode)
    assert decode_root(tree.built.reference.root, dir_root).is_root
    inner = next(c for c in tree.store if c != tree.built.reference.root)
    assert not is_directory_root(tree.store[inner])
    with pytest.raises(DirectoryError, match="is not the root of a directory"):
        decode_root(inner, tree.store[inner])
    junk = b"JUNK" + bytes(60)
    with pytest.raises(ManifestError, match="neither a file manifest nor a directory"):
        decode_root(ChunkId.of(junk), junk)
    with pytest.raises(IntegrityError, match="do not hash"):
        decode_root(ChunkId(bytes(32)), junk)


def test_wrong_key_on_a_root_is_a_wrong_key_error() -> None:
    tree = build(file_entries(3))
    node = decode_dir_node(tree.built.reference.root, tree.store[tree.built.reference.root])
    with pytest.raises(WrongKeyError, match="read key does not open directory"):
        open_dir_node(node, os.urandom(32))


def test_bytes_that_do_not_hash_to_their_id_are_an_integrity_error() -> None:
    tree = build(file_entries(3))
    data = bytearray(tree.store[tree.built.reference.root])
    data[-1] ^= 1
    with pytest.raises(IntegrityError, match=tree.built.reference.root.hex()):
        decode_dir_node(tree.built.reference.root, bytes(data))


# --- the builder refuses misuse ---------------------------------------------------------


def test_the_builder_wants_sorted_unique_names() -> None:
    builder = DirectoryBuilder()
    builder.add(DirEntry.inline_file("b", b""))
    for name in ["b", "a"]:
        with pytest.raises(ValueError, match="does not sort after"):
            builder.add(DirEntry.inline_file(name, b""))
    builder.finish()
    with pytest.raises(RuntimeError):
        builder.add(DirEntry.inline_file("c", b""))
    with pytest.raises(RuntimeError):
        builder.finish()


def test_names_sort_by_their_utf8_bytes() -> None:
    # U+FF5E sorts after U+E000 and both after ASCII, as their UTF-8 bytes do.
    names = sorted(["~", "a", "\ue000", "\uff5e", "\U0001f600", "Z"], key=str.encode)
    tree = build([DirEntry.inline_file(n, b"") for n in names], max_node_entries=8)
    assert [e.name for e in walk(tree)] == names


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_node_entries": 7}, "max_node_entries"),
        ({"max_node_bytes": 4096}, "max_node_bytes"),
        ({"max_node_bytes": MAX_NODE_SIZE + 1}, "max_node_bytes"),
    ],
)
def test_builder_options_are_checked(options: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DirectoryBuilder(b"", **options)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DirEntry.inline_file("", b""), "name is empty"),
        (lambda: DirEntry.inline_file(".", b""), "path step"),
        (lambda: DirEntry.inline_file("..", b""), "path step"),
        (lambda: DirEntry.inline_file("a/b", b""), "contains '/'"),
        (lambda: DirEntry.inline_file("a\0b", b""), "contains NUL"),
        (lambda: DirEntry.inline_file("x" * 256, b""), "more than 255"),
        (lambda: DirEntry.inline_file("bad\udcff", b""), "not UTF-8"),
        (lambda: DirEntry.inline_file("s", b"", mode=0o4755), "only permission bits"),
        (lambda: DirEntry.inline_file("s", b"", mode=0o1777), "only permission bits"),
        (lambda: DirEntry.inline_file("s", b"", mode=0o100644), "only permission bits"),
        (lambda: DirEntry.symlink("l", ""), "symlink target of 0 bytes"),
        (lambda: DirEntry.symlink("l", "a\0b"), "containing NUL"),
        (lambda: DirEntry.symlink("l", "x" * 4096), "symlink target of 4096 bytes"),
        (lambda: DirEntry("f", EntryKind.FILE, 1, 0o644, 0), "either a reference or inlined"),
        (lambda: DirEntry("d", EntryKind.DIRECTORY, 0, 0o755, 0, inline=b""), "a directory"),
        (lambda: DirEntry("f", EntryKind.FILE, 2, 0o644, 0, inline=b"x"), "size of 2"),
        (lambda: DirEntry("f", EntryKind.FILE, 1, 0o644, 1 << 63, FILE_REF), "mtime"),
    ],
)
def test_an_entry_no_reader_would_accept_cannot_be_made(make, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        make()


# --- hostile nodes: every one refused with DirectoryError -----------------------------------

INLINE = 1
SYMLINK = 3

HOSTILE_LEAVES = {
    "duplicate name": [raw_entry(INLINE, b"a", b""), raw_entry(INLINE, b"a", b"")],
    "unsorted names": [raw_entry(INLINE, b"b", b""), raw_entry(INLINE, b"a", b"")],
    "empty name": [raw_entry(INLINE, b"", b"")],
    "dot": [raw_entry(INLINE, b".", b"")],
    "dot dot": [raw_entry(INLINE, b"..", b"")],
    "slash": [raw_entry(INLINE, b"../../etc/passwd", b"")],
    "nul": [raw_entry(INLINE, b"a\0", b"")],
    "not utf-8": [raw_entry(INLINE, b"\xff\xfe", b"")],
    "surrogate in utf-8": [raw_entry(INLINE, b"\xed\xb3\xbf", b"")],
    "unknown kind": [raw_entry(9, b"a", b"")],
    "setuid": [raw_entry(INLINE, b"a", b"", mode=0o4755)],
    "sticky": [raw_entry(INLINE, b"a", b"", mode=0o1777)],
    "file type bits": [raw_entry(INLINE, b"a", b"", mode=0o120777)],
    "symlink with nul": [raw_entry(SYMLINK, b"a", b"/etc\0")],
    "empty symlink": [raw_entry(SYMLINK, b"a", b"")],
    "symlink over limit": [raw_entry(SYMLINK, b"a", b"x" * (MAX_TARGET_BYTES + 1))],
    "symlink not utf-8": [raw_entry(SYMLINK, b"a", b"\xff")],
    "inline over limit": [raw_entry(INLINE, b"a", bytes(MAX_INLINE_SIZE + 1))],
    "size past the end": [raw_entry(INLINE, b"a", b"xy", size=3)],
    "name past the end": [ENTRY.pack(INLINE, 0o644, 0, 0, 200) + b"short"],
    "reference without child id": [raw_entry(0, b"a", KEY)],
}
HOSTILE_MESSAGES = {
    "duplicate name": "duplicate name 'a'",
    "unsorted names": "unsorted name 'a' after 'b'",
    "empty name": "is empty",
    "dot": "path step",
    "dot dot": "path step",
    "slash": "contains '/'",
    "nul": "contains NUL",
    "not utf-8": "is not UTF-8",
    "surrogate in utf-8": "is not UTF-8",
    "unknown kind": "unknown kind 9",
    "setuid": "mode 0o4755: only permission bits",
    "sticky": "mode 0o1777: only permission bits",
    "file type bits": "mode 0o120777: only permission bits",
    "symlink with nul": "containing NUL",
    "empty symlink": "symlink target of 0 bytes",
    "symlink over limit": f"over {MAX_TARGET_BYTES}",
    "symlink not utf-8": "target that is not UTF-8",
    "inline over limit": f"over {MAX_INLINE_SIZE}",
    "size past the end": "truncated inside the bytes of 'a'",
    "name past the end": "truncated inside name",
    "reference without child id": "more entries with a child than child ids",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LEAVES))
def test_a_hostile_leaf_is_refused(case: str) -> None:
    chunk = seal_raw(root_leaf(HOSTILE_LEAVES[case]))
    with pytest.raises(DirectoryError, match=HOSTILE_MESSAGES[case]):
        open_raw(chunk)


def test_a_name_over_the_limit_is_refused() -> None:
    # A name length byte cannot say more than 255: the longest name readable
    # is MAX_NAME_BYTES, and both sides agree on it.
    assert MAX_NAME_BYTES == 255
    chunk = seal_raw(root_leaf([raw_entry(INLINE, b"x" * 255, b"")]))
    assert open_raw(chunk).entries[0].name == "x" * 255


@pytest.mark.parametrize(
    ("private", "refs", "message"),
    [
        (root_leaf([]), [CHILD], "more child ids than entries"),
        (struct.pack(">QQI", 0, 0, 70_000), None, "70000 entries, more than 65536"),
        (struct.pack(">QQI", 0, 0, 2) + raw_entry(INLINE, b"a", b""), None, "truncated"),
        (root_leaf([]) + b"\0", None, "1 trailing sealed bytes"),
        (b"\0" * 10, None, "truncated inside its totals"),
        (struct.pack(">QQI", 5, 0, 0), None, "declares 5 entries of 0 bytes but holds 0"),
        (struct.pack(">QQI", 1, 9, 1) + raw_entry(INLINE, b"a", b"x"), None, "of 9 bytes"),
    ],
)
def test_hostile_counts_and_lengths_are_refused(
    private: bytes, refs: list[tuple[ChunkId, int]] | None, message: str
) -> None:
    with pytest.raises(DirectoryError, match=message):
        open_raw(seal_raw(private, refs=refs))


def test_a_non_root_leaf_without_entries_is_refused() -> None:
    with pytest.raises(DirectoryError, match="leaf with no entries below a root"):
        open_raw(seal_raw(struct.pack(">I", 0), flags=0))


def branch(name: bytes) -> bytes:
    return KEY + bytes([len(name)]) + name


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([b"b", b"a"], "out of order: 'a' after 'b'"),
        ([b"a", b"a"], "out of order"),
        ([b"a", b"b/c"], "contains '/'"),
        ([b"a", b""], "is empty"),
    ],
)
def test_interior_ranges_must_be_sorted_and_valid(names: list[bytes], message: str) -> None:
    private = struct.pack(">QQ", 0, 0) + b"".join(branch(n) for n in names)
    chunk = seal_raw(private, refs=[CHILD] * len(names), height=1)
    with pytest.raises(DirectoryError, match=message):
        open_raw(chunk)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: d[:5], "truncated: 5 bytes"),
        (lambda d: b"DHTX" + d[4:], "bad magic"),
        (lambda d: d[:4] + b"\x02" + d[5:], "format version 2"),
        (lambda d: d[:5] + bytes([MAX_HEIGHT + 1]) + d[6:], "height 17; readers follow at most 16"),
        (lambda d: d[:6] + b"\x80\x01" + d[8:], "unknown flags"),
        (lambda d: d[:8] + (1 << 20).to_bytes(4, "big") + d[12:], "more than 65536"),
        (lambda d: d[:8] + (1000).to_bytes(4, "big") + d[12:], "truncated inside its child list"),
        (lambda d: d + b"\0", "sealed part is"),
        (lambda d: d[:5] + b"\x01" + d[6:8] + bytes(4) + d[12:], "interior node with no children"),
        (lambda d: d[:44] + (7).to_bytes(4, "big") + d[48:], "impossible stored size 7"),
        (lambda d: d[:48] + (4).to_bytes(4, "big") + bytes(4), "shorter than its tag"),
        (lambda d: d + bytes(MAX_NODE_SIZE), "more than 1048576"),
    ],
)
def test_a_malformed_public_part_is_refused(mangle, message) -> None:  # type: ignore[no-untyped-def]
    tree = build([DirEntry.file("a", FILE_REF, 1, 100)])
    data = mangle(tree.store[tree.built.reference.root])
    with pytest.raises(DirectoryError, match=message):
        decode_dir_node(ChunkId.of(data), data)


def hostile_tree(children: list[tuple[bytes, SealedChunk]], height: int = 1) -> OpenedDirNode:
    """A root of ``height`` over hand-made children, each with the first name given."""
    private = struct.pack(">QQ", 0, 0) + b"".join(
        chunk.key + bytes([len(name)]) + name for name, chunk in children
    )
    refs = [(chunk.chunk_id, len(chunk.data)) for _, chunk in children]
    return open_raw(seal_raw(private, refs=refs, height=height))


def leaf(*names: bytes, flags: int = 0) -> SealedChunk:
    entries = [raw_entry(INLINE, name, b"") for name in names]
    if flags:
        return seal_raw(root_leaf(entries), flags=flags)
    return seal_raw(struct.pack(">I", len(entries)) + b"".join(entries), flags=flags)


@pytest.mark.parametrize(
    ("children", "message"),
    [
        ([(b"a", leaf(b"a", b"m")), (b"k", leaf(b"k", b"z"))], "reaches 'm', into its next"),
        ([(b"a", leaf(b"b")), (b"k", leaf(b"k"))], "begins at 'b'; its parent says 'a'"),
        ([(b"a", leaf(b"a", flags=1)), (b"k", leaf(b"k"))], "is a root inside a directory"),
    ],
)
def test_overlapping_or_misplaced_children_are_refused(
    children: list[tuple[bytes, SealedChunk]], message: str
) -> None:
    parent = hostile_tree(children)
    with pytest.raises(DirectoryError, match=message):
        for branch_, (_, chunk) in zip(parent.branches, children, strict=True):
            check_child(parent, branch_, open_raw(chunk))


def test_a_child_of_the_wrong_height_is_refused() -> None:
    # A root claiming height 2 over leaves: depth is fixed by the root.
    parent = hostile_tree([(b"a", leaf(b"a")), (b"k", leaf(b"k"))], height=2)
    with pytest.raises(DirectoryError, match="height 0 below a node of height 2"):
        check_child(parent, parent.branches[0], open_raw(leaf(b"a")))


# --- truncation, trailing bytes, fuzz ---------------------------------------------------


def sample_root() -> tuple[SealedChunk, bytes]:
    """A root leaf with every kind of entry, and its private plaintext."""
    sub = build([DirEntry.inline_file("a", b"x")]).built
    entries = [
        raw_entry(0, b"f", KEY),
        raw_entry(1, b"i", b"abc"),
        raw_entry(2, b"s", KEY),
        raw_entry(3, b"t", b"../x"),
    ]
    private = root_leaf(entries)
    refs = [(FILE_REF.root, 100), (sub.reference.root, sub.stored_size)]
    return seal_raw(private, refs=refs), private


def test_the_sample_root_is_valid() -> None:
    chunk, _ = sample_root()
    kinds = [e.kind for e in open_raw(chunk).entries]
    assert kinds == [EntryKind.FILE, EntryKind.FILE, EntryKind.DIRECTORY, EntryKind.SYMLINK]


def test_stored_bytes_truncated_anywhere_or_extended_are_refused() -> None:
    chunk, _ = sample_root()
    for end in range(len(chunk.data)):
        data = chunk.data[:end]
        with pytest.raises(DirectoryError):
            decode_dir_node(ChunkId.of(data), data)
    for extra in (b"\0", b"\0" * 100):
        data = chunk.data + extra
        with pytest.raises(DirectoryError, match="sealed part is"):
            decode_dir_node(ChunkId.of(data), data)


def test_sealed_plaintext_truncated_anywhere_or_extended_is_refused() -> None:
    # The AEAD hides truncation from the public part; the sealed reader
    # must catch it on its own, at every byte.
    chunk, private = sample_root()
    refs = [
        (c.chunk_id, c.stored_size) for c in decode_dir_node(chunk.chunk_id, chunk.data).children
    ]
    for end in range(len(private)):
        with pytest.raises(DirectoryError):
            open_raw(seal_raw(private[:end], refs=refs))
    with pytest.raises(DirectoryError, match="trailing sealed bytes"):
        open_raw(seal_raw(private + b"\0", refs=refs))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_decode_or_raise_directory_error(data: bytes) -> None:
    try:
        node = decode_dir_node(ChunkId.of(data), data)
    except DirectoryError:
        return
    assert node.stored_size == len(data) <= MAX_NODE_SIZE


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.sampled_from([0, 1, 2]), st.booleans())
def test_any_sealed_plaintext_opens_or_raises_directory_error(
    private: bytes, ref_count: int, is_root: bool
) -> None:
    """The AEAD authenticates the publisher, not their honesty: feed the
    sealed reader anything a publisher could seal."""
    chunk = seal_raw(private, refs=[CHILD] * ref_count, flags=int(is_root))
    try:
        opened = open_raw(chunk)
    except DirectoryError:
        return
    names = [e.name.encode() for e in opened.entries]
    assert names == sorted(set(names))
    assert all(e.mode & ~0o777 == 0 for e in opened.entries)


@given(st.data())
def test_a_mutated_root_decodes_or_raises_the_modules_errors(data: st.DataObject) -> None:
    chunk, _ = sample_root()
    raw = bytearray(chunk.data)
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] = data.draw(st.integers(0, 255))
    mutated = bytes(raw[: data.draw(st.integers(0, len(raw)))])
    try:
        opened = open_dir_node(decode_dir_node(ChunkId.of(mutated), mutated), chunk.key)
    except (DirectoryError, IntegrityError):
        return
    assert len(opened.entries) == 4
