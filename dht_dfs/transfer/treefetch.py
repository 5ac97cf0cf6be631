"""Fetching a directory tree to disk: plan it all, then write it, never outside the output.

A tree comes from its publisher, who may be hostile: every name, size,
mode and link target in it may be chosen to hurt the fetcher. The decoder
already refuses names with "/" or NUL, "." and "..", so an entry can only
ever name a child. What is left to the fetcher is here, in two passes.

1. **Plan** (``_Planner``): walk every directory node (no file chunk),
   a few directories at a time, and refuse before any byte is written:
   names that collide on this target (a case-insensitive file system folds
   "A" and "a" into one, the trick behind git's CVE-2021-21300) or that
   the target cannot hold (longer than its NAME_MAX; on a case-insensitive
   target, characters such as ``:`` or ``\\``); a name that is another's
   part file; anything already on disk in the way (unless ``overwrite``);
   more entries than free inodes, more bytes than free space. A tree may
   name one directory node from many entries (a "zip bomb" of a DAG): the
   entry count is bounded by the free inodes, so the plan ends.
2. **Write** (``_Writer``): directories first (created ``0700``, each
   opened step by step with ``O_NOFOLLOW``, so an existing symbolic link is
   never walked through); small inlined files written in one worker call
   per directory; other files through ``FileFetch`` (part file, resume,
   verified chunks), ``tree_files_in_flight`` at a time. Symbolic links are
   created last, as links with their target as published, when nothing
   more is written: no write of ours ever goes through one. Then, bottom up,
   each directory gets its published mode (under the umask) and mtime.

Resuming: a file already there with the published size and mtime is
checked, not trusted. An inlined one is compared byte for byte; a chunked
one is renamed to its part file, where ``FileFetch`` re-encrypts each
region to compare it with the chunk id and fetches only what differs. A
file that cannot be had (a lost chunk, a corrupt manifest) does not stop
the others; the fetch then fails naming it, and running it again resumes.

What this does not defend against: a local user who can write into the
output directory while the fetch runs, and swaps a directory for a link
between our check and our write.

Must not import: dht, transport, node, or the network side of transfer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from dht_dfs.core.config import Config, format_size
from dht_dfs.core.direntry import DirEntry, EntryKind
from dht_dfs.core.errors import (
    ChunkNotFoundError,
    DhtfsError,
    InputError,
    IntegrityError,
    ManifestError,
    OutputError,
)
from dht_dfs.core.refs import ReadReference
from dht_dfs.transfer.browse import ROOT_NAME, CachingSource, list_directory
from dht_dfs.transfer.fetch import PART_SUFFIX, FileFetch, current_umask, resolve_output
from dht_dfs.transfer.pipeline import ProgressFn, first_error
from dht_dfs.transfer.ports import ChunkSource
from dht_dfs.transfer.target import (
    TargetRules,
    disk_states,
    free_space,
    make_link,
    open_below,
    probe_target,
    set_mtime_at,
    sync_tree,
    to_part,
    write_inline_files,
)

NODE_CACHE_BYTES = 64 * 1024 * 1024
"""Directory nodes kept between the two passes, so the write pass rarely fetches again."""
PLAN_DIRECTORIES_IN_FLIGHT = 8
MAX_DEPTH = 1024
"""Directories deeper than this are refused (paths past PATH_MAX, and a bomb of depth)."""
MAX_FAILURE_NOTES = 20
_FILE_FAILURES = (ChunkNotFoundError, IntegrityError, ManifestError)
"""What one file may fail with while the rest of the tree goes on."""


@dataclass(frozen=True, slots=True)
class TreeFetchResult:
    path: Path
    size: int
    """Bytes of every file in the tree (those kept from an earlier try included)."""
    files: int
    directories: int
    symlinks: int
    chunks: int
    chunks_fetched: int
    chunks_resumed: int
    files_kept: int
    """Files already there, complete and verified (an earlier, interrupted fetch)."""
    seconds: float
    kind: EntryKind = EntryKind.DIRECTORY
    """What was fetched: a directory, or an inlined file or a link of a tree."""


@dataclass(slots=True)
class _Plan:
    directories: list[tuple[tuple[str, ...], DirEntry]] = field(default_factory=list)
    """Every directory, parents before children, with its path below the output."""
    files: int = 0
    symlinks: int = 0
    entries: int = 0
    size: int = 0
    to_write: int = 0
    """Bytes of files not already there with the published size and mtime."""


def _show(path: Sequence[str]) -> str:
    return "/".join(path) or "."


class _Planner:
    """Pass 1: read every directory node, refuse what cannot be written (module docstring)."""

    def __init__(
        self,
        source: ChunkSource,
        executor: Executor,
        output: Path,
        rules: TargetRules,
        *,
        overwrite: bool,
        max_entries: int,
    ) -> None:
        self._source = source
        self._executor = executor
        self._output = output
        self._rules = rules
        self._overwrite = overwrite
        self._max_entries = max_entries
        self.plan = _Plan()

    async def run(self, root: DirEntry) -> _Plan:
        """Every directory, ``PLAN_DIRECTORIES_IN_FLIGHT`` read at a time."""
        self.plan.directories.append(((), root))
        queue: asyncio.Queue[tuple[tuple[str, ...], DirEntry]] = asyncio.Queue()
        queue.put_nowait(((), root))

        async def worker() -> None:
            while True:
                path, entry = await queue.get()
                try:
                    for child in await self._directory(path, entry):
                        queue.put_nowait(child)
                finally:
                    queue.task_done()

        workers = [asyncio.ensure_future(worker()) for _ in range(PLAN_DIRECTORIES_IN_FLIGHT)]
        joined = asyncio.ensure_future(queue.join())
        try:
            # Done when every directory is read, or when the first worker fails.
            await asyncio.wait([joined, *workers], return_when=asyncio.FIRST_COMPLETED)
            for task in workers:
                if task.done():
                    task.result()  # raises the worker's error
        finally:
            for task in (joined, *workers):
                task.cancel()
            await asyncio.gather(joined, *workers, return_exceptions=True)
        return self.plan

    async def _directory(
        self, path: tuple[str, ...], entry: DirEntry
    ) -> list[tuple[tuple[str, ...], DirEntry]]:
        if len(path) > MAX_DEPTH:
            raise InputError(f"{_show(path)}: the tree is more than {MAX_DEPTH} directories deep")
        seen: dict[str, str] = {}
        entries: list[DirEntry] = []
        async for item in list_directory(self._source, entry, self._executor):
            problem = self._rules.name_problem(item.name)
            if problem is not None:
                raise InputError(f"cannot fetch {_show((*path, item.name))!r}: its name {problem}")
            folded = self._rules.fold(item.name)
            if folded in seen:
                raise InputError(
                    f"cannot fetch into {self._output}: {_show((*path, seen[folded]))!r} and "
                    f"{item.name!r} would be one name on this case-insensitive file system"
                )
            seen[folded] = item.name
            entries.append(item)
            self.plan.entries += 1
            if self.plan.entries > self._max_entries:
                raise OutputError(
                    f"not enough free inodes in {self._output}: the tree has more than "
                    f"{self._max_entries} entries"
                )
        names = set(seen.values())
        for item in entries:
            if item.name.endswith(PART_SUFFIX) and item.name[: -len(PART_SUFFIX)] in names:
                raise InputError(
                    f"cannot fetch {_show((*path, item.name))!r}: the name is the partial "
                    f"file of {item.name[: -len(PART_SUFFIX)]!r}"
                )
        states = await asyncio.get_running_loop().run_in_executor(
            self._executor, disk_states, self._output, path, entries
        )
        children: list[tuple[tuple[str, ...], DirEntry]] = []
        for item, state in zip(entries, states, strict=True):
            self._account(path, item, state)
            if item.kind is EntryKind.DIRECTORY:
                child = ((*path, item.name), item)
                self.plan.directories.append(child)
                children.append(child)
        return children

    def _account(self, path: tuple[str, ...], item: DirEntry, state: str) -> None:
        where = _show((*path, item.name))
        if item.kind is EntryKind.FILE:
            self.plan.files += 1
            self.plan.size += item.size
            if state != "same":
                self.plan.to_write += item.size
        elif item.kind is EntryKind.SYMLINK:
            self.plan.symlinks += 1
        in_the_way = {
            EntryKind.FILE: ("directory", "other", "file", "link"),
            EntryKind.DIRECTORY: ("other", "file", "link"),
            EntryKind.SYMLINK: ("directory", "other", "file", "link"),
        }[item.kind]
        if state == "directory" and item.kind is not EntryKind.DIRECTORY:
            raise InputError(
                f"cannot fetch {where!r} into {self._output}: a directory is in the way"
            )
        if state in in_the_way and not self._overwrite:
            raise InputError(
                f"cannot fetch {where!r} into {self._output}: something else is already "
                "there; fetch to another directory or overwrite it (--force)"
            )


@dataclass(slots=True)
class _Counts:
    chunks: int = 0
    fetched: int = 0
    resumed: int = 0
    kept: int = 0
    done_bytes: int = 0
    failures: list[str] = field(default_factory=list)
    failed: int = 0


class _Writer:
    """Pass 2: write what the plan found, in the order the module docstring gives."""

    def __init__(
        self,
        source: ChunkSource,
        nodes: ChunkSource,
        config: Config,
        *,
        executor: Executor,
        output: Path,
        plan: _Plan,
        overwrite: bool,
        progress: ProgressFn | None,
        created_root: bool,
    ) -> None:
        self._source = source
        self._nodes = nodes
        self._created_root = created_root
        self._config = config
        self._executor = executor
        self._output = output
        self._plan = plan
        self._overwrite = overwrite
        self._progress = progress
        self._umask = current_umask()
        self._files = asyncio.Semaphore(config.tree_files_in_flight)
        self.counts = _Counts()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        links: list[tuple[tuple[str, ...], DirEntry]] = []
        try:
            async with asyncio.TaskGroup() as group:
                for path, directory in self._plan.directories:
                    fd = await loop.run_in_executor(
                        self._executor,
                        functools.partial(open_below, self._output, path, create=True),
                    )
                    try:
                        small: list[DirEntry] = []
                        async for item in list_directory(self._nodes, directory, self._executor):
                            if item.kind is EntryKind.SYMLINK:
                                links.append((path, item))
                            elif item.kind is EntryKind.FILE and item.inline is not None:
                                small.append(item)
                            elif item.kind is EntryKind.FILE:
                                await self._files.acquire()
                                group.create_task(self._file(path, item))
                        written = await loop.run_in_executor(
                            self._executor, write_inline_files, fd, small, self._umask
                        )
                    finally:
                        os.close(fd)
                    self.counts.kept += len(small) - written
                    self._done(sum(item.size for item in small))
        except* DhtfsError as group_error:
            raise first_error(group_error) from None
        await loop.run_in_executor(self._executor, self._finish, links)

    def _done(self, length: int) -> None:
        self.counts.done_bytes += length
        if self._progress is not None:
            self._progress(self.counts.done_bytes, self._plan.size)

    async def _file(self, path: tuple[str, ...], entry: DirEntry) -> None:
        target = self._output.joinpath(*path, entry.name)
        loop = asyncio.get_running_loop()
        counted = 0

        def progress(done: int, total: int) -> None:
            nonlocal counted
            self._done(done - counted)
            counted = done

        try:
            assert entry.reference is not None
            await loop.run_in_executor(self._executor, to_part, target, entry)
            fetch = FileFetch(
                entry.reference, self._source, self._config, executor=self._executor,
                output=target, overwrite=True, progress=progress, on_metadata=None,
                verify_hash=self._config.verify_file_hash, durable=False,
                expected_size=entry.size,
            )  # fmt: skip
            result = await fetch.run()
            await loop.run_in_executor(self._executor, set_mtime_at, target, entry)
            self.counts.chunks += result.chunks
            self.counts.fetched += result.chunks_fetched
            self.counts.resumed += result.chunks_resumed
            if result.chunks and result.chunks_resumed == result.chunks:
                self.counts.kept += 1
        except _FILE_FAILURES as error:
            self.counts.failed += 1
            if len(self.counts.failures) < MAX_FAILURE_NOTES:
                self.counts.failures.append(f"{_show((*path, entry.name))}: {error}")
        finally:
            self._done(entry.size - counted)
            self._files.release()

    def _finish(self, links: Sequence[tuple[tuple[str, ...], DirEntry]]) -> None:
        """In a worker: links last, then each directory's mode and mtime, deepest first."""
        for path, link in links:
            fd = open_below(self._output, path, create=False)
            try:
                make_link(fd, link)
            except OutputError as error:
                raise OutputError(f"{_show(path)}: {error}") from None
            finally:
                os.close(fd)
        sync_tree(self._output)
        for path, directory in reversed(self._plan.directories):
            if not path and not self._created_root:
                continue  # a directory of the user's, merged into: theirs to keep as it is
            fd = open_below(self._output, path, create=False)
            try:
                os.fchmod(fd, (directory.mode or 0o755) & ~self._umask)
                if directory.mtime_ns:
                    os.utime(fd, ns=(directory.mtime_ns, directory.mtime_ns))
            except OSError as exc:
                raise OutputError(f"cannot set mode of {_show(path)}: {exc.strerror}") from None
            finally:
                os.close(fd)


