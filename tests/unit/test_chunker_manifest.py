"""Chunker spans and manifest codecs, with hypothesis."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dht_dfs.core.chunker import chunk_count, chunk_spans
from dht_dfs.core.crypto import TAG_SIZE, SealedChunk, seal_chunk
from dht_dfs.core.errors import ChunkNotFoundError, IntegrityError, ManifestError, WrongKeyError
from dht_dfs.core.ids import ChunkId
from dht_dfs.core.manifest import (
    MAX_ENTRIES,
    MAX_STORED_SIZE,
    FileMetadata,
    ManifestBuilder,
    NodeKind,
    decode_node,
    open_node,
)
from dht_dfs.core.refs import ReadReference
from dht_dfs.transfer.walk import LeafChunk, open_root, walk_leaves, walk_public


@given(st.integers(0, 10_000), st.integers(1, 700))
def test_spans_tile_the_file(size: int, chunk_size: int) -> None:
    spans = list(chunk_spans(size, chunk_size))
    assert len(spans) == chunk_count(size, chunk_size)
    position = 0
    for index, span in enumerate(spans):
        assert span.index == index
        assert span.offset == position
        assert 1 <= span.length <= chunk_size
        if index < len(spans) - 1:
            assert span.length == chunk_size
        position += span.length
    assert position == size


class MemorySource:
    def __init__(self, chunks: dict[ChunkId, bytes]) -> None:
        self.chunks = chunks

    async def fetch(self, chunk_id: ChunkId, size_hint: int | None, consume):  # type: ignore[no-untyped-def]
        try:
            return consume(self.chunks[chunk_id])
        except KeyError:
            raise ChunkNotFoundError(f"missing {chunk_id.hex()}") from None

    async def prefetch(self, chunk_ids: object) -> None:
        return None


def fake_chunk(i: int) -> SealedChunk:
    data = i.to_bytes(4, "big") * 10 + bytes(TAG_SIZE)
    return SealedChunk(ChunkId.of(data), os.urandom(32), data, len(data) - TAG_SIZE)


FAKE_CHUNK = 40
"""Plaintext bytes of every ``fake_chunk``."""
METADATA = FileMetadata("name.bin", 0, 0o644, FAKE_CHUNK, bytes(32))


def metadata_for(count: int) -> FileMetadata:
    return FileMetadata("name.bin", count * FAKE_CHUNK, 0o644, FAKE_CHUNK, bytes(32))


def build(count: int, fanout: int) -> tuple[dict[ChunkId, bytes], ReadReference, list[SealedChunk]]:
    builder = ManifestBuilder(b"", fanout)
    nodes: dict[ChunkId, bytes] = {}
    data_chunks = [fake_chunk(i) for i in range(count)]
    for chunk in data_chunks:
        for node in builder.add(chunk):
            nodes[node.chunk_id] = node.data
    tail, reference = builder.finish(metadata_for(count))
    for node in tail:
        nodes[node.chunk_id] = node.data
    assert tail[-1].chunk_id == reference.root
    return nodes, reference, data_chunks


async def collect_leaves(nodes: dict[ChunkId, bytes], reference: ReadReference) -> list[LeafChunk]:
    source = MemorySource(nodes)
    with ThreadPoolExecutor(2) as executor:
        root = await open_root(source, reference, executor)
        return [leaf async for leaf in walk_leaves(source, root, executor)]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 140), st.integers(2, 6))
def test_manifest_tree_lists_every_chunk_in_order(count: int, fanout: int) -> None:
    nodes, reference, data_chunks = build(count, fanout)
    leaves = asyncio.run(collect_leaves(nodes, reference))
    assert [leaf.entry.chunk_id for leaf in leaves] == [c.chunk_id for c in data_chunks]
    assert [leaf.key for leaf in leaves] == [c.key for c in data_chunks]
    assert [leaf.index for leaf in leaves] == list(range(len(data_chunks)))
    # No node lists more than fanout entries, and small files need one node.
    for chunk_id, data in nodes.items():
        assert len(decode_node(chunk_id, data).entries) <= fanout
    if count <= fanout:
        assert len(nodes) == 1


def test_manifest_tree_is_deterministic() -> None:
    first = build(30, 3)
    builder = ManifestBuilder(b"", 3)
    for chunk in first[2]:
        builder.add(chunk)
    _, again = builder.finish(metadata_for(30))
    assert again == first[1]


def test_root_metadata_round_trips() -> None:
    metadata = FileMetadata("résumé.pdf", 0, 0o640, 4096, os.urandom(32))
    builder = ManifestBuilder(b"", 4)
    (root,), reference = builder.finish(metadata)
    opened = open_node(decode_node(root.chunk_id, root.data), reference.key)
    assert opened.metadata == metadata
    assert opened.node.is_root and opened.node.kind == NodeKind.LEAF


def test_public_part_needs_no_key_and_hides_the_name() -> None:
    metadata = FileMetadata("secret-plans.txt", 10, 0o600, 4096, bytes(32))
    builder = ManifestBuilder(b"", 4)
    chunk = seal_chunk(b"0123456789")
    builder.add(chunk)
    (root,), _ = builder.finish(metadata)
    node = decode_node(root.chunk_id, root.data)
    assert [e.chunk_id for e in node.entries] == [chunk.chunk_id]
    assert b"secret-plans" not in root.data
    assert chunk.key not in root.data


def test_wrong_key_on_root_raises_wrong_key() -> None:
    nodes, reference, _ = build(3, 4)
    node = decode_node(reference.root, nodes[reference.root])
    with pytest.raises(WrongKeyError, match="read key does not open"):
        open_node(node, os.urandom(32))


def test_corrupt_manifest_is_an_integrity_error() -> None:
    nodes, reference, _ = build(3, 4)
    data = bytearray(nodes[reference.root])
    data[-1] ^= 0xFF
    with pytest.raises(IntegrityError, match=reference.root.hex()):
        decode_node(reference.root, bytes(data))


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: d[:5], "truncated"),
        (lambda d: b"XXXX" + d[4:], "bad magic"),
        (lambda d: d[:4] + b"\x09" + d[5:], "format version 9"),
        (lambda d: d[:5] + b"\x07" + d[6:], "unknown node kind"),
        (lambda d: d[:6] + b"\x80\x00" + d[8:], "unknown flags"),
        (lambda d: d[:8] + (1 << 20).to_bytes(4, "big") + d[12:], "more than"),
        (
            lambda d: d[:8] + (3).to_bytes(4, "big") + d[12:],
            "private part|entry list|impossible size",
        ),
        (lambda d: d + b"\x00", "private part is"),
    ],
)
def test_malformed_manifest_layout_is_reported(mangle, message) -> None:  # type: ignore[no-untyped-def]
    nodes, reference, _ = build(2, 4)
    data = mangle(nodes[reference.root])
    with pytest.raises(ManifestError, match=message):
        decode_node(ChunkId.of(data), data)


@given(st.binary(max_size=400))
def test_any_bytes_decode_or_raise_manifest_error(data: bytes) -> None:
    """Anything else escaping (IndexError, struct.error...) fails the test."""
    try:
        node = decode_node(ChunkId.of(data), data)
    except ManifestError:
        return
    # What does decode is a node whose parts tile the bytes exactly, with
    # every listed chunk inside the limits a reader relies on.
    assert data == node.public_bytes + len(node.sealed_private).to_bytes(4, "big") + (
        node.sealed_private
    )
    assert len(node.entries) <= MAX_ENTRIES
    assert all(e.stored_size <= MAX_STORED_SIZE for e in node.entries)


@given(st.data())
def test_mutated_manifest_decodes_or_raises_manifest_error(data: st.DataObject) -> None:
    nodes, reference, _ = build(3, 4)
    raw = bytearray(nodes[reference.root])
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] = data.draw(st.integers(0, 255))
    mutated = bytes(raw[: data.draw(st.integers(0, len(raw)))])
    try:
        node = decode_node(ChunkId.of(mutated), mutated)
        opened = open_node(node, reference.key)
    except (ManifestError, IntegrityError):
        return
    # A mutation that still opens must be one the AEAD cannot see: none, or
    # a truncation that leaves nothing to see. Either way it is whole.
    assert len(opened.keys) == len(node.entries)
    assert opened.metadata is not None and opened.metadata.name == METADATA.name


async def collect_public(nodes: dict[ChunkId, bytes], root: ChunkId) -> list[ChunkId]:
    from dht_dfs.core.refs import RootHash

    source = MemorySource(nodes)
    with ThreadPoolExecutor(2) as executor:
        return [c async for c, _, _ in walk_public(source, RootHash(root), executor)]


def test_a_root_listed_inside_a_tree_is_refused_by_both_walks() -> None:
    from dht_dfs.core.manifest import Entry, _seal_node

    inner_nodes, inner, _ = build(2, 2)
    inner_root = inner_nodes[inner.root]
    # Three chunks under fanout 2: a root of two children, the first a full
    # leaf of two chunks, which the inner root's shape matches.
    child = (Entry(inner.root, len(inner_root)), inner.key)
    outer = _seal_node(NodeKind.INTERIOR, [child, child], metadata_for(3), b"", fanout=2)
    nodes = {**inner_nodes, outer.chunk_id: outer.data}
    outer_reference = ReadReference(outer.chunk_id, outer.key)
    with pytest.raises(ManifestError, match="is a root inside a tree"):
        asyncio.run(collect_leaves(nodes, outer_reference))
    with pytest.raises(ManifestError, match="is a root inside a tree"):
        asyncio.run(collect_public(nodes, outer.chunk_id))


# --- manifest bombs: trees that declare more than their size ---------------------


class RecordingSource(MemorySource):
    """A MemorySource that remembers every chunk fetched from it."""

    def __init__(self, chunks: dict[ChunkId, bytes]) -> None:
        super().__init__(chunks)
        self.fetched: list[ChunkId] = []

    async def fetch(self, chunk_id: ChunkId, size_hint: int | None, consume):  # type: ignore[no-untyped-def]
        self.fetched.append(chunk_id)
        return await super().fetch(chunk_id, size_hint, consume)


def hostile_tree(
    size: int, leaves: list[list[SealedChunk]], fanout: int
) -> tuple[dict[ChunkId, bytes], ReadReference]:
    """A two-level tree built by hand: a root over one leaf node per list."""
    from dht_dfs.core.manifest import Entry, _seal_node

    chunks: dict[ChunkId, bytes] = {}
    children = []
    for leaf in leaves:
        node = _seal_node(
            NodeKind.LEAF, [(Entry(c.chunk_id, len(c.data)), c.key) for c in leaf], None, b""
        )
        chunks[node.chunk_id] = node.data
        chunks.update((c.chunk_id, c.data) for c in leaf)
        children.append((Entry(node.chunk_id, len(node.data)), node.key))
    metadata = FileMetadata("bomb.bin", size, 0o644, FAKE_CHUNK, bytes(32))
    root = _seal_node(NodeKind.INTERIOR, children, metadata, b"", fanout=fanout)
    chunks[root.chunk_id] = root.data
    return chunks, ReadReference(root.chunk_id, root.key)


@pytest.mark.parametrize(
    "excess",
    [seal_chunk(b""), seal_chunk(b"x" * FAKE_CHUNK)],
    ids=["empty-chunks", "more-bytes-than-declared"],
)
async def test_a_leaf_beyond_the_declared_size_is_refused_before_it_is_fetched(
    tmp_path: Path, excess: SealedChunk
) -> None:
    from dht_dfs.core.config import Config
    from dht_dfs.core.refs import RootHash
    from dht_dfs.transfer.fetch import fetch_file

    # Five chunks under fanout 4: a full first leaf of 4, then one of 1. The
    # second leaf lists 4096 chunks instead, empty or full-sized.
    honest = [seal_chunk(os.urandom(FAKE_CHUNK)) for _ in range(4)]
    chunks, reference = hostile_tree(5 * FAKE_CHUNK, [honest, [excess] * 4096], 4)
    source = RecordingSource(chunks)
    with ThreadPoolExecutor(2) as executor:
        with pytest.raises(ManifestError, match=r"lists 4096 entries .* allows exactly 1"):
            await fetch_file(
                reference, source, Config(), executor=executor, output=tmp_path / "out"
            )
        assert excess.chunk_id not in source.fetched
        # check and repair, without the key, stop at the same node.
        walked: list[ChunkId] = []
        with pytest.raises(ManifestError, match="allows exactly 1"):
            async for chunk_id, _, _ in walk_public(source, RootHash(reference.root), executor):
                walked.append(chunk_id)
    assert excess.chunk_id not in walked


def test_a_root_listing_empty_chunks_of_an_empty_file_is_refused() -> None:
    from dht_dfs.core.manifest import Entry, _seal_node

    empty = seal_chunk(b"")
    metadata = FileMetadata("bomb.bin", 0, 0o644, FAKE_CHUNK, bytes(32))
    entries = [(Entry(empty.chunk_id, len(empty.data)), empty.key)] * 1000
    root = _seal_node(NodeKind.LEAF, entries, metadata, b"", fanout=4096)
    with pytest.raises(ManifestError, match=r"lists 1000 entries .* allows exactly 0"):
        decode_node(root.chunk_id, root.data)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ([FAKE_CHUNK, FAKE_CHUNK - 1, 1], "chunk 1 as 39 bytes"),
        ([FAKE_CHUNK, FAKE_CHUNK, FAKE_CHUNK], "chunk 2 as 40 bytes"),
        ([FAKE_CHUNK, FAKE_CHUNK, 0], "chunk 2 as 0 bytes"),
    ],
)
def test_chunk_sizes_must_follow_from_the_file_size(sizes: list[int], message: str) -> None:
    from dht_dfs.core.manifest import Entry, _seal_node

    chunks = [seal_chunk(os.urandom(n)) for n in sizes]
    metadata = FileMetadata("x", 2 * FAKE_CHUNK + 1, 0o644, FAKE_CHUNK, bytes(32))
    entries = [(Entry(c.chunk_id, len(c.data)), c.key) for c in chunks]
    root = _seal_node(NodeKind.LEAF, entries, metadata, b"", fanout=4)
    with pytest.raises(ManifestError, match=message):
        decode_node(root.chunk_id, root.data)


def test_check_walks_a_repeated_subtree_once() -> None:
    """Without the key only the public part bounds a walk: 4 levels of one
    repeated node under fanout 16 declare 65536 one-byte chunks in 4 stored
    manifest nodes; ``walk_public`` lists each stored node's entries once."""
    from dht_dfs.core.manifest import Entry, _seal_node

    data = seal_chunk(b"a")
    chunks = {data.chunk_id: data.data}
    child = (Entry(data.chunk_id, len(data.data)), data.key)
    for height in (1, 2, 3):
        kind = NodeKind.LEAF if height == 1 else NodeKind.INTERIOR
        node = _seal_node(kind, [child] * 16, None, b"")
        chunks[node.chunk_id] = node.data
        child = (Entry(node.chunk_id, len(node.data)), node.key)
    metadata = FileMetadata("ones", 16**4, 0o644, 1, bytes(32))
    root = _seal_node(NodeKind.INTERIOR, [child] * 16, metadata, b"", fanout=16)
    chunks[root.chunk_id] = root.data
    walked = asyncio.run(collect_public(chunks, root.chunk_id))
    assert len(walked) == 1 + 4 * 16
    # With the key, the file really is 65536 bytes: fetch writes them all.
    leaves = asyncio.run(collect_leaves(chunks, ReadReference(root.chunk_id, root.key)))
    assert len(leaves) == 16**4
