"""Publish, fetch and check engines, independent of where chunks live.

The engines stream a file through a bounded pipeline: at most
``transfer_window`` chunks are in flight, so memory does not grow with the
file. Where chunks go and come from is a ``ChunkSink`` / ``ChunkSource``:
a local store (``StoreSink``/``StoreSource`` here) or the network
(``network.py``). Hashing, encryption and file I/O run in a thread pool
(hashlib and libsodium release the GIL).

Encryption happens at the edge, as in Tahoe-LAFS: the publish engine hands
only sealed chunks to its sink, and the fetch engine decrypts what its
source returns. A source returns only bytes that hash to the id asked for.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from dht_dfs.core.chunker import ChunkSpan, chunk_count, chunk_spans
from dht_dfs.core.config import Config
from dht_dfs.core.crypto import (
    SealedChunk,
    decrypt_into,
    encrypt_with_key,
    seal_chunk,
)
from dht_dfs.core.errors import (
    DhtfsError,
    InputError,
    IntegrityError,
    ManifestError,
    OutputError,
)
from dht_dfs.core.ids import ChunkId
from dht_dfs.core.manifest import (
    MAX_DEPTH,
    Entry,
    FileMetadata,
    ManifestBuilder,
    ManifestNode,
    NodeKind,
    OpenedNode,
    decode_node,
    open_node,
)
from dht_dfs.core.refs import ReadReference, RootHash
from dht_dfs.store.chunks import ChunkStore, PutOutcome

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

ProgressFn = Callable[[int, int], None]
"""Called with (bytes done, bytes total) as work advances."""

PART_SUFFIX = ".dhtfs-part"


class ChunkSink(Protocol):
    """Where the publish engine puts sealed chunks."""

    async def put(self, chunk: SealedChunk) -> None:
        """Store one chunk durably (on every replica it needs), or raise."""

    async def flush(self) -> None:
        """Finish anything ``put`` left in the background."""


Consume = Callable[[bytes | bytearray], T]
"""Runs on a chunk's bytes in a worker thread; raises IntegrityError if they are bad."""


def verified(chunk_id: ChunkId) -> Consume[bytes | bytearray]:
    """A consume function that only checks the bytes hash to ``chunk_id``."""

    def check(data: bytes | bytearray) -> bytes | bytearray:
        if not chunk_id.matches(data):
            raise IntegrityError(f"chunk {chunk_id.hex()} is corrupt", chunk_id.hex())
        return data

    return check


class ChunkSource(Protocol):
    """Where the fetch engine gets chunks."""

    async def fetch(self, chunk_id: ChunkId, size_hint: int | None, consume: Consume[T]) -> T:
        """Get a chunk and run ``consume`` on its bytes in a worker thread.

        If ``consume`` raises IntegrityError the copy was bad: another holder
        is tried. Raises ChunkNotFoundError when no good copy can be had.
        Checking, decrypting and writing in the one worker call saves a
        thread hop per chunk.
        """

    async def prefetch(self, chunk_ids: Sequence[ChunkId]) -> None:
        """A hint: these chunks will be asked for soon, in this order."""


async def get_verified(
    source: ChunkSource, chunk_id: ChunkId, size_hint: int | None = None
) -> bytes | bytearray:
    """A chunk's bytes, checked against its id."""
    return await source.fetch(chunk_id, size_hint, verified(chunk_id))


# --- local store adapters ----------------------------------------------------------


class StoreSink:
    """Publish into a local chunk store."""

    def __init__(self, store: ChunkStore, executor: Executor | None = None) -> None:
        self._store = store
        self._executor = executor
        self.stored = 0
        self.already_had = 0

    async def put(self, chunk: SealedChunk) -> None:
        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(
            self._executor, self._store.put, chunk.chunk_id, chunk.data
        )
        if outcome is PutOutcome.STORED:
            self.stored += 1
        else:
            self.already_had += 1

    async def flush(self) -> None:
        return None


class StoreSource:
    """Fetch from a local chunk store (verifies every read)."""

    def __init__(self, store: ChunkStore, executor: Executor | None = None) -> None:
        self._store = store
        self._executor = executor

    async def fetch(self, chunk_id: ChunkId, size_hint: int | None, consume: Consume[T]) -> T:
        def read_and_consume() -> T:
            # The store checks the hash on read (and drops a corrupt copy).
            return consume(self._store.get(chunk_id))

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, read_and_consume)

    async def prefetch(self, chunk_ids: Sequence[ChunkId]) -> None:
        return None


# --- helpers ---------------------------------------------------------------------------


