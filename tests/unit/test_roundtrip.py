"""Publish into a local store and restore: the data path without a network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dht_dfs.core.config import Config
from dht_dfs.core.crypto import TAG_SIZE
from dht_dfs.core.errors import InputError, IntegrityError, WrongKeyError
from dht_dfs.core.refs import ReadReference, parse_read_reference
from dht_dfs.store.chunks import ChunkStore
from dht_dfs.transfer.fetch import PART_SUFFIX
from dht_dfs.transfer.local import publish_to_store, restore_from_store

CHUNK = 4096
CONFIG = Config(chunk_size=CHUNK, manifest_fanout=4)


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    with ChunkStore(tmp_path / "store") as opened:
        yield opened


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "size",
    [0, 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 4 * CHUNK, 23 * CHUNK + 5],
    ids=["empty", "one-byte", "one-chunk", "chunk+1", "multi-chunk", "fanout", "tree"],
)
async def test_round_trip(tmp_path: Path, store: ChunkStore, size: int) -> None:
    data = os.urandom(size)
    source = write(tmp_path / "input.bin", data)
    source.chmod(0o640)
    result = await publish_to_store(source, store, CONFIG)
    token = str(result.reference)
    restored = await restore_from_store(
        parse_read_reference(token), store, CONFIG, tmp_path / "out.bin"
    )
    assert (tmp_path / "out.bin").read_bytes() == data
    assert restored.metadata.name == "input.bin"
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o640
    assert not (tmp_path / ("out.bin" + PART_SUFFIX)).exists()
    expected_data_chunks = (size + CHUNK - 1) // CHUNK
    assert result.data_chunks == expected_data_chunks
    if size == 23 * CHUNK + 5:
        assert result.manifest_chunks > 1, "a file this big under fanout 4 needs a manifest tree"


async def test_restore_into_directory_uses_published_name(
    tmp_path: Path, store: ChunkStore
) -> None:
    source = write(tmp_path / "report.txt", b"hello")
    result = await publish_to_store(source, store, CONFIG)
    outdir = tmp_path / "downloads"
    outdir.mkdir()
    restored = await restore_from_store(result.reference, store, CONFIG, outdir)
    assert restored.path == outdir / "report.txt"
    with pytest.raises(InputError, match="already exists"):
        await restore_from_store(result.reference, store, CONFIG, outdir)


async def test_same_file_twice_same_root_no_new_chunk(tmp_path: Path, store: ChunkStore) -> None:
    source = write(tmp_path / "a.bin", os.urandom(10 * CHUNK))
    first = await publish_to_store(source, store, CONFIG)
    before = store.stats()
    second = await publish_to_store(source, store, CONFIG)
    assert second.reference == first.reference
    after = store.stats()
    assert (after.chunks, after.bytes_used) == (before.chunks, before.bytes_used)


async def test_shared_content_is_stored_once(tmp_path: Path, store: ChunkStore) -> None:
    shared = os.urandom(6 * CHUNK)
    a = write(tmp_path / "a.bin", shared + os.urandom(2 * CHUNK))
    b = write(tmp_path / "b.bin", shared + os.urandom(3 * CHUNK))
    await publish_to_store(a, store, CONFIG)
    after_a = store.stats().chunks
    await publish_to_store(b, store, CONFIG)
    new_chunks = store.stats().chunks - after_a
    # b adds its 3 own data chunks and its manifest nodes, none of the shared 6.
    assert 3 <= new_chunks <= 3 + 4
    data_bytes = sum(store.size_of(c) or 0 for c in store.ids())
    assert data_bytes < (6 + 2 + 3) * (CHUNK + TAG_SIZE) + 8 * 2048


async def test_no_plaintext_or_name_on_disk(tmp_path: Path, store: ChunkStore) -> None:
    marker = b"TOP-SECRET-MARKER-7c1f"
    source = write(tmp_path / "marker-file-name.txt", marker * (20 * CHUNK // len(marker)))
    await publish_to_store(source, store, CONFIG)
    for path in store.root.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert marker not in content, path
            assert b"marker-file-name" not in content, path


async def test_flipped_byte_fails_restore_naming_the_chunk(
    tmp_path: Path, store: ChunkStore
) -> None:
    data = os.urandom(5 * CHUNK)
    result = await publish_to_store(write(tmp_path / "in.bin", data), store, CONFIG)
    data_chunks = [c for c in store.ids() if store.size_of(c) == CHUNK + TAG_SIZE]
    victim = data_chunks[0]
    damaged = bytearray(store.path_of(victim).read_bytes())
    damaged[7] ^= 0x40
    store.path_of(victim).write_bytes(bytes(damaged))
    out = tmp_path / "out.bin"
    with pytest.raises(IntegrityError, match=victim.hex()):
        await restore_from_store(result.reference, store, CONFIG, out)
    assert not out.exists(), "wrong bytes must never be delivered as the file"


async def test_wrong_key_is_a_clear_error(tmp_path: Path, store: ChunkStore) -> None:
    result = await publish_to_store(write(tmp_path / "in.bin", b"abc"), store, CONFIG)
    forged = ReadReference(result.reference.root, os.urandom(32))
    with pytest.raises(WrongKeyError, match="read key does not open"):
        await restore_from_store(forged, store, CONFIG, tmp_path / "out.bin")


async def test_interrupted_restore_resumes_without_refetching(
    tmp_path: Path, store: ChunkStore
) -> None:
    data = os.urandom(12 * CHUNK + 100)
    result = await publish_to_store(write(tmp_path / "in.bin", data), store, CONFIG)
    out = tmp_path / "out.bin"
    # Simulate an interrupted fetch: the part file holds the first 5 chunks
    # and a torn 6th.
    part = tmp_path / ("out.bin" + PART_SUFFIX)
    with open(part, "wb") as handle:
        handle.write(data[: 5 * CHUNK + 1000])
    restored = await restore_from_store(result.reference, store, CONFIG, out)
    assert out.read_bytes() == data
    assert restored.chunks_resumed == 5
    assert restored.chunks_fetched == 13 - 5


async def test_missing_input_file_is_a_clear_error(tmp_path: Path, store: ChunkStore) -> None:
    with pytest.raises(InputError, match="no such file"):
        await publish_to_store(tmp_path / "nope", store, CONFIG)
    with pytest.raises(InputError, match="is a directory"):
        await publish_to_store(tmp_path, store, CONFIG)


async def test_whole_file_hash_is_checked_on_request(tmp_path: Path, store: ChunkStore) -> None:
    """A manifest whose recorded SHA-256 disagrees with its chunks (a publisher
    bug) is caught by --verify-hash; chunk checks alone cannot see it."""
    from dht_dfs.core.crypto import seal_chunk
    from dht_dfs.core.manifest import FileMetadata, ManifestBuilder

    data = os.urandom(3 * CHUNK)
    builder = ManifestBuilder(b"", CONFIG.manifest_fanout)
    for start in range(0, len(data), CHUNK):
        sealed = seal_chunk(data[start : start + CHUNK])
        store.put(sealed.chunk_id, sealed.data)
        for node in builder.add(sealed):
            store.put(node.chunk_id, node.data)
    wrong = FileMetadata("x.bin", len(data), 0o644, CHUNK, bytes(32))
    nodes, reference = builder.finish(wrong)
    for node in nodes:
        store.put(node.chunk_id, node.data)

    checked = CONFIG.replace(verify_file_hash=True)
    with pytest.raises(IntegrityError, match="does not match its recorded SHA-256"):
        await restore_from_store(reference, store, checked, tmp_path / "checked.bin")
    assert not (tmp_path / "checked.bin").exists()
    await restore_from_store(reference, store, CONFIG, tmp_path / "plain.bin")
    assert (tmp_path / "plain.bin").read_bytes() == data


async def test_verified_round_trip_of_a_tree(tmp_path: Path, store: ChunkStore) -> None:
    data = os.urandom(23 * CHUNK + 5)
    result = await publish_to_store(write(tmp_path / "in.bin", data), store, CONFIG)
    checked = CONFIG.replace(verify_file_hash=True)
    await restore_from_store(result.reference, store, checked, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data


async def test_full_disk_during_restore_is_a_clear_error_and_keeps_the_part(
    tmp_path: Path, store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from dht_dfs.core.errors import OutputError

    data = os.urandom(6 * CHUNK)
    result = await publish_to_store(write(tmp_path / "in.bin", data), store, CONFIG)
    real_pwrite = os.pwrite
    calls = 0

    def pwrite_until_full(fd: int, buffer: object, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, buffer, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", pwrite_until_full)
    out = tmp_path / "out.bin"
    with pytest.raises(OutputError, match="No space left on device; the partial file is kept"):
        await restore_from_store(result.reference, store, CONFIG, out)
    assert not out.exists()
    assert (tmp_path / ("out.bin" + PART_SUFFIX)).exists()
    # Space is back: the fetch resumes and keeps the chunks already written.
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    resumed = await restore_from_store(result.reference, store, CONFIG, out)
    assert out.read_bytes() == data
    assert resumed.chunks_resumed >= 1


# --- the fetcher's machine is safe (DESIGN property 15) ----------------------------


async def test_a_file_larger_than_the_free_space_is_refused_before_writing(
    tmp_path: Path, store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dht_dfs.core.errors import OutputError

    data = os.urandom(5 * CHUNK)
    result = await publish_to_store(write(tmp_path / "in.bin", data), store, CONFIG)
    real_statvfs = os.statvfs
    seen: list[str] = []

    class NearlyFull:
        f_bavail = 3
        f_frsize = 4096

    def statvfs(path: object) -> object:
        seen.append(str(path))
        return NearlyFull()

    monkeypatch.setattr(os, "statvfs", statvfs)
    out = tmp_path / "out.bin"
    with pytest.raises(
        OutputError, match=f"needs {len(data)} bytes .*, 12288 bytes .* are available"
    ):
        await restore_from_store(result.reference, store, CONFIG, out)
    assert seen == [str(tmp_path)]
    assert not out.exists()
    assert not (tmp_path / ("out.bin" + PART_SUFFIX)).exists()
    monkeypatch.setattr(os, "statvfs", real_statvfs)
    await restore_from_store(result.reference, store, CONFIG, out)
    assert out.read_bytes() == data


async def test_a_link_planted_at_the_part_file_is_never_written_through(
    tmp_path: Path, store: ChunkStore
) -> None:
    from dht_dfs.core.errors import OutputError

    result = await publish_to_store(
        write(tmp_path / "in.bin", os.urandom(3 * CHUNK)), store, CONFIG
    )
    victim = write(tmp_path / "victim", b"precious")
    out = tmp_path / "out.bin"
    part = tmp_path / ("out.bin" + PART_SUFFIX)
    part.symlink_to(victim)
    with pytest.raises(OutputError, match="is not a partial fetch of yours"):
        await restore_from_store(result.reference, store, CONFIG, out)
    assert victim.read_bytes() == b"precious"
    assert part.is_symlink() and not out.exists()
    # A hard link to someone's file is no partial fetch either.
    part.unlink()
    os.link(victim, part)
    with pytest.raises(OutputError, match="is not a partial fetch of yours"):
        await restore_from_store(result.reference, store, CONFIG, out)
    assert victim.read_bytes() == b"precious"


async def test_a_link_at_the_output_is_refused_and_forced_replaced_not_followed(
    tmp_path: Path, store: ChunkStore
) -> None:
    data = os.urandom(2 * CHUNK)
    result = await publish_to_store(write(tmp_path / "in.bin", data), store, CONFIG)
    victim = write(tmp_path / "victim", b"precious")
    dangling = tmp_path / "dangling.bin"
    dangling.symlink_to(tmp_path / "nowhere")
    for out in (tmp_path / "out.bin", dangling):
        if not out.is_symlink():
            out.symlink_to(victim)
        with pytest.raises(InputError, match="already exists"):
            await restore_from_store(result.reference, store, CONFIG, out)
        await restore_from_store(result.reference, store, CONFIG, out, overwrite=True)
        assert not out.is_symlink() and out.read_bytes() == data
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "nowhere").exists()


async def test_published_mode_loses_setuid_and_obeys_the_umask(
    tmp_path: Path, store: ChunkStore
) -> None:
    from dht_dfs.core.crypto import seal_chunk
    from dht_dfs.core.manifest import FileMetadata, ManifestBuilder

    data = os.urandom(100)
    sealed = seal_chunk(data)
    store.put(sealed.chunk_id, sealed.data)
    builder = ManifestBuilder(b"", CONFIG.manifest_fanout)
    builder.add(sealed)
    metadata = FileMetadata("run.sh", len(data), 0o4777 | 0o2000 | 0o1000, CHUNK, bytes(32))
    (root,), reference = builder.finish(metadata)
    store.put(root.chunk_id, root.data)
    previous = os.umask(0o022)
    try:
        restored = await restore_from_store(reference, store, CONFIG, tmp_path / "run.sh")
    finally:
        os.umask(previous)
    assert restored.metadata.mode == 0o7777
    assert (tmp_path / "run.sh").stat().st_mode & 0o7777 == 0o755


@pytest.mark.parametrize(("name", "what"), [(".bashrc", "be hidden"), ("-rf", "read as an option")])
async def test_a_hidden_or_option_like_name_needs_an_explicit_output(
    tmp_path: Path, store: ChunkStore, monkeypatch: pytest.MonkeyPatch, name: str, what: str
) -> None:
    source = write(tmp_path / "in.bin", b"alias ls='rm -rf ~'\n")
    result = await publish_to_store(source, store, CONFIG, name=name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(home)
    for output in (None, home):
        with pytest.raises(InputError, match=f"'{name}' would {what}; .* with -o NAME"):
            await restore_from_store(result.reference, store, CONFIG, output)
    assert list(home.iterdir()) == []
    await restore_from_store(result.reference, store, CONFIG, home / "safe.txt")
    assert (home / "safe.txt").read_bytes() == source.read_bytes()


async def test_a_lost_chunk_keeps_the_part_file_and_says_how_to_resume(
    tmp_path: Path, store: ChunkStore
) -> None:
    from dht_dfs.core.crypto import seal_chunk
    from dht_dfs.core.errors import ChunkNotFoundError

    data = os.urandom(6 * CHUNK)
    result = await publish_to_store(write(tmp_path / "in.bin", data), store, CONFIG)
    last = seal_chunk(data[5 * CHUNK :])
    kept = store.get(last.chunk_id)
    store.delete(last.chunk_id)
    out = tmp_path / "out.bin"
    with pytest.raises(ChunkNotFoundError, match="run the same command again to resume") as caught:
        await restore_from_store(result.reference, store, CONFIG, out)
    part = tmp_path / ("out.bin" + PART_SUFFIX)
    assert str(part) in str(caught.value)
    assert part.exists() and not out.exists()
    store.put(last.chunk_id, kept)  # the holder is back
    restored = await restore_from_store(result.reference, store, CONFIG, out)
    assert out.read_bytes() == data
    # How many of the others were written before the miss stopped the window
    # varies (resuming is tested above); every chunk is resumed or fetched once.
    assert restored.chunks_resumed + restored.chunks_fetched == 6
