"""Directory trees over an in-memory store: publish, resolve, list, cat, walk."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dht_dfs.core.config import Config
from dht_dfs.core.crypto import SealedChunk
from dht_dfs.core.direntry import EntryKind
from dht_dfs.core.errors import ChunkNotFoundError, InputError
from dht_dfs.core.ids import ChunkId
from dht_dfs.transfer.browse import (
    PathNotFoundError,
    list_directory,
    resolve,
    split_path,
    stream_file,
)
from dht_dfs.transfer.publish import PublishResult
from dht_dfs.transfer.tree import publish_tree
from dht_dfs.transfer.walk import walk_public

CONFIG = Config(chunk_size=1024, manifest_fanout=4, inline_limit=100, transfer_window=3)


class MemoryStore:
    """Sink and source at once; counts what is fetched, and flushes."""

    def __init__(self) -> None:
        self.chunks: dict[ChunkId, bytes] = {}
        self.fetched: list[ChunkId] = []
        self.flushes = 0

    async def put(self, chunk: SealedChunk) -> None:
        self.chunks[chunk.chunk_id] = chunk.data

    async def flush(self) -> None:
        self.flushes += 1

    async def fetch(self, chunk_id: ChunkId, size_hint: int | None, consume):  # type: ignore[no-untyped-def]
        self.fetched.append(chunk_id)
        try:
            return consume(self.chunks[chunk_id])
        except KeyError:
            raise ChunkNotFoundError(f"missing {chunk_id.hex()}") from None

    async def prefetch(self, chunk_ids: object) -> None:
        return None


def make_tree(base: Path) -> Path:
    root = base / "tree"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "small.txt").write_bytes(b"inline me")
    (root / "sub" / "big.bin").write_bytes(os.urandom(5000))
    (root / "sub" / "deeper" / "mid.bin").write_bytes(os.urandom(1500))
    (root / "link").symlink_to("sub/big.bin")
    (root / "dangling").symlink_to("/nowhere/at/all")
    os.mkfifo(root / "pipe")
    return root


@pytest.fixture
def executor():  # type: ignore[no-untyped-def]
    with ThreadPoolExecutor(4) as pool:
        yield pool


async def publish(root: Path, store: MemoryStore, executor: ThreadPoolExecutor) -> PublishResult:
    return await publish_tree(root, store, CONFIG, executor=executor)


async def test_tree_round_trip(
    tmp_path: Path, executor: ThreadPoolExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_tree(tmp_path)
    store = MemoryStore()
    with caplog.at_level(logging.WARNING):
        result = await publish(root, store, executor)
    assert "pipe" in caplog.text and "skipping" in caplog.text
    assert store.flushes == 1  # one shared sink, flushed once for the whole tree
    assert (result.files, result.directories, result.symlinks, result.skipped) == (3, 4, 2, 1)
    assert result.size == 9 + 5000 + 1500

    ref = result.reference
    names = [
        e.name
        async for e in list_directory(
            store, (await resolve(store, ref, (), executor)).entry, executor
        )
    ]
    assert names == sorted(["dangling", "empty", "link", "small.txt", "sub"])
    link = (await resolve(store, ref, ("link",), executor)).entry
    assert link.kind is EntryKind.SYMLINK and link.target == "sub/big.bin"
    small = (await resolve(store, ref, ("small.txt",), executor)).entry
    assert small.inline == b"inline me" and small.reference is None
    empty = (await resolve(store, ref, ("empty",), executor)).entry
    assert [e async for e in list_directory(store, empty, executor)] == []

    big = (await resolve(store, ref, ("sub", "big.bin"), executor)).entry
    data = b"".join([part async for part in stream_file(store, big, CONFIG, executor)])
    assert data == (root / "sub" / "big.bin").read_bytes()
    mid = (await resolve(store, ref, ("sub", "deeper", "mid.bin"), executor)).entry
    data = b"".join([part async for part in stream_file(store, mid, CONFIG, executor)])
    assert data == (root / "sub" / "deeper" / "mid.bin").read_bytes()


async def test_publishing_the_same_tree_twice_gives_the_same_root(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    root = make_tree(tmp_path)
    first, second = MemoryStore(), MemoryStore()
    assert (await publish(root, first, executor)).reference == (
        await publish(root, second, executor)
    ).reference
    assert first.chunks.keys() == second.chunks.keys()


async def test_listing_fetches_no_file_chunk(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    root = make_tree(tmp_path)
    store = MemoryStore()
    result = await publish(root, store, executor)
    directory_nodes = {c for c, data in store.chunks.items() if data[:4] == b"DHTD"}
    sub = (await resolve(store, result.reference, ("sub",), executor)).entry
    listed = [e async for e in list_directory(store, sub, executor)]
    assert [e.name for e in listed] == ["big.bin", "deeper"]
    assert listed[0].size == 5000
    assert set(store.fetched) <= directory_nodes


async def test_a_missing_path_names_the_first_missing_step(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    store = MemoryStore()
    result = await publish(make_tree(tmp_path), store, executor)
    with pytest.raises(PathNotFoundError, match="no 'sub/nope' in this tree"):
        await resolve(store, result.reference, ("sub", "nope", "further"), executor)
    with pytest.raises(PathNotFoundError, match=r"small\.txt is a file, not a directory"):
        await resolve(store, result.reference, ("small.txt", "x"), executor)
    assert split_path("dhtfs:r1:abc/sub//./file") == ("dhtfs:r1:abc", ("sub", "file"))
    with pytest.raises(InputError):
        split_path("dhtfs:r1:abc/../etc")


async def test_cat_refuses_a_directory(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    store = MemoryStore()
    result = await publish(make_tree(tmp_path), store, executor)
    sub = (await resolve(store, result.reference, ("sub",), executor)).entry
    with pytest.raises(InputError, match="is a directory, not a file"):
        [part async for part in stream_file(store, sub, CONFIG, executor)]


async def test_walk_public_of_a_tree_counts_every_chunk(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    store = MemoryStore()
    result = await publish(make_tree(tmp_path), store, executor)
    walked = [c async for c, _, _ in walk_public(store, result.root_hash, executor)]
    assert len(walked) == len(set(walked))
    assert set(walked) == set(store.chunks)


async def test_strict_fails_on_a_special_file(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    root = tmp_path / "t"
    root.mkdir()
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(root / "sock"))
        with pytest.raises(InputError, match="sock"):
            await publish_tree(root, MemoryStore(), CONFIG, executor=executor, strict=True)
        result = await publish_tree(root, MemoryStore(), CONFIG, executor=executor)
    assert result.skipped == 1


async def test_unreadable_file_is_skipped_with_a_warning(
    tmp_path: Path, executor: ThreadPoolExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    root = tmp_path / "t"
    root.mkdir()
    secret = root / "secret.bin"
    secret.write_bytes(os.urandom(3000))
    secret.chmod(0)
    (root / "ok.txt").write_bytes(b"fine")
    with caplog.at_level(logging.WARNING):
        result = await publish_tree(root, MemoryStore(), CONFIG, executor=executor)
    assert result.skipped == 1 and result.files == 1
    assert "secret.bin" in caplog.text and "ermission denied" in caplog.text


LOOP_SCRIPT = """
import asyncio, json, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dht_dfs.transfer.tree import publish_tree
from tests.unit.test_tree import CONFIG, MemoryStore

