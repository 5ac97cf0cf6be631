"""Publishing a directory tree: walk it, publish its files, seal its directory nodes.

The walk is depth first and bottom-up: a directory's node can only be
sealed once each child's reference is known. Entries are read with
``os.scandir`` and sorted by their name's bytes (the order directory nodes
keep). Nothing is ever followed: a symbolic link becomes a symlink entry
with its target as written, and a fifo, socket or device is skipped with a
warning (reading one could block or never end).

Files go through the file engine (``publish_file``) into ONE shared sink,
so a network sink batches its provider announcements across files; the
engine's per-file ``flush`` is absorbed and the sink is flushed once at the
end. Files up to ``inline_limit`` bytes are inlined into their directory
node and get no chunk of their own.

Nothing waits on one store at a time: a tree is mostly small files in
small directories, and each chunk costs a round trip to its holders. So at
most ``tree_files_in_flight`` files larger than a chunk are published at
once (each with its own ``transfer_window``), and besides them up to
``SMALL_FILES_PER_LARGE`` times as many files of one chunk; subdirectories
are walked as tasks of their own, up to ``DIRECTORIES_IN_FLIGHT`` at once
(beyond that, in line, so a deep tree never waits on itself), and each
directory's node chunks are stored concurrently, ``transfer_window`` at a
time. Memory stays bounded whatever the tree: a directory's entries are held
while it is built (the builder itself streams), so it grows with the largest
directories in flight, not with the tree.

A file or directory that cannot be read, and a file that changes while it
is read, is skipped with a warning naming it and why (logged, and counted
in the result); under ``strict`` it fails the publish instead. Names that
are not UTF-8 are skipped the same way: a directory node cannot hold them.

Must not import: dht, transport, node, or the network side of transfer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dht_dfs.core.config import Config
from dht_dfs.core.crypto import SealedChunk
from dht_dfs.core.dirbuilder import DirectoryBuilder
from dht_dfs.core.direntry import BuiltDirectory, DirEntry
from dht_dfs.core.errors import DhtfsError, InputError, SourceChangedError
from dht_dfs.core.refs import ReadReference
from dht_dfs.transfer.pipeline import ProgressFn, first_error
from dht_dfs.transfer.ports import ChunkSink
from dht_dfs.transfer.publish import PublishResult, publish_file

log = logging.getLogger(__name__)

MAX_SKIPPED_NOTES = 100
"""Skipped entries a result names; the count covers them all."""
SMALL_FILES_PER_LARGE = 8
"""Files of one chunk in flight for each larger file ``tree_files_in_flight`` allows."""
DIRECTORIES_IN_FLIGHT = 32
"""Directories walked at once as their own tasks."""


class _SharedSink:
    """One sink for every file of a tree: the engine's per-file flush is absorbed."""

    def __init__(self, sink: ChunkSink) -> None:
        self._sink = sink

    async def put(self, chunk: SealedChunk) -> None:
        await self._sink.put(chunk)

    async def flush(self) -> None:
        return None


@dataclass(slots=True)
class _Tally:
    """What the walk has done so far (one per publish, updated as it goes)."""

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    skipped: int = 0
    size: int = 0
    data_chunks: int = 0
    node_chunks: int = 0
    done_bytes: int = 0
    skipped_notes: list[str] = field(default_factory=list)
    """The first MAX_SKIPPED_NOTES "path: why" lines, for the caller to show."""

    def note_skip(self, path: Path, why: str) -> None:
        log.warning("skipping %s: %s", path, why)
        self.skipped += 1
        if len(self.skipped_notes) < MAX_SKIPPED_NOTES:
            self.skipped_notes.append(f"{path}: {why}")


