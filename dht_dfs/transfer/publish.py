"""The publish engine: split, seal and hand a file's chunks to a ``ChunkSink``.

The file is read once, in chunk order, with at most ``transfer_window``
chunks in flight, so memory does not grow with the file. Reading and
sealing run in worker threads (hashlib and libsodium release the GIL).
Encryption happens here, at the edge, as in Tahoe-LAFS: the sink only ever
sees sealed chunks.

Must not import: dht, transport, node, or the network side of transfer.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dht_dfs.core.chunker import ChunkSpan, chunk_spans
from dht_dfs.core.config import Config
from dht_dfs.core.crypto import SealedChunk, seal_chunk
from dht_dfs.core.errors import DhtfsError, InputError, SourceChangedError
from dht_dfs.core.manifest import FileMetadata, ManifestBuilder
from dht_dfs.core.refs import ReadReference, RootHash
from dht_dfs.transfer.pipeline import InOrderHasher, ProgressFn, first_error, ordered_map
from dht_dfs.transfer.ports import ChunkSink


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
    already_held: int = 0
    """Chunks not sent: their rightful holders proved they had them (``held``)."""
    files: int = 1
    """Regular files published (a tree: inlined ones included)."""
    directories: int = 0
    symlinks: int = 0
    skipped: int = 0
    """Tree entries left out (special files, unreadable or changing files)."""
    skipped_notes: tuple[str, ...] = ()
    """"path: why" for the first of them."""

    @property
    def root_hash(self) -> RootHash:
        return self.reference.root_hash


MetadataFn = Callable[[int, bytes], FileMetadata]
"""The file's metadata once all of it is read: from its size and SHA-256."""


async def _publish_sealed(
    pairs: AsyncIterator[tuple[bytes, SealedChunk]],
    sink: ChunkSink,
    config: Config,
    *,
    metadata_of: MetadataFn,
    total: int,
    progress: ProgressFn | None,
    before_finish: Callable[[], None] | None = None,
    hash_thread: ThreadPoolExecutor | None = None,
) -> tuple[ReadReference, int, int, int]:
    """Hand each (plaintext, sealed chunk), in file order, and the manifest to the sink.

    Returns (reference, size, data chunks, manifest chunks). ``before_finish``
    may refuse the file once it is read (it changed meanwhile).
    """
    builder = ManifestBuilder(config.convergence_secret, config.manifest_fanout)
    hasher = InOrderHasher(config.transfer_window, hash_thread)
    window = asyncio.Semaphore(config.transfer_window)
    size = data_chunks = manifest_chunks = 0

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

            async for plain, sealed in pairs:
                await hasher.update(plain)
                await put(sealed)
                data_chunks += 1
                for node in builder.add(sealed):
                    manifest_chunks += 1
                    await put(node)
                size += len(plain)
                if progress is not None:
                    progress(size, total)
            if before_finish is not None:
                before_finish()
            nodes, reference = builder.finish(metadata_of(size, await hasher.digest()))
            for node in nodes:
                manifest_chunks += 1
                await put(node)
    except* DhtfsError as group_error:
        raise first_error(group_error) from None
    finally:
        hasher.close()
    await sink.flush()
    return reference, size, data_chunks, manifest_chunks