async def _ordered_map(
    func: Callable[[T], R],
    items: Iterable[T],
    *,
    concurrency: int,
    executor: Executor,
) -> AsyncIterator[R]:
    """Run ``func`` over ``items`` in threads, ``concurrency`` at a time, in order."""
    loop = asyncio.get_running_loop()
    pending: deque[asyncio.Future[R]] = deque()
    iterator = iter(items)
    try:
        for item in iterator:
            pending.append(loop.run_in_executor(executor, func, item))
            if len(pending) >= concurrency:
                yield await pending.popleft()
        while pending:
            yield await pending.popleft()
    finally:
        for future in pending:
            future.cancel()


class _InOrderHasher:
    """SHA-256 of a stream whose pieces arrive in order, hashed in a thread.

    One single-thread executor keeps updates in submission order; at most
    ``backlog`` pieces wait, so memory stays bounded.
    """

    def __init__(self, backlog: int) -> None:
        self._hash = hashlib.sha256()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dhtfs-hash")
        self._pending: deque[asyncio.Future[None]] = deque()
        self._backlog = backlog

    async def update(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._pending.append(loop.run_in_executor(self._executor, self._hash.update, data))
        while len(self._pending) > self._backlog:
            await self._pending.popleft()

    async def digest(self) -> bytes:
        while self._pending:
            await self._pending.popleft()
        return self._hash.digest()

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


# --- publish -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublishResult:
    reference: ReadReference
    size: int
    data_chunks: int
    manifest_chunks: int
    seconds: float
    copies: int = 0
    """Chunk copies placed (a network publish); 0 for a local store."""
    under_replicated: int = 0
    """Chunks that got fewer than ``replicas`` copies (too few live nodes)."""

    @property
    def root_hash(self) -> RootHash:
        return self.reference.root_hash


async def publish_file(
    path: Path,
    sink: ChunkSink,
    config: Config,
    *,
    executor: Executor,
    name: str | None = None,
    progress: ProgressFn | None = None,
) -> PublishResult:
    """Split, encrypt and store a file; return its read reference.

    Reads the file once, in order of chunks, ``transfer_window`` chunks in
    flight at most. A file that changes size while it is read is refused.
    """
    started = time.monotonic()
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory; publish takes a file") from None
    except PermissionError:
        raise InputError(f"cannot read {path}: permission denied") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InputError(f"{path} is a directory; publish takes a file")
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path} is not a regular file")
        size = info.st_size
        chunk_size = config.chunk_size
        secret = config.convergence_secret

        def read_and_seal(span: ChunkSpan) -> tuple[bytes, SealedChunk]:
            try:
                plain = os.pread(fd, span.length, span.offset)
            except OSError as exc:
                raise DhtfsError(f"cannot read {path}: {exc.strerror or exc}") from None
            if len(plain) != span.length:
                raise DhtfsError(f"{path} shrank while it was being published")
            return plain, seal_chunk(plain, secret)

        builder = ManifestBuilder(secret, config.manifest_fanout)
        hasher = _InOrderHasher(config.transfer_window)
        window = asyncio.Semaphore(config.transfer_window)
        done_bytes = 0
        manifest_chunks = 0

        async def put_bounded(chunk: SealedChunk) -> None:
            try:
                await sink.put(chunk)
            finally:
                window.release()

        try:
            async with asyncio.TaskGroup() as group:

                async def put(chunk: SealedChunk) -> None:
                    await window.acquire()
                    group.create_task(put_bounded(chunk))

                async for plain, sealed in _ordered_map(
                    read_and_seal,
                    chunk_spans(size, chunk_size),
                    concurrency=config.transfer_window,
                    executor=executor,
                ):
                    await hasher.update(plain)
                    await put(sealed)
                    for node in builder.add(sealed):
                        manifest_chunks += 1
                        await put(node)
                    done_bytes += len(plain)
                    if progress is not None:
                        progress(done_bytes, size)
                after = os.fstat(fd)
                if after.st_size != size or after.st_mtime_ns != info.st_mtime_ns:
                    raise DhtfsError(f"{path} changed while it was being published; try again")
                metadata = FileMetadata(
                    name=name if name is not None else path.name,
                    size=size,
                    mode=stat.S_IMODE(info.st_mode),
                    chunk_size=chunk_size,
                    plain_sha256=await hasher.digest(),
                )
                nodes, reference = builder.finish(metadata)
                for node in nodes:
                    manifest_chunks += 1
                    await put(node)
        except* DhtfsError as group_error:
            raise _first(group_error) from None
        finally:
            hasher.close()
        await sink.flush()
    finally:
        os.close(fd)
    return PublishResult(
        reference,
        size,
        chunk_count(size, chunk_size),
        manifest_chunks,
        time.monotonic() - started,
    )


