"""Fetching trees to disk over an in-memory store: round trip, resume, and what a
hostile tree or a planted link in the output must not achieve."""

from __future__ import annotations

import asyncio
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dht_dfs.core.dirbuilder import DirectoryBuilder
from dht_dfs.core.direntry import DirEntry
from dht_dfs.core.errors import DhtfsError, InputError, OutputError
from dht_dfs.transfer.browse import resolve
from dht_dfs.transfer.target import TargetRules
from dht_dfs.transfer.treefetch import fetch_tree
from tests.unit.test_tree import CONFIG, MemoryStore, make_tree, publish

SENSITIVE = TargetRules(case_insensitive=False, name_max=255)
INSENSITIVE = TargetRules(case_insensitive=True, name_max=255)


@pytest.fixture
def executor():  # type: ignore[no-untyped-def]
    with ThreadPoolExecutor(4) as pool:
        yield pool


def listing(root: Path) -> list[tuple[str, str, int, str]]:
    """(path, type, mode, content or link target) of everything below ``root``."""
    found = []
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(directory) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                found.append((str(path.relative_to(root)), "link", 0, os.readlink(path)))
            elif stat.S_ISDIR(info.st_mode):
                found.append((str(path.relative_to(root)), "dir", stat.S_IMODE(info.st_mode), ""))
            else:
                mode, content = stat.S_IMODE(info.st_mode), path.read_bytes().hex()
                found.append((str(path.relative_to(root)), "file", mode, content))
    return sorted(found)


async def published(tmp_path: Path, executor: ThreadPoolExecutor):  # type: ignore[no-untyped-def]
    """The test tree (without its fifo, which publish skips), published into a new store."""
    root = make_tree(tmp_path)
    os.unlink(root / "pipe")
    store = MemoryStore()
    return root, store, (await publish(root, store, executor)).reference


async def fetch(store: MemoryStore, ref, out: Path, executor, **kw):  # type: ignore[no-untyped-def]
    entry = (await resolve(store, ref, (), executor)).entry
    return await fetch_tree(entry, store, CONFIG, executor=executor, output=out, **kw)


async def test_a_tree_comes_back_as_published(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    root = make_tree(tmp_path)
    os.unlink(root / "pipe")
    os.chmod(root / "sub" / "big.bin", 0o600)
    os.chmod(root / "sub" / "deeper", 0o700)
    store = MemoryStore()
    ref = (await publish(root, store, executor)).reference
    out = tmp_path / "out"
    result = await fetch(store, ref, out, executor, rules=SENSITIVE)
    assert listing(out) == listing(root)
    assert (result.files, result.symlinks, result.directories) == (3, 2, 4)
    diff = await asyncio.create_subprocess_exec("diff", "-r", "--no-dereference", root, out)
    assert await diff.wait() == 0
    big = out / "sub" / "big.bin"
    assert big.stat().st_mtime_ns == (root / "sub" / "big.bin").stat().st_mtime_ns


async def test_a_second_fetch_keeps_complete_files_and_refetches_a_damaged_one(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    root, store, ref = await published(tmp_path, executor)
    out = tmp_path / "out"
    await fetch(store, ref, out, executor, rules=SENSITIVE)
    # Damage one file without changing its size or mtime: it must be noticed.
    big = out / "sub" / "big.bin"
    info = big.stat()
    with open(big, "r+b") as handle:
        handle.write(b"\0" * 10)
    os.utime(big, ns=(info.st_atime_ns, info.st_mtime_ns))
    again = await fetch(store, ref, out, executor, rules=SENSITIVE)
    assert listing(out) == listing(root)
    assert again.chunks_fetched == 1  # only the damaged chunk of big.bin
    assert again.files_kept >= 2


async def test_names_that_fold_together_are_refused_before_any_write(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    # The git CVE-2021-21300 shape: a directory "A" and a link "a" to elsewhere.
    store = MemoryStore()
    builder = DirectoryBuilder(CONFIG.convergence_secret, inline_limit=100)
    inner = DirectoryBuilder(CONFIG.convergence_secret, inline_limit=100)
    for chunk in inner.add(DirEntry.inline_file("payload", b"x")):
        await store.put(chunk)
    nodes, built = inner.finish()
    for chunk in nodes:
        await store.put(chunk)
    for entry in (DirEntry.directory("A", built), DirEntry.symlink("a", str(tmp_path / "victim"))):
        for chunk in builder.add(entry):
            await store.put(chunk)
    nodes, top = builder.finish()
    for chunk in nodes:
        await store.put(chunk)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="case-insensitive"):
        await fetch(store, top.reference, out, executor, rules=INSENSITIVE)
    assert not out.exists()
    # On a case-sensitive target the same tree is fine, and the link is only a link.
    await fetch(store, top.reference, out, executor, rules=SENSITIVE)
    assert (out / "a").is_symlink() and not (tmp_path / "victim").exists()


async def test_a_link_planted_in_the_output_is_never_written_through(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    _root, store, ref = await published(tmp_path, executor)
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere)
    with pytest.raises(InputError, match="sub"):
        await fetch(store, ref, out, executor, rules=SENSITIVE)
    assert list(elsewhere.iterdir()) == []
    # Even when told to overwrite, the link is replaced, never followed.
    with pytest.raises((InputError, OutputError)):
        await fetch(store, ref, out, executor, rules=SENSITIVE, overwrite=True)
    assert list(elsewhere.iterdir()) == []


async def test_a_file_in_the_way_is_refused_unless_forced(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    _root, store, ref = await published(tmp_path, executor)
    out = tmp_path / "out"
    out.mkdir()
    (out / "small.txt").write_bytes(b"mine, keep it")
    with pytest.raises(InputError, match=r"small\.txt"):
        await fetch(store, ref, out, executor, rules=SENSITIVE)
    assert (out / "small.txt").read_bytes() == b"mine, keep it"
    assert sorted(os.listdir(out)) == ["small.txt"]  # nothing else was written
    await fetch(store, ref, out, executor, rules=SENSITIVE, overwrite=True)
    assert (out / "small.txt").read_bytes() == b"inline me"


async def test_a_missing_chunk_fails_that_file_and_writes_the_rest(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    root, store, ref = await published(tmp_path, executor)
    mid = (await resolve(store, ref, ("sub", "deeper", "mid.bin"), executor)).entry
    assert mid.reference is not None
    del store.chunks[mid.reference.root]
    out = tmp_path / "out"
    with pytest.raises(DhtfsError, match=r"mid\.bin.*again to resume"):
        await fetch(store, ref, out, executor, rules=SENSITIVE)
    assert (out / "sub" / "big.bin").read_bytes() == (root / "sub" / "big.bin").read_bytes()
    assert not (out / "sub" / "deeper" / "mid.bin").exists()


async def test_names_too_long_for_the_target_are_refused(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    _root, store, ref = await published(tmp_path, executor)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="longer than the 5 bytes"):
        await fetch(store, ref, out, executor, rules=TargetRules(False, 5))
    assert not out.exists()