async def publish_file(
    path: Path,
    sink: ChunkSink,
    config: Config,
    *,
    executor: Executor,
    name: str | None = None,
    progress: ProgressFn | None = None,
    hash_thread: ThreadPoolExecutor | None = None,
    expected: os.stat_result | None = None,
) -> PublishResult:
    """Split, encrypt and store a file; return its read reference.

    Reads the file once, in order of chunks, ``transfer_window`` chunks in
    flight at most. A file that changes size while it is read is refused.
    ``hash_thread``: a one-worker executor to hash on (else one of its own).
    ``expected``: what a tree walk saw at this path; the file opened must be
    that one (no link is followed, and a file swapped in since is refused).
    The open never blocks: a fifo put in a file's place is refused, not waited on.
    """
    started = time.monotonic()
    path = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | (os.O_NOFOLLOW if expected is not None else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory; publish takes a file") from None
    except PermissionError:
        raise InputError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        if expected is not None and exc.errno == errno.ELOOP:
            raise SourceChangedError(f"{path} was replaced by a link while publishing") from None
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if expected is not None and (
            info.st_dev,
            info.st_ino,
            stat.S_IFMT(info.st_mode),
        ) != (expected.st_dev, expected.st_ino, stat.S_IFMT(expected.st_mode)):
            # The type too: an inode number freed by the old file can come back.
            raise SourceChangedError(f"{path} was replaced while it was being published")
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
                raise SourceChangedError(f"cannot read {path}: {exc.strerror or exc}") from None
            if len(plain) != span.length:
                raise SourceChangedError(f"{path} shrank while it was being published")
            return plain, seal_chunk(plain, secret)

        def unchanged() -> None:
            after = os.fstat(fd)
            if after.st_size != size or after.st_mtime_ns != info.st_mtime_ns:
                raise SourceChangedError(f"{path} changed while it was being published; try again")

        def metadata_of(length: int, digest: bytes) -> FileMetadata:
            return FileMetadata(
                name=name if name is not None else path.name,
                size=length,
                mode=stat.S_IMODE(info.st_mode),
                chunk_size=chunk_size,
                plain_sha256=digest,
            )

        pairs = ordered_map(
            read_and_seal,
            chunk_spans(size, chunk_size),
            concurrency=config.transfer_window,
            executor=executor,
        )
        reference, size, data_chunks, manifest_chunks = await _publish_sealed(
            pairs, sink, config, metadata_of=metadata_of, total=size, progress=progress,
            before_finish=unchanged, hash_thread=hash_thread,
        )  # fmt: skip
    finally:
        os.close(fd)
    return PublishResult(reference, size, data_chunks, manifest_chunks, time.monotonic() - started)


def read_full(fd: int, length: int) -> bytes:
    """Up to ``length`` bytes from a pipe or file: fewer only at its end."""
    parts: list[bytes] = []
    wanted = length
    while wanted:
        try:
            part = os.read(fd, wanted)
        except OSError as exc:
            raise InputError(f"cannot read the input: {exc.strerror or exc}") from None
        if not part:
            break
        parts.append(part)
        wanted -= len(part)
    return b"".join(parts)


async def _stream_pairs(
    fd: int, config: Config, executor: Executor
) -> AsyncIterator[tuple[bytes, SealedChunk]]:
    """Read ``fd`` chunk after chunk (one read at a time: a pipe has no offsets) and seal
    each in the workers, ``transfer_window`` chunks ahead at most."""
    loop = asyncio.get_running_loop()
    secret = config.convergence_secret
    pending: collections.deque[asyncio.Future[SealedChunk]] = collections.deque()
    plains: collections.deque[bytes] = collections.deque()
    try:
        while True:
            plain = await loop.run_in_executor(executor, read_full, fd, config.chunk_size)
            if not plain:
                break
            plains.append(plain)
            pending.append(loop.run_in_executor(executor, seal_chunk, plain, secret))
            if len(pending) >= config.transfer_window:
                yield plains.popleft(), await pending.popleft()
            if len(plain) < config.chunk_size:
                break
        while pending:
            yield plains.popleft(), await pending.popleft()
    finally:
        for future in pending:
            future.cancel()


async def publish_stream(
    fd: int,
    sink: ChunkSink,
    config: Config,
    *,
    executor: Executor,
    name: str,
    mode: int = 0o644,
    progress: ProgressFn | None = None,
) -> PublishResult:
    """Split, encrypt and store what a pipe (stdin) gives until its end, in bounded memory.

    The size is known only at the end: ``progress`` gets a total of 0.
    """
    started = time.monotonic()

    def metadata_of(length: int, digest: bytes) -> FileMetadata:
        return FileMetadata(
            name=name, size=length, mode=mode, chunk_size=config.chunk_size, plain_sha256=digest
        )

    reference, size, data_chunks, manifest_chunks = await _publish_sealed(
        _stream_pairs(fd, config, executor), sink, config, metadata_of=metadata_of, total=0,
        progress=progress,
    )  # fmt: skip
    return PublishResult(reference, size, data_chunks, manifest_chunks, time.monotonic() - started)


__all__ = ["PublishResult", "publish_file", "publish_stream", "read_full"]