def _first(group: BaseExceptionGroup[DhtfsError]) -> DhtfsError:
    """The first error of a task group, to report as one line."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, DhtfsError)
    return error


# --- manifest walking ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeafChunk:
    """One data chunk of a file, where it goes, and how to open it."""

    index: int
    offset: int
    entry: Entry
    key: bytes


async def _read_node(
    source: ChunkSource, chunk_id: ChunkId, size: int | None, executor: Executor
) -> ManifestNode:
    """Fetch, check and parse one manifest node (public part only)."""
    data = bytes(await get_verified(source, chunk_id, size))
    if size is not None and len(data) != size:
        raise ManifestError(
            f"manifest chunk {chunk_id.hex()} has {len(data)} bytes, its parent says {size}"
        )
    node = await asyncio.get_running_loop().run_in_executor(executor, decode_node, chunk_id, data)
    if node.is_root != (size is None):
        where = "is a manifest node but not a root" if size is None else "is a root inside a tree"
        raise ManifestError(f"manifest chunk {chunk_id.hex()} {where}")
    return node


async def open_root(
    source: ChunkSource, reference: ReadReference, executor: Executor
) -> OpenedNode:
    node = await _read_node(source, reference.root, None, executor)
    return await asyncio.get_running_loop().run_in_executor(
        executor, open_node, node, reference.key
    )


async def _walk(
    source: ChunkSource,
    root: ManifestNode,
    keys: tuple[bytes, ...] | None,
    executor: Executor,
    *,
    prefetch: bool,
) -> AsyncIterator[tuple[Entry, bytes | None, bool]]:
    """Every entry below ``root``, depth first in file order: (entry, key, is manifest).

    Without ``keys`` (no read key) only public parts are read and each key
    is None. Manifest nodes are fetched as they are reached and one node is
    held per level, so memory is bounded by the depth. With ``prefetch`` the
    source hears of each leaf's chunks as the leaf is reached.
    """
    loop = asyncio.get_running_loop()
    if prefetch and root.kind == NodeKind.LEAF:
        await source.prefetch([entry.chunk_id for entry in root.entries])
    stack: list[tuple[ManifestNode, tuple[bytes, ...] | None, int]] = [(root, keys, 0)]
    while stack:
        node, node_keys, position = stack[-1]
        if position == len(node.entries):
            stack.pop()
            continue
        stack[-1] = (node, node_keys, position + 1)
        entry = node.entries[position]
        key = None if node_keys is None else node_keys[position]
        if node.kind == NodeKind.LEAF:
            yield entry, key, False
            continue
        if len(stack) >= MAX_DEPTH:
            raise ManifestError(
                f"manifest of {root.chunk_id.hex()} is deeper than {MAX_DEPTH} levels"
            )
        child = await _read_node(source, entry.chunk_id, entry.stored_size, executor)
        yield entry, key, True
        if prefetch and child.kind == NodeKind.LEAF:
            await source.prefetch([leaf.chunk_id for leaf in child.entries])
        child_keys = None
        if key is not None:
            child_keys = (await loop.run_in_executor(executor, open_node, child, key)).keys
        stack.append((child, child_keys, 0))


async def walk_leaves(
    source: ChunkSource, root: OpenedNode, executor: Executor
) -> AsyncIterator[LeafChunk]:
    """Every data chunk of the file in order, with its offset and key."""
    index = offset = 0
    async for entry, key, is_manifest in _walk(
        source, root.node, root.keys, executor, prefetch=True
    ):
        if is_manifest:
            continue
        assert key is not None
        yield LeafChunk(index, offset, entry, key)
        index += 1
        offset += entry.plain_size


async def walk_public(
    source: ChunkSource, root: RootHash, executor: Executor
) -> AsyncIterator[tuple[ChunkId, int, bool]]:
    """Every chunk of a file without its key: (id, stored size, is manifest).

    Manifest nodes come before their children. Enough to check, repair or
    pin a file.
    """
    node = await _read_node(source, root.root, None, executor)
    yield root.root, node.stored_size, True
    async for entry, _, is_manifest in _walk(source, node, None, executor, prefetch=False):
        yield entry.chunk_id, entry.stored_size, is_manifest


# --- fetch ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchResult:
    path: Path
    size: int
    chunks: int
    chunks_fetched: int
    """Chunks downloaded in this run (the rest were already in a partial file)."""
    chunks_resumed: int
    seconds: float
    metadata: FileMetadata


def safe_file_name(name: str, fallback: str) -> str:
    """A publisher-chosen name made safe to create in a directory."""
    cleaned = name.replace("\x00", "").strip()
    if not cleaned or cleaned in (".", "..") or "/" in cleaned or "\\" in cleaned:
        return fallback
    return cleaned


def resolve_output(metadata: FileMetadata, reference: ReadReference, output: Path | None) -> Path:
    fallback = f"dhtfs-{reference.root.hex()[:16]}"
    name = safe_file_name(metadata.name, fallback)
    if output is None:
        return Path.cwd() / name
    if output.is_dir():
        return output / name
    return output


async def fetch_file(
    reference: ReadReference,
    source: ChunkSource,
    config: Config,
    *,
    executor: Executor,
    output: Path | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    on_metadata: Callable[[FileMetadata, Path], Awaitable[None] | None] | None = None,
    verify_hash: bool | None = None,
) -> FetchResult:
    """Fetch, verify and decrypt a file, writing each chunk at its offset.

    Every chunk is checked against its id (SHA-256 of its ciphertext, listed
    in the authenticated manifest) and its AEGIS tag before it is written.
    With ``verify_hash`` (default: ``config.verify_file_hash``) the whole
    file's SHA-256 is also recomputed and compared with the manifest's; that
    catches nothing the chunk checks miss unless dhtfs itself has a bug, and
    costs ~0.6 CPU-seconds per GiB.

    Writes into ``<output>.dhtfs-part`` and renames it when all is well. If
    a part file is already there, chunks it holds intact (re-encrypting them
    gives their id) are not fetched again. Memory is bounded by
    ``transfer_window`` chunks.
    """
    started = time.monotonic()
    if verify_hash is None:
        verify_hash = config.verify_file_hash
    loop = asyncio.get_running_loop()
    root = await open_root(source, reference, executor)
    metadata = root.metadata
    assert metadata is not None
    target = resolve_output(metadata, reference, output)
    if target.exists() and not overwrite:
        raise InputError(
            f"{target} already exists; fetch to another path or overwrite it (--force)"
        )
    if on_metadata is not None:
        maybe = on_metadata(metadata, target)
        if maybe is not None:
            await maybe
    part = target.with_name(target.name + PART_SUFFIX)
    try:
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise OutputError(f"cannot write {part}: {exc.strerror}") from None
    size = metadata.size
    fetched = resumed = chunks = 0
    try:
        resuming = os.fstat(fd).st_size > 0
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise _output_error(part, exc) from None
        hasher = _InOrderHasher(config.transfer_window) if verify_hash else None
        window = asyncio.Semaphore(config.transfer_window)
        ready: dict[int, bytes] = {}
        next_to_hash = 0
        done_bytes = 0
        expected_offset = 0

        def region_is_intact(leaf: LeafChunk) -> bytes | None:
            if not _region_has_data(fd, leaf.offset, leaf.entry.plain_size):
                return None
            plain = os.pread(fd, leaf.entry.plain_size, leaf.offset)
            if len(plain) != leaf.entry.plain_size:
                return None
            if ChunkId.of(encrypt_with_key(plain, leaf.key)) != leaf.entry.chunk_id:
                return None
            return plain

        def check_open_and_write(leaf: LeafChunk, data: bytes | bytearray) -> bytes | int:
            """In a worker: check, decrypt into this thread's buffer, write at the offset.

            Returns the plaintext when the whole-file hash needs it, else its length.
            """
            chunk_id = leaf.entry.chunk_id
            if len(data) != leaf.entry.stored_size or not chunk_id.matches(data):
                raise IntegrityError(f"chunk {chunk_id.hex()} is corrupt", chunk_id.hex())
            buffer = _thread_buffer(leaf.entry.plain_size)
            length = decrypt_into(data, leaf.key, buffer, chunk_id)
            if length != leaf.entry.plain_size:
                raise ManifestError(f"chunk {chunk_id.hex()} size disagrees with its manifest")
            view = memoryview(buffer)[:length]
            position = leaf.offset
            try:
                while view:
                    written = os.pwrite(fd, view, position)
                    view = view[written:]
                    position += written
            except OSError as exc:
                raise _output_error(part, exc) from None
            return bytes(buffer[:length]) if verify_hash else length

        def chunk_done(length: int) -> None:
            nonlocal done_bytes
            done_bytes += length
            window.release()
            if progress is not None:
                progress(done_bytes, size)

        async def hash_in_order() -> None:
            # The whole-file hash needs the chunks in file order: finished
            # ones wait here, holding their window slot, until their turn.
            nonlocal next_to_hash
            assert hasher is not None
            while next_to_hash in ready:
                plain = ready.pop(next_to_hash)
                await hasher.update(plain)
                next_to_hash += 1
                chunk_done(len(plain))

        async def fetch_one(leaf: LeafChunk) -> None:
            nonlocal fetched, resumed
            result: bytes | int | None = None
            if resuming:
                result = await loop.run_in_executor(executor, region_is_intact, leaf)
            if result is not None:
                resumed += 1
            else:
                result = await source.fetch(
                    leaf.entry.chunk_id,
                    leaf.entry.stored_size,
                    functools.partial(check_open_and_write, leaf),
                )
                fetched += 1
            if hasher is None:
                chunk_done(result if isinstance(result, int) else len(result))
            else:
                assert isinstance(result, bytes)
                ready[leaf.index] = result
                await hash_in_order()

        try:
            async with asyncio.TaskGroup() as group:
                async for leaf in walk_leaves(source, root, executor):
                    if leaf.offset != expected_offset or leaf.offset + leaf.entry.plain_size > size:
                        raise ManifestError(
                            f"manifest of {reference.root.hex()} does not add up to the file size"
                        )
                    expected_offset += leaf.entry.plain_size
                    chunks += 1
                    await window.acquire()
                    group.create_task(fetch_one(leaf))
            if expected_offset != size:
                raise ManifestError(
                    f"manifest of {reference.root.hex()} covers {expected_offset} bytes, "
                    f"the file has {size}"
                )
            digest = await hasher.digest() if hasher is not None else None
        except* DhtfsError as group_error:
            raise _first(group_error) from None
        finally:
            if hasher is not None:
                hasher.close()
        if digest is not None and digest != metadata.plain_sha256:
            raise IntegrityError(
                f"file assembled from {reference.root.hex()} does not match its recorded "
                "SHA-256; the partial file is kept for inspection"
            )
        try:
            await loop.run_in_executor(executor, os.fsync, fd)
            os.fchmod(fd, metadata.mode & 0o777 or 0o644)
        except OSError as exc:
            raise _output_error(part, exc) from None
    finally:
        os.close(fd)
    try:
        os.replace(part, target)
    except OSError as exc:
        raise _output_error(target, exc) from None
    return FetchResult(target, size, chunks, fetched, resumed, time.monotonic() - started, metadata)


def _output_error(path: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    return OutputError(
        f"cannot write {path}: {reason}; the partial file is kept, "
        "fetch again to resume once this is fixed"
    )


_buffers = threading.local()


def _thread_buffer(size: int) -> bytearray:
    """A reusable per-thread buffer of at least ``size`` bytes (no churn of fresh pages)."""
    buffer: bytearray | None = getattr(_buffers, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = bytearray(size)
        _buffers.buffer = buffer
    return buffer


def _region_has_data(fd: int, offset: int, length: int) -> bool:
    """False when [offset, offset+length) is a hole: nothing was written there."""
    if length == 0:
        return True
    try:
        data_at = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError:
        return False  # ENXIO: only a hole remains after offset
    return data_at < offset + length


# --- local round trip (no network) ---------------------------------------------------


async def publish_to_store(
    path: Path, store: ChunkStore, config: Config, *, name: str | None = None
) -> PublishResult:
    """Publish a file into a local store: the data path without a network."""
    with ThreadPoolExecutor(config.workers, thread_name_prefix="dhtfs-io") as executor:
        return await publish_file(
            path, StoreSink(store, executor), config, executor=executor, name=name
        )


async def restore_from_store(
    reference: ReadReference,
    store: ChunkStore,
    config: Config,
    output: Path | None = None,
    *,
    overwrite: bool = False,
) -> FetchResult:
    """Restore a file from a local store by its read reference."""
    with ThreadPoolExecutor(config.workers, thread_name_prefix="dhtfs-io") as executor:
        return await fetch_file(
            reference,
            StoreSource(store, executor),
            config,
            executor=executor,
            output=output,
            overwrite=overwrite,
        )


__all__ = [
    "ChunkSink",
    "ChunkSource",
    "FetchResult",
    "LeafChunk",
    "PublishResult",
    "StoreSink",
    "StoreSource",
    "fetch_file",
    "open_root",
    "publish_file",
    "publish_to_store",
    "restore_from_store",
    "walk_leaves",
    "walk_public",
]