class _TreePublisher:
    def __init__(
        self,
        sink: ChunkSink,
        config: Config,
        executor: Executor,
        *,
        strict: bool,
        progress: ProgressFn | None,
    ) -> None:
        self._sink = sink
        self._shared = _SharedSink(sink)
        self._config = config
        self._executor = executor
        self._strict = strict
        self._progress = progress
        self._large_files = asyncio.Semaphore(config.tree_files_in_flight)
        self._small_files = asyncio.Semaphore(SMALL_FILES_PER_LARGE * config.tree_files_in_flight)
        self._directories = asyncio.Semaphore(DIRECTORIES_IN_FLIGHT)
        self._node_window = asyncio.Semaphore(config.transfer_window)
        self.hash_thread = ThreadPoolExecutor(1, thread_name_prefix="dhtfs-hash")
        """One thread hashes every file (in order per file), not one thread per file."""
        self.tally = _Tally()

    def skip(self, path: Path, why: str) -> None:
        """Leave ``path`` out with a warning, or fail the publish under ``strict``."""
        if self._strict:
            raise InputError(f"cannot publish {path}: {why}")
        self.tally.note_skip(path, why)

    def _count_bytes(self, length: int) -> None:
        self.tally.done_bytes += length
        if self._progress is not None:
            self._progress(self.tally.done_bytes, 0)

    async def _put_all(self, chunks: list[SealedChunk], group: asyncio.TaskGroup) -> None:
        """Store a directory's node chunks in ``group``, ``transfer_window`` at a time."""

        async def put(chunk: SealedChunk) -> None:
            try:
                await self._sink.put(chunk)
            finally:
                self._node_window.release()

        for chunk in chunks:
            self.tally.node_chunks += 1
            await self._node_window.acquire()
            group.create_task(put(chunk))

    async def directory(
        self, path: Path, ancestors: Mapping[tuple[int, int], Path] | None = None
    ) -> BuiltDirectory | None:
        """Publish one directory and everything below it; None if it was skipped.

        ``ancestors``: the (device, inode) of each directory above, and their
        paths, so a bind mount of an ancestor below itself ends as a skip,
        not as an endless walk.
        """
        try:
            if ancestors is None:
                own = os.stat(path, follow_symlinks=False)
                ancestors = {(own.st_dev, own.st_ino): path}
            with os.scandir(path) as scan:
                found = sorted(scan, key=lambda item: os.fsencode(item.name))
        except OSError as exc:
            self.skip(path, exc.strerror or str(exc))
            return None
        slots: list[DirEntry | None] = [None] * len(found)
        try:
            async with asyncio.TaskGroup() as group:
                for index, item in enumerate(found):
                    child = Path(item.path)
                    try:
                        info = item.stat(follow_symlinks=False)
                        item.name.encode("utf-8")
                    except UnicodeEncodeError:
                        self.skip(child, "its name is not UTF-8")
                        continue
                    except OSError as exc:
                        self.skip(child, exc.strerror or str(exc))
                        continue
                    if stat.S_ISDIR(info.st_mode):
                        identity = (info.st_dev, info.st_ino)
                        if identity in ancestors:
                            self.skip(
                                child,
                                f"a directory loop: it is {ancestors[identity]} again "
                                "(a bind mount of an ancestor?)",
                            )
                            continue
                        below = {**ancestors, identity: child}
                        if self._directories.locked():
                            # Every slot is taken (by this directory's
                            # ancestors, maybe): walk it here, never wait.
                            await self._subdirectory(
                                child, item.name, info, slots, index, ancestors=below
                            )
                        else:
                            await self._directories.acquire()
                            group.create_task(
                                self._subdirectory(
                                    child,
                                    item.name,
                                    info,
                                    slots,
                                    index,
                                    ancestors=below,
                                    release=True,
                                )
                            )
                    elif stat.S_ISLNK(info.st_mode):
                        slots[index] = self._symlink(child, item.name, info)
                    elif stat.S_ISREG(info.st_mode):
                        budget = (
                            self._small_files
                            if info.st_size <= self._config.chunk_size
                            else self._large_files
                        )
                        await budget.acquire()
                        group.create_task(
                            self._file(child, item.name, info, slots, index, budget=budget)
                        )
                    else:
                        self.skip(child, "not a regular file, directory or symlink")
            builder = DirectoryBuilder(
                self._config.convergence_secret, inline_limit=self._config.inline_limit
            )
            async with asyncio.TaskGroup() as group:
                for entry in slots:
                    if entry is not None:
                        await self._put_all(builder.add(entry), group)
                nodes, built = builder.finish()
                await self._put_all(nodes, group)
        except* DhtfsError as group_error:
            raise first_error(group_error) from None
        self.tally.directories += 1
        return built

    async def _subdirectory(
        self,
        path: Path,
        name: str,
        info: os.stat_result,
        slots: list[DirEntry | None],
        index: int,
        *,
        ancestors: Mapping[tuple[int, int], Path],
        release: bool = False,
    ) -> None:
        try:
            built = await self.directory(path, ancestors)
        finally:
            if release:
                self._directories.release()
        if built is not None:
            slots[index] = DirEntry.directory(
                name, built, mode=stat.S_IMODE(info.st_mode), mtime_ns=info.st_mtime_ns
            )

    def _symlink(self, path: Path, name: str, info: os.stat_result) -> DirEntry | None:
        try:
            target = os.readlink(path)
            target.encode("utf-8")
            entry = DirEntry.symlink(name, target, mtime_ns=info.st_mtime_ns)
        except UnicodeEncodeError:
            self.skip(path, "its target is not UTF-8")
            return None
        except OSError as exc:
            self.skip(path, exc.strerror or str(exc))
            return None
        except ValueError as exc:
            self.skip(path, str(exc))
            return None
        self.tally.symlinks += 1
        return entry

    async def _file(
        self,
        path: Path,
        name: str,
        info: os.stat_result,
        slots: list[DirEntry | None],
        index: int,
        *,
        budget: asyncio.Semaphore,
    ) -> None:
        try:
            mode = stat.S_IMODE(info.st_mode)
            if info.st_size <= self._config.inline_limit:
                data = await asyncio.get_running_loop().run_in_executor(
                    self._executor, _read_small, path, info
                )
                mtime = info.st_mtime_ns
                slots[index] = DirEntry.inline_file(name, data, mode=mode, mtime_ns=mtime)
                size = len(data)
                self._count_bytes(size)
            else:
                counted = 0

                def progress(done: int, total: int) -> None:
                    nonlocal counted
                    self._count_bytes(done - counted)
                    counted = done

                result = await publish_file(
                    path, self._shared, self._config, executor=self._executor, name=name,
                    progress=progress, hash_thread=self.hash_thread, expected=info,
                )  # fmt: skip
                slots[index] = DirEntry.file(
                    name, result.reference, result.size, mode=mode, mtime_ns=info.st_mtime_ns
                )
                size = result.size
                self.tally.data_chunks += result.data_chunks
                self.tally.node_chunks += result.manifest_chunks
                self._count_bytes(size - counted)
            self.tally.files += 1
            self.tally.size += size
        except InputError as error:
            # SourceChangedError included: the file moved under us; what
            # was already stored of it is harmless (content-addressed).
            if self._strict:
                raise
            self.tally.note_skip(path, str(error))
        finally:
            budget.release()