root = Path(sys.argv[1])
subprocess.run(["mount", "--bind", str(root), str(root / "a" / "loop")], check=True)

async def main() -> None:
    with ThreadPoolExecutor(2) as executor:
        result = await publish_tree(root, MemoryStore(), CONFIG, executor=executor)
    print(json.dumps([result.files, result.directories, result.skipped, result.skipped_notes]))

asyncio.run(main())
"""


def test_a_bind_mount_loop_is_skipped_not_walked_forever(tmp_path: Path) -> None:
    """``mount --bind ROOT ROOT/a/loop``, in a mount namespace of its own (so
    nothing outlives the test): publish skips the loop, names it, and
    publishes the rest."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private mount namespace")
    root = tmp_path / "t"
    (root / "a" / "loop").mkdir(parents=True)
    (root / "a" / "file.txt").write_text("kept\n")
    namespace = ["unshare", "--mount", "--propagation", "private"]
    done = subprocess.run(
        [*namespace, sys.executable, "-c", LOOP_SCRIPT, str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"no mount namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    files, directories, skipped, notes = json.loads(done.stdout)
    assert (files, directories, skipped) == (1, 2, 1)
    assert "a/loop" in notes[0] and f"it is {root} again" in notes[0]


async def test_a_file_swapped_after_the_scan_is_refused_not_followed(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    """The walk stats a file, and may open it much later: by then it can be a
    link to someone's secret, or a fifo that would block the loop forever."""
    from dht_dfs.core.errors import SourceChangedError
    from dht_dfs.transfer.publish import publish_file

    secret = tmp_path / "secret"
    secret.write_bytes(b"private key\n" * 500)
    victim = tmp_path / "big.bin"
    victim.write_bytes(os.urandom(5000))
    seen = os.stat(victim, follow_symlinks=False)
    victim.unlink()
    victim.symlink_to(secret)
    store = MemoryStore()
    with pytest.raises(SourceChangedError, match="replaced by a link"):
        await publish_file(victim, store, CONFIG, executor=executor, expected=seen)
    victim.unlink()
    os.mkfifo(victim)
    with pytest.raises(SourceChangedError, match="replaced"):
        await asyncio.wait_for(
            publish_file(victim, store, CONFIG, executor=executor, expected=seen), 10
        )
    assert not store.chunks, "nothing of the secret was stored"