def _inspect_output(output: Path, probe: bool) -> tuple[bool, Path, TargetRules, int, int]:
    """In a worker: (whether the fetch makes ``output``, the directory that exists,
    its rules, free bytes, free inodes)."""
    created_root = not os.path.lexists(output)
    if not created_root and not output.is_dir():
        raise InputError(f"cannot fetch a directory into {output}: it is not a directory")
    existing = output if output.is_dir() else output.parent
    if not existing.is_dir():
        raise InputError(f"cannot fetch into {output}: {existing} is not a directory")
    rules = probe_target(existing) if probe else TargetRules(False, 255)
    return (created_root, existing, rules, *free_space(existing))


async def fetch_tree(
    entry: DirEntry,
    source: ChunkSource,
    config: Config,
    *,
    executor: Executor,
    output: Path,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    rules: TargetRules | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> TreeFetchResult:
    """Write the directory ``entry`` names into ``output`` (made if missing, merged into if not).

    ``rules`` (default: probed at the output) say what the target can hold;
    ``on_plan(total_bytes)`` is called once the plan is made, before any write.
    Raises InputError or OutputError before writing for anything the plan
    refuses; a DhtfsError naming the files that failed, once all others are written.
    """
    if entry.kind is not EntryKind.DIRECTORY:
        raise ValueError("fetch_tree takes a directory entry")
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    created_root, existing, probed, space, inodes = await loop.run_in_executor(
        executor, _inspect_output, output, rules is None
    )
    rules = rules or probed
    nodes = CachingSource(source, NODE_CACHE_BYTES)
    planner = _Planner(
        nodes, executor, output, rules, overwrite=overwrite, max_entries=max(0, inodes - 16)
    )
    plan = await planner.run(entry)
    if plan.to_write > space:
        raise OutputError(
            f"not enough free space in {existing}: the tree needs {plan.to_write} bytes "
            f"({format_size(plan.to_write)}), {space} bytes ({format_size(space)}) are available"
        )
    if on_plan is not None:
        on_plan(plan.size)
    writer = _Writer(
        source, nodes, config, executor=executor, output=output, plan=plan,
        overwrite=overwrite, progress=progress, created_root=created_root,
    )  # fmt: skip
    await writer.run()
    counts = writer.counts
    if counts.failed:
        first = "; ".join(counts.failures[:3])
        raise DhtfsError(
            f"{counts.failed} file(s) of the tree could not be fetched ({first}); everything "
            f"else is written in {output}: run the same fetch again to resume"
        )
    return TreeFetchResult(
        path=output,
        size=plan.size,
        files=plan.files,
        directories=len(plan.directories),
        symlinks=plan.symlinks,
        chunks=counts.chunks,
        chunks_fetched=counts.fetched,
        chunks_resumed=counts.resumed,
        files_kept=counts.kept,
        seconds=time.monotonic() - started,
    )


def _write_one(entry: DirEntry, target: Path, overwrite: bool) -> None:
    """In a worker: an inlined file or a link, written at ``target`` (its own name)."""
    if os.path.isdir(target) and not os.path.islink(target):
        raise InputError(f"cannot fetch {entry.name!r} to {target}: a directory is in the way")
    if os.path.lexists(target) and not overwrite:
        raise InputError(
            f"{target} already exists; fetch to another path or overwrite it (--force)"
        )
    named = dataclasses.replace(entry, name=target.name)
    fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if entry.kind is EntryKind.SYMLINK:
            make_link(fd, named)
        else:
            write_inline_files(fd, [named], current_umask())
    finally:
        os.close(fd)


async def fetch_entry(
    entry: DirEntry,
    source: ChunkSource,
    config: Config,
    *,
    executor: Executor,
    reference: ReadReference,
    output: Path | None,
    directory: Path,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    on_plan: Callable[[Path, int], None] | None = None,
) -> TreeFetchResult:
    """Write a directory, an inlined file or a symbolic link of a tree.

    Where: ``output`` itself (a directory fetched into an existing one is
    merged into it; a file or link into one is written inside it), or the
    entry's name in ``directory``. A file with chunks of its own goes
    through ``fetch_file``. ``on_plan(path, total_bytes)`` before any write.
    """
    name = "" if entry.name == ROOT_NAME else entry.name
    if entry.kind is EntryKind.DIRECTORY:
        output = output if output is not None else resolve_output(name, reference, directory)
        return await fetch_tree(
            entry, source, config, executor=executor, output=output, overwrite=overwrite,
            progress=progress, on_plan=functools.partial(on_plan, output) if on_plan else None,
        )  # fmt: skip
    started = time.monotonic()
    output = resolve_output(name, reference, output if output is not None else directory)
    if on_plan is not None:
        on_plan(output, entry.size if entry.kind is EntryKind.FILE else 0)
    await asyncio.get_running_loop().run_in_executor(executor, _write_one, entry, output, overwrite)
    is_file = entry.kind is EntryKind.FILE
    return TreeFetchResult(
        path=output,
        size=entry.size if is_file else 0,
        files=int(is_file),
        directories=0,
        symlinks=int(not is_file),
        chunks=0,
        chunks_fetched=0,
        chunks_resumed=0,
        files_kept=0,
        seconds=time.monotonic() - started,
        kind=entry.kind,
    )


__all__ = ["TargetRules", "TreeFetchResult", "fetch_entry", "fetch_tree", "probe_target"]