def _read_small(path: Path, info: os.stat_result) -> bytes:
    """A small file's bytes, never through a link; refused if it changed since ``info``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or now.st_ino != info.st_ino:
            raise SourceChangedError(f"{path} was replaced while it was being published")
        data = os.pread(fd, info.st_size + 1, 0)
        after = os.fstat(fd)
    except OSError as exc:
        raise SourceChangedError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) != info.st_size or after.st_mtime_ns != info.st_mtime_ns:
        raise SourceChangedError(f"{path} changed while it was being published; try again")
    return data


async def publish_tree(
    path: Path,
    sink: ChunkSink,
    config: Config,
    *,
    executor: Executor,
    strict: bool = False,
    progress: ProgressFn | None = None,
) -> PublishResult:
    """Publish a directory and everything below it; the reference is its root node's.

    ``progress(done_bytes, 0)``: the total is not known before the walk ends.
    """
    started = time.monotonic()
    path = Path(path)
    publisher = _TreePublisher(sink, config, executor, strict=strict, progress=progress)
    try:
        built = await publisher.directory(path)
    finally:
        publisher.hash_thread.shutdown(wait=False, cancel_futures=True)
    if built is None:
        raise InputError(f"cannot read directory {path}")
    await sink.flush()
    tally = publisher.tally
    reference: ReadReference = built.reference
    return PublishResult(
        reference,
        tally.size,
        tally.data_chunks,
        tally.node_chunks,
        time.monotonic() - started,
        files=tally.files,
        directories=tally.directories,
        symlinks=tally.symlinks,
        skipped=tally.skipped,
        skipped_notes=tuple(tally.skipped_notes),
    )


__all__ = ["publish_tree"]
